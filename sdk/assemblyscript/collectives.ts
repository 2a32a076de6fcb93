// MPI-style collectives for Cohort guests, built on plain group messages.
//
// Guests are event-driven: there is no blocking receive. Each collective is a
// small state machine the guest drives: it *starts* an operation (arrive,
// contribute, send) and feeds every incoming group message to `handle` from
// its `message` export. Both return
//
//   NOT_MINE     the message is not for this collective (handle only)
//   IN_PROGRESS  accepted; the operation has not completed yet on this rank
//   COMPLETED    the operation completed on this rank: read its result now
//
// Cohort delivers group messages exactly once and, per sender, in send order
// (also across failovers), so the state machines need no timeouts, acks or
// duplicate handling. Messages of different senders may interleave freely.
//
// Wire format (little-endian), an 8-byte header then the payload:
//   0 u8  MAGIC (0xC7)
//   1 u8  kind (KIND_*)
//   2 u8  instance id (several collectives may run side by side)
//   3 u8  0
//   4 u32 round (1, 2, ...: consecutive rounds never mix)
// A guest that also sends its own messages must not start them with 0xC7 0x01..0x05 0x<id> 0x00.
//
// Back-pressure: `cohort.send` returns E_FULL while the VM's sender log or
// outbox is full. Collectives then queue the message (in guest memory, so it
// is checkpointed) and keep per-destination order; call `flushSends()` from a
// timer while `queuedSends() > 0` (the examples do).

import { E_FULL, errorName, OK, rank, send, size } from "./index";

export const NOT_MINE: i32 = 0;
export const IN_PROGRESS: i32 = 1;
export const COMPLETED: i32 = 2;

export const MAGIC: u8 = 0xc7;
export const HEADER_BYTES: i32 = 8;
export const KIND_BARRIER_ARRIVE: u8 = 1;
export const KIND_BARRIER_RELEASE: u8 = 2;
export const KIND_BROADCAST: u8 = 3;
export const KIND_REDUCE: u8 = 4;
export const KIND_REDUCE_RESULT: u8 = 5;

/** Reduction operators of Allreduce. */
export const OP_SUM: i32 = 0;
export const OP_MIN: i32 = 1;
export const OP_MAX: i32 = 2;

// ---------------------------------------------------------------------------
// Sends with back-pressure: in order, queued while the host says E_FULL.

class QueuedSend {
  constructor(public to: i32, public bytes: Uint8Array) {}
}

const sendQueue: Array<QueuedSend> = [];

/**
 * Sends `bytes` to rank `to`, or queues a copy if the host is full (or
 * earlier sends are still queued, to keep order). Any other error traps.
 */
export function sendOrQueue(to: i32, bytes: Uint8Array): void {
  if (sendQueue.length == 0) {
    const rc = send(to, bytes);
    if (rc == OK) return;
    if (rc != E_FULL) throw new Error("collectives: send to rank " + to.toString() + " failed: " + errorName(rc));
  }
  sendQueue.push(new QueuedSend(to, bytes.slice()));
}

/** Retries queued sends in order until the host is full again; returns how many are still queued. */
export function flushSends(): i32 {
  while (sendQueue.length > 0) {
    const next = sendQueue[0];
    const rc = send(next.to, next.bytes);
    if (rc == E_FULL) break;
    if (rc != OK) throw new Error("collectives: send to rank " + next.to.toString() + " failed: " + errorName(rc));
    sendQueue.shift();
  }
  return sendQueue.length;
}

/** Messages waiting for the host to accept them. */
export function queuedSends(): i32 {
  return sendQueue.length;
}

// ---------------------------------------------------------------------------
// Framing.

/** A message of `kind` for collective `id`, round `round`, with room for `payload` bytes after the header. */
function frame(kind: u8, id: u8, round: u32, payload: i32): Uint8Array {
  const bytes = new Uint8Array(HEADER_BYTES + payload);
  const p = bytes.dataStart;
  store<u8>(p, MAGIC, 0);
  store<u8>(p, kind, 1);
  store<u8>(p, id, 2);
  store<u8>(p, 0, 3);
  store<u32>(p, round, 4);
  return bytes;
}

/** The kind of a collective message for instance `id`, or 0 if it is not one. */
function kindOf(bytes: Uint8Array, id: u8): u8 {
  if (bytes.length < HEADER_BYTES) return 0;
  const p = bytes.dataStart;
  if (load<u8>(p, 0) != MAGIC || load<u8>(p, 2) != id || load<u8>(p, 3) != 0) return 0;
  const kind = load<u8>(p, 1);
  return kind >= KIND_BARRIER_ARRIVE && kind <= KIND_REDUCE_RESULT ? kind : 0;
}

function roundOf(bytes: Uint8Array): u32 {
  return load<u32>(bytes.dataStart, 4);
}

function checkRoot(root: i32): void {
  if (root < 0 || root >= size()) throw new RangeError("collectives: root " + root.toString() + " is not a rank");
}

// A string, not an Error: AssemblyScript passes a thrown error's message to
// abort() only for a literal `throw new Error(<message>)`, so callers write
// `throw new Error(protocolMessage(...))`.
function protocolMessage(what: string, from: i32, round: u32, expected: u32): string {
  return "collectives: " + what + " for round " + round.toString() + " from rank " + from.toString() + ", expected round " + expected.toString();
}

// ---------------------------------------------------------------------------

/**
 * Barrier: every rank calls `arrive()`; the root counts arrivals (its own
 * included) and, once all `size()` ranks arrived, releases everyone. The
 * operation completes on a rank when it is released: `arrive()` returns
 * COMPLETED on the rank that arrived last if that is the root, otherwise a
 * later `handle()` does. `round` = barriers completed on this rank.
 */
export class Barrier {
  /** Barriers completed on this rank. */
  round: u32 = 0;
  /** This rank arrived and was not released yet. */
  waiting: bool = false;
  /** Root: arrivals counted for round `round + 1` (its own included). */
  private arrivals: i32 = 0;

  constructor(public readonly id: u8 = 0, public readonly root: i32 = 0) {}

  arrive(): i32 {
    checkRoot(this.root);
    if (this.waiting) throw new Error("Barrier.arrive: already waiting at the barrier");
    this.waiting = true;
    if (rank() != this.root) {
      sendOrQueue(this.root, frame(KIND_BARRIER_ARRIVE, this.id, this.round + 1, 0));
      return IN_PROGRESS;
    }
    return this.count();
  }

  handle(from: i32, bytes: Uint8Array): i32 {
    const kind = kindOf(bytes, this.id);
    if (kind == KIND_BARRIER_ARRIVE) {
      const r = roundOf(bytes);
      if (rank() != this.root || r != this.round + 1) throw new Error(protocolMessage("barrier arrival", from, r, this.round + 1));
      return this.count();
    }
    if (kind == KIND_BARRIER_RELEASE) {
      const r = roundOf(bytes);
      if (from != this.root || !this.waiting || r != this.round + 1) throw new Error(protocolMessage("barrier release", from, r, this.round + 1));
      this.round = r;
      this.waiting = false;
      return COMPLETED;
    }
    return NOT_MINE;
  }

  /** Root: one more arrival; release when everybody is there and the root itself arrived. */
  private count(): i32 {
    this.arrivals++;
    if (this.arrivals < size()) return IN_PROGRESS;
    this.round++;
    this.arrivals = 0;
    this.waiting = false;
    const release = frame(KIND_BARRIER_RELEASE, this.id, this.round, 0);
    for (let r = 0; r < size(); r++) if (r != this.root) sendOrQueue(r, release);
    return COMPLETED;
  }
}

/**
 * Broadcast: the root calls `send(bytes)` (COMPLETED at once on the root);
 * every other rank's `handle()` returns COMPLETED with the bytes in `data`.
 * Rounds are numbered, so consecutive broadcasts arrive in order.
 */
export class Broadcast {
  /** Broadcasts completed on this rank. */
  round: u32 = 0;
  /** The bytes of the last completed broadcast. */
  data: Uint8Array = new Uint8Array(0);

  constructor(public readonly id: u8 = 0, public readonly root: i32 = 0) {}

  send(bytes: Uint8Array): i32 {
    checkRoot(this.root);
    if (rank() != this.root) throw new Error("Broadcast.send on rank " + rank().toString() + ", root is " + this.root.toString());
    this.round++;
    const message = frame(KIND_BROADCAST, this.id, this.round, bytes.length);
    memory.copy(message.dataStart + HEADER_BYTES, bytes.dataStart, <usize>bytes.length);
    for (let r = 0; r < size(); r++) if (r != this.root) sendOrQueue(r, message);
    this.data = bytes.slice();
    return COMPLETED;
  }

  handle(from: i32, bytes: Uint8Array): i32 {
    if (kindOf(bytes, this.id) != KIND_BROADCAST) return NOT_MINE;
    const r = roundOf(bytes);
    if (from != this.root || r != this.round + 1) throw new Error(protocolMessage("broadcast", from, r, this.round + 1));
    this.round = r;
    this.data = bytes.slice(HEADER_BYTES);
    return COMPLETED;
  }
}

/**
 * Allreduce of one f64 per rank (sum, min or max): every rank calls
 * `contribute(value)`; the contributions are reduced at the root, in rank
 * order (so the f64 result is the same whatever order messages arrive in),
 * and the result is broadcast. When the operation completes on a rank,
 * `result` holds the reduced value of round `round`. A rank contributes to
 * round k+1 only after round k completed on it, so rounds never mix.
 */
export class Allreduce {
  /** Rounds completed on this rank. */
  round: u32 = 0;
  /** The result of round `round`. */
  result: f64 = 0;
  /** This rank contributed to round `round + 1` and has no result yet. */
  waiting: bool = false;
  /** Root: contribution of each rank to round `round + 1`. */
  private values: StaticArray<f64>;
  private present: StaticArray<bool>;
  private count: i32 = 0;

  constructor(public readonly id: u8 = 0, public readonly root: i32 = 0, public readonly op: i32 = OP_SUM) {
    if (op != OP_SUM && op != OP_MIN && op != OP_MAX) throw new RangeError("Allreduce: unknown op " + op.toString());
    this.values = new StaticArray<f64>(0);
    this.present = new StaticArray<bool>(0);
  }

  contribute(value: f64): i32 {
    checkRoot(this.root);
    if (this.waiting) throw new Error("Allreduce.contribute: round " + (this.round + 1).toString() + " already has this rank's contribution");
    this.waiting = true;
    if (rank() != this.root) {
      const message = frame(KIND_REDUCE, this.id, this.round + 1, 8);
      store<f64>(message.dataStart, value, HEADER_BYTES);
      sendOrQueue(this.root, message);
      return IN_PROGRESS;
    }
    return this.collect(rank(), value);
  }

  handle(from: i32, bytes: Uint8Array): i32 {
    const kind = kindOf(bytes, this.id);
    if (kind == KIND_REDUCE) {
      const r = roundOf(bytes);
      if (rank() != this.root || r != this.round + 1 || bytes.length != HEADER_BYTES + 8) throw new Error(protocolMessage("allreduce contribution", from, r, this.round + 1));
      return this.collect(from, load<f64>(bytes.dataStart, HEADER_BYTES));
    }
    if (kind == KIND_REDUCE_RESULT) {
      const r = roundOf(bytes);
      if (from != this.root || !this.waiting || r != this.round + 1 || bytes.length != HEADER_BYTES + 8) throw new Error(protocolMessage("allreduce result", from, r, this.round + 1));
      this.round = r;
      this.result = load<f64>(bytes.dataStart, HEADER_BYTES);
      this.waiting = false;
      return COMPLETED;
    }
    return NOT_MINE;
  }

  /** Root: one contribution; reduce and broadcast once every rank (the root included) contributed. */
  private collect(from: i32, value: f64): i32 {
    const n = size();
    if (this.values.length != n) {
      this.values = new StaticArray<f64>(n);
      this.present = new StaticArray<bool>(n);
    }
    if (this.present[from]) throw new Error("Allreduce: two contributions of rank " + from.toString() + " to round " + (this.round + 1).toString());
    this.present[from] = true;
    this.values[from] = value;
    this.count++;
    if (this.count < n) return IN_PROGRESS;
    let acc = this.values[0];
    for (let r = 1; r < n; r++) {
      const v = this.values[r];
      if (this.op == OP_SUM) acc += v;
      else if (this.op == OP_MIN) acc = min(acc, v);
      else acc = max(acc, v);
    }
    for (let r = 0; r < n; r++) this.present[r] = false;
    this.count = 0;
    this.round++;
    this.result = acc;
    this.waiting = false;
    const message = frame(KIND_REDUCE_RESULT, this.id, this.round, 8);
    store<f64>(message.dataStart, acc, HEADER_BYTES);
    for (let r = 0; r < n; r++) if (r != this.root) sendOrQueue(r, message);
    return COMPLETED;
  }
}
