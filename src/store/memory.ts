/**
 * The coordination store held in one process's memory: for clusters whose
 * hosts all live in this process (`cohort run`'s in-process cluster). Same
 * interface and checks as the embedded store; values are deep-copied in and
 * out, so no caller can change what another reads.
 */
import { StoreError, validateKey, validatePrefix, type CoordinationStore, type Versioned } from "./store.js";

/** Values larger than this (as JSON) are refused, like the embedded store's. */
const VALUE_BYTES_MAX = 1 << 20;

export class MemoryStore implements CoordinationStore {
  private readonly entries = new Map<string, { json: string; version: number }>();
  private closed = false;

  async get<T>(key: string): Promise<Versioned<T> | null> {
    this.check();
    validateKey(key);
    const e = this.entries.get(key);
    return e ? { key, value: JSON.parse(e.json) as T, version: e.version } : null;
  }

  async put<T>(key: string, value: T): Promise<number> {
    this.check();
    validateKey(key);
    const json = encode(value);
    const version = (this.entries.get(key)?.version ?? 0) + 1;
    this.entries.set(key, { json, version });
    return version;
  }

  /** `expected_version` 0: create only. Returns the new version, or null when the key moved on. */
  async cas<T>(key: string, expected_version: number, value: T): Promise<number | null> {
    this.check();
    validateKey(key);
    if (!Number.isSafeInteger(expected_version) || expected_version < 0) throw new StoreError("InvalidArgument", `expected version ${expected_version}`);
    const json = encode(value);
    const current = this.entries.get(key)?.version ?? 0;
    if (current !== expected_version) return null;
    this.entries.set(key, { json, version: current + 1 });
    return current + 1;
  }

  async list<T>(prefix: string): Promise<Versioned<T>[]> {
    this.check();
    validatePrefix(prefix);
    return [...this.entries]
      .filter(([key]) => key.startsWith(prefix))
      .sort(([a], [b]) => (a < b ? -1 : 1))
      .map(([key, e]) => ({ key, value: JSON.parse(e.json) as T, version: e.version }));
  }

  async delete(key: string): Promise<void> {
    this.check();
    validateKey(key);
    this.entries.delete(key);
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  private check(): void {
    if (this.closed) throw new StoreError("StoreUnavailable", "the store is closed");
  }
}

function encode(value: unknown): string {
  const json = JSON.stringify(value);
  if (json === undefined) throw new StoreError("InvalidValue", "value is not JSON");
  if (json.length > VALUE_BYTES_MAX) throw new StoreError("ValueTooLarge", `value of ${json.length} bytes (max ${VALUE_BYTES_MAX})`);
  return json;
}
