/**
 * The released output stream of one VM, as a host knows it: records in
 * sequence order, each at most once. The primary appends what a commit
 * released; a backup mirrors it from committed deltas, so after a failover the
 * stream continues without a gap. Appending a sequence number already present
 * is a no-op: that is how re-released output of a recovery cut is deduplicated.
 */
import { EventEmitter } from "node:events";
import { OUTPUT_REPLY, unpackOutput, type OutputRecord, type PackedOutput } from "../vm/runtime-state.js";
import type { ReleasedRecord } from "../core/frames.js";

/** Records kept per VM; older ones are dropped (followers that fall further behind see a gap notice). */
export const OUTPUT_LOG_RECORDS_MAX = 200_000;
/**
 * Released history a primary sends a new backup with its image (newest
 * first, up to this many bytes of JSON-encoded records: it travels in a
 * frame header, which must stay under 1 MiB whatever bytes the guest logged
 * and however small its records).
 */
export const OUTPUT_LOG_HISTORY_BYTES_MAX = 256 * 1024;
/**
 * A `logs` reply or push carries records up to about this many bytes of
 * JSON (a page always holds at least one record, and one record is at most
 * message_bytes_max = 64 KiB of guest bytes, ≤ 6× that as JSON): a message
 * header must stay under 1 MiB, and a long log goes out page by page.
 */
export const LOG_PAGE_BYTES_MAX = 256 * 1024;

/** A record's size as sent: a control character takes 6 bytes in JSON, and every record its fields. */
const sentBytes = (r: ReleasedRecord) => Buffer.byteLength(JSON.stringify(r)) + 1;

/** Splits records into pages of at most `bytes_max` JSON bytes (at least one record each), in order. */
export function logPages(records: readonly ReleasedRecord[], bytes_max = LOG_PAGE_BYTES_MAX): ReleasedRecord[][] {
  const pages: ReleasedRecord[][] = [];
  let page: ReleasedRecord[] = [];
  let bytes = 0;
  for (const r of records) {
    const size = sentBytes(r);
    if (page.length && bytes + size > bytes_max) {
      pages.push(page);
      page = [];
      bytes = 0;
    }
    page.push(r);
    bytes += size;
  }
  if (page.length) pages.push(page);
  return pages;
}

/**
 * A released record as kept: the guest's bytes, not yet decoded. The JSON
 * form (ReleasedRecord, with the text) is made when someone reads it (a
 * follower, a `logs` request, a new backup's history): every record a commit
 * releases passes through here, on the primary's host and, mirrored, on the
 * backup's, and most are never read.
 */
interface KeptRecord {
  seq: number;
  epoch: number;
  kind: number;
  request_id: number;
  bytes: Uint8Array;
  produced_ms: number;
  released_ms: number;
}

function wire(r: KeptRecord): ReleasedRecord {
  // Decoded through a view of the record's bytes: no copy.
  const text = Buffer.from(r.bytes.buffer, r.bytes.byteOffset, r.bytes.byteLength).toString("utf8");
  const out: ReleasedRecord = { seq: r.seq, epoch: r.epoch, kind: r.kind, text, produced_ms: r.produced_ms, released_ms: r.released_ms };
  if (r.kind === OUTPUT_REPLY) out.request_id = r.request_id;
  return out;
}

const fromWire = (r: ReleasedRecord): KeptRecord => ({ seq: r.seq, epoch: r.epoch, kind: r.kind, request_id: r.request_id ?? 0, bytes: new TextEncoder().encode(r.text), produced_ms: r.produced_ms, released_ms: r.released_ms });

export class OutputLog extends EventEmitter<{ append: [records: ReleasedRecord[]] }> {
  private records: KeptRecord[] = [];
  private first = 1; // seq of records[0]

  get lastSeq(): number {
    return this.first + this.records.length - 1;
  }

  get firstSeq(): number {
    return this.first;
  }

  /**
   * Released records as a VM thread packs them (PackedOutput): kept as views
   * into the batch's buffer, which holds nothing but these records.
   */
  appendPacked(packed: PackedOutput): number {
    return this.append(unpackOutput(packed, false), true);
  }

  /**
   * Appends records with seq > lastSeq, in order; returns how many were new. Listeners of `append` get the new ones.
   * `keepViews`: the records' bytes are views into a buffer of records only (appendPacked), kept as they are.
   */
  append(records: readonly OutputRecord[], keepViews = false): number {
    const now = Date.now();
    const from = this.records.length;
    for (const r of records) {
      if (r.seq <= this.lastSeq) continue;
      // Sequence numbers are dense: a hole would be lost output.
      if (r.seq !== this.lastSeq + 1) throw new Error(`output log gap: have up to ${this.lastSeq}, got ${r.seq}`);
      // A view into a much larger buffer (a decoded runtime state) is copied: kept for long, it would keep that buffer alive.
      const bytes = !keepViews && r.bytes.buffer.byteLength > 4 * r.bytes.byteLength + 1024 ? r.bytes.slice() : r.bytes;
      this.records.push({ seq: r.seq, epoch: r.epoch, kind: r.kind, request_id: r.request_id, bytes, produced_ms: r.produced_ms, released_ms: now });
    }
    const added = this.records.length - from;
    const fresh = added > 0 && this.listenerCount("append") > 0 ? this.records.slice(from).map(wire) : [];
    if (this.records.length > OUTPUT_LOG_RECORDS_MAX) {
      const drop = this.records.length - OUTPUT_LOG_RECORDS_MAX;
      this.records.splice(0, drop);
      this.first += drop;
    }
    if (fresh.length) this.emit("append", fresh);
    return added;
  }

  /** The newest records that, JSON-encoded, add up to at most `bytes_max`: what a new backup gets of the history. */
  tail(bytes_max: number): ReleasedRecord[] {
    const out: ReleasedRecord[] = [];
    let bytes = 0;
    for (let i = this.records.length - 1; i >= 0; i--) {
      const r = wire(this.records[i]);
      const size = sentBytes(r);
      if (bytes + size > bytes_max) break;
      bytes += size;
      out.push(r);
    }
    return out.reverse();
  }

  /** A new backup's log: the history the primary sent, then whatever its commits release. */
  adopt(history: readonly ReleasedRecord[], last_seq: number): void {
    const first = history.length ? history[0].seq : last_seq + 1;
    if (history.length && history[history.length - 1].seq !== last_seq) throw new Error(`log history ends at ${history[history.length - 1].seq}, released up to ${last_seq}`);
    this.records = history.map(fromWire);
    this.first = first;
  }

  /** Records with seq >= from_seq that are still kept. */
  since(from_seq: number): ReleasedRecord[] {
    const start = Math.max(0, from_seq - this.first);
    return this.records.slice(start).map(wire);
  }

  /**
   * The kept records from `from_seq` on, up to about `bytes_max` bytes of
   * JSON (at least one record if there is any), and whether more follow.
   * Costs the page, not the log.
   */
  page(from_seq: number, bytes_max = LOG_PAGE_BYTES_MAX): { records: ReleasedRecord[]; more: boolean } {
    let i = Math.max(0, from_seq - this.first);
    const out: ReleasedRecord[] = [];
    let bytes = 0;
    while (i < this.records.length) {
      const r = wire(this.records[i]);
      const size = sentBytes(r);
      if (out.length && bytes + size > bytes_max) break;
      bytes += size;
      out.push(r);
      i++;
    }
    return { records: out, more: i < this.records.length };
  }
}
