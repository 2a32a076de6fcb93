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
import { VmCore, VmCrashedError, type GuestModule, type ReceiveStatus, type VmOptions } from "./machine.js";
import {
  WATCHDOG_BUSY,
  WATCHDOG_SEQ,
  type GuestBundle,
  type VmStatus,
  type WorkerEvent,
  type WorkerOps,
  type WorkerRequest,
  type WorkerResponse,
  type WorkerVmOptions,
} from "./protocol.js";
import { assert, AssertionError } from "../util/assert.js";

const port = parentPort;
assert(port, "worker.ts runs in a worker thread");
const watchdog = new Int32Array(workerData.watchdog as SharedArrayBuffer);

let primary: VmCore | null = null;
let backup: BackupImage | null = null;
let timerMode: WorkerVmOptions["timers"] = "manual";
let timerHandle: NodeJS.Timeout | null = null;
let outputEpochSignalled = 0;

function post(message: WorkerResponse, transfer: ArrayBuffer[] = []): void {
  port!.postMessage(message, transfer);
}

function emit(body: WorkerEvent): void {
  post({ kind: "event", body });
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
  if (vm.pendingOutput().length > 0 && outputEpochSignalled !== vm.epoch) {
    outputEpochSignalled = vm.epoch;
    emit({ event: "output_pending", epoch: vm.epoch });
  }
  scheduleTimers();
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
    const outbox = vm.takeOutbox();
    if (outbox.length) emit({ event: "outbox", messages: outbox });
  }, Math.max(0, next[1] - nowMs()));
}

type Handlers = { [K in keyof WorkerOps]: (args: WorkerOps[K]["args"]) => WorkerOps[K]["result"] };

const handlers: Handlers = {
  boot({ guest, options }) {
    timerMode = options.timers;
    primary = guarded(() => VmCore.boot(guestOf(guest), vmOptions(options)));
    afterCall();
    return status();
  },
  restore({ guest, options, image }) {
    timerMode = options.timers;
    primary = guarded(() => VmCore.restore(guestOf(guest), decodeImage(image), vmOptions(options)));
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
  apply({ delta }) {
    needBackup().apply(decodeDelta(delta));
    return status();
  },
  promote() {
    const b = needBackup();
    primary = guarded(() => b.promote());
    backup = null;
    afterCall();
    return status();
  },
  message({ from_rank, payload }) {
    const vm = needPrimary();
    guarded(() => vm.message(from_rank, payload));
    return vm.takeOutbox();
  },
  request({ session, request_id, payload }) {
    const vm = needPrimary();
    guarded(() => vm.request(session, request_id, payload));
    return vm.takeOutbox();
  },
  timer({ timer_id }) {
    const vm = needPrimary();
    guarded(() => vm.timer(timer_id));
    return vm.takeOutbox();
  },
  fire_timers({ now_ms }) {
    const vm = needPrimary();
    const fired = guarded(() => vm.fireDueTimers(now_ms));
    return { fired, outbox: vm.takeOutbox() };
  },
  invoke({ name, args }) {
    const vm = needPrimary();
    return guarded(() => vm.invoke(name, args));
  },
  capture() {
    const vm = needPrimary();
    // Capturing starts a new epoch, which may make held group messages deliverable: guest calls.
    const captured = guarded(() => vm.capture());
    return { ...captured, outbox: vm.takeOutbox() };
  },
  commit({ epoch, trim }) {
    const vm = needPrimary();
    const released = vm.commit(epoch);
    if (trim) vm.trimSenderLog(trim);
    return released;
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
    return { statuses, delivered, outbox: vm.takeOutbox() };
  },
  take_outbox() {
    return needPrimary().takeOutbox();
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
    return status();
  },
  rollback({ epoch }) {
    const started = process.hrtime.bigint();
    const result = needPrimary().rollback(epoch);
    scheduleTimers();
    return { ...result, rollback_us: Number(process.hrtime.bigint() - started) / 1000 };
  },
  image() {
    if (!primary) return encodeImage(needBackup().image());
    // A primary's full copy is taken at a fresh cut: capture (the delta is not needed, the
    // image supersedes it), then the image of that cut. The caller commits it once stored.
    // Held messages the new epoch makes deliverable wait until the image is taken.
    primary.capture({ deliver_pending: false });
    const image = encodeImage(primary.image());
    const vm = primary;
    try {
      guarded(() => vm.deliverPending());
    } catch (error) {
      // The image is good; the crash is reported by afterCall.
      if (!(error instanceof VmCrashedError)) throw error;
    }
    // What they sent goes out with the next request's outbox or an event.
    const outbox = vm.takeOutbox();
    if (outbox.length) emit({ event: "outbox", messages: outbox });
    return image;
  },
  image_current() {
    return encodeImage(needPrimary().image());
  },
  set_timers({ mode }) {
    timerMode = mode;
    if (mode === "manual" && timerHandle) {
      clearTimeout(timerHandle);
      timerHandle = null;
      timerDueMs = Infinity;
    }
    scheduleTimers();
    return status();
  },
  status() {
    return status();
  },
};

/** Buffers we created here and hand over whole: moved to the host thread, not copied. */
function transferables(value: unknown): ArrayBuffer[] {
  if (value instanceof Uint8Array && value.byteOffset === 0 && value.byteLength === value.buffer.byteLength && value.buffer instanceof ArrayBuffer) {
    return [value.buffer];
  }
  if (value && typeof value === "object" && "delta" in value) return transferables((value as { delta: unknown }).delta);
  return [];
}

port.on("message", (request: WorkerRequest) => {
  try {
    const handler = handlers[request.op] as (args: unknown) => unknown;
    const value = handler(request.args);
    post({ kind: "result", id: request.id, ok: true, value }, transferables(value));
  } catch (error) {
    const e = error as Error & { code?: string };
    post({ kind: "result", id: request.id, ok: false, error: { name: e.name ?? "Error", code: e.code ?? "Error", message: e.message } });
    // A broken invariant is a bug: this replica's thread dies loudly rather than run on in a state nobody planned for.
    if (error instanceof AssertionError) throw error;
  }
});
