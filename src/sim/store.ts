/**
 * The simulated coordination store: one versioned key per group, read and
 * compare-and-swap, as src/store/embedded.ts offers the daemon. The CAS that
 * wins is the failover decision, so the checkers read the decisions here.
 */
import type { ProtectionRecord } from "../core/types.js";

export interface StoreResult {
  ok: boolean;
  record: ProtectionRecord | null;
  version: number;
}

export class SimStore {
  private record: ProtectionRecord;
  private version = 1;
  writes = 0;

  constructor(
    readonly key: string,
    initial: ProtectionRecord,
  ) {
    this.record = structuredClone(initial);
  }

  get current(): ProtectionRecord {
    return this.record;
  }

  get(key: string): StoreResult {
    this.check(key);
    return { ok: true, record: structuredClone(this.record), version: this.version };
  }

  cas(key: string, expected: number, value: ProtectionRecord): StoreResult {
    this.check(key);
    if (expected !== this.version) return { ok: false, record: structuredClone(this.record), version: this.version };
    this.record = structuredClone(value);
    this.version++;
    this.writes++;
    return { ok: true, record: structuredClone(this.record), version: this.version };
  }

  private check(key: string): void {
    if (key !== this.key) throw new Error(`unknown store key ${key}`);
  }
}
