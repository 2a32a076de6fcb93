/**
 * Coordination store on etcd v3 (through the `etcd3` client), for hosts on
 * several machines: the same CoordinationStore contract as the embedded store
 * (src/store/store.ts), the same record per key (src/store/record.ts) as the
 * etcd value of `<prefix><key>`.
 *
 * Every write is one etcd transaction guarded by the key's mod_revision as
 * read just before (or "the key was never created"): put and delete retry on
 * a lost race, cas re-reads and fails if the version it expected is gone. The
 * record's own version, not etcd's per-key `version` (which restarts when a
 * key is deleted), is the contract's version, and a delete writes a
 * tombstone, so versions never go back (no ABA).
 *
 * Fault handling: the client retries nothing on its own (a write retried
 * after a lost reply could report "someone else wrote first" for its own
 * write) and opens no circuit breaker (decisions must not wait seconds after
 * etcd comes back). An unreachable etcd, a deadline passed or a closed store
 * is StoreUnavailable, which callers treat as "try again later"; every call
 * has a deadline (call_timeout_ms).
 */
import { noop } from "cockatiel";
import { createRequire } from "node:module";
import type { Etcd3, IKeyValue, Lease as Etcd3Lease, Namespace } from "etcd3";
import { checkExpectedVersion, encodeValue, liveVersion, parseRecord, recordText, type StoredRecord } from "./record.js";
import { checkLeaseTtl, type CoordinationStore, isValidKey, type Lease, pollingWatch, type PutOptions, StoreError, type Versioned, validateKey, validatePrefix, type Watch } from "./store.js";

/**
 * etcd3 and its gRPC stack take ≈ 0.2 s of main-thread time to load: loaded
 * with the first EtcdStore, not by every CLI command and every host on the
 * embedded store (a host's main thread also answers heartbeats).
 */
let etcd3Module: typeof import("etcd3") | null = null;
function etcd3(): typeof import("etcd3") {
  return (etcd3Module ??= createRequire(import.meta.url)("etcd3") as typeof import("etcd3"));
}

export interface EtcdStoreOptions {
  /** `host:port` of each etcd member (plain HTTP/2 gRPC). */
  endpoints: string[];
  /** Prefix of every key in etcd (default "cohort/"), so one etcd can serve other users too. */
  prefix?: string;
  /** Largest JSON encoding of a value, in bytes (default 1 MiB, as the embedded store; etcd's own limit is 1.5 MiB). */
  max_value_bytes?: number;
  /** Deadline of each call (default 2000 ms). */
  call_timeout_ms?: number;
  /** Deadline for connecting (default 2000 ms). */
  dial_timeout_ms?: number;
}

export const ETCD_STORE_DEFAULTS = {
  prefix: "cohort/",
  max_value_bytes: 1024 * 1024,
  call_timeout_ms: 2000,
  dial_timeout_ms: 2000,
} as const;

/** Marker keys of live leases (not valid keys: list skips them). */
const LEASE_MARKER_PREFIX = "_leases/";

/** A write lost its race this many times in a row: StoreUnavailable rather than spinning on a key someone hammers. */
const WRITE_ATTEMPTS_MAX = 50;

interface Read {
  record: StoredRecord;
  /** etcd's mod_revision of the key when read: the guard of the next write. */
  mod_revision: string;
}

export class EtcdStore implements CoordinationStore {
  private readonly client: Etcd3;
  private readonly ns: Namespace;
  private readonly opts: Required<Omit<EtcdStoreOptions, "endpoints">> & { endpoints: string[] };
  private closed = false;
  private readonly inflight = new Set<Promise<unknown>>();

  constructor(options: EtcdStoreOptions) {
    if (options.endpoints.length === 0) throw new StoreError("InvalidArgument", "etcd store: no endpoint given");
    this.opts = { ...ETCD_STORE_DEFAULTS, ...options };
    const call_timeout_ms = this.opts.call_timeout_ms;
    this.client = new (etcd3().Etcd3)({
      hosts: this.opts.endpoints.map((e) => `http://${e}`),
      dialTimeout: this.opts.dial_timeout_ms,
      defaultCallOptions: (context) => (context.isStream ? {} : { deadline: Date.now() + call_timeout_ms }),
      faultHandling: { host: () => noop, global: noop },
    });
    this.ns = this.client.namespace(this.opts.prefix);
  }

  async get<T>(key: string): Promise<Versioned<T> | null> {
    validateKey(key);
    return this.op(`get ${key}`, async () => {
      const read = await this.read(key);
      return read === null || read.record.deleted ? null : { key, value: read.record.value as T, version: read.record.version };
    });
  }

  async put<T>(key: string, value: T, options: PutOptions = {}): Promise<number> {
    validateKey(key);
    const json = encodeValue(key, value, this.opts.max_value_bytes);
    const lease = options.lease;
    if (lease && !(lease instanceof EtcdLease && lease.owner === this)) throw new StoreError("InvalidArgument", `put ${key}: a lease of another store`);
    return this.op(`put ${key}`, () =>
      this.writeLoop(
        key,
        (cur) => {
          const version = (cur?.record.version ?? 0) + 1;
          return { text: recordText(key, version, json, lease?.id), result: version };
        },
        lease?.id,
      ),
    );
  }

  /** etcd counts a lease's TTL in whole seconds: ttl_ms is rounded up to one. */
  async grantLease(ttl_ms: number): Promise<Lease> {
    checkLeaseTtl(ttl_ms);
    const seconds = Math.ceil(ttl_ms / 1000);
    return this.op("grant lease", async () => {
      const lease = this.ns.lease(seconds, { autoKeepAlive: false });
      lease.on("lost", () => undefined); // reported by keepAlive's answer; an unheard 'lost' must not throw
      const id = await lease.grant();
      // The lease's marker key lives and dies with the etcd lease; records name the lease (see EtcdLease).
      await lease.put(this.markerKey(id)).value("");
      return new EtcdLease(this, lease, id, seconds * 1000);
    });
  }

  /** @internal EtcdLease: runs a lease call like any other (deadline, StoreUnavailable), a lapsed lease as LeaseLost. */
  leaseOp<R>(what: string, fn: () => Promise<R>): Promise<R> {
    return this.op(what, async () => {
      try {
        return await fn();
      } catch (e) {
        if (e instanceof etcd3().EtcdLeaseInvalidError) throw new StoreError("LeaseLost", `${what}: the lease lapsed`, { cause: e });
        throw e;
      }
    });
  }

  async cas<T>(key: string, expected_version: number, value: T): Promise<number | null> {
    validateKey(key);
    checkExpectedVersion(key, expected_version);
    const json = encodeValue(key, value, this.opts.max_value_bytes);
    return this.op(`cas ${key}`, () =>
      this.writeLoop<number | null>(key, (cur) => {
        // Versions only grow, so a mismatch is final: the cas linearises at this read.
        if (liveVersion(cur?.record ?? null) !== expected_version) return { text: null, result: null };
        const version = (cur?.record.version ?? 0) + 1;
        return { text: recordText(key, version, json), result: version };
      }),
    );
  }

  async list<T>(prefix: string): Promise<Versioned<T>[]> {
    validatePrefix(prefix);
    return this.op(`list ${prefix}`, async () => {
      const query = this.ns.getAll();
      const res = await (prefix === "" ? query : query.prefix(prefix)).exec();
      const live = new Set((await this.ns.getAll().prefix(LEASE_MARKER_PREFIX).keys()).map((k) => k.slice(LEASE_MARKER_PREFIX.length)));
      const out: Versioned<T>[] = [];
      for (const kv of res.kvs) {
        const key = this.keyOf(kv);
        if (!key.startsWith(prefix) || !isValidKey(key)) continue; // not written by this store
        const record = parseRecord(key, kv.value.toString("utf8"), this.where(key));
        if (!record.deleted && (record.lease === undefined || live.has(record.lease))) out.push({ key, value: record.value as T, version: record.version });
      }
      return out.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
    });
  }

  async delete(key: string): Promise<void> {
    validateKey(key);
    return this.op(`delete ${key}`, () =>
      this.writeLoop(key, (cur) => {
        if (cur === null || cur.record.deleted) return { text: null, result: undefined };
        return { text: recordText(key, cur.record.version + 1, null), result: undefined };
      }),
    );
  }

  /**
   * etcd watches on the prefix and on the lease markers (a key whose lease
   * lapsed reads as deleted, but only its marker changes). If a watch cannot
   * be set up (etcd away at the time), it falls back to polling.
   */
  watch(prefix: string, onChange: () => void): Watch {
    validatePrefix(prefix);
    let closed = false;
    let fallback: Watch | null = null;
    const watchers: { cancel(): Promise<void> }[] = [];
    const builder = (p: string) => (p === "" ? this.ns.watch().prefix("") : this.ns.watch().prefix(p));
    Promise.all([builder(prefix).create(), builder(LEASE_MARKER_PREFIX).create()]).then(
      (created) => {
        const [onPrefix, onMarkers] = created;
        onPrefix.on("put", () => onChange());
        onPrefix.on("delete", () => onChange());
        // A marker is put when a lease is granted, which changes no key that
        // reads; only its deletion (the lease revoked or lapsed) does.
        onMarkers.on("delete", () => onChange());
        for (const w of created) {
          // The client reconnects a broken watch by itself; nothing to do here but not crash.
          w.on("error", () => undefined);
          watchers.push(w);
        }
        if (closed) for (const w of watchers) w.cancel().catch(() => undefined);
        else onChange(); // in place: what changed meanwhile is not lost
      },
      () => {
        if (!closed) fallback = pollingWatch(this, prefix, onChange);
      },
    );
    return {
      close: () => {
        closed = true;
        fallback?.close();
        for (const w of watchers) w.cancel().catch(() => undefined);
      },
    };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.allSettled([...this.inflight]);
    this.client.close();
  }

  // ---- internals ----------------------------------------------------------

  /**
   * Read-modify-write of one key: `decide` sees the current record and says
   * what to write (text null: nothing, return `result` as is). The write
   * happens only if nobody wrote the key since the read; otherwise read again.
   */
  private async writeLoop<R>(key: string, decide: (cur: Read | null) => { text: string | null; result: R }, lease?: string): Promise<R> {
    for (let attempt = 0; attempt < WRITE_ATTEMPTS_MAX; attempt++) {
      const cur = await this.read(key);
      const { text, result } = decide(cur);
      if (text === null) return result;
      const guard = cur === null ? this.ns.if(key, "Create", "==", 0) : this.ns.if(key, "Mod", "==", cur.mod_revision);
      if (lease !== undefined) guard.and(this.markerKey(lease), "Create", ">", 0);
      const outcome = await guard.then(this.ns.put(key).value(text)).commit();
      if (outcome.succeeded) return result;
      if (lease !== undefined && !(await this.leaseAlive(lease))) throw new StoreError("LeaseLost", `${key}: lease ${lease} lapsed`);
    }
    throw new StoreError("StoreUnavailable", `${key}: ${WRITE_ATTEMPTS_MAX} writes in a row lost their race to other writers`);
  }

  /** The key's record; a value whose lease lapsed reads as deleted (its version stays: the record itself stays in etcd). */
  private async read(key: string): Promise<Read | null> {
    const res = await this.ns.get(key).exec();
    const kv = res.kvs[0];
    if (!kv) return null;
    const record = parseRecord(key, kv.value.toString("utf8"), this.where(key));
    const lapsed = !record.deleted && record.lease !== undefined && !(await this.leaseAlive(record.lease));
    return { record: lapsed ? { key, version: record.version, deleted: true } : record, mod_revision: kv.mod_revision };
  }

  /**
   * Leases: an etcd lease would delete the key itself when it lapses, and with
   * it the key's version (a re-created key would start again at 1: ABA). So a
   * record names its lease, and the lease's marker key (not a valid key, so
   * `list` skips it) is what etcd deletes.
   */
  private markerKey(lease: string): string {
    return `${LEASE_MARKER_PREFIX}${lease}`;
  }

  private async leaseAlive(lease: string): Promise<boolean> {
    return (await this.ns.get(this.markerKey(lease)).exec()).kvs.length > 0;
  }

  /** A key as returned by a namespaced range: without the prefix (the client strips it). */
  private keyOf(kv: IKeyValue): string {
    return kv.key.toString("utf8");
  }

  private where(key: string): string {
    return `etcd key ${this.opts.prefix}${key}`;
  }

  private async op<R>(what: string, fn: () => Promise<R>): Promise<R> {
    if (this.closed) throw new StoreError("StoreUnavailable", `${what}: store is closed`);
    const p = (async () => {
      try {
        return await fn();
      } catch (e) {
        if (e instanceof StoreError) throw e;
        // Every other failure is the client's or the server's (unreachable, deadline, closed, refused).
        throw new StoreError("StoreUnavailable", `${what}: etcd at ${this.opts.endpoints.join(",")}: ${(e as Error).message}`, { cause: e });
      }
    })();
    this.inflight.add(p);
    try {
      return await p;
    } finally {
      this.inflight.delete(p);
    }
  }
}

/**
 * A lease of an EtcdStore: an etcd lease, kept alive by its holder (no
 * automatic keep-alive: the holder decides, and learns at once when it
 * lapsed), with a marker key that etcd deletes when it lapses.
 */
class EtcdLease implements Lease {
  constructor(
    readonly owner: EtcdStore,
    private readonly lease: Etcd3Lease,
    readonly id: string,
    readonly ttl_ms: number,
  ) {}

  keepAlive(): Promise<void> {
    return this.owner.leaseOp(`keep lease ${this.id} alive`, async () => {
      const res = await this.lease.keepaliveOnce();
      if (res.TTL === "0") throw new StoreError("LeaseLost", `lease ${this.id} lapsed`);
    });
  }

  revoke(): Promise<void> {
    return this.owner.leaseOp(`revoke lease ${this.id}`, () => this.lease.revoke());
  }
}
