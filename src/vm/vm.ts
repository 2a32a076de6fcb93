/**
 * Host-thread handle of one VM replica running in its own worker thread.
 * Requests are queued in order and answered in order by the worker; the
 * handle also runs the per-call CPU watchdog (an infinite loop in a guest is
 * stopped by terminating the worker, which crashes that VM and nothing else).
 */
import { EventEmitter } from "node:events";
import { Worker, type TransferListItem } from "node:worker_threads";
import { fileURLToPath } from "node:url";
import { availableParallelism } from "node:os";
import { bulkhead, BulkheadRejectedError } from "cockatiel";
import { sealDelta } from "../checkpoint/format.js";
import { threadCpuMs } from "../util/thread-cpu.js";
import {
  WATCHDOG_BUSY,
  WATCHDOG_SEQ,
  WATCHDOG_SLOTS,
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

/** Budget for a VM thread to start and answer its first request (boot, restore, backup install). */
export const VM_START_TIMEOUT_MS = 10_000;

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
 * Pooled deltas on this thread, by buffer: the VM thread that lent it and the
 * loan's id (see VmWorker.recycle). Weak: a delta nobody gives back is garbage.
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
  const watchdog = new SharedArrayBuffer(WATCHDOG_SLOTS * 4);
  return { worker: new Worker(fileURLToPath(WORKER_URL), { workerData: { watchdog } }), watchdog };
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
 * creation (or its being taken from the spares) until its first request
 * (boot, restore, backup install) answered. A Node worker costs 60-100 ms of
 * CPU to start (isolate, Node's bootstrap, the VM runtime's modules), most
 * of it before the thread can lower its priority. A host that started all
 * 32 threads of its share of a 64-VM group at once (4 hosts, 2 cores) kept
 * every host's main thread waiting for a core for 0.7-1 s of each second
 * (/proc/<tid>/schedstat), the hosts declared each other failed and the
 * deploy gave up after three attempts; two at a time, the same deploy
 * succeeds with the main loops at most 60-170 ms late. One per core, up to 4.
 */
export const VM_THREAD_STARTS_MAX = Math.max(1, Math.min(4, availableParallelism()));
/** VM starts waiting for their turn; more is a host asked to start more VMs than it could hold. */
export const VM_THREAD_STARTS_QUEUED_MAX = 4096;
const threadStarts = bulkhead(VM_THREAD_STARTS_MAX, VM_THREAD_STARTS_QUEUED_MAX);

/** VM thread starts under way and waiting for a slot, now (for tests and status). */
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
  // 'error' event throws. Once taken, the VmWorker that owns it handles its errors.
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
    // Replace it in the background, off the path of whoever is waiting now.
    setImmediate(() => VmWorker.prewarm(sparesWanted));
    return spare;
  }
  return spawnThread();
}

export class VmWorker extends EventEmitter<VmEvents> {
  private readonly worker: Worker;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private readonly watchdog: Int32Array;
  private readonly watchdogTimer: NodeJS.Timeout;
  private gone: string | null = null;

  /** Keeps `count` idle VM threads ready (a host daemon calls this; idle threads do not keep a process alive). */
  static prewarm(count: number): void {
    sparesWanted = count;
    if (!prewarming) fillSpares().catch((error: Error) => process.emitWarning(`starting an idle VM thread failed: ${error.message}`));
  }

  private constructor(private readonly call_cpu_ms: number) {
    super();
    const thread = takeThread();
    this.watchdog = new Int32Array(thread.watchdog);
    this.worker = thread.worker;
    this.worker.on("message", (message: WorkerResponse) => this.onMessage(message));
    this.worker.on("error", (error) => this.fail(`VM thread failed: ${error.message}`));
    this.worker.on("exit", (code) => this.fail(`VM thread exited (code ${code})`));
    let lastSeq = -1;
    let since_ms = Date.now();
    let cpuSince_ms: number | null = null;
    // Polls at a quarter of the budget. A call is first seen busy up to one poll after it began, so a
    // runaway call is stopped after between 1x and 1.25x its budget of CPU, plus one poll.
    this.watchdogTimer = setInterval(() => {
      const seq = Atomics.load(this.watchdog, WATCHDOG_SEQ);
      const busy = Atomics.load(this.watchdog, WATCHDOG_BUSY) === 1;
      if (!busy || seq !== lastSeq) {
        lastSeq = seq;
        since_ms = Date.now();
        cpuSince_ms = busy ? this.threadCpu_ms() : null;
        return;
      }
      // A thread cannot run longer than the wall clock: only a call past its budget in wall time costs a read.
      if (Date.now() - since_ms <= this.call_cpu_ms) return;
      const cpu_ms = this.threadCpu_ms();
      // Where the thread's CPU time cannot be read (not Linux), wall time is the budget.
      const used_ms = cpu_ms !== null && cpuSince_ms !== null ? cpu_ms - cpuSince_ms : Date.now() - since_ms;
      if (used_ms > this.call_cpu_ms) this.fail(`cpu limit exceeded: a guest call used more than ${this.call_cpu_ms} ms of CPU`);
    }, Math.max(5, Math.floor(call_cpu_ms / 4)));
    this.watchdogTimer.unref();
  }

  /** CPU time of this replica's thread so far (ms), or null where it cannot be read. */
  private threadCpu_ms(): number | null {
    return threadCpuMs(Atomics.load(this.watchdog, WATCHDOG_TID));
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
   * Starts a thread and its first request once a start slot is free (VM_THREAD_STARTS_MAX),
   * bounded in time from then: a thread that never answers (it failed to start) must not hold up
   * a deploy or a failover forever. On failure the thread is stopped.
   */
  private static async start(options: WorkerVmOptions, first: (vm: VmWorker) => Promise<unknown>): Promise<VmWorker> {
    try {
      return await threadStarts.execute(() => VmWorker.startNow(options, first));
    } catch (error) {
      if (error instanceof BulkheadRejectedError) throw new VmGoneError(`more than ${VM_THREAD_STARTS_QUEUED_MAX} VM threads are waiting to start on this host`);
      throw error;
    }
  }

  private static async startNow(options: WorkerVmOptions, first: (vm: VmWorker) => Promise<unknown>): Promise<VmWorker> {
    if (spares.length === 0) await nextThreadTurn(); // this VM creates a thread (see nextThreadTurn)
    const vm = new VmWorker(options.limits.call_cpu_ms);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new VmGoneError(`VM thread did not start within ${VM_START_TIMEOUT_MS} ms`)), VM_START_TIMEOUT_MS);
    });
    try {
      await Promise.race([first(vm), timeout]);
      return vm;
    } catch (error) {
      await vm.terminate();
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Why this replica's thread is gone (crash, watchdog, terminate), or null while it runs. */
  get goneReason(): string | null {
    return this.gone;
  }

  request<K extends WorkerOp>(op: K, args: WorkerOps[K]["args"], transfer: TransferListItem[] = []): Promise<WorkerOps[K]["result"]> {
    if (this.gone) return Promise.reject(new VmGoneError(this.gone));
    if (this.pending.size >= VM_QUEUE_MAX) return Promise.reject(new VmGoneError(`VM request queue full (${VM_QUEUE_MAX})`));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (value: unknown) => void, reject });
      this.worker.postMessage({ id, op, args }, transfer);
    });
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
    this.worker.postMessage({ id: 0, op: "recycle", args: { loans: [{ id, buffer }] } } satisfies WorkerRequest, [buffer]);
    return true;
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

  async terminate(): Promise<void> {
    this.fail("terminated");
    await this.worker.terminate();
  }

  private onMessage(message: WorkerResponse): void {
    if (message.kind === "event") {
      this.onEvent(message.body);
      return;
    }
    const pending = this.pending.get(message.id);
    if (!pending) return;
    this.pending.delete(message.id);
    if (message.ok) pending.resolve(message.value);
    else pending.reject(new VmRequestError(message.error));
  }

  private onEvent(body: WorkerEvent): void {
    if (body.event === "crashed") this.emit("crashed", body.message);
    else if (body.event === "problem") this.emit("problem", body.message);
    else if (body.event === "captured") {
      this.received(body.result);
      this.emit("captured", body.result);
    }
    else if (body.event === "active") this.emit("active", body.epoch);
    else this.emit("output_pending", body.epoch, body.urgent);
  }

  private fail(reason: string): void {
    if (this.gone) return;
    this.gone = reason;
    clearInterval(this.watchdogTimer);
    for (const pending of this.pending.values()) pending.reject(new VmGoneError(reason));
    this.pending.clear();
    if (reason !== "terminated") {
      this.emit("crashed", reason);
      this.worker.terminate().catch((error: Error) => this.emit("problem", `VM thread did not terminate: ${error.message}`));
    }
  }
}
