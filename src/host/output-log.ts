/**
 * The released output stream of one VM, as a host knows it: records in
 * sequence order, each at most once. The primary appends what a commit
 * released; a backup mirrors it from committed deltas, so after a failover the
 * stream continues without a gap. Appending a sequence number already present
 * is a no-op: that is how re-released output of a recovery cut is deduplicated.
 */
import { EventEmitter } from "node:events";
import type { OutputRecord } from "../vm/runtime-state.js";
import type { LogRecordWire } from "./messages.js";

/** Records kept per VM; older ones are dropped (followers that fall further behind see a gap notice). */
export const OUTPUT_LOG_RECORDS_MAX = 200_000;

export class OutputLog extends EventEmitter<{ append: [records: LogRecordWire[]] }> {
  private records: LogRecordWire[] = [];
  private first = 1; // seq of records[0]

  get lastSeq(): number {
    return this.first + this.records.length - 1;
  }

  get firstSeq(): number {
    return this.first;
  }

  /** A log that starts after `last_seq` (a new backup: everything up to there was released before it joined). */
  resetTo(last_seq: number): void {
    this.records = [];
    this.first = last_seq + 1;
  }

  /** Appends records with seq > lastSeq, in order; returns those that were new. */
  append(records: readonly OutputRecord[]): LogRecordWire[] {
    const fresh: LogRecordWire[] = [];
    for (const r of records) {
      if (r.seq <= this.lastSeq) continue;
      // Sequence numbers are dense: a hole would be lost output.
      if (r.seq !== this.lastSeq + 1) throw new Error(`output log gap: have up to ${this.lastSeq}, got ${r.seq}`);
      const wire = { seq: r.seq, epoch: r.epoch, kind: r.kind, text: Buffer.from(r.bytes).toString("utf8"), produced_ms: r.produced_ms, released_ms: Date.now() };
      this.records.push(wire);
      fresh.push(wire);
    }
    if (this.records.length > OUTPUT_LOG_RECORDS_MAX) {
      const drop = this.records.length - OUTPUT_LOG_RECORDS_MAX;
      this.records.splice(0, drop);
      this.first += drop;
    }
    if (fresh.length) this.emit("append", fresh);
    return fresh;
  }

  /** Records with seq >= from_seq that are still kept. */
  since(from_seq: number): LogRecordWire[] {
    const start = Math.max(0, from_seq - this.first);
    return this.records.slice(start);
  }
}
