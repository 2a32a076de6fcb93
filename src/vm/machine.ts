/**
 * A VM's executing replica: one instance of an instrumented guest, its
 * memory, runtime state, dirty tracking and undo log. Runs on whatever thread
 * owns it (a worker in production, see worker.ts; the test and benchmark code
 * also drive it in-process). One guest call at a time; checkpoints happen
 * between calls, when the wasm stack is empty.
 */
import { abiImports, E_BAD_RANK, E_FULL, E_INVALID, E_OK, E_TOO_BIG, type AbiHost } from "./abi.js";
import { DirtyTracker, type UndoLog } from "./dirty-tracker.js";
import { BASE_BYTES, GLOBALS_OFFSET, GLOBAL_SLOT_BYTES, PAGE_BYTES, PAGE_SHIFT, RESERVED_WASM_PAGES, WASM_PAGE_BYTES } from "./layout.js";
import {
  decodeRuntimeState,
  encodeRuntimeState,
  initialRuntimeState,
  OUTPUT_LOG,
  OUTPUT_REPLY,
  type OutputRecord,
  type RuntimeState,
} from "./runtime-state.js";
import { EXPORT_BOOT, EXPORT_LOAD_GLOBALS, EXPORT_SAVE_GLOBALS, HV_MODULE, type ModuleInfo } from "../guest/module-info.js";
import { deltaByteLength, layoutDelta, type ImageParts } from "../checkpoint/format.js";
import { assert } from "../util/assert.js";

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
  /** Group messages waiting to be taken by the host. */
  outbox_max: number;
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
}

export interface OutboxMessage {
  to_rank: number;
  epoch: number;
  bytes: Uint8Array;
}

export interface CapturedDelta {
  epoch: number;
  /** Laid out by layoutDelta, not yet sealed: the checksum is computed off the VM's thread. */
  delta: Uint8Array;
  dirty_pages: number;
  pause_us: number;
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
  private readonly epochs = new Map<number, EpochRecord>();
  private outbox: OutboxMessage[] = [];
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

  get dirtyPages(): number {
    return this.tracker.dirtyCount;
  }

  get memoryBytes(): number {
    return this.memory.buffer.byteLength;
  }

  // ---- guest calls -------------------------------------------------------

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

  /** Group messages the guest sent since the last call; the host routes them. */
  takeOutbox(): OutboxMessage[] {
    const out = this.outbox;
    this.outbox = [];
    return out;
  }

  /** Unreleased output (tests and status). */
  pendingOutput(): readonly OutputRecord[] {
    return this.state.output;
  }

  private call(what: string, body: () => void): void {
    if (this.crash) throw new VmCrashedError(`VM crashed earlier: ${this.crash}`);
    try {
      body();
    } catch (error) {
      this.crash = `${what}: ${(error as Error).message}`;
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
   * epoch. Cost scales with dirty pages, not memory size.
   */
  capture(): CapturedDelta {
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
    // Not zero-filled: every byte is written below before the delta leaves this thread.
    const delta = Buffer.allocUnsafeSlow(size) as Uint8Array;
    const regions = layoutDelta(delta, {
      epoch,
      memory_pages: memoryPages,
      page_count: pages.length,
      globals_bytes: globals.length,
      runtime_state_bytes: stateBytes.length,
    });
    const mem = this.tracker.bytes();
    regions.page_indices.set(pages);
    for (let i = 0; i < pages.length; i++) {
      const from = pages[i] * PAGE_BYTES;
      regions.page_data.set(mem.subarray(from, from + PAGE_BYTES), i * PAGE_BYTES);
    }
    regions.globals.set(globals);
    regions.runtime_state.set(stateBytes);
    const dirty = pages.length;
    const record = this.epochs.get(epoch);
    assert(record && record.undo === null, `epoch ${epoch} has a start record and no undo log yet`);
    record.undo = this.tracker.endEpoch();
    this.epochs.set(epoch + 1, { globals, state: stateBytes, memory_pages: memoryPages, undo: null });
    const pause_us = Number(process.hrtime.bigint() - started) / 1000;
    return { epoch, delta, dirty_pages: dirty, pause_us };
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
    for (const k of this.epochs.keys()) if (k <= epoch) this.epochs.delete(k);
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
   */
  rollback(epoch: number): { pages_restored: number } {
    assert(epoch >= this.committed, `rollback to ${epoch} below committed cut ${this.committed}`);
    assert(epoch < this.state.epoch, `rollback to ${epoch}, not a captured cut (current epoch ${this.state.epoch})`);
    const mem = this.tracker.bytes();
    let pages = this.tracker.dirtyCount;
    this.tracker.undo.restoreInto(mem);
    this.tracker.discardEpoch();
    for (let k = this.state.epoch - 1; k > epoch; k--) {
      const record = this.epochs.get(k);
      assert(record?.undo, `undo log of epoch ${k}`);
      pages += record.undo.pages.length;
      record.undo.restoreInto(mem);
    }
    // Epochs after the cut are gone; the record of epoch+1 (its start = the cut) stays.
    for (const k of this.epochs.keys()) if (k > epoch + 1) this.epochs.delete(k);
    const start = this.epochs.get(epoch + 1);
    assert(start, `start record of epoch ${epoch + 1}`);
    start.undo = null;
    if (this.memory.buffer.byteLength / WASM_PAGE_BYTES !== start.memory_pages) this.shrinkMemory(start.memory_pages);
    this.loadGlobals(start.globals);
    this.state = decodeRuntimeState(start.state);
    assert(this.state.epoch === epoch + 1, "restored runtime state starts the epoch after the cut");
    // Output of committed epochs was released already; the restored state must not release it twice.
    this.commitOutputFilter();
    this.outbox = [];
    this.crash = null;
    return { pages_restored: pages };
  }

  /** Full image of the VM as of the last capture (no guest call since). For re-protection and tests. */
  image(): ImageParts {
    assert(this.tracker.dirtyCount === 0, "image() between a capture and the next guest call");
    const record = this.epochs.get(this.state.epoch);
    assert(record, "start record of the current epoch");
    return imageOf(this.tracker.bytes(), this.state.epoch - 1, this.guest.hash, record.globals, record.state);
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
    return this.emit(OUTPUT_REPLY, session, request_id, bytes);
  }

  send(rank: number, bytes: Uint8Array): number {
    if (rank < 0 || rank >= this.options.size || !Number.isInteger(rank)) return E_BAD_RANK;
    if (bytes.length > this.options.limits.message_bytes_max) return E_TOO_BIG;
    if (this.outbox.length >= this.options.limits.outbox_max) return E_FULL;
    this.outbox.push({ to_rank: rank, epoch: this.state.epoch, bytes });
    return E_OK;
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

  private commitOutputFilter(): void {
    const kept = this.state.output.filter((r) => r.epoch > this.committed);
    this.state.output_bytes = kept.reduce((n, r) => n + r.bytes.length, 0);
    this.state.output = kept;
  }

  private instantiate(): void {
    const imports = abiImports(this);
    imports[HV_MODULE] = { memory: this.memory, first_write: this.tracker.firstWrite };
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
export function imageOf(mem: Uint8Array, epoch: number, module_hash: Uint8Array, globals: Uint8Array, runtime_state: Uint8Array): ImageParts {
  const words = new BigUint64Array(mem.buffer, mem.byteOffset, mem.length / 8);
  const indices: number[] = [];
  const wordsPerPage = PAGE_BYTES / 8;
  // The hypervisor region is not part of the image: the dirty map is per-replica and globals travel separately.
  for (let page = BASE_BYTES / PAGE_BYTES; page < mem.length / PAGE_BYTES; page++) {
    const base = page * wordsPerPage;
    for (let w = 0; w < wordsPerPage; w++) {
      if (words[base + w] !== 0n) {
        indices.push(page);
        break;
      }
    }
  }
  const page_data = new Uint8Array(indices.length * PAGE_BYTES);
  indices.forEach((page, i) => page_data.set(mem.subarray(page * PAGE_BYTES, (page + 1) * PAGE_BYTES), i * PAGE_BYTES));
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
