/**
 * How every coordination store keeps one key: a JSON record
 *
 *   {"key":"hosts/h1","version":3,"value":{...}}   a live value
 *   {"key":"hosts/h1","version":3,"lease":"9f..","value":{...}}   a live value while lease 9f.. lives
 *   {"key":"hosts/h1","version":4,"deleted":true}  a tombstone
 *
 * The embedded store writes it to a file per key, the etcd store as the etcd
 * value of the key. Deleting writes a tombstone holding the next version, so a
 * key's versions only grow, across deletes too (no ABA for cas; see
 * src/store/store.ts). One format and one parser for both stores.
 */
import { StoreError } from "./store.js";

/** What is stored for a key: a live record or a tombstone. */
export type StoredRecord = { key: string; version: number; deleted: false; value: unknown; lease?: string } | { key: string; version: number; deleted: true };

/** The version a cas compares against: 0 for a key that does not exist (never written, or deleted). */
export function liveVersion(record: StoredRecord | null): number {
  return record === null || record.deleted ? 0 : record.version;
}

/** The value's JSON, checked: StoreError InvalidValue (not JSON) or ValueTooLarge (over max_value_bytes as UTF-8). */
export function encodeValue(key: string, value: unknown, max_value_bytes: number): string {
  let json: string | undefined;
  try {
    json = JSON.stringify(value);
  } catch (e) {
    throw new StoreError("InvalidValue", `value for ${key} cannot be encoded as JSON: ${(e as Error).message}`, { cause: e });
  }
  if (json === undefined) throw new StoreError("InvalidValue", `value for ${key} cannot be encoded as JSON (${typeof value})`);
  const bytes = Buffer.byteLength(json, "utf8");
  if (bytes > max_value_bytes) {
    throw new StoreError("ValueTooLarge", `value for ${key} is ${bytes} bytes as JSON (max ${max_value_bytes})`);
  }
  return json;
}

/** The record's text; `value_json` null writes a tombstone; `lease`: the id of the lease the value lives by. */
export function recordText(key: string, version: number, value_json: string | null, lease?: string): string {
  const head = `{"key":${JSON.stringify(key)},"version":${version},${lease !== undefined && value_json !== null ? `"lease":${JSON.stringify(lease)},` : ""}`;
  return value_json === null ? `${head}"deleted":true}\n` : `${head}"value":${value_json}}\n`;
}

/** Parses the record stored for `key`; `where` names the place in errors. StoreError Corrupt if it is not one. */
export function parseRecord(key: string, text: string, where: string): StoredRecord {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (e) {
    throw new StoreError("Corrupt", `record of ${key} (${where}) is not valid JSON: ${(e as Error).message}`, { cause: e });
  }
  const bad = (why: string) => new StoreError("Corrupt", `record of ${key} (${where}): ${why}`);
  if (typeof doc !== "object" || doc === null || Array.isArray(doc)) throw bad("not a JSON object");
  const r = doc as Record<string, unknown>;
  if (r.key !== key) throw bad(`holds key ${JSON.stringify(r.key)}`);
  if (typeof r.version !== "number" || !Number.isSafeInteger(r.version) || r.version < 1) throw bad(`invalid version ${JSON.stringify(r.version)}`);
  if (r.deleted === true) return { key, version: r.version, deleted: true };
  if (!("value" in r) || r.deleted !== undefined) throw bad("neither a value nor a tombstone");
  if (r.lease !== undefined && typeof r.lease !== "string") throw bad(`invalid lease ${JSON.stringify(r.lease)}`);
  return { key, version: r.version, deleted: false, value: r.value, ...(r.lease !== undefined ? { lease: r.lease } : {}) };
}

/** Checks a cas's expected_version: StoreError InvalidArgument unless an integer >= 0. */
export function checkExpectedVersion(key: string, expected_version: number): void {
  if (!Number.isSafeInteger(expected_version) || expected_version < 0) {
    throw new StoreError("InvalidArgument", `cas ${key}: expected_version must be an integer >= 0, got ${String(expected_version)}`);
  }
}
