/**
 * Worker-thread side of VM replicas. A thread holds one or more replicas
 * (src/vm/vm.ts decides which share a thread: the VMs of one group on one
 * host), each an executing VmCore (primary) or a BackupImage (backup);
 * promotion turns the one into the other in place, with no memory copy.
 * Requests name their replica and are handled one at a time, so guest calls
 * and checkpoints never interleave, within a replica or across the thread's.
 */
import { parentPort, workerData } from "node:worker_threads";
import { BackupImage } from "../checkpoint/backup-image.js";
import { decodeDelta, decodeImage, encodeImage } from "../checkpoint/format.js";
import { RESERVED_WASM_PAGES } from "./layout.js";
import { VmCore, VmCrashedError, type CapturedDelta, type GroupMessage, type GuestModule, type ReceiveStatus, type VmOptions } from "./machine.js";
import { MessagePath, PathEndpoint } from "./message-path.js";
import type { TlsMaterial } from "../tls/context.js";
import { decodeOutputRecords, packOutput, type OutputRecord, type PackedOutput } from "./runtime-state.js";
import {
  WATCHDOG_BUSY,
  WATCHDOG_PARKED,
  WATCHDOG_SEQ,
  WATCHDOG_TID,
  WATCHDOG_VM,
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

function post(message: WorkerResponse, transfer: ArrayBuffer[] = []): void {
  port!.postMessage(message, transfer);
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

/** The loan id of a pooled delta's buffer: it is transferred to the host thread, which gives it back (`recycle`). */
function loanOf(vm: VmCore, captured: CapturedDelta): number | null {
  return vm.deltas.idOf(captured.delta) ?? null;
}

/**
 * One replica on this thread: its VmCore or BackupImage, its timers, what it
 * last announced, and its message path.
 */
class Replica {
  primary: VmCore | null = null;
  backup: BackupImage | null = null;
  timerMode: WorkerVmOptions["timers"] = "manual";
  timerHandle: NodeJS.Timeout | null = null;
  /** The epochs output_pending was last sent for: any output, and urgent output (see afterCall). */
  outputEpochSignalled = 0;
  urgentEpochSignalled = 0;
  /** The epoch `active` was last sent for (see afterCall); 0 after a boot, restore or rollback. */
  activeEpochSignalled = 0;
  /** The group message data path, once the host opened it (group members); until then sends go out in outboxes. */
  path: MessagePath | null = null;

  constructor(readonly id: number) {}

  emit(body: WorkerEvent, transfer: ArrayBuffer[] = []): void {
    post({ kind: "event", vm: this.id, body }, transfer);
  }

  /** Drops the replica: its timer stops and its message path closes (the thread runs on for the others). */
  close(): void {
    if (this.timerHandle) clearTimeout(this.timerHandle);
    this.timerHandle = null;
    this.timerMode = "manual";
    this.path?.close();
    this.path = null;
    this.primary = null;
    this.backup = null;
  }

  needPrimary(): VmCore {
    if (!this.primary) throw new Error("this replica is not a primary");
    return this.primary;
  }

  needBackup(): BackupImage {
    if (!this.backup) throw new Error("this replica is not a backup");
    return this.backup;
  }

  status(): VmStatus {
    if (this.primary) {
      return {
        role: "primary",
        epoch: this.primary.epoch,
        committed: this.primary.committedEpoch,
        memory_bytes: this.primary.memoryBytes,
        dirty_pages: this.primary.dirtyPages,
        pending_output: this.primary.pendingOutput().length,
        crashed: this.primary.crashed,
        incarnation: this.primary.incarnation,
        pending_messages: this.primary.pendingMessages,
        sender_log_bytes: this.primary.senderLogBytes,
        delta_pool: this.primary.deltas.stats,
      };
    }
    const b = this.needBackup();
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
  guarded<T>(body: () => T): T {
    Atomics.add(watchdog, WATCHDOG_SEQ, 1);
    Atomics.store(watchdog, WATCHDOG_VM, this.id);
    Atomics.store(watchdog, WATCHDOG_BUSY, 1);
    // After the busy flag (the host parks, then looks at the flag: one of the two sees the other).
    if (Atomics.load(watchdog, WATCHDOG_PARKED) === 1 && Atomics.compareExchange(watchdog, WATCHDOG_PARKED, 1, 0) === 1) post({ kind: "watch" });
    try {
      return body();
    } finally {
      Atomics.store(watchdog, WATCHDOG_BUSY, 0);
      this.afterCall();
    }
  }

  afterCall(): void {
    const vm = this.primary;
    if (!vm) return;
    if (vm.crashed) {
      this.emit({ event: "crashed", message: vm.crashed });
      return;
    }
    this.signalActive(vm);
    const waiting = vm.outputWaiting();
    if (waiting) this.signalOutput(vm.epoch, waiting === "reply");
    this.scheduleTimers();
  }

  /**
   * A boot, restore, promotion or rollback: epochs start again from the cut, so
   * what the VM does in them is announced anew (`active`, `output_pending`).
   */
  forgetSignals(): void {
    this.activeEpochSignalled = 0;
    this.outputEpochSignalled = 0;
    this.urgentEpochSignalled = 0;
  }

  /** Once per epoch the VM did something in: the leader (vm, none mode: the member's clock) ends only such epochs. */
  signalActive(vm: VmCore): void {
    if (vm.activeEpoch !== vm.epoch || this.activeEpochSignalled === vm.epoch) return;
    this.activeEpochSignalled = vm.epoch;
    this.emit({ event: "active", epoch: vm.epoch });
  }

  /**
   * What the guest sent since the last call: out on the message path if there
   * is one (returns nothing), else returned for the host thread to route.
   */
  flush(vm: VmCore): GroupMessage[] {
    const outbox = vm.takeOutbox();
    if (!this.path) return outbox;
    if (outbox.length) this.path.send(outbox);
    // vm mode: held messages wait for a commit like a reply does (their receiver blocks on them).
    if (this.path.heldCount > 0) this.signalOutput(vm.epoch, true);
    return [];
  }

  /**
   * Tells the host that output waits in `epoch` (adaptive epochs): once per
   * epoch, and once more if it was log output only and now someone blocks on
   * output too (`urgent`: a reply, a held message), which hurries the epoch more.
   */
  signalOutput(epoch: number, urgent: boolean): void {
    if (urgent ? this.urgentEpochSignalled === epoch : this.outputEpochSignalled === epoch) return;
    this.outputEpochSignalled = epoch;
    if (urgent) this.urgentEpochSignalled = epoch;
    this.emit({ event: "output_pending", epoch, urgent });
  }

  /**
   * group mode: a message from a later epoch than the VM's means the leader
   * ended the VM's epoch (its sender captured it): capture now and deliver,
   * rather than hold the message until the leader's `end` reaches this host.
   * The captures are the same ones `end` would have asked for (capture_to then
   * finds them done), taken a little earlier.
   */
  captureForMarker(vm: VmCore, m: GroupMessage): void {
    // Not while the path is frozen: a recovery is choosing the cut.
    if (!this.path?.running) return;
    const to = vm.markerEpoch(m); // null unless group mode, this VM's incarnation and at most MARKER_EPOCHS_MAX ahead
    if (to === null) return;
    while (vm.epoch < to) this.emitCaptured(vm, vm.capture());
  }

  /** group mode: a checkpoint leaves as a `captured` event, whichever way it was taken, so the host sees them all in epoch order. */
  emitCaptured(vm: VmCore, captured: CapturedDelta): void {
    const result: CaptureResult = { ...captured, outbox: [], path: this.path?.counters ?? null, delta_loan: loanOf(vm, captured) };
    this.emit({ event: "captured", result }, transferables(result));
  }

  /** The path's hook: offer arrivals to the VM, say which it refused for now. */
  offer(messages: GroupMessage[]): GroupMessage[] {
    const vm = this.primary;
    if (!vm || vm.crashed) return [];
    const refused: GroupMessage[] = [];
    try {
      this.guarded(() => {
        for (const m of messages) {
          this.captureForMarker(vm, m);
          const { status } = vm.receive(m);
          if (status === "full" || status === "early") refused.push(m);
        }
      });
    } catch (error) {
      if (!(error instanceof VmCrashedError)) throw error; // malformed: the link that brought it is closed
    } finally {
      this.flush(vm);
    }
    return refused;
  }

  /** Due time of the armed timerHandle: re-armed only when the guest's next timer changed (not after every call). */
  timerDueMs = Infinity;

  scheduleTimers(): void {
    if (this.timerMode !== "auto" || !this.primary || this.primary.crashed) return;
    const next = this.primary.nextTimer();
    if (this.timerHandle && next && next[1] === this.timerDueMs) return;
    if (this.timerHandle) clearTimeout(this.timerHandle);
    this.timerHandle = null;
    this.timerDueMs = Infinity;
    if (!next) return;
    this.timerDueMs = next[1];
    this.timerHandle = setTimeout(() => {
      this.timerHandle = null;
      this.timerDueMs = Infinity;
      const vm = this.primary;
      if (!vm || vm.crashed) return;
      try {
        this.guarded(() => vm.fireDueTimers(nowMs()));
      } catch {
        return; // crash already reported by afterCall
      }
      // Without a message path, what the guest sent waits in the outbox for the next request that returns it.
      if (this.path) this.flush(vm);
    }, Math.max(0, next[1] - nowMs()));
  }


  /** Cut `epoch` committed: release its output, trim the sender log, (vm mode) send what was held for it. */
  commitCut(vm: VmCore, epoch: number, trim: number[] | undefined): PackedOutput {
    const released = packOutput(vm.commit(epoch));
    if (trim) {
      // The trim vector is a peer's word (what receivers delivered). One that is not a cut of this
      // VM's history changes nothing and is reported; the commit stands, and its output is released.
      try {
        vm.trimSenderLog(trim);
      } catch (error) {
        if (!(error instanceof RangeError)) throw error;
        this.emit({ event: "problem", message: `sender log not trimmed at cut ${epoch}: ${error.message}` });
      }
    }
    this.path?.release(epoch);
    return released;
  }

  needPath(): MessagePath {
    if (!this.path) throw new Error("the message path is not open");
    return this.path;
  }

  setTimerMode(mode: WorkerVmOptions["timers"]): void {
    this.timerMode = mode;
    if (mode === "manual" && this.timerHandle) {
      clearTimeout(this.timerHandle);
      this.timerHandle = null;
      this.timerDueMs = Infinity;
    }
    this.scheduleTimers();
  }

}

/**
 * Every handler but path_open is synchronous, so guest calls and checkpoints
 * never interleave; path_open awaits only its listening socket, before the
 * path has routes or the guest runs.
 */
type Handlers = { [K in keyof WorkerOps]: (r: Replica, args: WorkerOps[K]["args"]) => K extends "path_open" ? Promise<WorkerOps[K]["result"]> : WorkerOps[K]["result"] };

const handlers: Handlers = {
  boot(r, { guest, options }) {
    r.timerMode = options.timers;
    r.primary = r.guarded(() => VmCore.boot(guestOf(guest), vmOptions(options)));
    r.forgetSignals();
    r.afterCall();
    return r.status();
  },
  restore(r, { guest, options, image }) {
    r.timerMode = options.timers;
    r.primary = r.guarded(() => VmCore.restore(guestOf(guest), decodeImage(image), vmOptions(options)));
    r.forgetSignals();
    r.afterCall();
    return r.status();
  },
  backup(r, { guest, options, image }) {
    r.timerMode = options.timers;
    const g = guestOf(guest);
    r.backup = image
      ? BackupImage.fromImage(g, vmOptions(options), decodeImage(image))
      : BackupImage.blank(g, vmOptions(options), RESERVED_WASM_PAGES + g.info.guest_initial_pages);
    return r.status();
  },
  apply_batch(r, { deltas }) {
    const b = r.needBackup();
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
  apply(r, { delta }) {
    r.needBackup().apply(decodeDelta(delta));
    return r.status();
  },
  promote(r) {
    const b = r.needBackup();
    r.primary = r.guarded(() => b.promote());
    r.backup = null;
    r.forgetSignals();
    r.afterCall();
    return r.status();
  },
  message(r, { from_rank, payload }) {
    const vm = r.needPrimary();
    r.guarded(() => vm.message(from_rank, payload));
    return r.flush(vm);
  },
  request(r, { session, request_id, payload }) {
    const vm = r.needPrimary();
    r.guarded(() => vm.request(session, request_id, payload));
    return r.flush(vm);
  },
  timer(r, { timer_id }) {
    const vm = r.needPrimary();
    r.guarded(() => vm.timer(timer_id));
    return r.flush(vm);
  },
  fire_timers(r, { now_ms }) {
    const vm = r.needPrimary();
    const fired = r.guarded(() => vm.fireDueTimers(now_ms));
    return { fired, outbox: r.flush(vm) };
  },
  invoke(r, { name, args }) {
    const vm = r.needPrimary();
    return r.guarded(() => vm.invoke(name, args));
  },
  capture(r) {
    const vm = r.needPrimary();
    // Capturing starts a new epoch, which may make held group messages deliverable: guest calls.
    const captured = r.guarded(() => vm.capture());
    r.path?.retryRefused();
    return { ...captured, outbox: r.flush(vm), path: r.path?.counters ?? null, delta_loan: loanOf(vm, captured) };
  },
  capture_to(r, { epoch, commit }) {
    const vm = r.needPrimary();
    if (commit) requireReachableCut(vm, commit.epoch, "commit");
    const released = commit ? r.commitCut(vm, commit.epoch, commit.trim) : NOTHING_RELEASED;
    if (vm.epoch > epoch) {
      // Ended already (captureForMarker), which does not offer refused messages again: now.
      r.path?.retryRefused();
      return { captured: null, released };
    }
    // The epoch comes from a peer's frame (the core checks it): a wrong one fails this request, not the VM's thread.
    if (vm.epoch !== epoch) throw new Error(`capture_to ${epoch}: the VM is in epoch ${vm.epoch}`);
    assert(r.path, "capture_to is for group members, whose sends go out on their message path");
    r.emitCaptured(vm, r.guarded(() => vm.capture()));
    r.path.retryRefused();
    r.flush(vm);
    return { captured: epoch, released };
  },
  commit(r, { epoch, trim }) {
    const vm = r.needPrimary();
    requireReachableCut(vm, epoch, "commit");
    return r.commitCut(vm, epoch, trim);
  },
  receive(r, { messages }) {
    const vm = r.needPrimary();
    const statuses: ReceiveStatus[] = [];
    let delivered = 0;
    r.guarded(() => {
      for (const message of messages) {
        const result = vm.receive(message);
        statuses.push(result.status);
        delivered += result.delivered;
      }
    });
    return { statuses, delivered, outbox: r.flush(vm) };
  },
  take_outbox(r) {
    return r.flush(r.needPrimary());
  },
  delivered_vector(r) {
    return r.needPrimary().deliveredVector();
  },
  trim_sender_log(r, { delivered_by_receiver }) {
    return r.needPrimary().trimSenderLog(delivered_by_receiver);
  },
  resend_for(r, { receiver, delivered }) {
    return r.needPrimary().resendFor(receiver, delivered);
  },
  set_incarnation(r, { incarnation }) {
    r.needPrimary().setIncarnation(incarnation);
    r.path?.restamp(incarnation);
    return r.status();
  },
  rollback(r, { epoch }) {
    const started = process.hrtime.bigint();
    const vm = r.needPrimary();
    requireReachableCut(vm, epoch, "rollback to");
    // Guarded like a guest call: rollback(0) runs the guest's boot again (CPU watchdog, crash event).
    const result = r.guarded(() => vm.rollback(epoch));
    r.forgetSignals();
    r.path?.dropHeldAfter(epoch);
    r.scheduleTimers();
    return { ...result, rollback_us: Number(process.hrtime.bigint() - started) / 1000 };
  },
  image(r) {
    if (!r.primary) return encodeImage(r.needBackup().image());
    // A primary's full copy is taken at a fresh cut: capture (the delta is not needed, the
    // image supersedes it), then the image of that cut. The caller commits it once stored.
    // Held messages the new epoch makes deliverable wait until the image is taken.
    r.primary.recycle(r.primary.capture({ deliver_pending: false }).delta);
    const image = encodeImage(r.primary.image());
    const vm = r.primary;
    try {
      r.guarded(() => vm.deliverPending());
    } catch (error) {
      // The image is good; the crash is reported by afterCall.
      if (!(error instanceof VmCrashedError)) throw error;
    }
    // What they sent goes out on the message path, or waits in the outbox for the next request that returns it.
    if (r.path) r.flush(vm);
    return image;
  },
  image_current(r) {
    return encodeImage(r.needPrimary().image());
  },
  status(r) {
    return r.status();
  },
  async path_open(r, { bind_host, hold_until_commit, tls }) {
    const vm = r.needPrimary();
    assert(!r.path, "the message path is open already");
    const opened = new MessagePath(
      { rank: vm.rank(), bind_host, hold_until_commit, tls },
      { offer: (messages) => r.offer(messages), committed: () => r.primary?.committedEpoch ?? 0, problem: (message) => r.emit({ event: "problem", message }) },
      endpointFor(bind_host, tls),
    );
    r.path = opened;
    const port = await opened.listen();
    return { address: `${bind_host}:${port}`, token: opened.token };
  },
  path_routes(r, { routes, locals, ports }) {
    r.needPath().setRoutes(routes, locals, ports);
    return null;
  },
  freeze(r) {
    r.setTimerMode("manual");
    r.path?.freeze();
    return r.status();
  },
  run(r) {
    const vm = r.needPrimary();
    r.setTimerMode("auto");
    r.path?.run();
    // What the VM did before it ran (its boot, a rollback to cut 0 booting again) reached a core
    // that held the member frozen, which drops `active`: announce it again now that the group runs it.
    r.activeEpochSignalled = 0;
    r.signalActive(vm);
    r.flush(vm);
    return r.status();
  },
  resend(r, { delivered }) {
    const vm = r.needPrimary();
    const p = r.needPath();
    let resent = 0;
    for (let rank = 0; rank < delivered.length; rank++) {
      if (rank === vm.rank()) continue;
      // What receiver `rank` delivered is a peer's word (the resume frame): a value this VM's history
      // cannot have (more than it sent) re-sends nothing to it and is reported; the others get theirs.
      let messages: GroupMessage[];
      try {
        messages = vm.resendFor(rank, delivered[rank]);
      } catch (error) {
        if (!(error instanceof RangeError)) throw error;
        r.emit({ event: "problem", message: `nothing re-sent to rank ${rank}: ${error.message}` });
        continue;
      }
      p.dropHeldTo(rank);
      p.send(messages, true);
      resent += messages.length;
    }
    return { resent };
  },
  path_counters(r) {
    return r.path?.counters ?? null;
  },
  drop(r) {
    r.close();
    replicas.delete(r.id);
    return null;
  },
  recycle(r, { loans }) {
    // Loans of a replaced VmCore (a restore, a promotion) match nothing in the current pool: dropped.
    for (const { id, buffer } of loans) r.primary?.deltas.giveBack(id, buffer);
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

/**
 * The thread's message endpoints (one listener and one connection per peer
 * thread for every VM here), by interface and TLS identity: a host gives all
 * its VMs the same, so a thread has one.
 */
const endpoints = new Map<string, PathEndpoint>();

function endpointFor(bind_host: string, tls: TlsMaterial | null): PathEndpoint {
  const key = `${bind_host}\n${tls?.cert ?? "plain"}`;
  let endpoint = endpoints.get(key);
  if (!endpoint || endpoint.isClosed) endpoints.set(key, (endpoint = new PathEndpoint(bind_host, tls)));
  return endpoint;
}

/** The replicas on this thread, by the id the host gave each. */
const replicas = new Map<number, Replica>();

/** Ops that put a replica on the thread; every other op is for one that is here. */
const CREATING: ReadonlySet<WorkerRequest["op"]> = new Set(["boot", "restore", "backup"]);

function replicaFor(request: WorkerRequest): Replica {
  let r = replicas.get(request.vm);
  if (!r) {
    if (!CREATING.has(request.op)) throw new Error(`no replica ${request.vm} on this VM thread (${request.op})`);
    r = new Replica(request.vm);
    replicas.set(request.vm, r);
  }
  return r;
}

port.on("message", (request: WorkerRequest) => {
  if (request.id === 0) {
    // One-way (`recycle`): nothing to answer; a replica dropped meanwhile takes nothing back. A broken invariant ends the thread like any other.
    const r = replicas.get(request.vm);
    if (r) (handlers[request.op] as (r: Replica, args: unknown) => unknown)(r, request.args);
    return;
  }
  if (request.vm === 0) {
    // Addressed to the thread, not a replica: the host's probe that this thread is up (VmThread.start).
    post({ kind: "result", id: request.id, ok: true, value: null });
    return;
  }
  try {
    const r = replicaFor(request);
    const handler = handlers[request.op] as (r: Replica, args: unknown) => unknown;
    const value = handler(r, request.args);
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
