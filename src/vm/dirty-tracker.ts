/**
 * The JS half of the write barrier: which 4 KiB pages were written this
 * epoch, and their pre-images (undo log).
 *
 * The instrumented guest checks the dirty map byte itself and calls
 * `firstWrite(page)` only on the first write to a page in an epoch, so this
 * code runs once per dirty page per epoch, never per store. Everything here
 * costs O(dirty pages); nothing scans the whole memory.
 */
import { DIRTY_MAP_BYTES, FIRST_GUEST_PAGE, PAGE_BYTES, PAGE_SHIFT } from "./layout.js";
import { assert } from "../util/assert.js";

/** Pre-images are kept in chunks so a growing log never copies what it already holds. */
const UNDO_CHUNK_PAGES = 64;
const UNDO_CHUNK_BYTES = UNDO_CHUNK_PAGES * PAGE_BYTES;

/**
 * Chunks of undo logs no longer needed (their epoch committed, or rolled
 * back), kept for the logs of later epochs: a VM that dirties N pages an
 * epoch stops allocating (and the GC stops freeing) N pre-image pages an
 * epoch, whose collection would otherwise land in some capture's pause.
 * Bounded like the delta pool (src/vm/delta-pool.ts), for the same reason:
 * memory the VM's thread keeps beyond its guest's, counted against no limit.
 * 64 chunks (16 MiB) hold the pre-images of 4096 pages, an epoch of the
 * largest case `cohort bench checkpoint` measures.
 */
export const UNDO_CHUNKS_POOLED_MAX = 64;

export class UndoChunks {
  private readonly free: Uint8Array[] = [];

  take(): Uint8Array {
    return this.free.pop() ?? new Uint8Array(UNDO_CHUNK_BYTES);
  }

  give(chunk: Uint8Array): void {
    if (this.free.length < UNDO_CHUNKS_POOLED_MAX) this.free.push(chunk);
  }

  /** Chunks kept now. */
  get size(): number {
    return this.free.length;
  }
}

export class UndoLog {
  readonly pages: number[] = [];
  private readonly chunks: Uint8Array[] = [];
  private released = false;

  constructor(private readonly pool: UndoChunks = new UndoChunks()) {}

  save(page: number, memory: Uint8Array): void {
    assert(!this.released, "save into a released undo log");
    const slot = this.pages.length;
    const chunkIndex = Math.floor(slot / UNDO_CHUNK_PAGES);
    if (chunkIndex === this.chunks.length) this.chunks.push(this.pool.take());
    const at = (slot % UNDO_CHUNK_PAGES) * PAGE_BYTES;
    const from = page * PAGE_BYTES;
    this.chunks[chunkIndex].set(memory.subarray(from, from + PAGE_BYTES), at);
    this.pages.push(page);
  }

  /** Writes every pre-image back (in place, bypassing the barrier) and clears the pages' dirty bytes. */
  restoreInto(memory: Uint8Array): void {
    assert(!this.released, "restore from a released undo log");
    for (let slot = this.pages.length - 1; slot >= 0; slot--) {
      const page = this.pages[slot];
      const chunk = this.chunks[Math.floor(slot / UNDO_CHUNK_PAGES)];
      const at = (slot % UNDO_CHUNK_PAGES) * PAGE_BYTES;
      // A page beyond the current size belongs to memory that a rollback across memory.grow discards.
      // page * PAGE_BYTES, not a shift: page numbers above 2^19 would turn negative.
      if (page * PAGE_BYTES + PAGE_BYTES <= memory.length) memory.set(chunk.subarray(at, at + PAGE_BYTES), page * PAGE_BYTES);
    }
  }

  /** Each saved page's pre-image, by page number: views into the log's chunks, valid until release(). */
  preImages(): Map<number, Uint8Array> {
    assert(!this.released, "pre-images of a released undo log");
    const out = new Map<number, Uint8Array>();
    for (let slot = 0; slot < this.pages.length; slot++) {
      const chunk = this.chunks[Math.floor(slot / UNDO_CHUNK_PAGES)];
      const at = (slot % UNDO_CHUNK_PAGES) * PAGE_BYTES;
      if (!out.has(this.pages[slot])) out.set(this.pages[slot], chunk.subarray(at, at + PAGE_BYTES));
    }
    return out;
  }

  /** The log is no longer needed (its epoch committed, or it was restored): its chunks go back to the pool. */
  release(): void {
    assert(!this.released, "undo log released twice");
    this.released = true;
    for (const chunk of this.chunks) this.pool.give(chunk);
    this.chunks.length = 0;
  }

  get bytes(): number {
    return this.chunks.length * UNDO_CHUNK_BYTES;
  }
}

export class DirtyTracker {
  private memory: WebAssembly.Memory;
  private view: Uint8Array;
  private dirty: Uint32Array = new Uint32Array(1024);
  private count = 0;
  /** Chunks for the undo logs, reused once a log is released. */
  readonly undoChunks = new UndoChunks();
  /** Pre-images of the pages written in the current epoch. */
  undo = new UndoLog(this.undoChunks);

  constructor(memory: WebAssembly.Memory) {
    this.memory = memory;
    this.view = new Uint8Array(memory.buffer);
  }

  /** The current view of memory; memory.grow detaches the old buffer, so always go through here. */
  bytes(): Uint8Array {
    if (this.view.buffer !== this.memory.buffer) this.view = new Uint8Array(this.memory.buffer);
    return this.view;
  }

  /** Called by the guest's barrier (import cohort_hv.first_write) and by host writes into guest memory. */
  readonly firstWrite = (page: number): void => {
    const mem = this.bytes();
    // Out-of-range pages come from accesses that are about to trap; the hypervisor region is never guest-written.
    if (page < FIRST_GUEST_PAGE || page * PAGE_BYTES >= mem.length || page >= DIRTY_MAP_BYTES) return;
    if (mem[page] !== 0) return;
    mem[page] = 1;
    if (this.count === this.dirty.length) {
      const bigger = new Uint32Array(this.dirty.length * 2);
      bigger.set(this.dirty);
      this.dirty = bigger;
    }
    this.dirty[this.count++] = page;
    this.undo.save(page, mem);
  };

  /** Called by the guest's hoisted loop barriers (import cohort_hv.first_write_range): pages first..last, inclusive. */
  readonly firstWriteRange = (first: number, last: number): void => {
    for (let page = first; page <= last; page++) this.firstWrite(page);
  };

  /** Marks [address, address + length) before the host writes there (inbox payloads). */
  markRange(address: number, length: number): void {
    if (length <= 0) return;
    const last = (address + length - 1) >>> PAGE_SHIFT;
    for (let page = address >>> PAGE_SHIFT; page <= last; page++) this.firstWrite(page);
  }

  get dirtyCount(): number {
    return this.count;
  }

  /** The dirty pages of this epoch, in first-write order (a view; valid until reset). */
  dirtyPages(): Uint32Array {
    return this.dirty.subarray(0, this.count);
  }

  /**
   * Ends the epoch (also how a rollback discards the current one): clears the dirty bytes of exactly the pages recorded (O(dirty)),
   * hands back the epoch's undo log and starts an empty one.
   */
  endEpoch(): UndoLog {
    const mem = this.bytes();
    for (let i = 0; i < this.count; i++) mem[this.dirty[i]] = 0;
    this.count = 0;
    const finished = this.undo;
    this.undo = new UndoLog(this.undoChunks);
    return finished;
  }

  /** Swaps in a new memory (rollback across memory.grow re-creates it). */
  rebind(memory: WebAssembly.Memory): void {
    assert(this.count === 0, "rebind with pages still recorded as dirty");
    this.memory = memory;
    this.view = new Uint8Array(memory.buffer);
  }
}
