/** Simulated coordination store: one key per group, compare-and-swap on its version (>= 1). */
import type { GroupRecord, StoreResult } from "../protocol.js";

export class SimStore {
  private record: GroupRecord;
  private version = 1;
  /** Every record ever written, by incarnation (for the checkers). */
  readonly history = new Map<number, GroupRecord>();
  writes = 0;

  constructor(
    readonly key: string,
    initial: GroupRecord,
  ) {
    this.record = structuredClone(initial);
    this.history.set(initial.incarnation, this.record);
  }

  get current(): GroupRecord {
    return this.record;
  }

  get(key: string): StoreResult {
    this.check(key);
    return { type: "store.result", op: "get", ok: true, record: structuredClone(this.record), version: this.version };
  }

  cas(key: string, expected: number, value: GroupRecord): StoreResult {
    this.check(key);
    if (expected !== this.version) return { type: "store.result", op: "cas", ok: false, record: structuredClone(this.record), version: this.version };
    this.record = structuredClone(value);
    this.version++;
    this.writes++;
    this.history.set(value.incarnation, this.record);
    return { type: "store.result", op: "cas", ok: true, record: structuredClone(this.record), version: this.version };
  }

  private check(key: string): void {
    if (key !== this.key) throw new Error(`unknown store key ${key}`);
  }
}
