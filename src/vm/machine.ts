/**
 * A VM's executing replica: one instance of an instrumented guest, its
 * memory, runtime state, dirty tracking and undo log. Runs on whatever thread
 * owns it (a worker in production, see worker.ts; the test and benchmark code
 * also drive it in-process). One guest call at a time; checkpoints happen
 * between calls, when the wasm stack is empty.
 */
import { abiImports, E_BAD_RANK, E_FULL, E_INVALID, E_OK, E_TOO_BIG, type AbiHost } from "./abi.js";
import { DirtyTracker, type UndoLog } from "./dirty-tracker.js";
import { BASE_BYTES, GLOBALS_OFFSET, GLOBAL_SLOT_BYTES, PAGE_BYTES, RESERVED_WASM_PAGES, WASM_PAGE_BYTES } from "./layout.js";
import { decodeRuntimeState, encodeRuntimeState, initialRuntimeState, OUTPUT_LOG, OUTPUT_REPLY, type OutputRecord, type RuntimeState } from "./runtime-state.js";
import { Channels, type GroupMessage, type ReceiveDecision } from "../core/channel.js";
import { EXPORT_BOOT, EXPORT_LOAD_GLOBALS, EXPORT_SAVE_GLOBALS, HV_MODULE, type ModuleInfo } from "../guest/module-info.js";
import { deltaByteLength, layoutDelta, type ImageParts } from "../checkpoint/format.js";
import { DeltaPool } from "./delta-pool.js";
import { assert } from "../util/assert.js";
import { describeThrown } from "../guest/errors.js";

export interface VmLimits {
  /** Guest memory ceiling, in 64 KiB wasm pages (the hypervisor region is extra). */
  memory_pages_max: number;
  /** Unreleased external output held for this VM, in bytes. */
  output_bytes_max: number;
  /** One log record, reply or group message. */
  message_bytes_max: number;
  timers_max: number;
  /** Epochs captured but not yet committed; each keeps an undo log. */
  uncommitted_epochs_max: number;
  /** Group messages waiting to be taken by the host (takeOutbox), in messages. */
  outbox_max: number;
  /**
   * The sender log (replicated, part of every checkpoint): payload bytes plus
   * SENDER_LOG_ENTRY_OVERHEAD_BYTES per message, until a committed cut shows
   * the message delivered. A send that would exceed it returns E_FULL.
   */
  sender_log_bytes_max: number;
  /** Received group messages held (not replicated) until deliverable: out of channel order, or sent in a later epoch. */
  pending_messages_max: number;
  /** Payload bytes of those held messages. */
  pending_bytes_max: number;
  /** Wall-clock budget of one guest call; enforced by the thread that owns the worker. */
  call_cpu_ms: number;
}

export const DEFAULT_LIMITS: VmLimits = {
  memory_pages_max: 4096, // 256 MiB
  output_bytes_max: 1 << 20,
  message_bytes_max: 64 * 1024,
  timers_max: 1024,
  uncommitted_epochs_max: 256,
  outbox_max: 4096,
  sender_log_bytes_max: 4 * 1024 * 1024,
  pending_messages_max: 4096,
  pending_bytes_max: 8 * 1024 * 1024,
  call_cpu_ms: 1000,
};

export interface GuestModule {
  module: WebAssembly.Module;
  info: ModuleInfo;
  /** sha-256 of the instrumented module; images name the module they belong to. */
  hash: Uint8Array;
}

export interface VmOptions {
  rank: number;
  size: number;
  limits: VmLimits;
  /** Wall clock in ms; injectable so tests can drive time. */
  now: () => number;
  /**
   * Apply the consistent-cut rule (hold a message of sender epoch s until this
   * VM is in epoch r >= s). True in `group` mode, where members share one epoch
   * clock; false in `vm` and `none` mode, where each VM's epochs are its own and
   * the numbers of two VMs mean nothing to each other. Default true.
   */
  consistent_cut?: boolean;
  /**
   * Keep sent messages in the sender log until a committed cut shows them
   * delivered (default true). False in `none` mode: nothing is ever re-sent
   * there, and a log nobody trims would only grow until sends fail.
   */
  sender_log?: boolean;
  /** Called at the start of every guest call (the worker ticks its CPU watchdog here, so a chain of deliveries gets a budget per call). */
  on_guest_call?: () => void;
  /** Called right before a group message is handed to the guest, with the receiver's epoch (tracing, tests). */
  on_deliver?: (message: GroupMessage, receiver_epoch: number) => void;
}

export type { GroupMessage } from "../core/channel.js";

/**
 * What receive() did with one message:
 * - "delivered": handed to the guest (and possibly held successors after it);
 * - "held": accepted, delivered later (out of channel order, or s > r: after a capture);
 * - "duplicate": its seq was delivered or is held already: dropped;
 * - "stale": older incarnation than the VM's: dropped (its sender re-sends it if needed);
 * - "full": NOT accepted, the pending queue is full: offer it again after the next capture;
 * - "early": NOT accepted, newer incarnation than the VM's: offer it again after setIncarnation.
 */
export type ReceiveStatus = "delivered" | Exclude<ReceiveDecision, "deliver">;

export interface ReceiveResult {
  status: ReceiveStatus;
  /** Guest `message` calls this receive made (this message plus any held successors it unblocked). */
  delivered: number;
}

export interface CapturedDelta {
  epoch: number;
  /**
   * Laid out by layoutDelta, not yet sealed: the checksum is computed off the
   * VM's thread. A view at offset 0 of a buffer from the VM's pool, which may
   * be larger; give it back with recycle() once done with it.
   */
  delta: Uint8Array;
  dirty_pages: number;
  pause_us: number;
  /**
   * Index = sender rank: the highest seq delivered from it at this cut. Once
   * cut `epoch` commits, each sender may trim its log to it (trimSenderLog).
   */
  delivered: number[];
  /** Held messages delivered right after the capture because the new epoch made them deliverable. */
  delivered_after: number;
}

export interface CaptureOptions {
  /**
   * Deliver held messages that the new epoch makes deliverable (default true).
   * False when the caller needs image() of the cut first; it then calls deliverPending().
   */
  deliver_pending?: boolean;
}

/** The VM trapped or broke an ABI rule; it executes nothing more. */
export class VmCrashedError extends Error {
  override name = "VmCrashedError";
  readonly code = "VmCrashed";
}

interface GuestExports {
  [EXPORT_BOOT]: () => void;
  [EXPORT_SAVE_GLOBALS]: () => void;
  [EXPORT_LOAD_GLOBALS]: () => void;
  start?: () => void;
  message?: (from: number, ptr: number, len: number) => void;
  request?: (session: number, request_id: number, ptr: number, len: number) => void;
  timer?: (id: number) => void;
  cohort_inbox?: (len: number) => number;
}

/** State at the start of an epoch (= at the previous cut) and the epoch's undo log once it ended. */
interface EpochRecord {
  globals: Uint8Array;
  state: Uint8Array;
  memory_pages: number;
  undo: UndoLog | null;
}

export class VmCore implements AbiHost {
  private memory: WebAssembly.Memory;
  private readonly tracker: DirtyTracker;
  private exports!: GuestExports;
  private state: RuntimeState;
  private committed = 0;
  /** The epoch of the newest reply emitted (outputWaiting). */
  private newestReplyEpoch = 0;
  private readonly epochs = new Map<number, EpochRecord>();
  /** The buffers deltas are laid out in (see recycle). */
  readonly deltas = new DeltaPool();
  /** The group channels; their replicated part is `state`'s channel fields (Channels adopts them). */
  private readonly channels: Channels;
  private crash: string | null = null;

  private constructor(
    readonly guest: GuestModule,
    private readonly options: VmOptions,
    memory: WebAssembly.Memory,
    state: RuntimeState,
  ) {
    this.memory = memory;
    this.tracker = new DirtyTracker(memory);
    this.state = state;
    for (const record of state.output) if (record.kind === OUTPUT_REPLY) this.newestReplyEpoch = Math.max(this.newestReplyEpoch, record.epoch);
    this.channels = new Channels(options, state);
    this.instantiate();
  }

  /** A fresh VM: blank memory, data segments and start run inside epoch 1. */
  static boot(guest: GuestModule, options: VmOptions): VmCore {
    const vm = new VmCore(guest, options, newMemory(guest.info, options.limits, RESERVED_WASM_PAGES + guest.info.guest_initial_pages), initialRuntimeState());
    vm.recordEpochStart();
    vm.runBoot();
    return vm;
  }

  /** A VM continuing from a committed image (copies the image into a new memory). */
  static restore(guest: GuestModule, image: ImageParts, options: VmOptions): VmCore {
    assert(equalBytes(image.module_hash, guest.hash), "image belongs to another module");
    const memory = newMemory(guest.info, options.limits, image.memory_pages);
    const bytes = new Uint8Array(memory.buffer);
    for (let i = 0; i < image.page_indices.length; i++) {
      bytes.set(image.page_data.subarray(i * PAGE_BYTES, (i + 1) * PAGE_BYTES), image.page_indices[i] * PAGE_BYTES);
    }
    return VmCore.resume(guest, options, memory, image.globals, image.runtime_state, image.epoch);
  }

  /**
   * A VM continuing on an existing memory that holds the committed image of cut
   * `epoch`: zero-copy promotion of a backup.
   */
  static resume(guest: GuestModule, options: VmOptions, memory: WebAssembly.Memory, globals: Uint8Array, runtime_state: Uint8Array, epoch: number): VmCore {
    const state = epoch === 0 ? initialRuntimeState() : decodeRuntimeState(runtime_state);
    const vm = new VmCore(guest, options, memory, state);
    vm.committed = epoch;
    if (state.booted) {
      vm.loadGlobals(globals);
      assert(state.epoch === epoch + 1, `runtime state epoch ${state.epoch} does not follow cut ${epoch}`);
    } else {
      state.epoch = epoch + 1;
    }
    vm.recordEpochStart();
    if (!state.booted) vm.runBoot();
    return vm;
  }

  get epoch(): number {
    return this.state.epoch;
  }

  get committedEpoch(): number {
    return this.committed;
  }

  get crashed(): string | null {
    return this.crash;
  }

  /**
   * The newest epoch in which the VM did something: a guest call ran (the
   * boot's included: what it sends and logs is epoch 1's), or a message was
   * accepted (held or refused for now). An epoch it did nothing in needs no
   * checkpoint (the core's `active` event). A rollback clears it.
   */
  activeEpoch = 0;

  get dirtyPages(): number {
    return this.tracker.dirtyCount;
  }

  get memoryBytes(): number {
    return this.memory.buffer.byteLength;
  }

  // ---- guest calls -------------------------------------------------------

  /**
   * Calls the guest's `message` export directly. Group messages go through
   * receive(), which calls this in channel order; this bypasses the channel
   * bookkeeping (tests and fixtures).
   */
  message(from_rank: number, payload: Uint8Array): void {
    this.call("message", () => {
      const ptr = this.writeInbox(payload);
      this.exports.message?.(from_rank, ptr, payload.length);
    });
  }

  request(session: number, request_id: number, payload: Uint8Array): void {
    this.call("request", () => {
      const ptr = this.writeInbox(payload);
      this.exports.request?.(session, request_id, ptr, payload.length);
    });
  }

  timer(id: number): void {
    this.call("timer", () => this.exports.timer?.(id));
  }

  /**
   * Calls any export by name: for tests and fixtures whose exports are not
   * ABI entry points. Same crash handling as an ABI call.
   */
  invoke(name: string, args: (number | bigint)[]): unknown {
    let result: unknown;
    this.call(name, () => {
      const fn = (this.exports as unknown as Record<string, unknown>)[name];
      if (typeof fn !== "function" || name.startsWith("__cohort_")) throw new Error(`no guest export ${name}`);
      result = (fn as (...a: (number | bigint)[]) => unknown)(...args);
    });
    return result;
  }

  /** Fires every timer due at `now`, earliest first; returns how many fired. */
  fireDueTimers(now: number): number {
    let fired = 0;
    for (;;) {
      const next = this.nextTimer();
      if (!next || next[1] > now || this.crash) return fired;
      this.state.timers.delete(next[0]);
      this.timer(next[0]);
      fired++;
    }
  }

  /** [id, due_ms] of the earliest armed timer. */
  nextTimer(): [number, number] | undefined {
    let best: [number, number] | undefined;
    for (const entry of this.state.timers) if (!best || entry[1] < best[1]) best = entry;
    return best;
  }

  // ---- group messaging ---------------------------------------------------
  //
  // The channel logic (stamps, sender log, delivered vector, pending queue,
  // consistent-cut and incarnation rules) is Channels (src/core/channel.ts),
  // whose replicated part is this.state's channel fields. VmCore gives it the
  // epoch and hands to the guest, in order, what it says to deliver.

  /** The group generation this VM belongs to (stamped on what it sends). */
  get incarnation(): number {
    return this.channels.incarnation;
  }

  /** Received messages held until deliverable (not replicated). */
  get pendingMessages(): number {
    return this.channels.pendingCount;
  }

  /** Size of the sender log as counted against `sender_log_bytes_max`. */
  get senderLogBytes(): number {
    return this.channels.senderLogBytes;
  }

  /** Entries in the sender log. */
  get senderLogLength(): number {
    return this.channels.senderLogLength;
  }

  /** Group messages the guest sent since the host last took them, in send order; the host routes them. */
  takeOutbox(): GroupMessage[] {
    return this.channels.takeOutbox();
  }

  /** See Channels.setIncarnation: never lowers it, drops held messages of the old one, re-stamps the outbox. */
  setIncarnation(incarnation: number): void {
    this.channels.setIncarnation(incarnation);
  }

  /**
   * Offers one group message to this VM (see ReceiveStatus). Delivers it (the
   * guest's `message` export) if it is next in its channel and was sent in an
   * epoch <= the current one, then every held successor that became
   * deliverable. Throws on a malformed message (a host bug) and, like every
   * guest call, VmCrashedError if delivery crashes the guest.
   */
  receive(message: GroupMessage): ReceiveResult {
    if (this.crash) {
      this.channels.check(message); // a malformed message is reported as such, crashed VM or not
      throw new VmCrashedError(`VM crashed earlier: ${this.crash}`);
    }
    const epoch = this.state.epoch;
    const decision = this.channels.receive(message, epoch);
    // Held and refused-for-now messages need a capture too (delivered, or offered again, after one).
    if (decision !== "duplicate" && decision !== "stale" && decision !== "early") this.activeEpoch = epoch;
    if (decision !== "deliver") return { status: decision, delivered: 0 };
    this.deliver(message);
    let delivered = 1;
    for (let next = this.channels.next(message.from, epoch); next; next = this.channels.next(message.from, epoch)) {
      this.deliver(next);
      delivered++;
    }
    return { status: "delivered", delivered };
  }

  /**
   * Delivers every held message that is deliverable now (next in its channel,
   * sent in an epoch <= the current one), channel by channel in seq order.
   * capture() calls it once the new epoch started; returns how many it delivered.
   */
  deliverPending(): number {
    const epoch = this.state.epoch;
    let delivered = 0;
    for (let next = this.channels.deliverPending(epoch); next; next = this.channels.deliverPending(epoch)) {
      this.deliver(next);
      delivered++;
    }
    return delivered;
  }

  /** The marker rule (see Channels.markerEpoch): the epoch to capture up to before offering `message`, or null. */
  markerEpoch(message: GroupMessage): number | null {
    return this.channels.markerEpoch(message, this.state.epoch);
  }

  /** Index = sender rank: the highest channel seq delivered from it, in the current state. */
  deliveredVector(): number[] {
    return this.channels.deliveredVector();
  }

  /** Index = receiver rank: the last channel seq sent to it, in the current state. */
  sentVector(): number[] {
    return this.channels.sentVector();
  }

  /**
   * Drops sender-log entries the receivers have delivered at a committed cut
   * (see Channels.trim): `delivered_by_receiver[r]` = receiver r's
   * CapturedDelta.delivered[this rank] at that cut. Monotonic.
   */
  trimSenderLog(delivered_by_receiver: readonly number[]): { trimmed: number; sender_log_bytes: number } {
    return this.channels.trim(delivered_by_receiver);
  }

  /** What to re-send to `receiver` after a rollback or promotion (see Channels.resendFor). */
  resendFor(receiver: number, delivered: number): GroupMessage[] {
    return this.channels.resendFor(receiver, delivered);
  }

  /** Unreleased output (tests and status). */
  pendingOutput(): readonly OutputRecord[] {
    return this.state.output;
  }

  /**
   * What unreleased output waits, in O(1) (asked after every guest call):
   * "reply" if a reply to a request may be among it (someone blocks on it),
   * "log" if only log output, null if none. May say "reply" for a reply a
   * rollback undid (one early epoch), never "log" while a reply waits.
   */
  outputWaiting(): "reply" | "log" | null {
    if (this.state.output.length === 0) return null;
    return this.newestReplyEpoch > this.committed ? "reply" : "log";
  }

  private call(what: string, body: () => void): void {
    if (this.crash) throw new VmCrashedError(`VM crashed earlier: ${this.crash}`);
    this.options.on_guest_call?.();
    this.activeEpoch = this.state.epoch;
    try {
      body();
    } catch (error) {
      // describeThrown: a wasm exception that escapes the guest is not an Error and has no message.
      this.crash = `${what}: ${describeThrown(error)}`;
      throw new VmCrashedError(this.crash);
    }
  }

  private writeInbox(payload: Uint8Array): number {
    const inbox = this.exports.cohort_inbox;
    if (!inbox) throw new Error("guest exports no cohort_inbox but receives payloads");
    const ptr = inbox(payload.length) >>> 0;
    const address = BASE_BYTES + ptr;
    const mem = this.tracker.bytes();
    if (address + payload.length > mem.length) throw new Error(`cohort_inbox returned ${ptr}, outside guest memory`);
    this.tracker.markRange(address, payload.length);
    mem.set(payload, address);
    return ptr;
  }

  // ---- checkpoint path ---------------------------------------------------

  /**
   * Checkpoint `epoch`: copies the dirty pages, globals and runtime state into
   * a delta, clears the dirty map for exactly those pages, and starts the next
   * epoch. Cost scales with dirty pages, not memory size. The delta's buffer
   * comes from the VM's pool: once deltas are given back, a capture allocates
   * nothing of the delta's size (only the small encodings kept for rollback).
   */
  capture(options: CaptureOptions = {}): CapturedDelta {
    if (this.crash) throw new VmCrashedError(`VM crashed earlier: ${this.crash}`);
    const started = process.hrtime.bigint();
    const epoch = this.state.epoch;
    assert(epoch - this.committed <= this.options.limits.uncommitted_epochs_max, `more than ${this.options.limits.uncommitted_epochs_max} uncommitted epochs`);
    const globals = this.saveGlobals();
    this.state.epoch = epoch + 1; // the state shipped is the one the next epoch starts from
    const stateBytes = encodeRuntimeState(this.state);
    const pages = this.tracker.dirtyPages();
    const memoryPages = this.memory.buffer.byteLength / WASM_PAGE_BYTES;
    const size = deltaByteLength(pages.length, globals.length, stateBytes.length);
    // A pooled buffer, not zero-filled: every byte is written below before the delta leaves this thread.
    const delta = this.deltas.take(size);
    const regions = layoutDelta(delta, {
      epoch,
      memory_pages: memoryPages,
      page_count: pages.length,
      globals_bytes: globals.length,
      runtime_state_bytes: stateBytes.length,
    });
    const mem = this.tracker.bytes();
    const data = regions.page_data;
    regions.page_indices.set(pages);
    for (let i = 0; i < pages.length; ) {
      // Pages written one after another (a sequential write) are one copy, in the same order.
      let end = i + 1;
      while (end < pages.length && pages[end] === pages[end - 1] + 1) end++;
      const from = pages[i] * PAGE_BYTES;
      data.set(mem.subarray(from, from + (end - i) * PAGE_BYTES), i * PAGE_BYTES);
      i = end;
    }
    regions.globals.set(globals);
    regions.runtime_state.set(stateBytes);
    const dirty = pages.length;
    const record = this.epochs.get(epoch);
    assert(record && record.undo === null, `epoch ${epoch} has a start record and no undo log yet`);
    record.undo = this.tracker.endEpoch();
    this.epochs.set(epoch + 1, { globals, state: stateBytes, memory_pages: memoryPages, undo: null });
    const delivered = this.channels.deliveredVector();
    const pause_us = Number(process.hrtime.bigint() - started) / 1000;
    let delivered_after = 0;
    if (options.deliver_pending ?? true) {
      try {
        delivered_after = this.deliverPending();
      } catch (error) {
        // The checkpoint is good; the crash is the VM's (see `crashed`) and is reported by its caller.
        if (!(error instanceof VmCrashedError)) throw error;
      }
    }
    return { epoch, delta, dirty_pages: dirty, pause_us, delivered, delivered_after };
  }

  /**
   * The consumer of a delta from capture() is done with it (and with every
   * view of its bytes): its buffer goes back to this VM's pool for a later
   * capture. False if it is not a delta of this VM that is still out (then
   * nothing happens). A delta never recycled is garbage like any other.
   * Across threads the buffer comes back through the pool itself (worker.ts).
   */
  recycle(delta: Uint8Array): boolean {
    return this.deltas.recycle(delta);
  }

  /**
   * Cut `epoch` is committed: its undo logs are no longer needed (no rollback
   * goes below a committed cut) and its external output may leave. Returns the
   * output to release, in sequence order.
   */
  commit(epoch: number): OutputRecord[] {
    assert(epoch >= this.committed, `commit ${epoch} below committed cut ${this.committed}`);
    assert(epoch < this.state.epoch, `commit ${epoch} of an epoch not yet captured (current ${this.state.epoch})`);
    this.committed = epoch;
    for (const [k, record] of this.epochs) {
      if (k > epoch) continue;
      record.undo?.release();
      this.epochs.delete(k);
    }
    const released: OutputRecord[] = [];
    let keep = 0;
    for (const record of this.state.output) {
      if (record.epoch <= epoch) released.push(record);
      else this.state.output[keep++] = record;
    }
    this.state.output.length = keep;
    for (const record of released) this.state.output_bytes -= record.bytes.length;
    return released;
  }

  /**
   * Rolls back in place to cut `epoch` (committed <= epoch < current) from the
   * undo log: memory, globals and runtime state become exactly what they were
   * when checkpoint `epoch` was captured. Moves only the pages written since.
   * Cut 0 is the freshly booted VM: rollback(0) runs boot again (its data
   * segments and start function), and a trap in it crashes the VM
   * (VmCrashedError), as it would in VmCore.boot.
   */
  rollback(epoch: number): { pages_restored: number } {
    assert(epoch >= this.committed, `rollback to ${epoch} below committed cut ${this.committed}`);
    assert(epoch < this.state.epoch, `rollback to ${epoch}, not a captured cut (current epoch ${this.state.epoch})`);
    // What the VM did since the cut is undone (a rollback to cut 0 boots again, which counts as the boot did).
    this.activeEpoch = 0;
    const mem = this.tracker.bytes();
    let pages = this.tracker.dirtyCount;
    this.tracker.undo.restoreInto(mem);
    this.tracker.endEpoch().release(); // the current epoch's pre-images were just written back
    for (let k = this.state.epoch - 1; k > epoch; k--) {
      const record = this.epochs.get(k);
      assert(record?.undo, `undo log of epoch ${k}`);
      pages += record.undo.pages.length;
      record.undo.restoreInto(mem);
      record.undo.release();
      record.undo = null;
    }
    // Epochs after the cut are gone; the record of epoch+1 (its start = the cut) stays.
    for (const k of this.epochs.keys()) if (k > epoch + 1) this.epochs.delete(k);
    const start = this.epochs.get(epoch + 1);
    assert(start, `start record of epoch ${epoch + 1}`);
    start.undo = null;
    // A data segment dropped since the cut is gone from this instance, and loading the cut's
    // globals can only drop segments, never bring one back: a new instance has every segment,
    // and loadGlobals drops again those the cut had dropped.
    const revive = this.droppedSince(start.globals);
    if (this.memory.buffer.byteLength / WASM_PAGE_BYTES !== start.memory_pages) this.shrinkMemory(start.memory_pages);
    else if (revive) this.instantiate();
    this.loadGlobals(start.globals);
    this.state = decodeRuntimeState(start.state);
    assert(this.state.epoch === epoch + 1, "restored runtime state starts the epoch after the cut");
    // Keeps the incarnation (the group's clock); forgets the outbox (sent after the cut) and held messages (re-sent).
    this.channels.restore(this.state);
    // Output of committed epochs was released already; the restored state must not release it twice.
    this.commitOutputFilter();
    this.crash = null;
    // Cut 0 is recorded before boot. Everywhere else it means "booted": a backup promoted from
    // cut 0 boots (resume), and so must a primary rolled back to it, in the epoch after the cut
    // as VmCore.boot does, or its next capture would ship a state that never booted.
    if (!this.state.booted) this.runBoot();
    return { pages_restored: pages };
  }

  /**
   * Full image of the VM as of its last cut (the start of the current
   * epoch): pages written since come from the epoch's undo log, globals and
   * runtime state from the epoch's start record. Guest calls since the cut
   * change nothing in it. A recovery ships this to a member's new backup;
   * a primary rolled back to cut 0 has booted again by then (its boot is
   * part of epoch 1), and the image is still cut 0's, unbooted. For
   * re-protection and tests.
   */
  image(): ImageParts {
    const record = this.epochs.get(this.state.epoch);
    assert(record, "start record of the current epoch");
    const mem = this.tracker.bytes().subarray(0, record.memory_pages * WASM_PAGE_BYTES);
    const preImages = this.tracker.dirtyCount > 0 ? this.tracker.undo.preImages() : undefined;
    return imageOf(mem, this.state.epoch - 1, this.guest.hash, record.globals, record.state, preImages);
  }

  // ---- AbiHost -----------------------------------------------------------

  bytes(): Uint8Array {
    return this.tracker.bytes();
  }

  markRange(address: number, length: number): void {
    this.tracker.markRange(address, length);
  }

  log(bytes: Uint8Array): number {
    return this.emit(OUTPUT_LOG, 0, 0, bytes);
  }

  reply(session: number, request_id: number, bytes: Uint8Array): number {
    const rc = this.emit(OUTPUT_REPLY, session, request_id, bytes);
    if (rc === E_OK) this.newestReplyEpoch = this.state.epoch;
    return rc;
  }

  send(rank: number, bytes: Uint8Array): number {
    const sent = this.channels.send(rank, bytes, this.state.epoch);
    if (typeof sent !== "string") return E_OK;
    return sent === "bad_rank" ? E_BAD_RANK : sent === "too_big" ? E_TOO_BIG : E_FULL;
  }

  timerSet(id: number, delay_ms: number): number {
    if (!Number.isFinite(delay_ms) || delay_ms < 0) return E_INVALID;
    if (!this.state.timers.has(id) && this.state.timers.size >= this.options.limits.timers_max) return E_FULL;
    this.state.timers.set(id, this.options.now() + delay_ms);
    return E_OK;
  }

  timerCancel(id: number): number {
    this.state.timers.delete(id);
    return E_OK;
  }

  now(): number {
    return this.options.now();
  }

  rank(): number {
    return this.options.rank;
  }

  size(): number {
    return this.options.size;
  }

  // ---- internals ---------------------------------------------------------

  private emit(kind: number, session: number, request_id: number, bytes: Uint8Array): number {
    if (bytes.length > this.options.limits.message_bytes_max) return E_TOO_BIG;
    if (this.state.output_bytes + bytes.length > this.options.limits.output_bytes_max) {
      // Unbounded held-back output would let one guest exhaust its host; the VM stops instead.
      throw new Error(`output limit exceeded: ${this.state.output_bytes + bytes.length} bytes unreleased > ${this.options.limits.output_bytes_max}`);
    }
    this.state.output.push({ kind, epoch: this.state.epoch, seq: this.state.output_seq++, session, request_id, bytes, produced_ms: this.options.now() });
    this.state.output_bytes += bytes.length;
    return E_OK;
  }

  private deliver(message: GroupMessage): void {
    this.options.on_deliver?.(message, this.state.epoch);
    this.message(message.from, message.bytes);
  }

  private commitOutputFilter(): void {
    const kept = this.state.output.filter((r) => r.epoch > this.committed);
    this.state.output_bytes = kept.reduce((n, r) => n + r.bytes.length, 0);
    this.state.output = kept;
  }

  private instantiate(): void {
    const imports = abiImports(this);
    imports[HV_MODULE] = { memory: this.memory, first_write: this.tracker.firstWrite, first_write_range: this.tracker.firstWriteRange };
    const instance = new WebAssembly.Instance(this.guest.module, imports);
    this.exports = instance.exports as unknown as GuestExports;
  }

  private runBoot(): void {
    this.call("start", () => {
      this.exports[EXPORT_BOOT]();
      this.state.booted = true;
      this.exports.start?.();
    });
  }

  private recordEpochStart(): void {
    this.epochs.set(this.state.epoch, {
      globals: this.saveGlobals(),
      state: encodeRuntimeState(this.state),
      memory_pages: this.memory.buffer.byteLength / WASM_PAGE_BYTES,
      undo: null,
    });
  }

  private saveGlobals(): Uint8Array {
    this.exports[EXPORT_SAVE_GLOBALS]();
    const n = this.guest.info.mutable_globals.length * GLOBAL_SLOT_BYTES;
    return this.tracker.bytes().slice(GLOBALS_OFFSET, GLOBALS_OFFSET + n);
  }

  private loadGlobals(globals: Uint8Array): void {
    assert(globals.length === this.guest.info.mutable_globals.length * GLOBAL_SLOT_BYTES, "globals save area size matches the module");
    this.tracker.bytes().set(globals, GLOBALS_OFFSET);
    this.exports[EXPORT_LOAD_GLOBALS]();
  }

  /** True if a data segment is dropped in the running instance but not at the cut whose saved globals are `cut_globals`. */
  private droppedSince(cut_globals: Uint8Array): boolean {
    const flags = this.guest.info.data_drop_flags;
    if (flags.length === 0) return false;
    const now = this.saveGlobals();
    // Each flag is an i32 that is 0 or 1, stored little-endian at the start of its slot.
    return flags.some((i) => now[i * GLOBAL_SLOT_BYTES] !== 0 && cut_globals[i * GLOBAL_SLOT_BYTES] === 0);
  }

  /** Memory cannot shrink in place: a rollback across memory.grow re-creates it and re-instantiates. */
  private shrinkMemory(pages: number): void {
    const old = this.tracker.bytes();
    const memory = newMemory(this.guest.info, this.options.limits, pages);
    new Uint8Array(memory.buffer).set(old.subarray(0, pages * WASM_PAGE_BYTES));
    this.memory = memory;
    this.tracker.rebind(memory);
    this.instantiate();
  }
}

export function newMemory(info: ModuleInfo, limits: VmLimits, initial_pages: number): WebAssembly.Memory {
  const maximum = RESERVED_WASM_PAGES + Math.min(info.guest_maximum_pages, limits.memory_pages_max);
  if (initial_pages > maximum) {
    throw new Error(`memory of ${initial_pages - RESERVED_WASM_PAGES} pages exceeds the limit of ${maximum - RESERVED_WASM_PAGES} pages`);
  }
  return new WebAssembly.Memory({ initial: initial_pages, maximum });
}

/** Image of a whole memory: only pages that are not all zero are stored. O(memory): for full copies only. */
function nonZeroWords(words: BigUint64Array, from: number, count: number): boolean {
  for (let w = from; w < from + count; w++) if (words[w] !== 0n) return true;
  return false;
}

/** `preImages`: pages to take from there rather than from `mem` (what they held at the image's cut). */
export function imageOf(mem: Uint8Array, epoch: number, module_hash: Uint8Array, globals: Uint8Array, runtime_state: Uint8Array, preImages?: Map<number, Uint8Array>): ImageParts {
  const pageOf = (page: number): Uint8Array => preImages?.get(page) ?? mem.subarray(page * PAGE_BYTES, (page + 1) * PAGE_BYTES);
  const words = new BigUint64Array(mem.buffer, mem.byteOffset, mem.length / 8);
  const wordsPerPage = PAGE_BYTES / 8;
  const indices: number[] = [];
  // The hypervisor region is not part of the image: the dirty map is per-replica and globals travel separately.
  for (let page = BASE_BYTES / PAGE_BYTES; page < mem.length / PAGE_BYTES; page++) {
    const pre = preImages?.get(page);
    if (pre ? pre.some((b) => b !== 0) : nonZeroWords(words, page * wordsPerPage, wordsPerPage)) indices.push(page);
  }
  const page_data = new Uint8Array(indices.length * PAGE_BYTES);
  indices.forEach((page, i) => page_data.set(pageOf(page), i * PAGE_BYTES));
  return {
    epoch,
    memory_pages: mem.length / WASM_PAGE_BYTES,
    module_hash,
    page_indices: Uint32Array.from(indices),
    page_data,
    globals,
    runtime_state,
  };
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}
