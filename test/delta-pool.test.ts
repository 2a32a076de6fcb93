/**
 * Pooled delta buffers: a capture reuses the buffer of a delta given back, a
 * buffer still lent is never handed out again, the pool stays within its
 * limits, and a delta laid out in a reused (dirty) buffer is byte for byte
 * the delta the reference encoder writes. Undo log chunks are reused the
 * same way once their epoch committed or was rolled back.
 */
import { describe, expect, it } from "vitest";
import { BackupImage } from "../src/checkpoint/backup-image.js";
import { decodeDelta, encodeDelta, sealDelta } from "../src/checkpoint/format.js";
import { AssertionError } from "../src/util/assert.js";
import { capacityFor, DELTA_LOANS_TRACKED_MAX, DeltaPool } from "../src/vm/delta-pool.js";
import { DirtyTracker, UNDO_CHUNKS_POOLED_MAX } from "../src/vm/dirty-tracker.js";
import { FIRST_GUEST_PAGE, PAGE_BYTES, RESERVED_WASM_PAGES } from "../src/vm/layout.js";
import { VmCore } from "../src/vm/machine.js";
import { imageBytes } from "./support/checkpoint.js";
import { guestOf, options, watBytes } from "./support/guests.js";

const MIB = 1024 * 1024;

describe("DeltaPool", () => {
  it("hands out views of exactly the size asked, at offset 0 of a buffer with up to 25 % slack", () => {
    const pool = new DeltaPool();
    for (const n of [0, 1, 65_536, 65_537, 1_049_857, 17 * MIB + 3]) {
      const v = pool.take(n);
      expect(v.byteOffset).toBe(0);
      expect(v.length).toBe(n);
      expect(v.buffer.byteLength).toBe(capacityFor(n));
      expect(capacityFor(n)).toBeGreaterThanOrEqual(n);
      if (n > 65_536) expect(capacityFor(n)).toBeLessThanOrEqual(n * 1.25);
    }
    expect(capacityFor(1_049_857)).toBe(1.25 * MIB);
  });

  it("reuses a buffer given back (same ArrayBuffer), the smallest that fits", () => {
    const pool = new DeltaPool();
    const big = pool.take(4 * MIB);
    const small = pool.take(100_000);
    expect(pool.recycle(big)).toBe(true);
    expect(pool.recycle(small)).toBe(true);
    const again = pool.take(90_000);
    expect(again.buffer).toBe(small.buffer);
    const large = pool.take(3 * MIB);
    expect(large.buffer).toBe(big.buffer);
    expect(pool.stats).toMatchObject({ taken: 4, reused: 2, allocated: 2, returned: 2, lent: 2, free_buffers: 0 });
  });

  it("never hands out a buffer that is still lent", () => {
    const pool = new DeltaPool();
    const lent = new Set<ArrayBufferLike>();
    const held: Uint8Array[] = [];
    for (let i = 0; i < 50; i++) {
      const v = pool.take(100_000 + ((i * 7919) % 50_000));
      expect(lent.has(v.buffer)).toBe(false);
      lent.add(v.buffer);
      held.push(v);
      // Give back about half, in a scrambled order.
      if (i % 2 === 1) {
        const back = held.splice((i * 31) % held.length, 1)[0];
        lent.delete(back.buffer);
        expect(pool.recycle(back)).toBe(true);
      }
      expect(pool.stats.lent).toBe(held.length);
    }
  });

  it("a loan given back twice is a bug; a view it never lent is refused", () => {
    const pool = new DeltaPool();
    const v = pool.take(1000);
    expect(pool.recycle(v)).toBe(true);
    expect(() => pool.recycle(v)).toThrow(AssertionError);
    // Lent again under a new view: the old view is stale and refused, the new loan stays out.
    const w = pool.take(1000);
    expect(w.buffer).toBe(v.buffer);
    expect(pool.recycle(new Uint8Array(1000))).toBe(false);
    expect(pool.recycle(w.subarray(0, 10))).toBe(false);
    expect(pool.stats.lent).toBe(1);
    expect(pool.recycle(w)).toBe(true);
  });

  it("stays within its limits of free buffers and bytes, keeping the largest", () => {
    const pool = new DeltaPool({ buffers: 2, bytes: 3 * MIB });
    const views = [100_000, 200_000, 300_000, 1.5 * MIB, 2 * MIB].map((n) => pool.take(n));
    for (const v of views) pool.recycle(v);
    const s = pool.stats;
    expect(s.free_buffers).toBeLessThanOrEqual(2);
    expect(s.free_bytes).toBeLessThanOrEqual(3 * MIB);
    expect(s.returned).toBe(5);
    expect(s.discarded).toBe(5 - s.free_buffers);
    // What is kept is the biggest that fits the byte limit.
    expect(pool.take(2 * MIB).buffer).toBe(views[4].buffer);
    const none = new DeltaPool({ buffers: 0, bytes: 0 });
    const x = none.take(10);
    expect(none.recycle(x)).toBe(true);
    expect(none.take(10).buffer).not.toBe(x.buffer);
  });

  it("across threads: a loan comes back by id as a new ArrayBuffer of the same size", () => {
    const pool = new DeltaPool();
    const v = pool.take(70_000);
    const id = pool.idOf(v)!;
    expect(id).toBeGreaterThan(0);
    // What a transfer does: the same memory in a new ArrayBuffer, the old one detached.
    const lent = v.buffer as ArrayBuffer;
    const moved = structuredClone(lent, { transfer: [lent] });
    expect(v.buffer.byteLength).toBe(0);
    expect(pool.giveBack(id, new ArrayBuffer(12))).toBe(false); // not the buffer lent
    expect(pool.giveBack(id + 1000, moved)).toBe(false); // not a loan of this pool
    expect(pool.giveBack(id, moved)).toBe(true);
    expect(pool.giveBack(id, moved)).toBe(false); // no longer waited for
    expect(pool.idOf(v)).toBeUndefined();
    expect(pool.take(70_000).buffer).toBe(moved);
  });

  it("forgets the oldest loans beyond DELTA_LOANS_TRACKED_MAX (a consumer that never gives back)", () => {
    const pool = new DeltaPool();
    const first = pool.take(10);
    for (let i = 0; i < DELTA_LOANS_TRACKED_MAX; i++) pool.take(10);
    expect(pool.stats.lent).toBe(DELTA_LOANS_TRACKED_MAX);
    expect(pool.recycle(first)).toBe(false);
    expect(pool.stats.free_buffers).toBe(0);
  });
});

// touch(addr, value): one word; fill(page, count, value): the first word of `count` pages from `page`.
const GUEST = watBytes(`(module
  (memory 64)
  (global $g (mut i32) (i32.const 0))
  (func (export "touch") (param $addr i32) (param $value i32)
    (global.set $g (local.get $value))
    (i32.store (local.get $addr) (local.get $value)))
  (func (export "fill") (param $page i32) (param $count i32) (param $value i32)
    (local $i i32)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $count)))
      (i32.store (i32.mul (i32.add (local.get $page) (local.get $i)) (i32.const ${PAGE_BYTES})) (i32.add (local.get $value) (local.get $i)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))))`);

/** Pages dirtied in epoch `e`: sizes go up and down, so a reused buffer is often bigger than the delta and holds an older one's bytes. */
function writeEpoch(vm: VmCore, e: number): void {
  const count = [3, 200, 17, 90, 1, 260, 40][e % 7];
  // A sequential run (one copy) and scattered single pages.
  vm.invoke("fill", [(e * 37) % 500, count, e * 1000]);
  for (let i = 0; i < count % 11; i++) vm.invoke("touch", [((e * 131 + i * 977) % 1000) * PAGE_BYTES + 8, e + i]);
}

describe("VmCore capture from the pool", () => {
  it("in steady state reuses one buffer; deltas are byte for byte those of the reference encoder and of unpooled captures", async () => {
    const guest = await guestOf(GUEST);
    const pooled = VmCore.boot(guest, options());
    const fresh = VmCore.boot(guest, options());
    const backup = BackupImage.blank(guest, options(), RESERVED_WASM_PAGES + guest.info.guest_initial_pages);
    const buffers = new Set<ArrayBufferLike>();
    for (let e = 1; e <= 60; e++) {
      writeEpoch(pooled, e);
      writeEpoch(fresh, e);
      const a = pooled.capture();
      const b = fresh.capture(); // never given back: always a new buffer
      buffers.add(a.delta.buffer);
      sealDelta(a.delta);
      sealDelta(b.delta);
      expect(Buffer.from(a.delta).equals(Buffer.from(b.delta))).toBe(true);
      // Every byte was written: re-encoding the decoded parts gives the same blob.
      expect(Buffer.from(encodeDelta(decodeDelta(a.delta))).equals(Buffer.from(a.delta))).toBe(true);
      backup.apply(decodeDelta(a.delta));
      pooled.commit(a.epoch);
      fresh.commit(b.epoch);
      expect(pooled.recycle(a.delta)).toBe(true);
    }
    expect(imageBytes(backup).equals(imageBytes(pooled))).toBe(true);
    expect(imageBytes(fresh).equals(imageBytes(pooled))).toBe(true);
    // One buffer for the biggest delta serves every smaller one after it (the first epochs grow it).
    expect(buffers.size).toBeLessThanOrEqual(3);
    expect(pooled.deltas.stats).toMatchObject({ taken: 60, lent: 0 });
    expect(pooled.deltas.stats.allocated).toBe(buffers.size);
    expect(fresh.deltas.stats.allocated).toBe(60);
  });

  it("a delta still held is not reused: the next capture gets another buffer", async () => {
    const vm = VmCore.boot(await guestOf(GUEST), options());
    writeEpoch(vm, 1);
    const held = vm.capture();
    const bytes = Buffer.from(held.delta);
    for (let e = 2; e < 10; e++) {
      writeEpoch(vm, e);
      const c = vm.capture();
      expect(c.delta.buffer).not.toBe(held.delta.buffer);
      vm.recycle(c.delta);
    }
    expect(Buffer.from(held.delta).equals(bytes)).toBe(true);
    expect(vm.deltas.stats.lent).toBe(1);
    expect(vm.recycle(held.delta)).toBe(true);
    expect(vm.recycle(new Uint8Array(8))).toBe(false);
  });
});

describe("undo log chunks", () => {
  it("a released log's chunks serve the next epochs; the pool is bounded; a released log is not used again", () => {
    const memory = new WebAssembly.Memory({ initial: RESERVED_WASM_PAGES + 200 });
    const tracker = new DirtyTracker(memory);
    const dirty = (n: number) => {
      for (let i = 0; i < n; i++) tracker.firstWrite(FIRST_GUEST_PAGE + i);
    };
    dirty(130); // three chunks of 64 pages
    const log = tracker.endEpoch();
    expect(tracker.undoChunks.size).toBe(0);
    log.release();
    expect(tracker.undoChunks.size).toBe(3);
    expect(() => log.release()).toThrow(AssertionError);
    expect(() => log.restoreInto(new Uint8Array(memory.buffer))).toThrow(AssertionError);
    dirty(100); // two chunks, both from the pool
    expect(tracker.undoChunks.size).toBe(1);
    tracker.endEpoch().release();
    expect(tracker.undoChunks.size).toBe(3);
    // At most UNDO_CHUNKS_POOLED_MAX are kept, however many come back.
    const big = new DirtyTracker(new WebAssembly.Memory({ initial: RESERVED_WASM_PAGES + 1100 }));
    for (let i = 0; i < (UNDO_CHUNKS_POOLED_MAX + 5) * 64; i++) big.firstWrite(FIRST_GUEST_PAGE + i);
    big.endEpoch().release();
    expect(big.undoChunks.size).toBe(UNDO_CHUNKS_POOLED_MAX);
  });

  it("pre-images in reused chunks restore exactly: rollback after many committed epochs", async () => {
    const vm = VmCore.boot(await guestOf(GUEST), options());
    for (let e = 1; e <= 20; e++) {
      writeEpoch(vm, e);
      const c = vm.capture();
      vm.commit(c.epoch);
      vm.recycle(c.delta);
    }
    const cut = imageBytes(vm);
    const epoch = vm.epoch - 1;
    for (let e = 21; e <= 24; e++) {
      writeEpoch(vm, e);
      vm.recycle(vm.capture().delta);
    }
    writeEpoch(vm, 25);
    vm.rollback(epoch);
    expect(imageBytes(vm).equals(cut)).toBe(true);
  });
});
