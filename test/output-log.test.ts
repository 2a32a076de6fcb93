/**
 * A VM's released output stream as a host keeps it (src/host/output-log.ts):
 * dense sequence numbers, deduplication of re-released output, and the pages
 * a `logs` reply or push is cut into so that no message header reaches 1 MiB
 * however long the log is.
 */
import { describe, expect, it } from "vitest";
import { encodePayload } from "../src/host/messages.js";
import { LOG_PAGE_BYTES_MAX, logPages, OUTPUT_LOG_RECORDS_MAX, OutputLog } from "../src/host/output-log.js";
import { MalformedRuntimeStateError, OUTPUT_LOG, packOutput, type OutputRecord } from "../src/vm/runtime-state.js";

const record = (seq: number, text: string): OutputRecord => ({ seq, epoch: 1, kind: OUTPUT_LOG, session: 0, request_id: 0, bytes: new TextEncoder().encode(text), produced_ms: 0 });

function logOf(count: number, text: (seq: number) => string): OutputLog {
  const log = new OutputLog();
  const records: OutputRecord[] = [];
  for (let seq = 1; seq <= count; seq++) records.push(record(seq, text(seq)));
  log.append(records);
  return log;
}

describe("output log", () => {
  it("appends each sequence number once and refuses a gap", () => {
    const log = logOf(3, (s) => `line ${s}\n`);
    const appended: number[] = [];
    log.on("append", (records) => appended.push(...records.map((r) => r.seq)));
    expect(log.append([record(2, "again"), record(3, "again"), record(4, "new")])).toBe(1);
    expect(appended).toEqual([4]);
    expect(() => log.append([record(6, "hole")])).toThrow(/gap/);
    expect(log.since(3).map((r) => r.text)).toEqual(["line 3\n", "new"]);
  });

  it("takes released records packed as a VM thread sends them: same records, same deduplication", () => {
    const log = logOf(2, (s) => `line ${s}\n`);
    const appended: string[] = [];
    log.on("append", (records) => appended.push(...records.map((r) => `${r.seq}:${r.text}`)));
    expect(log.appendPacked(packOutput([record(2, "again"), record(3, "three"), record(4, "four")]))).toBe(2);
    expect(log.appendPacked(packOutput([]))).toBe(0);
    expect(appended).toEqual(["3:three", "4:four"]);
    expect(() => log.appendPacked(packOutput([record(9, "hole")]))).toThrow(/gap/);
    expect(log.since(1).map((r) => r.text)).toEqual(["line 1\n", "line 2\n", "three", "four"]);
  });

  it("pages a log of many megabytes: every page fits a message header, together they are the log, in order", () => {
    // 20,000 records of ~200 bytes, some full of control characters (6 JSON bytes each).
    const log = logOf(20_000, (s) => (s % 7 === 0 ? "\u0001".repeat(150) : `round ${s} `.padEnd(200, "x")));
    const seen: number[] = [];
    let from = 1;
    for (let pages = 0; ; pages++) {
      expect(pages).toBeLessThan(1000);
      const { records, more } = log.page(from);
      expect(records.length).toBeGreaterThan(0);
      const json = Buffer.byteLength(JSON.stringify(records));
      expect(json).toBeLessThanOrEqual(LOG_PAGE_BYTES_MAX + records.length);
      expect(() => encodePayload({ records })).not.toThrow();
      for (const r of records) seen.push(r.seq);
      from = records[records.length - 1].seq + 1;
      if (!more) break;
    }
    expect(seen).toEqual(Array.from({ length: 20_000 }, (_, i) => i + 1));
    // The same cut for pushes of already released records.
    const pages = logPages(log.since(1));
    expect(pages.length).toBeGreaterThan(10);
    expect(pages.flat().map((r) => r.seq)).toEqual(seen);
    for (const page of pages) expect(() => encodePayload({ records: page })).not.toThrow();
  });

  it("a new backup's log adopts the history it was sent and goes on from there", () => {
    const primary = logOf(50, (s) => `line ${s} é\n`);
    const backup = new OutputLog();
    backup.adopt(primary.tail(400), primary.lastSeq);
    expect(backup.firstSeq).toBeGreaterThan(1);
    expect(backup.since(1)).toEqual(primary.since(backup.firstSeq));
    backup.append([record(51, "next")]);
    expect(backup.since(50).map((r) => r.text)).toEqual(["line 50 é\n", "next"]);
  });

  it("a page holds at least one record, however large", () => {
    const log = logOf(2, () => "\u0002".repeat(64 * 1024));
    const first = log.page(1, 1000);
    expect(first.records.map((r) => r.seq)).toEqual([1]);
    expect(first.more).toBe(true);
    expect(log.page(2, 1000)).toMatchObject({ more: false });
    expect(log.page(3)).toEqual({ records: [], more: false });
  });

  it("keeps the newest OUTPUT_LOG_RECORDS_MAX records: whole batches go first, then part of the oldest left", () => {
    const log = new OutputLog();
    const batch = Math.ceil(OUTPUT_LOG_RECORDS_MAX * 0.35);
    for (let b = 0; b < 3; b++) {
      const records: OutputRecord[] = [];
      for (let i = 1; i <= batch; i++) records.push(record(b * batch + i, `r${b * batch + i}`));
      expect(log.appendPacked(packOutput(records))).toBe(batch);
    }
    expect(log.lastSeq).toBe(3 * batch);
    expect(log.firstSeq).toBe(3 * batch - OUTPUT_LOG_RECORDS_MAX + 1);
    const kept = log.since(1);
    expect(kept.length).toBe(OUTPUT_LOG_RECORDS_MAX);
    expect(kept[0]).toMatchObject({ seq: log.firstSeq, text: `r${log.firstSeq}` });
    // Reads that start at each batch boundary and inside the partly dropped batch.
    for (const seq of [log.firstSeq, batch, batch + 1, 2 * batch, 2 * batch + 1, log.lastSeq]) {
      expect(log.page(seq, 100).records[0]).toMatchObject({ seq, text: `r${seq}` });
    }
    expect(log.page(log.lastSeq + 1)).toEqual({ records: [], more: false });
    // Still dense and deduplicating at the front.
    expect(log.append([record(log.firstSeq, "again"), record(log.lastSeq + 1, "next")])).toBe(1);
  });

  it("a backup mirrors only the records of released epochs, and the rest once they are", () => {
    const log = new OutputLog();
    const folded = [1, 1, 2, 3].map((epoch, i) => ({ ...record(i + 1, `e${epoch}`), epoch }));
    expect(log.appendPacked(packOutput(folded), 2)).toBe(3);
    expect(log.lastSeq).toBe(3);
    expect(log.appendPacked(packOutput([...folded, { ...record(5, "e4"), epoch: 4 }]), 3)).toBe(1);
    expect(log.since(1).map((r) => r.text)).toEqual(["e1", "e1", "e2", "e3"]);
  });

  it("refuses a batch whose layout does not add up, and keeps what it had", () => {
    const log = logOf(2, (s) => `line ${s}`);
    const packed = packOutput([record(3, "three")]);
    expect(() => log.appendPacked(packed.subarray(0, packed.length - 1))).toThrow(MalformedRuntimeStateError);
    expect(() => log.appendPacked(new Uint8Array([1, 2, 3]))).toThrow(MalformedRuntimeStateError);
    expect(log.lastSeq).toBe(2);
    expect(log.appendPacked(packed)).toBe(1);
  });
});
