/**
 * A group's protection record (src/core/types.ts) for tests that drive a
 * GroupCore or a host directly: the placement given, the rest defaulted
 * (group mode, incarnation 1, led by the first primary, nobody failed).
 */
import type { ProtectionRecord } from "../../src/core/types.js";

export function protectionRecord(fields: Partial<ProtectionRecord> & Pick<ProtectionRecord, "placement">): ProtectionRecord {
  return {
    group: "g",
    mode: "group",
    size: fields.placement.length,
    incarnation: 1,
    leader: fields.placement[0].primary,
    failed: [],
    epoch: { interval_ms: 20, min_interval_ms: 5, max_interval_ms: 200 },
    limits: { memory_mib: 64, call_cpu_ms: 1000, output_bytes_max: 1 << 20 },
    ...fields,
  };
}
