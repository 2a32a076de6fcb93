/**
 * Host-thread handles of VM replicas running in worker threads. A replica
 * has a thread of its own unless its options name a thread pool
 * (`WorkerVmOptions.thread`): the replicas of one pool on this host (a
 * group's primaries, or its backups) share at most `threads_max` threads, so
 * a host runs a bounded number of threads per group instead of one per VM.
 * Requests are queued in order and answered in order by the worker; each
 * thread runs the per-call CPU watchdog (an infinite loop in a guest is
 * stopped by terminating its thread, which crashes the replicas on that
 * thread — that VM alone, or its pool's others on the thread too — and
 * nothing else).
 */
import { EventEmitter } from "node:events";
import { Worker, type TransferListItem } from "node:worker_threads";
import { fileURLToPath } from "node:url";
import { availableParallelism } from "node:os";
import { bulkhead, BulkheadRejectedError } from "cockatiel";
import { sealDelta } from "../checkpoint/format.js";
import { threadCpuMs } from "../util/thread-cpu.js";
import { createLowered } from "../util/thread-priority.js";
import { assert } from "../util/assert.js";
import {
  WATCHDOG_BUSY,
  WATCHDOG_SEQ,
  WATCHDOG_VM,
  WATCHDOG_PARKED,
  WATCHDOG_WORDS,
  WATCHDOG_TID,
  type CaptureResult,
  type GuestBundle,
  type SerializedError,
  type VmStatus,
  type WorkerEvent,
  type WorkerOp,
  type WorkerOps,
  type WorkerRequest,
  type WorkerResponse,
  type WorkerVmOptions,
} from "./protocol.js";

/**
 * The worker runs compiled JavaScript. Under the TypeScript test runner this
 * file is src/vm/vm.ts, so the compiled worker is found in dist/ (built by
 * `npm run build`, which `npm test` runs first).
 */
const WORKER_URL = import.meta.url.endsWith(".ts")
  ? new URL("../../dist/src/vm/worker-entry.js", import.meta.url)
  : new URL("./worker-entry.js", import.meta.url);

/** Budget for a VM thread to start and answer, and then for a replica's first request on it (boot, restore, backup install). */
export const VM_START_TIMEOUT_MS = 10_000;

/**
 * Watchdog polls that find a thread idle (no guest call since the last one)
 * before the host stops polling it until its next call (VmThread.parkWatchdog):
 * 2 s at the default budget. A deployed group that does nothing then costs
 * its hosts no wake-up for its VM threads.
 */
export const WATCHDOG_IDLE_POLLS_TO_PARK = 8;

/** Requests queued to one worker at once; a host that outruns its VM gets an error, not unbounded memory. */
export const VM_QUEUE_MAX = 10_000;

export class VmRequestError extends Error {
  readonly code: string;
  constructor(error: SerializedError) {
    super(error.message);
    this.name = error.name;
    this.code = error.code;
  }
}

export class VmGoneError extends Error {
  override name = "VmGoneError";
  readonly code = "VmGone";
}

/**
 * Pooled deltas on this thread, by buffer: the replica whose VM thread lent
 * it and the loan's id (see VmWorker.recycle). Weak: a delta nobody gives back is garbage.
 */
const loans = new WeakMap<ArrayBufferLike, { vm: VmWorker; id: number }>();

interface Pending {
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
}

export interface VmEvents {
  crashed: [message: string];
  output_pending: [epoch: number, urgent: boolean];
  active: [epoch: number];
  /** group mode: a checkpoint (capture_to, or the VM's own: WorkerEvent "captured"); the delta is sealed, its buffer a loan (VmWorker.recycle). */
  captured: [result: CaptureResult];
  /** The message path had a problem (a link refused or broken); the VM runs on. */
  problem: [message: string];
}

interface Thread {
  worker: Worker;
  watchdog: SharedArrayBuffer;
}

function spawnThread(): Thread {
  const watchdog = new SharedArrayBuffer(WATCHDOG_WORDS * 4);
  return { worker: createLowered(() => new Worker(fileURLToPath(WORKER_URL), { workerData: { watchdog } })), watchdog };
}

/**
 * Threads started ahead of need (see VmWorker.prewarm): starting one and
 * loading its modules takes tens of milliseconds, which a failover would
 * otherwise spend before the new backup can take its image.
 */
const spares: Thread[] = [];
let sparesWanted = 0;

/**
 * Creating a Worker holds the calling thread until the new thread exists, and
 * on a loaded machine that can take tens of milliseconds: a host that started
 * every VM thread of a 32-VM deploy in one go held its main loop for over
 * 600 ms (heartbeats late, its peers declared it failed). Threads are created
 * one per turn of the event loop, in order, so timers and sockets are served
 * between them.
 */
let lastThreadTurn: Promise<void> = Promise.resolve();
function nextThreadTurn(): Promise<void> {
  const turn = lastThreadTurn.then(() => new Promise<void>((resolve) => setImmediate(resolve)));
  lastThreadTurn = turn;
  return turn;
}

/**
 * VM threads starting at once in this process: a thread counts from its
 * creation (or its being taken from the spares) until it answered its first
 * message (its modules are loaded). A Node worker costs 60-100 ms of CPU to
 * start (isolate, Node's bootstrap, the VM runtime's modules), most of it
 * before the thread can lower its priority. A host that started all 32
 * threads of its share of a 64-VM group at once (4 hosts, 2 cores) kept
 * every host's main thread waiting for a core for 0.7-1 s of each second
 * (/proc/<tid>/schedstat), the hosts declared each other failed and the
 * deploy gave up after three attempts; two at a time, the same deploy
 * succeeded with the main loops at most 60-170 ms late. One per core, up to 4.
 */
export const VM_THREAD_STARTS_MAX = Math.max(1, Math.min(4, availableParallelism()));
/** Thread starts waiting for their turn; more is a host asked to start more VMs than it could hold. */
export const VM_THREAD_STARTS_QUEUED_MAX = 4096;
const threadStarts = bulkhead(VM_THREAD_STARTS_MAX, VM_THREAD_STARTS_QUEUED_MAX);

/** VM thread starts under way and waiting for a slot, now. */
export function vmThreadStarts(): { running: number; waiting: number } {
  return { running: VM_THREAD_STARTS_MAX - threadStarts.executionSlots, waiting: VM_THREAD_STARTS_QUEUED_MAX - threadStarts.queueSlots };
}

/** Whether a fillSpares loop is running (one at a time). */
let prewarming = false;

async function fillSpares(): Promise<void> {
  prewarming = true;
  try {
    while (spares.length < sparesWanted) {
      await nextThreadTurn();
      if (spares.length < sparesWanted) addSpare(spawnThread());
    }
  } finally {
    prewarming = false;
  }
}

function addSpare(thread: Thread): void {
  thread.worker.unref();
  const drop = () => {
    const i = spares.indexOf(thread);
    if (i >= 0) spares.splice(i, 1);
  };
  thread.worker.once("exit", drop);
  // An idle thread that fails (it could not load) must not take the process with it: an unheard
  // 'error' event throws. Once taken, the VmThread that owns it handles its errors.
  thread.worker.on("error", (error) => {
    if (!spares.includes(thread)) return;
    drop();
    process.emitWarning(`idle VM thread failed: ${error.message}`);
  });
  spares.push(thread);
}

function takeThread(): Thread {
  const spare = spares.shift();
  if (spare) {
    spare.worker.ref();
    refillLater();
    return spare;
  }
  return spawnThread();
}

/**
 * Spares taken are replaced once no spare was taken for SPARES_REFILL_QUIET_MS:
 * a thread's start costs 60-100 ms of CPU, more on a loaded machine, and one
 * started at once competed with the deploy or failover that took the spare.
 */
export const SPARES_REFILL_QUIET_MS = 1000;
let refillTimer: NodeJS.Timeout | null = null;
function refillLater(): void {
  if (refillTimer) clearTimeout(refillTimer);
  refillTimer = setTimeout(() => {
    refillTimer = null;
    VmWorker.prewarm(sparesWanted);
  }, SPARES_REFILL_QUIET_MS);
  // A process with nothing else to do does not stay up for its spares.
  refillTimer.unref();
}

/** Rejects with VmGoneError(`what`) if `promise` has not settled within `ms`. */
async function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new VmGoneError(what)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Periodic checks that share one timer per interval in this process: every
 * VM thread's watchdog polls at the same interval (a quarter of the default
 * call budget), and one wake-up for all of them costs an idle host less than
 * one per thread (an idle host's CPU is mostly wake-ups). Returns the
 * function that removes `check`.
 */
const sharedTimers = new Map<number, { timer: NodeJS.Timeout; checks: Set<() => void> }>();
function everyMs(interval_ms: number, check: () => void): () => void {
  let entry = sharedTimers.get(interval_ms);
  if (!entry) {
    const checks = new Set<() => void>();
    const timer = setInterval(() => {
      for (const c of checks) c();
    }, interval_ms);
    timer.unref();
    entry = { timer, checks };
    sharedTimers.set(interval_ms, entry);
  }
  entry.checks.add(check);
  return () => {
    const e = sharedTimers.get(interval_ms);
    if (!e || !e.checks.delete(check) || e.checks.size > 0) return;
    clearInterval(e.timer);
    sharedTimers.delete(interval_ms);
  };
}

/**
 * One VM worker thread and the replicas on it: it routes their requests and
 * events, and watches their guest calls. Request ids are the thread's; each
 * request names its replica.
 */
class VmThread {
  private readonly worker: Worker;
  /** The worker thread's id, unique in this process. */
  get thread_id(): number {
    return this.worker.threadId;
  }

  get watchdog_parked(): boolean {
    return this.watchdogParked;
  }
  private readonly watchdog: Int32Array;
  private stopWatchdog: () => void = () => undefined;
  /** Starts polling the watchdog flags (the constructor, and again after a park). */
  private readonly watchdogCheck: () => void;
  private watchdogParked = false;
  private readonly replicas = new Map<number, VmWorker>();
  /** Requests in flight, by id. */
  private readonly pending = new Map<number, Pending>();
  private nextRequest = 1;
  private nextReplica = 1;
  private gone: string | null = null;

  private constructor(
    thread: Thread,
    readonly pool: string | null,
    /** Per-call CPU budget of the thread's first replica: it sets how often the watchdog looks, and stands in for a replica that left. */
    private readonly call_cpu_ms: number,
  ) {
    this.watchdog = new Int32Array(thread.watchdog);
    this.worker = thread.worker;
    this.worker.on("message", (message: WorkerResponse) => this.onMessage(message));
    this.worker.on("error", (error) => this.fail(`VM thread failed: ${error.message}`));
    this.worker.on("exit", (code) => this.fail(`VM thread exited (code ${code})`));
    let lastSeq = -1;
    let since_ms = Date.now();
    let cpuSince_ms: number | null = null;
    let idlePolls = 0;
    const interval_ms = Math.max(5, Math.floor(call_cpu_ms / 4));
    // Polls at a quarter of the budget. A call is first seen busy up to one poll after it began, so a
    // runaway call is stopped after between 1x and 1.25x its budget of CPU, plus one poll.
    const check = (): void => {
      const seq = Atomics.load(this.watchdog, WATCHDOG_SEQ);
      const busy = Atomics.load(this.watchdog, WATCHDOG_BUSY) === 1;
      if (!busy && seq === lastSeq && ++idlePolls >= WATCHDOG_IDLE_POLLS_TO_PARK) return this.parkWatchdog(seq);
      if (!busy || seq !== lastSeq) {
        if (seq !== lastSeq) idlePolls = 0;
        lastSeq = seq;
        since_ms = Date.now();
        cpuSince_ms = busy ? this.threadCpu_ms() : null;
        return;
      }
      // The budget of the replica whose guest runs (a pool's replicas normally share their group's).
      const culprit = Atomics.load(this.watchdog, WATCHDOG_VM);
      const budget_ms = this.replicas.get(culprit)?.call_cpu_ms ?? this.call_cpu_ms;
      // A thread cannot run longer than the wall clock: only a call past its budget in wall time costs a read.
      if (Date.now() - since_ms <= budget_ms) return;
      const cpu_ms = this.threadCpu_ms();
      // Where the thread's CPU time cannot be read (not Linux), wall time is the budget.
      const used_ms = cpu_ms !== null && cpuSince_ms !== null ? cpu_ms - cpuSince_ms : Date.now() - since_ms;
      if (used_ms > budget_ms) this.runaway(culprit, budget_ms);
    };
    this.watchdogCheck = () => {
      idlePolls = 0;
      this.stopWatchdog = everyMs(interval_ms, check);
    };
    this.watchdogCheck();
  }

  /**
   * Stops polling a thread that made no guest call for WATCHDOG_IDLE_POLLS_TO_PARK
   * polls: its next call says so (`watch`) and polling resumes, so a runaway
   * call is stopped as late as before plus that message. The parked flag is
   * set before the last look at the thread's flags, and the thread sets its
   * busy flag before it looks at the parked one (sequentially consistent
   * atomics): a call that began meanwhile is seen by one side or the other.
   */
  private parkWatchdog(seq: number): void {
    Atomics.store(this.watchdog, WATCHDOG_PARKED, 1);
    const busy = Atomics.load(this.watchdog, WATCHDOG_BUSY) === 1;
    if (busy || Atomics.load(this.watchdog, WATCHDOG_SEQ) !== seq) {
      // A call began: keep polling. If the thread took the flag back first, its `watch` finds the watchdog not parked and is ignored.
      Atomics.compareExchange(this.watchdog, WATCHDOG_PARKED, 1, 0);
      return;
    }
    // A call that began since the look above took the flag back: keep polling (its `watch` is ignored).
    if (Atomics.load(this.watchdog, WATCHDOG_PARKED) === 0) return;
    this.stopWatchdog();
    this.watchdogParked = true;
  }

  /**
   * A thread ready for replicas: created (one per event-loop turn, at most
   * VM_THREAD_STARTS_MAX starting at once) or taken from the spares, and
   * answering, within VM_START_TIMEOUT_MS of its turn.
   */
  static start(pool: string | null, call_cpu_ms: number): Promise<VmThread> {
    return threadStarts
      .execute(async () => {
        if (spares.length === 0) await nextThreadTurn();
        const thread = new VmThread(takeThread(), pool, call_cpu_ms);
        try {
          await within(thread.ask(0, "status", {}), VM_START_TIMEOUT_MS, `VM thread did not start within ${VM_START_TIMEOUT_MS} ms`);
        } catch (error) {
          thread.fail((error as Error).message);
          throw error;
        }
        return thread;
      })
      .catch((error: unknown) => {
        if (error instanceof BulkheadRejectedError) throw new VmGoneError(`more than ${VM_THREAD_STARTS_QUEUED_MAX} VM threads are waiting to start on this host`);
        throw error;
      });
  }

  get isGone(): boolean {
    return this.gone !== null;
  }

  /** Replicas on this thread. */
  get load(): number {
    return this.replicas.size;
  }

  /** A new replica's handle on this thread (it exists on the thread with its first request). */
  add(call_cpu_ms: number): VmWorker {
    assert(!this.gone, "a replica added to a VM thread that is gone");
    const vm = new VmWorker(this, this.nextReplica++, call_cpu_ms);
    this.replicas.set(vm.id, vm);
    return vm;
  }

  /** Posts request `op` for replica `vm` (0: the thread itself, for the start's probe); resolves with its answer. */
  ask(vm: number, op: WorkerOp, args: unknown, transfer: TransferListItem[] = []): Promise<unknown> {
    if (this.gone) return Promise.reject(new VmGoneError(this.gone));
    const id = this.nextRequest++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ id, vm, op, args } as WorkerRequest, transfer);
    });
  }

  /** One-way (recycle): request id 0, never answered. */
  post(vm: number, op: WorkerOp, args: unknown, transfer: TransferListItem[]): boolean {
    if (this.gone) return false;
    this.worker.postMessage({ id: 0, vm, op, args } as WorkerRequest, transfer);
    return true;
  }

  /** Replica `vm` leaves the thread; the last one out ends it. */
  async drop(vm: VmWorker): Promise<void> {
    if (!this.replicas.delete(vm.id)) return;
    if (this.replicas.size === 0) {
      this.end("terminated");
      await this.worker.terminate();
      return;
    }
    await this.ask(vm.id, "drop", {}).catch(() => undefined);
  }

  /** CPU time of this thread so far (ms), or null where it cannot be read. */
  private threadCpu_ms(): number | null {
    return threadCpuMs(Atomics.load(this.watchdog, WATCHDOG_TID));
  }

  private onMessage(message: WorkerResponse): void {
    if (message.kind === "watch") {
      if (this.watchdogParked && !this.gone) {
        this.watchdogParked = false;
        this.watchdogCheck();
      }
      return;
    }
    if (message.kind === "event") {
      this.replicas.get(message.vm)?.onEvent(message.body);
      return;
    }
    const pending = this.pending.get(message.id);
    if (!pending) return;
    this.pending.delete(message.id);
    if (message.ok) pending.resolve(message.value);
    else pending.reject(new VmRequestError(message.error));
  }

  /** A guest call of replica `culprit` ran past its budget: the thread stops, and every replica on it with it. */
  private runaway(culprit: number, budget_ms: number): void {
    const reason = `cpu limit exceeded: a guest call used more than ${budget_ms} ms of CPU`;
    const others = [...this.replicas.values()].filter((r) => r.id !== culprit);
    this.replicas.get(culprit)?.threadGone(reason);
    for (const r of others) r.threadGone(`VM thread stopped: another VM on it exceeded its cpu limit (${reason})`);
    this.fail(reason);
  }

  /** The thread failed or was stopped: every replica on it is gone, and the thread is terminated. */
  fail(reason: string): void {
    if (this.gone) return;
    for (const r of [...this.replicas.values()]) r.threadGone(reason);
    this.end(reason);
    this.worker.terminate().catch(() => undefined);
  }

  private end(reason: string): void {
    this.gone = reason;
    this.stopWatchdog();
    for (const p of this.pending.values()) p.reject(new VmGoneError(reason));
    this.pending.clear();
    this.replicas.clear();
    if (this.pool !== null) forgetPoolThread(this.pool, this);
  }
}

/**
 * A thread of a pool, or one being started; `coming` counts the replicas
 * placed on it that are not added to it yet.
 */
interface PoolThread {
  thread: Promise<VmThread>;
  started: VmThread | null;
  coming: number;
}

/** Threads of each pool on this host (WorkerVmOptions.thread), and those being started. */
const pools = new Map<string, PoolThread[]>();

function forgetPoolThread(pool: string, thread: VmThread): void {
  const list = pools.get(pool);
  if (!list) return;
  const i = list.findIndex((e) => e.started === thread);
  if (i >= 0) list.splice(i, 1);
  if (list.length === 0) pools.delete(pool);
}

/** A thread picked for a replica, and what to call once the replica is added to it (or not placed after all). */
interface Placement {
  thread: VmThread;
  placed: () => void;
}

/**
 * The thread a new replica goes to: a thread of its own without a pool; else
 * a new thread while the pool has fewer than `threads_max`, then the pool's
 * thread with the fewest replicas, counting those on their way to it. The
 * pick is made at once, before any wait: replicas placed together (a
 * deploy's) all saw the same loads when they picked after a wait, and 62 of
 * a host's 64 bank primaries went to one of its two threads.
 */
async function threadFor(options: WorkerVmOptions): Promise<Placement> {
  const share = options.thread;
  if (!share) return { thread: await VmThread.start(null, options.limits.call_cpu_ms), placed: () => undefined };
  assert(Number.isSafeInteger(share.threads_max) && share.threads_max >= 1, "a thread pool has at least one thread");
  let list = pools.get(share.name);
  if (!list) pools.set(share.name, (list = []));
  const weight = (e: PoolThread) => (e.started?.load ?? 0) + e.coming;
  const live = list.filter((e) => !e.started?.isGone);
  const fresh = live.length < share.threads_max;
  let entry: PoolThread;
  if (fresh) {
    const created: PoolThread = { thread: VmThread.start(share.name, options.limits.call_cpu_ms), started: null, coming: 0 };
    entry = created;
    list.push(created);
    created.thread.then(
      (t) => (created.started = t),
      () => {
        // A pool thread that did not start leaves room for another.
        const l = pools.get(share.name);
        const i = l?.indexOf(created) ?? -1;
        if (l && i >= 0) l.splice(i, 1);
      },
    );
  } else {
    entry = live.reduce((a, b) => (weight(b) < weight(a) ? b : a));
  }
  entry.coming++;
  let done = false;
  const placed = () => {
    if (done) return;
    done = true;
    entry.coming--;
  };
  try {
    return { thread: await entry.thread, placed };
  } catch (error) {
    placed();
    // Its own new thread failed: say so. A thread others started failed: place this one again.
    if (fresh) throw error;
    return threadFor(options);
  }
}

export class VmWorker extends EventEmitter<VmEvents> {
  private gone: string | null = null;
  /** Its requests not answered yet (bounded by VM_QUEUE_MAX). */
  private inFlight = 0;

  /** @internal VmThread.add */
  constructor(
    private readonly thread: VmThread,
    /** This replica's id on its thread. */
    readonly id: number,
    /** Its per-call CPU budget, which its thread's watchdog holds each of its guest calls to. */
    readonly call_cpu_ms: number,
  ) {
    super();
  }

  /** The thread it runs on (a pool's replicas share one): replicas on one thread exchange group messages without a channel. */
  get thread_id(): number {
    return this.thread.thread_id;
  }

  /** Whether its thread's watchdog stopped polling for now (no guest call for a while; see VmThread.parkWatchdog). */
  get watchdog_parked(): boolean {
    return this.thread.watchdog_parked;
  }

  /** Keeps `count` idle VM threads ready (a host daemon calls this; idle threads do not keep a process alive). */
  static prewarm(count: number): void {
    sparesWanted = count;
    if (!prewarming) fillSpares().catch((error: Error) => process.emitWarning(`starting an idle VM thread failed: ${error.message}`));
  }

  static boot(guest: GuestBundle, options: WorkerVmOptions): Promise<VmWorker> {
    return VmWorker.start(options, (vm) => vm.request("boot", { guest, options }));
  }

  static restore(guest: GuestBundle, options: WorkerVmOptions, image: Uint8Array): Promise<VmWorker> {
    return VmWorker.start(options, (vm) => vm.request("restore", { guest, options, image }));
  }

  /** A backup replica: blank (cut 0) or from a full image. */
  static backup(guest: GuestBundle, options: WorkerVmOptions, image: Uint8Array | null): Promise<VmWorker> {
    return VmWorker.start(options, (vm) => vm.request("backup", { guest, options, image }));
  }

  /**
   * Places a replica on a thread (VmThread.start bounds a new thread's start)
   * and runs its first request, bounded in time: a replica that never answers
   * must not hold up a deploy or a failover forever. On failure it is dropped.
   */
  private static async start(options: WorkerVmOptions, first: (vm: VmWorker) => Promise<unknown>): Promise<VmWorker> {
    let placement = await threadFor(options);
    // The pool's thread picked may have ended meanwhile (its last replica left): pick again.
    while (placement.thread.isGone) {
      placement.placed();
      placement = await threadFor(options);
    }
    // Synchronous from the check on: once the replica is added, the thread is not ended by another's leaving.
    const vm = placement.thread.add(options.limits.call_cpu_ms);
    placement.placed();
    try {
      await within(first(vm), VM_START_TIMEOUT_MS, `VM did not start within ${VM_START_TIMEOUT_MS} ms`);
      return vm;
    } catch (error) {
      await vm.terminate();
      throw error;
    }
  }

  /** Why this replica is gone (crash, watchdog, terminate), or null while it runs. */
  get goneReason(): string | null {
    return this.gone;
  }

  request<K extends WorkerOp>(op: K, args: WorkerOps[K]["args"], transfer: TransferListItem[] = []): Promise<WorkerOps[K]["result"]> {
    if (this.gone) return Promise.reject(new VmGoneError(this.gone));
    if (this.inFlight >= VM_QUEUE_MAX) return Promise.reject(new VmGoneError(`VM request queue full (${VM_QUEUE_MAX})`));
    this.inFlight++;
    return (this.thread.ask(this.id, op, args, transfer) as Promise<WorkerOps[K]["result"]>).finally(() => this.inFlight--);
  }

  /**
   * Captures the current epoch; the delta comes back sealed (checksum computed
   * on this thread). Its buffer is the VM thread's: give it back with
   * VmWorker.recycle once done with it.
   */
  async capture(): Promise<CaptureResult> {
    const result = await this.request("capture", {});
    this.received(result);
    return result;
  }

  /**
   * The caller, and everyone it handed the bytes to, is done with `delta`
   * from some VM thread's capture: its buffer is transferred back to that
   * thread's pool for a later capture, and every view of it on this thread
   * is detached (reads see no bytes). False, and nothing happens, if it is
   * not such a delta (bytes off the wire, a copy), was given back already, or
   * its VM thread is gone. A delta never given back is just garbage.
   */
  static recycle(delta: Uint8Array): boolean {
    const loan = loans.get(delta.buffer);
    if (!loan) return false;
    loans.delete(delta.buffer);
    return loan.vm.giveBack(loan.id, delta.buffer as ArrayBuffer);
  }

  private giveBack(id: number, buffer: ArrayBuffer): boolean {
    if (this.gone) return false;
    return this.thread.post(this.id, "recycle", { loans: [{ id, buffer }] }, [buffer]);
  }

  /** A capture arrived: seal its delta, and note the loan its buffer is. */
  private received(result: CaptureResult): void {
    sealDelta(result.delta);
    if (result.delta_loan !== null) loans.set(result.delta.buffer, { vm: this, id: result.delta_loan });
  }

  /**
   * group mode: ends epoch `epoch` unless the VM did already (null); see
   * WorkerOps.capture_to. The delta comes as a `captured` event, like the
   * VM's own captures, so that listeners see every delta in epoch order.
   */
  captureTo(epoch: number, commit?: { epoch: number; trim?: number[] }): Promise<WorkerOps["capture_to"]["result"]> {
    return this.request("capture_to", { epoch, commit });
  }

  status(): Promise<VmStatus> {
    return this.request("status", {});
  }

  /** Stops this replica: it leaves its thread (the last one out ends the thread); its requests in flight fail. */
  async terminate(): Promise<void> {
    if (this.gone === null) this.gone = "terminated";
    await this.thread.drop(this);
  }

  /** @internal VmThread: an event of this replica. */
  onEvent(body: WorkerEvent): void {
    if (body.event === "crashed") this.emit("crashed", body.message);
    else if (body.event === "problem") this.emit("problem", body.message);
    else if (body.event === "captured") {
      this.received(body.result);
      this.emit("captured", body.result);
    }
    else if (body.event === "active") this.emit("active", body.epoch);
    else this.emit("output_pending", body.epoch, body.urgent);
  }

  /** @internal VmThread: the thread is gone (watchdog, failure); a replica not stopped on purpose crashed. */
  threadGone(reason: string): void {
    if (this.gone) return;
    this.gone = reason;
    this.emit("crashed", reason);
  }
}
