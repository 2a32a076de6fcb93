/**
 * Worker-thread side of a VM replica. Holds either an executing VmCore
 * (primary) or a BackupImage (backup); promotion turns the one into the other
 * in place, with no memory copy. Requests are handled one at a time, so guest
 * calls and checkpoints never interleave.
 */
import { parentPort, workerData } from "node:worker_threads";
import { BackupImage } from "../checkpoint/backup-image.js";
import { decodeDelta, decodeImage, encodeImage } from "../checkpoint/format.js";
import { RESERVED_WASM_PAGES } from "./layout.js";
import { VmCore, VmCrashedError, type CapturedDelta, type GroupMessage, type GuestModule, type ReceiveStatus, type VmOptions } from "./machine.js";
import { MessagePath } from "./message-path.js";
import { decodeOutputRecords, packOutput, type OutputRecord, type PackedOutput } from "./runtime-state.js";
import {
  WATCHDOG_BUSY,
  WATCHDOG_SEQ,
  WATCHDOG_TID,
  type CaptureResult,
  type GuestBundle,
  type VmStatus,
  type WorkerEvent,
  type WorkerOps,
  type WorkerRequest,
  type WorkerResponse,
  type WorkerVmOptions,
} from "./protocol.js";
import { assert, AssertionError } from "../util/assert.js";
import { yieldCpuToMainThread } from "../util/thread-priority.js";
import { threadIdOfThisThread } from "../util/thread-cpu.js";

const port = parentPort;
assert(port, "worker.ts runs in a worker thread");
const watchdog = new Int32Array(workerData.watchdog as SharedArrayBuffer);
// Guests never starve the host's main thread of the CPU (its heartbeats and the protocol): see
// thread-priority.ts. worker-entry.ts did it before this module loaded; here for a thread started on this module directly.
yieldCpuToMainThread();
// The watchdog measures a call's CPU time on this thread, not its wall time (thread-cpu.ts).
Atomics.store(watchdog, WATCHDOG_TID, threadIdOfThisThread());

let primary: VmCore | null = null;
let backup: BackupImage | null = null;
let timerMode: WorkerVmOptions["timers"] = "manual";
let timerHandle: NodeJS.Timeout | null = null;
/** The epochs output_pending was last sent for: any output, and urgent output (see afterCall). */
let outputEpochSignalled = 0;
let urgentEpochSignalled = 0;
/** The epoch `active` was last sent for (see afterCall); 0 after a boot, restore or rollback. */
let activeEpochSignalled = 0;
/** The group message data path, once the host opened it (group members); until then sends go out in outboxes. */
let path: MessagePath | null = null;

function post(message: WorkerResponse, transfer: ArrayBuffer[] = []): void {
  port!.postMessage(message, transfer);
}

function emit(body: WorkerEvent, transfer: ArrayBuffer[] = []): void {
  post({ kind: "event", body }, transfer);
}

/** Wall clock with sub-millisecond resolution (guests time round trips of tens of microseconds). */
function nowMs(): number {
  return performance.timeOrigin + performance.now();
}

function vmOptions(options: WorkerVmOptions): VmOptions {
  // Every guest call ticks the watchdog's counter, so a chain of deliveries inside one request gets a budget per call.
  return {
    rank: options.rank,
    size: options.size,
    limits: options.limits,
    now: nowMs,
    consistent_cut: options.consistent_cut,
    sender_log: options.sender_log,
    on_guest_call: () => void Atomics.add(watchdog, WATCHDOG_SEQ, 1),
  };
}

function guestOf(bundle: GuestBundle): GuestModule {
  return { module: bundle.module, info: bundle.info, hash: bundle.hash };
}

function needPrimary(): VmCore {
  if (!primary) throw new Error("this replica is not a primary");
  return primary;
}

function needBackup(): BackupImage {
  if (!backup) throw new Error("this replica is not a backup");
  return backup;
}

function status(): VmStatus {
  if (primary) {
    return {
      role: "primary",
      epoch: primary.epoch,
      committed: primary.committedEpoch,
      memory_bytes: primary.memoryBytes,
      dirty_pages: primary.dirtyPages,
      pending_output: primary.pendingOutput().length,
      crashed: primary.crashed,
      incarnation: primary.incarnation,
      pending_messages: primary.pendingMessages,
      sender_log_bytes: primary.senderLogBytes,
      delta_pool: primary.deltas.stats,
    };
  }
  const b = needBackup();
  return {
    role: "backup",
    epoch: b.epoch,
    committed: b.epoch,
    memory_bytes: b.memoryBytes,
    dirty_pages: 0,
    pending_output: 0,
    crashed: null,
    incarnation: 0,
    pending_messages: 0,
    sender_log_bytes: 0,
    delta_pool: null,
  };
}

/** Marks a guest call for the watchdog; the host terminates this thread if one runs too long. */
function guarded<T>(body: () => T): T {
  Atomics.add(watchdog, WATCHDOG_SEQ, 1);
  Atomics.store(watchdog, WATCHDOG_BUSY, 1);
  try {
    return body();
  } finally {
    Atomics.store(watchdog, WATCHDOG_BUSY, 0);
    afterCall();
  }
}

function afterCall(): void {
  const vm = primary;
  if (!vm) return;
  if (vm.crashed) {
    emit({ event: "crashed", message: vm.crashed });
    return;
  }
  signalActive(vm);
  const waiting = vm.outputWaiting();
  if (waiting) signalOutput(vm.epoch, waiting === "reply");
  scheduleTimers();
}

/**
 * A boot, restore, promotion or rollback: epochs start again from the cut, so
 * what the VM does in them is announced anew (`active`, `output_pending`).
 */
function forgetSignals(): void {
  activeEpochSignalled = 0;
  outputEpochSignalled = 0;
  urgentEpochSignalled = 0;
}

/** Once per epoch the VM did something in: the leader (vm, none mode: the member's clock) ends only such epochs. */
function signalActive(vm: VmCore): void {
  if (vm.activeEpoch !== vm.epoch || activeEpochSignalled === vm.epoch) return;
  activeEpochSignalled = vm.epoch;
  emit({ event: "active", epoch: vm.epoch });
}

/**
 * What the guest sent since the last call: out on the message path if there
 * is one (returns nothing), else returned for the host thread to route.
 */
function flush(vm: VmCore): GroupMessage[] {
  const outbox = vm.takeOutbox();
  if (!path) return outbox;
  if (outbox.length) path.send(outbox);
  // vm mode: held messages wait for a commit like a reply does (their receiver blocks on them).
  if (path.heldCount > 0) signalOutput(vm.epoch, true);
  return [];
}

/**
 * Tells the host that output waits in `epoch` (adaptive epochs): once per
 * epoch, and once more if it was log output only and now someone blocks on
 * output too (`urgent`: a reply, a held message), which hurries the epoch more.
 */
function signalOutput(epoch: number, urgent: boolean): void {
  if (urgent ? urgentEpochSignalled === epoch : outputEpochSignalled === epoch) return;
  outputEpochSignalled = epoch;
  if (urgent) urgentEpochSignalled = epoch;
  emit({ event: "output_pending", epoch, urgent });
}

/**
 * group mode: a message from a later epoch than the VM's means the leader
 * ended the VM's epoch (its sender captured it): capture now and deliver,
 * rather than hold the message until the leader's `end` reaches this host.
 * The captures are the same ones `end` would have asked for (capture_to then
 * finds them done), taken a little earlier.
 */
function captureForMarker(vm: VmCore, m: GroupMessage): void {
  // Not while the path is frozen: a recovery is choosing the cut.
  if (!path?.running) return;
  const to = vm.markerEpoch(m); // null unless group mode, this VM's incarnation and at most MARKER_EPOCHS_MAX ahead
  if (to === null) return;
  while (vm.epoch < to) emitCaptured(vm, vm.capture());
}

/** group mode: a checkpoint leaves as a `captured` event, whichever way it was taken, so the host sees them all in epoch order. */
function emitCaptured(vm: VmCore, captured: CapturedDelta): void {
  const result: CaptureResult = { ...captured, outbox: [], path: path?.counters ?? null, delta_loan: loanOf(vm, captured) };
  emit({ event: "captured", result }, transferables(result));
}

/** The loan id of a pooled delta's buffer: it is transferred to the host thread, which gives it back (`recycle`). */
function loanOf(vm: VmCore, captured: CapturedDelta): number | null {
  return vm.deltas.idOf(captured.delta) ?? null;
}

/** The path's hook: offer arrivals to the VM, say which it refused for now. */
function offer(messages: GroupMessage[]): GroupMessage[] {
  const vm = primary;
  if (!vm || vm.crashed) return [];
  const refused: GroupMessage[] = [];
  try {
    guarded(() => {
      for (const m of messages) {
        captureForMarker(vm, m);
        const { status } = vm.receive(m);
        if (status === "full" || status === "early") refused.push(m);
      }
    });
  } catch (error) {
    if (!(error instanceof VmCrashedError)) throw error; // malformed: the link that brought it is closed
  } finally {
    flush(vm);
  }
  return refused;
}

/** Due time of the armed timerHandle: re-armed only when the guest's next timer changed (not after every call). */
let timerDueMs = Infinity;

function scheduleTimers(): void {
  if (timerMode !== "auto" || !primary || primary.crashed) return;
  const next = primary.nextTimer();
  if (timerHandle && next && next[1] === timerDueMs) return;
  if (timerHandle) clearTimeout(timerHandle);
  timerHandle = null;
  timerDueMs = Infinity;
  if (!next) return;
  timerDueMs = next[1];
  timerHandle = setTimeout(() => {
    timerHandle = null;
    timerDueMs = Infinity;
    const vm = primary;
    if (!vm || vm.crashed) return;
    try {
      guarded(() => vm.fireDueTimers(nowMs()));
    } catch {
      return; // crash already reported by afterCall
    }
    // Without a message path, what the guest sent waits in the outbox for the next request that returns it.
    if (path) flush(vm);
  }, Math.max(0, next[1] - nowMs()));
}

/**
 * Every handler but path_open is synchronous, so guest calls and checkpoints
 * never interleave; path_open awaits only its listening socket, before the
 * path has routes or the guest runs.
 */
type Handlers = { [K in keyof WorkerOps]: (args: WorkerOps[K]["args"]) => K extends "path_open" ? Promise<WorkerOps[K]["result"]> : WorkerOps[K]["result"] };

const handlers: Handlers = {
  boot({ guest, options }) {
    timerMode = options.timers;
    primary = guarded(() => VmCore.boot(guestOf(guest), vmOptions(options)));
    forgetSignals();
    afterCall();
    return status();
  },
  restore({ guest, options, image }) {
    timerMode = options.timers;
    primary = guarded(() => VmCore.restore(guestOf(guest), decodeImage(image), vmOptions(options)));
    forgetSignals();
    afterCall();
    return status();
  },
  backup({ guest, options, image }) {
    timerMode = options.timers;
    const g = guestOf(guest);
    backup = image
      ? BackupImage.fromImage(g, vmOptions(options), decodeImage(image))
      : BackupImage.blank(g, vmOptions(options), RESERVED_WASM_PAGES + g.info.guest_initial_pages);
    return status();
  },
  apply_batch({ deltas }) {
    const b = needBackup();
    // A record lives in the states from the epoch that produced it until its cut committed, so the
    // union over the batch holds every record released in it, not just the newest state's.
    const output = new Map<number, OutputRecord>();
    for (const delta of deltas) {
      // The host thread verified each checksum when it staged the delta (BackupReplica.stage).
      const parts = decodeDelta(delta, { checksum_verified: true });
      b.apply(parts);
      for (const r of decodeOutputRecords(parts.runtime_state)) output.set(r.seq, r);
    }
    return { output: packOutput([...output.values()].sort((x, y) => x.seq - y.seq)) };
  },
  apply({ delta }) {
    needBackup().apply(decodeDelta(delta));
    return status();
  },
  promote() {
    const b = needBackup();
    primary = guarded(() => b.promote());
    backup = null;
    forgetSignals();
    afterCall();
    return status();
  },
  message({ from_rank, payload }) {
    const vm = needPrimary();
    guarded(() => vm.message(from_rank, payload));
    return flush(vm);
  },
  request({ session, request_id, payload }) {
    const vm = needPrimary();
    guarded(() => vm.request(session, request_id, payload));
    return flush(vm);
  },
  timer({ timer_id }) {
    const vm = needPrimary();
    guarded(() => vm.timer(timer_id));
    return flush(vm);
  },
  fire_timers({ now_ms }) {
    const vm = needPrimary();
    const fired = guarded(() => vm.fireDueTimers(now_ms));
    return { fired, outbox: flush(vm) };
  },
  invoke({ name, args }) {
    const vm = needPrimary();
    return guarded(() => vm.invoke(name, args));
  },
  capture() {
    const vm = needPrimary();
    // Capturing starts a new epoch, which may make held group messages deliverable: guest calls.
    const captured = guarded(() => vm.capture());
    path?.retryRefused();
    return { ...captured, outbox: flush(vm), path: path?.counters ?? null, delta_loan: loanOf(vm, captured) };
  },
  capture_to({ epoch, commit }) {
    const vm = needPrimary();
    if (commit) requireReachableCut(vm, commit.epoch, "commit");
    const released = commit ? commitCut(vm, commit.epoch, commit.trim) : NOTHING_RELEASED;
    if (vm.epoch > epoch) {
      // Ended already (captureForMarker), which does not offer refused messages again: now.
      path?.retryRefused();
      return { captured: null, released };
    }
    // The epoch comes from a peer's frame (the core checks it): a wrong one fails this request, not the VM's thread.
    if (vm.epoch !== epoch) throw new Error(`capture_to ${epoch}: the VM is in epoch ${vm.epoch}`);
    assert(path, "capture_to is for group members, whose sends go out on their message path");
    emitCaptured(vm, guarded(() => vm.capture()));
    path.retryRefused();
    flush(vm);
    return { captured: epoch, released };
  },
  commit({ epoch, trim }) {
    const vm = needPrimary();
    requireReachableCut(vm, epoch, "commit");
    return commitCut(vm, epoch, trim);
  },
  receive({ messages }) {
    const vm = needPrimary();
    const statuses: ReceiveStatus[] = [];
    let delivered = 0;
    guarded(() => {
      for (const message of messages) {
        const result = vm.receive(message);
        statuses.push(result.status);
        delivered += result.delivered;
      }
    });
    return { statuses, delivered, outbox: flush(vm) };
  },
  take_outbox() {
    return flush(needPrimary());
  },
  delivered_vector() {
    return needPrimary().deliveredVector();
  },
  trim_sender_log({ delivered_by_receiver }) {
    return needPrimary().trimSenderLog(delivered_by_receiver);
  },
  resend_for({ receiver, delivered }) {
    return needPrimary().resendFor(receiver, delivered);
  },
  set_incarnation({ incarnation }) {
    needPrimary().setIncarnation(incarnation);
    path?.restamp(incarnation);
    return status();
  },
  rollback({ epoch }) {
    const started = process.hrtime.bigint();
    const vm = needPrimary();
    requireReachableCut(vm, epoch, "rollback to");
    // Guarded like a guest call: rollback(0) runs the guest's boot again (CPU watchdog, crash event).
    const result = guarded(() => vm.rollback(epoch));
    forgetSignals();
    path?.dropHeldAfter(epoch);
    scheduleTimers();
    return { ...result, rollback_us: Number(process.hrtime.bigint() - started) / 1000 };
  },
  image() {
    if (!primary) return encodeImage(needBackup().image());
    // A primary's full copy is taken at a fresh cut: capture (the delta is not needed, the
    // image supersedes it), then the image of that cut. The caller commits it once stored.
    // Held messages the new epoch makes deliverable wait until the image is taken.
    primary.recycle(primary.capture({ deliver_pending: false }).delta);
    const image = encodeImage(primary.image());
    const vm = primary;
    try {
      guarded(() => vm.deliverPending());
    } catch (error) {
      // The image is good; the crash is reported by afterCall.
      if (!(error instanceof VmCrashedError)) throw error;
    }
    // What they sent goes out on the message path, or waits in the outbox for the next request that returns it.
    if (path) flush(vm);
    return image;
  },
  image_current() {
    return encodeImage(needPrimary().image());
  },
  status() {
    return status();
  },
  async path_open({ bind_host, hold_until_commit, tls }) {
    const vm = needPrimary();
    assert(!path, "the message path is open already");
    const opened = new MessagePath(
      { rank: vm.rank(), bind_host, hold_until_commit, tls },
      { offer, committed: () => primary?.committedEpoch ?? 0, problem: (message) => emit({ event: "problem", message }) },
    );
    path = opened;
    const port = await opened.listen();
    return { address: `${bind_host}:${port}`, token: opened.token };
  },
  path_routes({ routes, locals }) {
    needPath().setRoutes(routes, locals);
    return null;
  },
  freeze() {
    setTimerMode("manual");
    path?.freeze();
    return status();
  },
  run() {
    const vm = needPrimary();
    setTimerMode("auto");
    path?.run();
    // What the VM did before it ran (its boot, a rollback to cut 0 booting again) reached a core
    // that held the member frozen, which drops `active`: announce it again now that the group runs it.
    activeEpochSignalled = 0;
    signalActive(vm);
    flush(vm);
    return status();
  },
  resend({ delivered }) {
    const vm = needPrimary();
    const p = needPath();
    let resent = 0;
    for (let r = 0; r < delivered.length; r++) {
      if (r === vm.rank()) continue;
      // What receiver r delivered is a peer's word (the resume frame): a value this VM's history
      // cannot have (more than it sent) re-sends nothing to r and is reported; the others get theirs.
      let messages: GroupMessage[];
      try {
        messages = vm.resendFor(r, delivered[r]);
      } catch (error) {
        if (!(error instanceof RangeError)) throw error;
        emit({ event: "problem", message: `nothing re-sent to rank ${r}: ${error.message}` });
        continue;
      }
      p.dropHeldTo(r);
      p.send(messages, true);
      resent += messages.length;
    }
    return { resent };
  },
  path_counters() {
    return path?.counters ?? null;
  },
  recycle({ loans }) {
    // Loans of a replaced VmCore (a restore, a promotion) match nothing in the current pool: dropped.
    for (const { id, buffer } of loans) primary?.deltas.giveBack(id, buffer);
    return null;
  },
};

/**
 * Cuts in commit and rollback requests come from peers' frames (the group
 * core checks them first): one that is not a captured, uncommitted cut fails
 * the request, where VmCore's own checks, which guard its invariants, would
 * end this thread.
 */
function requireReachableCut(vm: VmCore, epoch: number, what: string): void {
  if (!Number.isSafeInteger(epoch) || epoch < vm.committedEpoch || epoch >= vm.epoch) {
    throw new Error(`${what} ${epoch}: not a cut this VM can go to (committed ${vm.committedEpoch}, in epoch ${vm.epoch})`);
  }
}

/** Cut `epoch` committed: release its output, trim the sender log, (vm mode) send what was held for it. */
function commitCut(vm: VmCore, epoch: number, trim: number[] | undefined): PackedOutput {
  const released = packOutput(vm.commit(epoch));
  if (trim) {
    // The trim vector is a peer's word (what receivers delivered). One that is not a cut of this
    // VM's history changes nothing and is reported; the commit stands, and its output is released.
    try {
      vm.trimSenderLog(trim);
    } catch (error) {
      if (!(error instanceof RangeError)) throw error;
      emit({ event: "problem", message: `sender log not trimmed at cut ${epoch}: ${error.message}` });
    }
  }
  path?.release(epoch);
  return released;
}

function needPath(): MessagePath {
  if (!path) throw new Error("the message path is not open");
  return path;
}

function setTimerMode(mode: WorkerVmOptions["timers"]): void {
  timerMode = mode;
  if (mode === "manual" && timerHandle) {
    clearTimeout(timerHandle);
    timerHandle = null;
    timerDueMs = Infinity;
  }
  scheduleTimers();
}

/** Released output of a step that committed nothing (never transferred: it is shared). */
const NOTHING_RELEASED: PackedOutput = packOutput([]);

/**
 * Buffers we created here and hand over whole (an image, packed output), and
 * pooled delta buffers (a view of a loan's first bytes): moved to the host
 * thread, not copied.
 */
function transferables(value: unknown): ArrayBuffer[] {
  if (value instanceof Uint8Array && value !== NOTHING_RELEASED && value.byteOffset === 0 && value.byteLength === value.buffer.byteLength && value.buffer instanceof ArrayBuffer) {
    return [value.buffer];
  }
  if (value && typeof value === "object" && "delta" in value) {
    const { delta, delta_loan } = value as Partial<CaptureResult>;
    if (delta_loan != null && delta instanceof Uint8Array && delta.buffer instanceof ArrayBuffer) return [delta.buffer];
    return transferables(delta);
  }
  // capture_to's and apply_batch's packed output.
  if (value && typeof value === "object" && "released" in value) return transferables((value as { released: unknown }).released);
  if (value && typeof value === "object" && "output" in value) return transferables((value as { output: unknown }).output);
  return [];
}

function fail(id: number, error: unknown): void {
  const e = error as Error & { code?: string };
  post({ kind: "result", id, ok: false, error: { name: e.name ?? "Error", code: e.code ?? "Error", message: e.message } });
  // A broken invariant is a bug: this replica's thread dies loudly rather than run on in a state nobody planned for.
  if (error instanceof AssertionError) throw error;
}

port.on("message", (request: WorkerRequest) => {
  if (request.id === 0) {
    // One-way (`recycle`): nothing to answer; a broken invariant ends the thread like any other.
    (handlers[request.op] as (args: unknown) => unknown)(request.args);
    return;
  }
  try {
    const handler = handlers[request.op] as (args: unknown) => unknown;
    const value = handler(request.args);
    if (value instanceof Promise) {
      value.then(
        (v: unknown) => post({ kind: "result", id: request.id, ok: true, value: v }, transferables(v)),
        (error: unknown) => fail(request.id, error),
      );
      return;
    }
    post({ kind: "result", id: request.id, ok: true, value }, transferables(value));
  } catch (error) {
    fail(request.id, error);
  }
});
