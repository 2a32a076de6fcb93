/**
 * The coordination store held in one process's memory: for clusters whose
 * hosts all live in this process (`cohort run`'s in-process cluster). The
 * same contract (src/store/store.ts, tested with the other stores in
 * test/store-contract.test.ts) and the same checks of values and versions
 * (src/store/record.ts); values are kept as JSON, so no caller can change
 * what another reads, and a delete leaves a tombstone, so versions never go
 * back.
 */
import { randomBytes } from "node:crypto";
import { checkExpectedVersion, encodeValue } from "./record.js";
import { checkLeaseTtl, StoreError, validateKey, validatePrefix, type CoordinationStore, type Lease, type PutOptions, type Versioned, pollingWatch, type Watch } from "./store.js";

/** Values larger than this (as JSON) are refused by default, like the embedded store's. */
const VALUE_BYTES_MAX = 1 << 20;

type Entry = { version: number } & ({ deleted: true } | { deleted: false; json: string; lease?: string });

export class MemoryStore implements CoordinationStore {
  private readonly entries = new Map<string, Entry>();
  /** Live leases: id -> expiry (ms, this process's wall clock). */
  private readonly leases = new Map<string, number>();
  private closed = false;
  private readonly max_value_bytes: number;

  constructor(options: { max_value_bytes?: number } = {}) {
    this.max_value_bytes = options.max_value_bytes ?? VALUE_BYTES_MAX;
  }

  async get<T>(key: string): Promise<Versioned<T> | null> {
    this.check();
    validateKey(key);
    const e = this.read(key);
    return e && !e.deleted ? { key, value: JSON.parse(e.json) as T, version: e.version } : null;
  }

  async put<T>(key: string, value: T, options: PutOptions = {}): Promise<number> {
    this.check();
    validateKey(key);
    const json = encodeValue(key, value, this.max_value_bytes);
    const lease = options.lease;
    if (lease && !(lease instanceof MemoryLease && lease.owner === this)) throw new StoreError("InvalidArgument", `put ${key}: a lease of another store`);
    if (lease && !this.leaseAlive(lease.id)) throw new StoreError("LeaseLost", `put ${key}: lease ${lease.id} lapsed`);
    const version = (this.read(key)?.version ?? 0) + 1;
    this.entries.set(key, { version, deleted: false, json, ...(lease ? { lease: lease.id } : {}) });
    return version;
  }

  /** `expected_version` 0: create only. Returns the new version, or null when the key moved on. */
  async cas<T>(key: string, expected_version: number, value: T): Promise<number | null> {
    this.check();
    validateKey(key);
    checkExpectedVersion(key, expected_version);
    const json = encodeValue(key, value, this.max_value_bytes);
    const current = this.read(key);
    if ((current && !current.deleted ? current.version : 0) !== expected_version) return null; // 0: absent or deleted
    const version = (current?.version ?? 0) + 1;
    this.entries.set(key, { version, deleted: false, json });
    return version;
  }

  async list<T>(prefix: string): Promise<Versioned<T>[]> {
    this.check();
    validatePrefix(prefix);
    const out: Versioned<T>[] = [];
    for (const key of [...this.entries.keys()].filter((k) => k.startsWith(prefix)).sort((a, b) => (a < b ? -1 : a > b ? 1 : 0))) {
      const e = this.read(key);
      if (e && !e.deleted) out.push({ key, value: JSON.parse(e.json) as T, version: e.version });
    }
    return out;
  }

  async delete(key: string): Promise<void> {
    this.check();
    validateKey(key);
    const e = this.read(key);
    if (e && !e.deleted) this.entries.set(key, { version: e.version + 1, deleted: true });
  }

  async grantLease(ttl_ms: number): Promise<Lease> {
    this.check();
    checkLeaseTtl(ttl_ms);
    const id = randomBytes(8).toString("hex");
    this.leases.set(id, Date.now() + ttl_ms);
    return new MemoryLease(this, id, ttl_ms);
  }

  /** @internal MemoryLease.keepAlive */
  renewLease(id: string, ttl_ms: number): void {
    this.check();
    if (!this.leaseAlive(id)) throw new StoreError("LeaseLost", `lease ${id} lapsed`);
    this.leases.set(id, Date.now() + ttl_ms);
  }

  /** @internal MemoryLease.revoke */
  revokeLease(id: string): void {
    this.check();
    this.leases.delete(id);
  }

  watch(prefix: string, onChange: () => void): Watch {
    return pollingWatch(this, prefix, onChange);
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  /** The entry of `key`; a value whose lease lapsed reads as deleted (its version stays). */
  private read(key: string): Entry | undefined {
    const e = this.entries.get(key);
    if (e && !e.deleted && e.lease !== undefined && !this.leaseAlive(e.lease)) return { version: e.version, deleted: true };
    return e;
  }

  private leaseAlive(id: string): boolean {
    const expires = this.leases.get(id);
    return expires !== undefined && expires > Date.now();
  }

  private check(): void {
    if (this.closed) throw new StoreError("StoreUnavailable", "the store is closed");
  }
}

class MemoryLease implements Lease {
  constructor(
    readonly owner: MemoryStore,
    readonly id: string,
    readonly ttl_ms: number,
  ) {}

  async keepAlive(): Promise<void> {
    this.owner.renewLease(this.id, this.ttl_ms);
  }

  async revoke(): Promise<void> {
    this.owner.revokeLease(this.id);
  }
}
