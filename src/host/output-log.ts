/**
 * The released output stream of one VM, as a host knows it: records in
 * sequence order, each at most once. The primary appends what a commit
 * released; a backup mirrors it from committed deltas, so after a failover the
 * stream continues without a gap. Appending a sequence number already present
 * is a no-op: that is how re-released output of a recovery cut is deduplicated.
 */
import { EventEmitter } from "node:events";
import { OUTPUT_REPLY, packOutput, PackedOutputView, type OutputRecord, type PackedOutput } from "../vm/runtime-state.js";
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
 * One batch of released records as kept: the packed bytes a VM or backup
 * thread handed over (PackedOutputView reads them in place), records
 * [from, end) of it. Nothing per record is built until someone reads it (a
 * follower, a `logs` request, a new backup's history): every record a commit
 * releases passes through here, on the primary's host and, mirrored, on the
 * backup's, most are never read, and one object per record, kept for the log's
 * lifetime, made every young-generation collection of a host that runs a
 * chatty group copy them all.
 */
interface KeptBatch {
  view: PackedOutputView;
  from: number;
  end: number;
  released_ms: number;
}

function wire(b: KeptBatch, i: number): ReleasedRecord {
  const bytes = b.view.bytes(i);
  // Decoded through a view of the record's bytes: no copy.
  const text = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("utf8");
  const kind = b.view.kind(i);
  const out: ReleasedRecord = { seq: b.view.seq(i), epoch: b.view.epoch(i), kind, text, produced_ms: b.view.produced_ms(i), released_ms: b.released_ms };
  if (kind === OUTPUT_REPLY) out.request_id = b.view.request_id(i);
  return out;
}

const fromWire = (r: ReleasedRecord): OutputRecord => ({ seq: r.seq, epoch: r.epoch, kind: r.kind, session: 0, request_id: r.request_id ?? 0, bytes: new TextEncoder().encode(r.text), produced_ms: r.produced_ms });

/** Batches dropped from the front are cut off the array once they are this many and half of it. */
const COMPACT_AFTER_BATCHES = 64;

export class OutputLog extends EventEmitter<{ append: [records: ReleasedRecord[]] }> {
  /** batches[head..] are kept; their records are dense in seq, from `first`. */
  private batches: KeptBatch[] = [];
  private head = 0;
  private kept = 0;
  private first = 1; // seq of the first kept record

  get lastSeq(): number {
    return this.first + this.kept - 1;
  }

  get firstSeq(): number {
    return this.first;
  }

  /**
   * Released records as a VM thread packs them (PackedOutput), kept as that
   * batch. `released_through`: only the records of epochs up to it (a
   * backup's fold holds output its primary has not released yet; records are
   * in seq order, and so in epoch order). Returns how many were new.
   */
  appendPacked(packed: PackedOutput, released_through = Infinity): number {
    const view = new PackedOutputView(packed);
    let end = view.count;
    if (released_through !== Infinity) {
      end = 0;
      while (end < view.count && view.epoch(end) <= released_through) end++;
    }
    return this.keep(view, end, Date.now());
  }

  /** Appends records with seq > lastSeq, in order; returns how many were new. Listeners of `append` get the new ones. */
  append(records: readonly OutputRecord[]): number {
    return this.appendPacked(packOutput(records));
  }

  /** Keeps records [.., end) of `view` with seq > lastSeq; a record after a hole throws (it would be lost output). */
  private keep(view: PackedOutputView, end: number, released_ms: number): number {
    let from = 0;
    while (from < end && view.seq(from) <= this.lastSeq) from++;
    if (from === end) return 0;
    // Sequence numbers are dense: a hole would be lost output.
    for (let i = from; i < end; i++) {
      const expected = this.lastSeq + 1 + (i - from);
      if (view.seq(i) !== expected) throw new Error(`output log gap: have up to ${expected - 1}, got ${view.seq(i)}`);
    }
    const batch: KeptBatch = { view, from, end, released_ms };
    this.batches.push(batch);
    this.kept += end - from;
    this.trim();
    if (this.listenerCount("append") > 0) {
      const fresh: ReleasedRecord[] = [];
      for (let i = Math.max(from, batch.from); i < end; i++) fresh.push(wire(batch, i));
      if (fresh.length) this.emit("append", fresh);
    }
    return end - from;
  }

  /** Drops the oldest records beyond OUTPUT_LOG_RECORDS_MAX: whole batches, then part of the first one left. */
  private trim(): void {
    while (this.kept > OUTPUT_LOG_RECORDS_MAX) {
      const front = this.batches[this.head];
      const drop = Math.min(front.end - front.from, this.kept - OUTPUT_LOG_RECORDS_MAX);
      front.from += drop;
      this.kept -= drop;
      this.first += drop;
      if (front.from === front.end) this.head++;
    }
    if (this.head >= COMPACT_AFTER_BATCHES && 2 * this.head >= this.batches.length) {
      this.batches = this.batches.slice(this.head);
      this.head = 0;
    }
  }

  /** The kept record with seq `seq` as (batch index, record index), or null if it is not kept. */
  private locate(seq: number): { b: number; i: number } | null {
    if (seq < this.first || seq > this.lastSeq) return null;
    // Binary search for the last batch whose first kept seq is <= seq.
    let lo = this.head;
    let hi = this.batches.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      const b = this.batches[mid];
      if (b.view.seq(b.from) <= seq) lo = mid;
      else hi = mid - 1;
    }
    const b = this.batches[lo];
    return { b: lo, i: b.from + (seq - b.view.seq(b.from)) };
  }

  /** Calls `visit` on the kept records from `from_seq` on, in order, until it returns false. */
  private forEachFrom(from_seq: number, visit: (r: ReleasedRecord) => boolean): void {
    const at = this.locate(Math.max(from_seq, this.first));
    if (!at) return;
    for (let b = at.b, i = at.i; b < this.batches.length; b++, i = this.batches[b]?.from ?? 0) {
      const batch = this.batches[b];
      for (; i < batch.end; i++) if (!visit(wire(batch, i))) return;
    }
  }

  /** The newest records that, JSON-encoded, add up to at most `bytes_max`: what a new backup gets of the history. */
  tail(bytes_max: number): ReleasedRecord[] {
    const out: ReleasedRecord[] = [];
    let bytes = 0;
    for (let b = this.batches.length - 1; b >= this.head; b--) {
      const batch = this.batches[b];
      for (let i = batch.end - 1; i >= batch.from; i--) {
        const r = wire(batch, i);
        const size = sentBytes(r);
        if (bytes + size > bytes_max) return out.reverse();
        bytes += size;
        out.push(r);
      }
    }
    return out.reverse();
  }

  /** A new backup's log: the history the primary sent, then whatever its commits release. */
  adopt(history: readonly ReleasedRecord[], last_seq: number): void {
    const first = history.length ? history[0].seq : last_seq + 1;
    if (history.length && history[history.length - 1].seq !== last_seq) throw new Error(`log history ends at ${history[history.length - 1].seq}, released up to ${last_seq}`);
    this.batches = [];
    this.head = 0;
    this.kept = 0;
    this.first = first;
    // One batch per run of records released together: each keeps its release time.
    for (let i = 0; i < history.length; ) {
      let j = i + 1;
      while (j < history.length && history[j].released_ms === history[i].released_ms) j++;
      const view = new PackedOutputView(packOutput(history.slice(i, j).map(fromWire)));
      this.keep(view, view.count, history[i].released_ms);
      i = j;
    }
  }

  /** Records with seq >= from_seq that are still kept. */
  since(from_seq: number): ReleasedRecord[] {
    const out: ReleasedRecord[] = [];
    this.forEachFrom(from_seq, (r) => (out.push(r), true));
    return out;
  }

  /**
   * The kept records from `from_seq` on, up to about `bytes_max` bytes of
   * JSON (at least one record if there is any), and whether more follow.
   * Costs the page, not the log.
   */
  page(from_seq: number, bytes_max = LOG_PAGE_BYTES_MAX): { records: ReleasedRecord[]; more: boolean } {
    const out: ReleasedRecord[] = [];
    let bytes = 0;
    let more = false;
    this.forEachFrom(from_seq, (r) => {
      const size = sentBytes(r);
      if (out.length && bytes + size > bytes_max) {
        more = true;
        return false;
      }
      bytes += size;
      out.push(r);
      return true;
    });
    return { records: out, more };
  }
}
