/**
 * The coordination store: hosts, leases, placement, incarnations and leader
 * leases (docs/ARCHITECTURE.md, "Hosts, the store and failover"). One interface,
 * two implementations: embedded (src/store/embedded.ts, files in the cluster's
 * state directory, for a local cluster on one machine) and etcd v3
 * (src/store/etcd.ts, for hosts on several machines).
 *
 * The store is control plane only and never on the per-epoch data path, so
 * values are small JSON documents and every operation may take milliseconds.
 *
 * Versions: a key's version is >= 1 and grows by exactly 1 with every write
 * (put, successful cas, delete). It never goes back, not even when the key is
 * deleted and created again, so a `cas` holding a version read before a
 * delete can never succeed against the re-created key (no ABA).
 */

export interface Versioned<T> {
  key: string;
  value: T;
  /** >= 1; +1 per write of this key. */
  version: number;
}

/**
 * A lease: keys put with it exist only while it lives. It lapses ttl_ms after
 * it was granted or last kept alive (the store decides; a holder that cannot
 * reach the store must assume the worst once ttl_ms passed), or when revoked.
 * A key whose lease lapsed reads as deleted; its versions go on growing.
 * Hosts register with one (`hosts/<id>`), so a dead host's entry goes away.
 */
export interface Lease {
  readonly id: string;
  readonly ttl_ms: number;
  /** Renews it for ttl_ms; StoreError LeaseLost if it lapsed already (its keys are gone). */
  keepAlive(): Promise<void>;
  /** Ends it now: its keys go. */
  revoke(): Promise<void>;
}

export interface PutOptions {
  /** The key lives only as long as this lease (granted by the same store). */
  lease?: Lease;
}

/** Shortest lease a store grants (etcd counts whole seconds: it grants at least this, rounded up to a second). */
export const LEASE_TTL_MS_MIN = 1000;

/** A watch on a prefix (CoordinationStore.watch); close() stops it. */
export interface Watch {
  close(): void;
}

/** How often a store without change notifications (the memory store; the file store where the kernel gives none) looks for changes under a watched prefix. */
export const WATCH_POLL_MS = 250;

/**
 * A watch by polling, for stores that cannot push changes: lists the prefix
 * every `interval_ms` and calls `onChange` when its keys or versions differ
 * from the last listing. Errors (the store away) are skipped.
 */
export function pollingWatch(store: Pick<CoordinationStore, "list">, prefix: string, onChange: () => void, interval_ms = WATCH_POLL_MS): Watch {
  validatePrefix(prefix);
  let last: string | null = null;
  let busy = false;
  const look = () => {
    if (busy) return;
    busy = true;
    store
      .list(prefix)
      .then(
        (entries) => {
          const signature = entries.map((e) => `${e.key}@${e.version}`).join(",");
          if (signature !== last) onChange(); // the first listing too: the watch is in place
          last = signature;
        },
        () => undefined,
      )
      .finally(() => (busy = false));
  };
  look();
  const timer = setInterval(look, interval_ms);
  timer.unref();
  return { close: () => clearInterval(timer) };
}

export interface CoordinationStore {
  /** The current value, or null if the key does not exist (never written, deleted, or its lease lapsed). */
  get<T>(key: string): Promise<Versioned<T> | null>;
  /** Unconditional write; returns the new version. */
  put<T>(key: string, value: T, options?: PutOptions): Promise<number>;
  /** A new lease of ttl_ms (>= LEASE_TTL_MS_MIN; StoreError InvalidArgument otherwise). */
  grantLease(ttl_ms: number): Promise<Lease>;
  /**
   * Writes only if the current version equals expected_version (0 = key must
   * not exist). Returns the new version, or null if someone else wrote first.
   */
  cas<T>(key: string, expected_version: number, value: T): Promise<number | null>;
  /** Every existing key that starts with `prefix` ("" = all), sorted by key (code-unit order). */
  list<T>(prefix: string): Promise<Versioned<T>[]>;
  /** Removes the key; a no-op if it does not exist. */
  delete(key: string): Promise<void>;
  /**
   * Calls `onChange` soon after a key under `prefix` is written, deleted or
   * lapses with its lease (no detail: list again), and once when the watch
   * is in place (what changed while it was being set up is not lost). etcd
   * pushes changes; the file and in-memory stores look every WATCH_POLL_MS.
   * A store that is unreachable calls nothing until it is back.
   */
  watch(prefix: string, onChange: () => void): Watch;
  /** Waits for operations in flight; any later call fails with StoreUnavailable. */
  close(): Promise<void>;
}

export type StoreErrorCode =
  /** The store cannot be reached or used: I/O error, lock not obtained in time, store closed. Retryable. */
  | "StoreUnavailable"
  /** The key (or list prefix) does not follow the key rules (see validateKey). */
  | "InvalidKey"
  /** The value cannot be stored as JSON (undefined, a function, a BigInt, a cycle, ...). */
  | "InvalidValue"
  /** The value's JSON encoding is larger than the store's limit. */
  | "ValueTooLarge"
  /** An argument other than key or value is out of range (e.g. a negative expected_version). */
  | "InvalidArgument"
  /** What the store holds for a key cannot be read back (damaged file, foreign content). */
  | "Corrupt"
  /** The lease lapsed or was revoked: its keys are gone; grant a new one. */
  | "LeaseLost";

/**
 * Operating errors of a coordination store. Callers match on the stable
 * `code`; messages may change.
 */
export class StoreError extends Error {
  override name = "StoreError";

  constructor(
    readonly code: StoreErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

export const MAX_KEY_LENGTH = 200;
const KEY_RE = /^[a-z0-9][a-z0-9/_.-]*$/;

/**
 * Key rules, shared by every implementation: `[a-z0-9][a-z0-9/_.-]*`, at most
 * 200 characters, no `..` anywhere, and no empty path segment (no `//`, no
 * trailing `/`), e.g. `hosts/h1`, `groups/ticker`, `vms/ticker-0`.
 * Throws StoreError("InvalidKey").
 */
export function validateKey(key: unknown): asserts key is string {
  if (typeof key !== "string") throw new StoreError("InvalidKey", `key must be a string, got ${typeof key}`);
  checkShape(key, "key");
  if (key.endsWith("/")) throw new StoreError("InvalidKey", `key ${JSON.stringify(key)} must not end with "/"`);
}

/** Checks a lease's TTL: StoreError InvalidArgument unless an integer >= LEASE_TTL_MS_MIN. */
export function checkLeaseTtl(ttl_ms: number): void {
  if (!Number.isSafeInteger(ttl_ms) || ttl_ms < LEASE_TTL_MS_MIN) {
    throw new StoreError("InvalidArgument", `lease ttl_ms must be an integer >= ${LEASE_TTL_MS_MIN}, got ${String(ttl_ms)}`);
  }
}

/** Whether `key` follows the key rules (see validateKey): a store's list skips what it did not write. */
export function isValidKey(key: string): boolean {
  try {
    validateKey(key);
    return true;
  } catch {
    return false;
  }
}

/**
 * A list prefix is "" (everything) or follows the key rules, except that it
 * may end with "/" (`hosts/` lists `hosts/h1` but not `hostsx`).
 */
export function validatePrefix(prefix: unknown): asserts prefix is string {
  if (typeof prefix !== "string") throw new StoreError("InvalidKey", `prefix must be a string, got ${typeof prefix}`);
  if (prefix === "") return;
  checkShape(prefix, "prefix");
}

function checkShape(s: string, what: string): void {
  const shown = JSON.stringify(s.length > 60 ? `${s.slice(0, 60)}...` : s);
  if (s.length === 0) throw new StoreError("InvalidKey", `${what} must not be empty`);
  if (s.length > MAX_KEY_LENGTH) throw new StoreError("InvalidKey", `${what} ${shown} is ${s.length} characters long (max ${MAX_KEY_LENGTH})`);
  if (!KEY_RE.test(s)) {
    throw new StoreError("InvalidKey", `${what} ${shown} must match [a-z0-9][a-z0-9/_.-]* (lower case letters, digits, / _ . -)`);
  }
  if (s.includes("..")) throw new StoreError("InvalidKey", `${what} ${shown} must not contain ".."`);
  if (s.includes("//")) throw new StoreError("InvalidKey", `${what} ${shown} must not contain an empty segment ("//")`);
}
