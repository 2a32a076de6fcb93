/**
 * Runs instrument() on a worker thread. Binaryen needs a second or more to
 * load and up to seconds for a large module; on a host's main thread that
 * would silence its heartbeats and make its peers declare it failed.
 *
 * One instrumenter thread per process (InstrumenterThread.shared), started on
 * the first request, loads Binaryen once and instruments one module at a
 * time; it ends after INSTRUMENTER_IDLE_MS without work (Binaryen holds
 * ≈ 100 MiB) and never keeps the process alive on its own. A module's limits
 * (src/guest/limits.ts) are checked on the thread before Binaryen is loaded,
 * so a refused module costs no load.
 */
import { isMainThread, parentPort, Worker, workerData } from "node:worker_threads";
import { createLowered, yieldCpuToMainThread } from "../util/thread-priority.js";
import { fileURLToPath } from "node:url";
import { describeThrown, InstrumenterError, InvalidModuleError, ModuleLimitError, UnsupportedModuleError } from "./errors.js";
import { checkModuleLimits } from "./limits.js";
import { loadInstrumenter } from "./load-instrumenter.js";
import type { InstrumentedModule } from "./module-info.js";

const SELF = import.meta.url.endsWith(".ts") ? new URL("../../dist/src/guest/instrument-worker.js", import.meta.url) : new URL(import.meta.url);

/** How long the instrumenter thread waits for another module before it ends. */
export const INSTRUMENTER_IDLE_MS = 30_000;

/** Where an instrumentation's time went. */
export interface InstrumentTimings {
  /**
   * Loading Binaryen into the thread (import and warm-up, see
   * load-instrumenter.ts) when this instrumentation had to, else 0: paid
   * once per thread.
   */
  binaryen_load_ms: number;
  /** instrument() on this module, on the thread. */
  instrument_ms: number;
}

export type TimedInstrumentedModule = InstrumentedModule & { timings: InstrumentTimings };

/** What crosses the thread boundary of a failure: structured clone keeps neither the class nor a non-Error's meaning. */
interface ThrownData {
  name: string;
  message: string;
  code?: string;
  feature?: string;
  where?: string;
  limit?: ModuleLimitError["limit"];
  value?: number;
  max?: number;
}

type Reply = { ok: true; result: InstrumentedModule; timings: InstrumentTimings } | { ok: false; error: ThrownData };

interface Job {
  wasm: Uint8Array;
  resolve: (result: TimedInstrumentedModule) => void;
  reject: (error: Error) => void;
}

/**
 * A worker thread that instruments modules one at a time, in the order
 * asked. If the thread dies (an abort inside Binaryen), the module it was
 * instrumenting fails with InstrumenterError and the modules waiting behind
 * it go to a new thread.
 */
export class InstrumenterThread {
  /** The process's instrumenter thread, used by instrumentOffThread(). */
  static readonly shared = new InstrumenterThread();

  private worker: Worker | null = null;
  private readonly queue: Job[] = [];
  private current: Job | null = null;
  private idleTimer: NodeJS.Timeout | null = null;
  private started = 0;
  private instrumented = 0;

  constructor(private readonly idle_ms = INSTRUMENTER_IDLE_MS) {}

  /** Threads started and modules handed to them so far (tests count them). */
  get stats(): { threads_started: number; modules: number } {
    return { threads_started: this.started, modules: this.instrumented };
  }

  instrument(wasm: Uint8Array): Promise<TimedInstrumentedModule> {
    return new Promise((resolve, reject) => {
      this.queue.push({ wasm, resolve, reject });
      this.next();
    });
  }

  /** Ends the thread now: the module it was instrumenting and those waiting fail; modules asked for later start a new one. */
  async close(): Promise<void> {
    const worker = this.worker;
    this.clearIdle();
    this.worker = null;
    const jobs = [...(this.current ? [this.current] : []), ...this.queue.splice(0)];
    this.current = null;
    for (const job of jobs) job.reject(new InstrumenterError("instrumenter thread closed before answering"));
    if (worker) await worker.terminate();
  }

  private next(): void {
    if (this.current || this.queue.length === 0) return;
    this.clearIdle();
    const worker = this.worker ?? this.start();
    this.current = this.queue.shift()!;
    this.instrumented++;
    worker.ref();
    worker.postMessage({ wasm: this.current.wasm });
  }

  private start(): Worker {
    const worker = createLowered(() => new Worker(fileURLToPath(SELF), { workerData: { instrumenter: true } }));
    this.worker = worker;
    this.started++;
    const finish = (settle: (job: Job) => void) => {
      const job = this.current;
      this.current = null;
      if (job) settle(job);
    };
    worker.on("message", (reply: Reply) => {
      if (this.worker !== worker) return; // a reply that crossed close(): its module was already failed
      finish((job) => (reply.ok ? job.resolve({ ...reply.result, timings: reply.timings }) : job.reject(revive(reply.error))));
      this.afterJob(worker);
    });
    worker.once("error", (error) => {
      if (this.worker !== worker) return;
      this.worker = null;
      finish((job) => job.reject(new InstrumenterError(`instrumenter thread failed: ${describeThrown(error)}`, { cause: error })));
      this.next();
    });
    // Without this a thread that exits without a word (an abort inside Binaryen) would leave its caller waiting forever.
    worker.once("exit", (code) => {
      if (this.worker !== worker) return; // replaced after an error, or closed
      this.worker = null;
      finish((job) => job.reject(new InstrumenterError(`instrumenter thread exited with code ${code} before answering`)));
      this.next();
    });
    return worker;
  }

  private afterJob(worker: Worker): void {
    if (this.queue.length) {
      this.next();
      return;
    }
    // Idle: the thread must not keep the process alive, and ends unless more work comes.
    worker.unref();
    this.idleTimer = setTimeout(() => {
      this.idleTimer = null;
      if (this.worker !== worker || this.current) return;
      this.worker = null;
      worker.terminate().catch((error: Error) => process.emitWarning(`instrumenter thread did not terminate: ${error.message}`));
    }, this.idle_ms);
    this.idleTimer.unref();
  }

  private clearIdle(): void {
    if (this.idleTimer) clearTimeout(this.idleTimer);
    this.idleTimer = null;
  }
}

/**
 * Instruments on the process's instrumenter thread; fails with the same
 * classes instrument() throws (UnsupportedModuleError, ModuleLimitError,
 * InvalidModuleError), or InstrumenterError for anything else, so callers
 * can tell a refused module from a Cohort bug.
 */
export function instrumentOffThread(wasm: Uint8Array): Promise<TimedInstrumentedModule> {
  return InstrumenterThread.shared.instrument(wasm);
}

/** The error instrument() threw on the worker, as its own class again. */
function revive(e: ThrownData): Error {
  if (e.name === "ModuleLimitError" && e.limit !== undefined && e.value !== undefined && e.max !== undefined && e.where !== undefined) {
    return new ModuleLimitError(e.limit, e.value, e.max, e.where);
  }
  if (e.name === "UnsupportedModuleError" && e.feature !== undefined && e.where !== undefined) return new UnsupportedModuleError(e.feature, e.where);
  if (e.name === "InvalidModuleError") return new InvalidModuleError(e.message);
  return new InstrumenterError(`instrumenting failed: ${e.name ? `${e.name}: ` : ""}${e.message}`);
}

/** On the instrumenter thread: one module, checked against the limits, then instrumented. */
async function instrumentHere(wasm: Uint8Array): Promise<Reply> {
  try {
    checkModuleLimits(wasm); // before Binaryen is loaded: a refused module costs no load
    const { instrument, load_ms, loaded_now } = await loadInstrumenter();
    const started = performance.now();
    const result = instrument(wasm);
    return { ok: true, result, timings: { binaryen_load_ms: loaded_now ? load_ms : 0, instrument_ms: performance.now() - started } };
  } catch (error) {
    const e = error as Error & Partial<ThrownData>;
    return {
      ok: false,
      error:
        error instanceof Error
          ? { name: e.name, message: describeThrown(error), code: e.code, feature: e.feature, where: e.where, limit: e.limit, value: e.value, max: e.max }
          : { name: "", message: describeThrown(error) },
    };
  }
}

if (!isMainThread && parentPort && workerData?.instrumenter) {
  const port = parentPort;
  yieldCpuToMainThread();
  // Binaryen is loaded on the first module that passes the limits (loadInstrumenter), never by
  // the threads that import this file for instrumentOffThread().
  // One module at a time: the main thread sends the next only after this one's reply.
  port.on("message", ({ wasm }: { wasm: Uint8Array }) => {
    instrumentHere(wasm).then(
      (reply) => port.postMessage(reply),
      (error: unknown) => port.postMessage({ ok: false, error: { name: "", message: describeThrown(error) } } satisfies Reply),
    );
  });
}
