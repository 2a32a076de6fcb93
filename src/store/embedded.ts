/**
 * Embedded coordination store for a local cluster on one machine.
 *
 * The hosts of a local cluster are separate OS processes sharing a state
 * directory, so "embedded" means a library over files in that directory, with
 * no server:
 *
 *   <state_dir>/store/<enc>.json      one record per key: {"key","version","value"}
 *                                      or a tombstone {"key","version","deleted":true}
 *   <state_dir>/store/<enc>.lock      the key's write lock while a put/cas/delete runs
 *   <state_dir>/store/<id>.lease      a lease: {"id","ttl_ms"}; it lapses ttl_ms after the file's
 *                                      modification time (wall clock of this machine)
 *   <state_dir>/store/*.tmp           files being written (ignored by readers)
 *
 * `<enc>` is the key with "/" replaced by "~" (a character keys cannot
 * contain, so the mapping is one-to-one and the directory stays flat: a key
 * and a key below it, `a` and `a/b`, never compete for one path as a file and
 * a directory would).
 *
 * Reads take no lock: every record is written to a temporary file and renamed
 * over the old one, so a reader sees the old or the new record, never a torn
 * one. Writes (put, cas, delete) of one key are mutually exclusive across
 * processes through the key's lock file, created exclusively (see
 * acquireFileLock); the lock is held for one read-modify-write, i.e. for
 * about a millisecond. Waiting for a lock is bounded (lock_timeout_ms, 2 s by
 * default) and then fails with StoreUnavailable. A lock is broken only if it
 * is stale: older than stale_lock_ms (1 s) AND its recorded owner process is
 * gone (dead, a zombie, or its pid reused by a process with a different start
 * time). A live owner's lock is never broken, however old — e.g. a host under
 * SIGSTOP blocks writers of that key (they get StoreUnavailable) rather than
 * risking a lost update when it resumes.
 *
 * Records and tombstones are src/store/record.ts's format: deleting a key
 * leaves a tombstone holding its next version, so versions of a key only
 * grow, across deletes too (no ABA for cas). Tombstones are small and never
 * removed; the store is control plane only.
 */
import { procStatFields } from "../util/proc-stat.js";
import { randomBytes } from "node:crypto";
import { mkdirSync, readFileSync } from "node:fs";
import * as fsp from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { checkExpectedVersion, encodeValue, liveVersion, parseRecord, recordText, type StoredRecord } from "./record.js";
import { checkLeaseTtl, type CoordinationStore, isValidKey, type Lease, type PutOptions, StoreError, type Versioned, validateKey, validatePrefix, type Watch } from "./store.js";
import { fileWatch } from "./file-watch.js";

export interface EmbeddedStoreOptions {
  /** Largest JSON encoding of a value, in bytes (default 1 MiB). */
  max_value_bytes?: number;
  /** How long a write waits for a key's lock before StoreUnavailable (default 2000 ms). */
  lock_timeout_ms?: number;
  /** A lock whose owner is gone may be broken once it is this old (default 1000 ms). */
  stale_lock_ms?: number;
  /** fdatasync each record before renaming it into place (default true). */
  fsync?: boolean;
}

export const EMBEDDED_STORE_DEFAULTS = {
  max_value_bytes: 1024 * 1024,
  lock_timeout_ms: 2000,
  stale_lock_ms: 1000,
  fsync: true,
} as const satisfies Required<EmbeddedStoreOptions>;

/** Lease TTLs an EmbeddedStore remembers before it forgets them all and reads them again. */
const LEASE_TTLS_KNOWN_MAX = 1024;

export class EmbeddedStore implements CoordinationStore {
  /** The directory holding the records: `<state_dir>/store`. */
  readonly dir: string;
  private readonly opts: Required<EmbeddedStoreOptions>;
  private closed = false;
  private readonly inflight = new Set<Promise<unknown>>();
  private dir_ready: Promise<unknown> | null = null;
  /** TTL of each lease seen, by id (see leaseTtl). */
  private readonly leaseTtls = new Map<string, number>();

  constructor(state_dir: string, options: EmbeddedStoreOptions = {}) {
    this.dir = path.join(path.resolve(state_dir), "store");
    this.opts = { ...EMBEDDED_STORE_DEFAULTS, ...options };
  }

  async get<T>(key: string): Promise<Versioned<T> | null> {
    validateKey(key);
    return this.op(`get ${key}`, async () => {
      const rec = await this.read(key);
      return rec === null || rec.deleted ? null : { key, value: rec.value as T, version: rec.version };
    });
  }

  async put<T>(key: string, value: T, options: PutOptions = {}): Promise<number> {
    validateKey(key);
    const json = encodeValue(key, value, this.opts.max_value_bytes);
    const lease = options.lease;
    if (lease && !(lease instanceof EmbeddedLease && lease.store === this.dir)) throw new StoreError("InvalidArgument", `put ${key}: a lease of another store`);
    return this.op(`put ${key}`, () =>
      this.withLock(key, async () => {
        if (lease && !(await this.leaseAlive(lease.id))) throw new StoreError("LeaseLost", `put ${key}: lease ${lease.id} lapsed`);
        const cur = await this.read(key);
        const version = (cur?.version ?? 0) + 1;
        await this.write(key, version, json, lease?.id);
        return version;
      }),
    );
  }

  async grantLease(ttl_ms: number): Promise<Lease> {
    checkLeaseTtl(ttl_ms);
    return this.op("grant lease", async () => {
      const lease = new EmbeddedLease(this, randomBytes(8).toString("hex"), ttl_ms);
      await this.writeLease(lease.id, ttl_ms);
      return lease;
    });
  }

  /**
   * @internal EmbeddedLease.keepAlive. A renewal moves the lease file's
   * modification time: two system calls (a stat, then utimes), where
   * rewriting the file took eight (read it, write a new one, rename it). Every
   * host renews once a second, so this is most of an idle host's store work;
   * and a renewal changes only the file's metadata, which watches ignore.
   */
  async renewLease(id: string, _ttl_ms: number): Promise<void> {
    return this.op(`keep lease ${id} alive`, async () => {
      if (!(await this.leaseAlive(id))) throw new StoreError("LeaseLost", `lease ${id} lapsed`);
      const now = new Date();
      try {
        await fsp.utimes(this.leasePath(id), now, now);
      } catch (e) {
        // Revoked between the two calls.
        if (isErrno(e) && e.code === "ENOENT") throw new StoreError("LeaseLost", `lease ${id} lapsed`);
        throw e;
      }
    });
  }

  /** @internal EmbeddedLease.revoke */
  async revokeLease(id: string): Promise<void> {
    return this.op(`revoke lease ${id}`, () => fsp.rm(this.leasePath(id), { force: true }));
  }

  async cas<T>(key: string, expected_version: number, value: T): Promise<number | null> {
    validateKey(key);
    checkExpectedVersion(key, expected_version);
    const json = encodeValue(key, value, this.opts.max_value_bytes);
    return this.op(`cas ${key}`, async () => {
      // Versions only grow, so a mismatch seen without the lock is a valid
      // outcome (the cas linearises at that read) and spares the lock.
      if (liveVersion(await this.read(key)) !== expected_version) return null;
      return this.withLock(key, async () => {
        const cur = await this.read(key);
        if (liveVersion(cur) !== expected_version) return null;
        const version = (cur?.version ?? 0) + 1;
        await this.write(key, version, json);
        return version;
      });
    });
  }

  async list<T>(prefix: string): Promise<Versioned<T>[]> {
    validatePrefix(prefix);
    return this.op(`list ${prefix}`, async () => (await this.listLive(prefix)).map(({ rec }) => ({ key: rec.key, value: rec.value as T, version: rec.version })));
  }

  /** The live records under `prefix`, sorted by key, each with the expiry of the lease it lives by (if any). */
  private async listLive(prefix: string): Promise<{ rec: LiveRecord; lease?: { id: string; expires_at_ms: number } }[]> {
    const keys: string[] = [];
    for (const name of await fsp.readdir(this.dir)) {
      if (!name.endsWith(".json")) continue;
      const key = decodeKey(name.slice(0, -".json".length));
      if (!key.startsWith(prefix) || !isValidKey(key)) continue;
      keys.push(key);
    }
    const found = await Promise.all(
      keys.map(async (key) => {
        const rec = await this.readRecord(key);
        if (rec === null || rec.deleted) return null;
        if (rec.lease === undefined) return { rec };
        const expires_at_ms = await this.leaseExpiry(rec.lease);
        return expires_at_ms !== null && expires_at_ms > Date.now() ? { rec, lease: { id: rec.lease, expires_at_ms } } : null;
      }),
    );
    const out = found.filter((f) => f !== null);
    return out.sort((a, b) => (a.rec.key < b.rec.key ? -1 : a.rec.key > b.rec.key ? 1 : 0));
  }

  async delete(key: string): Promise<void> {
    validateKey(key);
    return this.op(`delete ${key}`, async () => {
      const first = await this.read(key);
      if (first === null || first.deleted) return;
      await this.withLock(key, async () => {
        const cur = await this.read(key);
        if (cur === null || cur.deleted) return;
        await this.write(key, cur.version + 1, null);
      });
    });
  }

  watch(prefix: string, onChange: () => void): Watch {
    validatePrefix(prefix);
    // The directory must exist to be watched (the store makes it lazily, on its first operation).
    mkdirSync(this.dir, { recursive: true });
    return fileWatch(
      {
        dir: this.dir,
        record_prefix: encodeKey(prefix),
        list: (p) => this.list(p),
        scan: () =>
          this.op(`watch ${prefix}`, async () => {
            const live = await this.listLive(prefix);
            const leases = new Map<string, number>();
            for (const { lease } of live) if (lease) leases.set(lease.id, Math.min(leases.get(lease.id) ?? Infinity, lease.expires_at_ms));
            return { signature: live.map(({ rec }) => `${rec.key}@${rec.version}`).join(","), leases };
          }),
      },
      prefix,
      onChange,
    );
  }

  async close(): Promise<void> {
    this.closed = true;
    await Promise.allSettled([...this.inflight]);
  }

  /**
   * Takes the write lock of `key` and keeps it until release() (or until the
   * process dies). For tests of lock recovery and for tools; put, cas and
   * delete take the lock themselves.
   */
  async lockForTesting(key: string): Promise<FileLock> {
    validateKey(key);
    return this.op(`lock ${key}`, () => this.acquire(key));
  }

  // ---- internals ----------------------------------------------------------

  private async op<R>(what: string, fn: () => Promise<R>): Promise<R> {
    if (this.closed) throw new StoreError("StoreUnavailable", `${what}: store is closed`);
    const p = (async () => {
      try {
        this.dir_ready ??= fsp.mkdir(this.dir, { recursive: true });
        await this.dir_ready;
        return await fn();
      } catch (e) {
        if (e instanceof StoreError) throw e;
        if (isErrno(e)) {
          if (this.dir_ready !== null && e.syscall === "mkdir") this.dir_ready = null; // let a later call try again
          throw new StoreError("StoreUnavailable", `${what}: ${e.message}`, { cause: e });
        }
        throw e;
      }
    })();
    this.inflight.add(p);
    try {
      return await p;
    } finally {
      this.inflight.delete(p);
    }
  }

  private dataPath(key: string): string {
    return path.join(this.dir, `${encodeKey(key)}.json`);
  }

  private acquire(key: string): Promise<FileLock> {
    const data = this.dataPath(key);
    return acquireFileLock(path.join(this.dir, `${encodeKey(key)}.lock`), {
      timeout_ms: this.opts.lock_timeout_ms,
      stale_ms: this.opts.stale_lock_ms,
      label: `key ${key}`,
      // Called while the dead owner's lock is still in place, so no one else
      // can be writing a temporary file for this key.
      on_break: (owner_pid) => removeTempFiles(data, owner_pid),
    });
  }

  private async withLock<R>(key: string, fn: () => Promise<R>): Promise<R> {
    const lock = await this.acquire(key);
    try {
      return await fn();
    } finally {
      await lock.release();
    }
  }

  private leasePath(id: string): string {
    return path.join(this.dir, `${id}.lease`);
  }

  private async writeLease(id: string, ttl_ms: number): Promise<void> {
    const file = this.leasePath(id);
    const tmp = `${file}.${process.pid}.${nonce()}.tmp`;
    await fsp.writeFile(tmp, JSON.stringify({ id, ttl_ms }));
    // The kernel stamps a new file with its coarse clock (a tick behind): the lease runs from now.
    const now = new Date();
    await fsp.utimes(tmp, now, now);
    await fsp.rename(tmp, file);
    this.leaseTtls.set(id, ttl_ms);
  }

  /** Whether lease `id` exists and has not expired (an unreadable lease file counts as lapsed). */
  private async leaseAlive(id: string): Promise<boolean> {
    const expires_at_ms = await this.leaseExpiry(id);
    return expires_at_ms !== null && expires_at_ms > Date.now();
  }

  /** When lease `id` lapses (wall clock), or null if it is gone or unreadable. */
  private async leaseExpiry(id: string): Promise<number | null> {
    let modified_ms: number;
    try {
      modified_ms = (await fsp.stat(this.leasePath(id))).mtimeMs;
    } catch (e) {
      if (isErrno(e) && e.code === "ENOENT") return null;
      throw e;
    }
    const ttl_ms = await this.leaseTtl(id);
    return ttl_ms === null ? null : modified_ms + ttl_ms;
  }

  /** A lease's TTL (it never changes: read from its file once), or null if the file is gone or unreadable. */
  private async leaseTtl(id: string): Promise<number | null> {
    const known = this.leaseTtls.get(id);
    if (known !== undefined) return known;
    let text: string;
    try {
      text = await fsp.readFile(this.leasePath(id), "utf8");
    } catch (e) {
      if (isErrno(e) && e.code === "ENOENT") return null;
      throw e;
    }
    let ttl_ms: unknown;
    try {
      ttl_ms = (JSON.parse(text) as { ttl_ms?: unknown }).ttl_ms;
    } catch {
      return null;
    }
    if (typeof ttl_ms !== "number" || !(ttl_ms > 0)) return null;
    // Bounded: lease ids are random, one per registration; a long-lived host sees few.
    if (this.leaseTtls.size >= LEASE_TTLS_KNOWN_MAX) this.leaseTtls.clear();
    this.leaseTtls.set(id, ttl_ms);
    return ttl_ms;
  }

  /** The stored record of `key`, or null if there is no file; a value whose lease lapsed reads as deleted. */
  private async read(key: string): Promise<StoredRecord | null> {
    const rec = await this.readRecord(key);
    if (rec && !rec.deleted && rec.lease !== undefined && !(await this.leaseAlive(rec.lease))) return { key, version: rec.version, deleted: true };
    return rec;
  }

  private async readRecord(key: string): Promise<StoredRecord | null> {
    const file = this.dataPath(key);
    let text: string;
    try {
      text = await fsp.readFile(file, "utf8");
    } catch (e) {
      if (isErrno(e) && e.code === "ENOENT") return null;
      throw e;
    }
    return parseRecord(key, text, file);
  }

  /** Writes the record (value_json null = tombstone) atomically; the caller holds the key's lock. */
  private async write(key: string, version: number, value_json: string | null, lease?: string): Promise<void> {
    const text = recordText(key, version, value_json, lease);
    const file = this.dataPath(key);
    const tmp = `${file}.${process.pid}.${nonce()}.tmp`;
    try {
      const fh = await fsp.open(tmp, "wx");
      try {
        await fh.writeFile(text, "utf8");
        if (this.opts.fsync) await fh.datasync();
      } finally {
        await fh.close();
      }
      await fsp.rename(tmp, file);
    } catch (e) {
      await fsp.unlink(tmp).catch(() => {});
      throw e;
    }
  }
}

type LiveRecord = Extract<StoredRecord, { deleted: false }>;

function encodeKey(key: string): string {
  return key.replaceAll("/", "~");
}

function decodeKey(name: string): string {
  return name.replaceAll("~", "/");
}

async function removeTempFiles(target: string, pid: number): Promise<void> {
  const dir = path.dirname(target);
  const start = `${path.basename(target)}.${pid}.`;
  const names = await fsp.readdir(dir).catch(() => [] as string[]);
  await Promise.all(names.filter((n) => n.startsWith(start) && n.endsWith(".tmp")).map((n) => fsp.unlink(path.join(dir, n)).catch(() => {})));
}

// ---- exclusive lock files ---------------------------------------------------

/** Contents of a lock file. */
export interface LockOwner {
  pid: number;
  /** Start time of the owner process in clock ticks since boot (/proc/<pid>/stat), null where unknown. */
  start: string | null;
  hostname: string;
  nonce: string;
  created_ms: number;
}

export interface FileLockOptions {
  /** Give up (StoreUnavailable) after waiting this long; 0 = one attempt, plus breaking a stale lock. */
  timeout_ms: number;
  /** See EmbeddedStoreOptions.stale_lock_ms. */
  stale_ms: number;
  /** For error messages, e.g. "key hosts/h1". */
  label?: string;
  /** Runs after a stale lock was verified and before it is removed. */
  on_break?: (owner_pid: number) => Promise<void>;
}

export class FileLock {
  private released = false;

  constructor(
    readonly path: string,
    private readonly nonce: string,
  ) {}

  /** Removes the lock file if it is still this lock's; idempotent. */
  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    const held = await readLock(this.path);
    if (held !== null && held.owner?.nonce === this.nonce) await fsp.unlink(this.path).catch(() => {});
  }
}

/**
 * Takes an exclusive lock file. The lock's contents (owner pid, process start
 * time, host name, a nonce) are written to a private temporary file first and
 * then hard-linked to `lock_path`: link(2) fails with EEXIST if the lock
 * exists, exactly like open(O_CREAT|O_EXCL), but the lock never appears
 * half-written, so a lock with unreadable contents is never mistaken for a
 * crashed owner's.
 *
 * While the lock is held by someone else the caller retries with a small
 * randomized exponential backoff (1 ms .. 20 ms). A lock is stale when it is
 * older than `stale_ms` and its owner is gone; a stale lock is removed under
 * a second lock (`<lock_path>.break`) after checking that the lock file still
 * has the contents judged stale, so two processes breaking the same stale
 * lock cannot remove a fresh lock taken in between.
 */
export async function acquireFileLock(lock_path: string, opts: FileLockOptions): Promise<FileLock> {
  const label = opts.label ?? lock_path;
  const id = nonce();
  const tmp = `${lock_path}.${process.pid}.${id}.tmp`;
  await fsp.writeFile(tmp, JSON.stringify(selfOwner(id)), { flag: "wx" });
  const deadline = Date.now() + opts.timeout_ms;
  let delay = 1;
  let first_pass = true;
  try {
    for (;;) {
      try {
        await fsp.link(tmp, lock_path);
        return new FileLock(lock_path, id);
      } catch (e) {
        if (!(isErrno(e) && e.code === "EEXIST")) throw e;
      }
      const held = await readLock(lock_path);
      // Gone (released or broken just now): try again at once, while in time.
      const gone = held === null || (isStale(held, opts.stale_ms) && (await breakStaleLock(lock_path, held, opts)));
      const now = Date.now();
      if (now >= deadline && !(gone && first_pass)) {
        const who =
          held === null ? "others (contended)"
          : held.owner ? `pid ${held.owner.pid}${held.owner.hostname !== os.hostname() ? ` on ${held.owner.hostname}` : ""} for ${Math.round(held.age_ms)} ms`
          : `an unknown owner for ${Math.round(held.age_ms)} ms`;
        throw new StoreError("StoreUnavailable", `${label}: lock ${lock_path} held by ${who}; gave up after ${opts.timeout_ms} ms`);
      }
      first_pass = false;
      if (gone) continue;
      await sleep(Math.min(delay * (0.5 + Math.random()), deadline - now));
      delay = Math.min(delay * 2, 20);
    }
  } finally {
    await fsp.unlink(tmp).catch(() => {});
  }
}

interface HeldLock {
  raw: string;
  /** null if the contents cannot be parsed. */
  owner: LockOwner | null;
  age_ms: number;
}

/** The lock file as it is now, or null if there is none. */
async function readLock(lock_path: string): Promise<HeldLock | null> {
  let fh: fsp.FileHandle;
  try {
    fh = await fsp.open(lock_path, "r");
  } catch (e) {
    if (isErrno(e) && e.code === "ENOENT") return null;
    throw e;
  }
  try {
    const st = await fh.stat();
    const raw = await fh.readFile("utf8");
    const owner = parseOwner(raw);
    // ctime moves when the file is linked into place; created_ms is when the
    // owner wrote its temporary file. Age counts from the later of the two.
    const since = Math.max(st.ctimeMs, st.mtimeMs, owner?.created_ms ?? 0);
    return { raw, owner, age_ms: Date.now() - since };
  } finally {
    await fh.close();
  }
}

function parseOwner(raw: string): LockOwner | null {
  try {
    const o = JSON.parse(raw) as Partial<LockOwner>;
    if (typeof o !== "object" || o === null) return null;
    if (!Number.isSafeInteger(o.pid) || typeof o.hostname !== "string" || typeof o.nonce !== "string" || typeof o.created_ms !== "number") return null;
    if (o.start !== null && typeof o.start !== "string") return null;
    return o as LockOwner;
  } catch {
    return null;
  }
}

function isStale(held: HeldLock, stale_ms: number): boolean {
  if (held.age_ms < stale_ms) return false;
  if (held.owner === null) return true; // never written by acquireFileLock: garbage
  return !isLockOwnerAlive(held.owner);
}

/** Whether the recorded owner may still be running. Owners on another host are assumed alive. */
export function isLockOwnerAlive(owner: LockOwner): boolean {
  if (owner.hostname !== os.hostname()) return true;
  if (!isProcessAlive(owner.pid)) return false;
  if (owner.start !== null) {
    const now = processStartTicks(owner.pid);
    if (now !== null && now !== owner.start) return false; // pid reused
  }
  return true;
}

/** Removes `held` if it is still the lock at `lock_path`; true if the lock is gone. */
async function breakStaleLock(lock_path: string, held: HeldLock, opts: FileLockOptions): Promise<boolean> {
  const breaker = `${lock_path}.break`;
  const id = nonce();
  const tmp = `${breaker}.${process.pid}.${id}.tmp`;
  await fsp.writeFile(tmp, JSON.stringify(selfOwner(id)), { flag: "wx" });
  try {
    try {
      await fsp.link(tmp, breaker);
    } catch (e) {
      if (!(isErrno(e) && e.code === "EEXIST")) throw e;
      // Someone else is breaking it (for microseconds), or died doing so.
      const other = await readLock(breaker);
      if (other !== null && isStale(other, opts.stale_ms)) await fsp.unlink(breaker).catch(() => {});
      return false;
    }
    try {
      const now = await readLock(lock_path);
      if (now === null) return true;
      if (now.raw !== held.raw) return false;
      if (held.owner !== null) {
        await opts.on_break?.(held.owner.pid);
        await fsp.unlink(`${lock_path}.${held.owner.pid}.${held.owner.nonce}.tmp`).catch(() => {});
      }
      await fsp.unlink(lock_path).catch((e: unknown) => {
        if (!(isErrno(e) && e.code === "ENOENT")) throw e;
      });
      return true;
    } finally {
      await new FileLock(breaker, id).release();
    }
  } finally {
    await fsp.unlink(tmp).catch(() => {});
  }
}

let self_start: string | null | undefined;

function selfOwner(id: string): LockOwner {
  self_start ??= processStartTicks(process.pid);
  return { pid: process.pid, start: self_start, hostname: os.hostname(), nonce: id, created_ms: Date.now() };
}

function nonce(): string {
  return randomBytes(8).toString("hex");
}

function isErrno(e: unknown): e is NodeJS.ErrnoException {
  return e instanceof Error && typeof (e as NodeJS.ErrnoException).code === "string";
}

// ---- processes ----------------------------------------------------------------
// Shared with src/cluster/local-cluster.ts (which must never signal a process
// that merely reuses a recorded pid).


/**
 * Whether `pid` names a running process: signal 0 reaches it and (where
 * /proc exists) it is not a zombie. A process owned by another user counts as
 * running (EPERM).
 */
export function isProcessAlive(pid: number): boolean {
  if (!Number.isSafeInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
  } catch (e) {
    if (!(isErrno(e) && e.code === "EPERM")) return false;
  }
  const state = procStatFields(pid)?.[0];
  return state !== "Z" && state !== "X" && state !== "x";
}

/** The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), null where unknown. */
export function processStartTicks(pid: number): string | null {
  return procStatFields(pid)?.[19] ?? null;
}

let boot_time_ms: number | null | undefined;

/**
 * The process's start time as a wall-clock time in ms, accurate to about a
 * second (boot time has a resolution of 1 s; USER_HZ is taken to be 100, as
 * on every mainstream Linux architecture). Null where there is no /proc.
 */
export function processStartMs(pid: number): number | null {
  const ticks = processStartTicks(pid);
  if (ticks === null) return null;
  if (boot_time_ms === undefined) {
    try {
      const m = /^btime (\d+)$/m.exec(readFileSync("/proc/stat", "utf8"));
      boot_time_ms = m ? Number(m[1]) * 1000 : null;
    } catch {
      boot_time_ms = null;
    }
  }
  return boot_time_ms === null ? null : boot_time_ms + Number(ticks) * 10;
}

/** A lease of an EmbeddedStore: its expiry in a file of the store's directory (see the file comment). */
class EmbeddedLease implements Lease {
  readonly store: string;
  constructor(
    private readonly owner: EmbeddedStore,
    readonly id: string,
    readonly ttl_ms: number,
  ) {
    this.store = owner.dir;
  }

  keepAlive(): Promise<void> {
    return this.owner.renewLease(this.id, this.ttl_ms);
  }

  revoke(): Promise<void> {
    return this.owner.revokeLease(this.id);
  }
}
