/**
 * The buffers a VM lays its checkpoint deltas out in, reused from epoch to
 * epoch: in steady state a capture allocates no delta buffer, so it neither
 * page-faults fresh memory in nor leaves a megabyte of garbage per epoch for
 * the GC to free (whose weak-callback passes and scavenges would otherwise
 * land in some later capture's pause).
 *
 * Whoever consumes a delta gives its buffer back once nothing reads it any
 * more: in process with `recycle(delta)`, across threads by transferring the
 * ArrayBuffer back with its id (`giveBack`; see VmWorker.recycle). A delta
 * never given back is ordinary garbage and the pool allocates another, so
 * correctness never depends on returns, only the allocation rate does.
 *
 * A buffer is either lent (taken, not yet given back) or free, never both:
 * each loan has its own id and its own view, and a loan given back twice, or a
 * buffer the pool does not know, is refused (the first is a bug and asserts).
 */
import { assert } from "../util/assert.js";

export interface DeltaPoolLimits {
  /** Free buffers kept for reuse. */
  buffers: number;
  /** Their bytes in total. */
  bytes: number;
}

/**
 * Free buffers are bounded because they are memory the VM's thread keeps on
 * top of its guest's memory and undo logs, counted against no limit: without
 * a bound, one burst (an epoch that dirtied much of a large memory, or a slow
 * link that kept many deltas in flight until they all came back at once)
 * would stay pinned for the VM's lifetime. Four buffers of up to 64 MiB in
 * all cover a few epochs in flight at 4096 dirty pages (a 16 MiB delta); a
 * buffer given back beyond that is left to the GC.
 */
export const DELTA_POOL_LIMITS: DeltaPoolLimits = { buffers: 4, bytes: 64 * 1024 * 1024 };

/**
 * Loans whose return the pool waits for, at most. The record of a loan is a
 * number, but a consumer that never gives deltas back (a test or a tool that
 * drives VmCore in process) would grow it by one per capture forever. Beyond
 * this the oldest loan is forgotten: if it does come back, it is not reused.
 */
export const DELTA_LOANS_TRACKED_MAX = 1024;

/** Smallest buffer allocated: small deltas (a few pages) share one size. */
const MIN_CAPACITY = 64 * 1024;

export interface DeltaPoolStats {
  /** take() calls. */
  taken: number;
  /** ... served from a free buffer. */
  reused: number;
  /** ... that allocated a new buffer. */
  allocated: number;
  /** Loans given back. */
  returned: number;
  /** Free buffers left to the GC to stay within the limits (the smallest first). */
  discarded: number;
  /** Loans no longer waited for (DELTA_LOANS_TRACKED_MAX), and returns of loans the pool did not know. */
  forgotten: number;
  /** Loans out now (not given back, not forgotten). */
  lent: number;
  free_buffers: number;
  free_bytes: number;
}

/** Ids are unique in a thread, across pools: a return addressed to a pool that was replaced matches nothing. */
let nextLoanId = 1;

export class DeltaPool {
  /** Free buffers, any order. */
  private readonly free: ArrayBuffer[] = [];
  private freeBytes = 0;
  /** Loan id -> its buffer's byteLength, in loan order (the oldest is forgotten first). */
  private readonly out = new Map<number, number>();
  /** The view each loan was handed out as -> its id (in process returns; views that crossed threads are new objects). */
  private readonly views = new WeakMap<Uint8Array, number>();
  private readonly counts = { taken: 0, reused: 0, allocated: 0, returned: 0, discarded: 0, forgotten: 0 };

  constructor(readonly limits: DeltaPoolLimits = DELTA_POOL_LIMITS) {
    assert(Number.isInteger(limits.buffers) && limits.buffers >= 0, `pool buffers limit must be a non-negative integer, got ${limits.buffers}`);
    assert(Number.isSafeInteger(limits.bytes) && limits.bytes >= 0, `pool bytes limit must be a non-negative integer, got ${limits.bytes}`);
  }

  /**
   * A view of exactly `bytes` bytes at offset 0 of a buffer lent to the
   * caller (the buffer may be larger). Its content is whatever the buffer
   * held: the caller writes every byte it uses.
   */
  take(bytes: number): Uint8Array {
    assert(Number.isSafeInteger(bytes) && bytes >= 0, `delta size must be a non-negative integer, got ${bytes}`);
    this.counts.taken++;
    let buffer: ArrayBuffer | undefined;
    let best = -1;
    for (let i = 0; i < this.free.length; i++) {
      const size = this.free[i].byteLength;
      if (size >= bytes && (best < 0 || size < this.free[best].byteLength)) best = i;
    }
    if (best >= 0) {
      buffer = this.free[best];
      this.free[best] = this.free[this.free.length - 1];
      this.free.pop();
      this.freeBytes -= buffer.byteLength;
      this.counts.reused++;
    } else {
      buffer = new ArrayBuffer(capacityFor(bytes));
      this.counts.allocated++;
    }
    const id = nextLoanId++;
    this.out.set(id, buffer.byteLength);
    if (this.out.size > DELTA_LOANS_TRACKED_MAX) {
      const oldest = this.out.keys().next().value as number;
      this.out.delete(oldest);
      this.counts.forgotten++;
    }
    const view = new Uint8Array(buffer, 0, bytes);
    this.views.set(view, id);
    return view;
  }

  /** The loan id of a view take() returned and that was not given back yet (what crosses threads with it). */
  idOf(view: Uint8Array): number | undefined {
    const id = this.views.get(view);
    return id !== undefined && this.out.has(id) ? id : undefined;
  }

  /**
   * In process: the caller is done with `view` (from take()) and every view
   * of its buffer. False if it is not a loan of this pool that is still out
   * (not from here, or forgotten), and then nothing happens.
   */
  recycle(view: Uint8Array): boolean {
    const id = this.views.get(view);
    // A loan given back twice: its buffer may be lent again already, to someone who is writing it.
    assert(!this.free.includes(view.buffer as ArrayBuffer), "a delta was given back twice");
    if (id === undefined) return false;
    this.views.delete(view);
    return this.giveBack(id, view.buffer as ArrayBuffer);
  }

  /**
   * Loan `id` comes back as `buffer` (across threads: the same memory in a new
   * ArrayBuffer, the sender's copy detached by the transfer). False if the
   * pool does not wait for that loan, or the buffer is not the one lent.
   */
  giveBack(id: number, buffer: ArrayBuffer): boolean {
    const size = this.out.get(id);
    if (size === undefined || !(buffer instanceof ArrayBuffer) || buffer.byteLength !== size) {
      this.counts.forgotten++;
      return false;
    }
    this.out.delete(id);
    assert(!this.free.includes(buffer), "a lent buffer is free already");
    this.free.push(buffer);
    this.freeBytes += buffer.byteLength;
    this.counts.returned++;
    this.trim();
    return true;
  }

  get stats(): DeltaPoolStats {
    return { ...this.counts, lent: this.out.size, free_buffers: this.free.length, free_bytes: this.freeBytes };
  }

  /** Back within the limits: the smallest free buffers go first (a big one serves small deltas too). */
  private trim(): void {
    while (this.free.length > this.limits.buffers || this.freeBytes > this.limits.bytes) {
      let smallest = 0;
      for (let i = 1; i < this.free.length; i++) if (this.free[i].byteLength < this.free[smallest].byteLength) smallest = i;
      const [dropped] = this.free.splice(smallest, 1);
      this.freeBytes -= dropped.byteLength;
      this.counts.discarded++;
    }
  }
}

/**
 * Buffer size for a delta of `bytes`: at least MIN_CAPACITY, else rounded up
 * to a quarter of its power of two (at most 25 % slack), so deltas whose
 * dirty page count wanders a little from epoch to epoch fit the same buffer.
 */
export function capacityFor(bytes: number): number {
  if (bytes <= MIN_CAPACITY) return MIN_CAPACITY;
  const step = 2 ** Math.floor(Math.log2(bytes)) / 4;
  return Math.ceil(bytes / step) * step;
}
