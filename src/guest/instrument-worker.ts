/**
 * Runs instrument() on a worker thread. Binaryen needs up to seconds for a
 * large module; on a host's main thread that would silence its heartbeats and
 * make its peers declare it failed.
 */
import { isMainThread, parentPort, Worker, workerData } from "node:worker_threads";
import { fileURLToPath } from "node:url";
import { describeThrown, InstrumenterError, InvalidModuleError, ModuleLimitError, UnsupportedModuleError } from "./errors.js";
import type { InstrumentedModule } from "./module-info.js";

const SELF = import.meta.url.endsWith(".ts") ? new URL("../../dist/src/guest/instrument-worker.js", import.meta.url) : new URL(import.meta.url);

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

/**
 * Instruments on a worker thread; fails with the same classes instrument()
 * throws (UnsupportedModuleError, InvalidModuleError), or InstrumenterError
 * for anything else, so callers can tell a refused module from a Cohort bug.
 */
export function instrumentOffThread(wasm: Uint8Array): Promise<InstrumentedModule> {
  return new Promise((resolve, reject) => {
    const worker = new Worker(fileURLToPath(SELF), { workerData: { wasm } });
    let answered = false;
    worker.once("message", (message: { ok: true; result: InstrumentedModule } | { ok: false; error: ThrownData }) => {
      answered = true;
      worker.terminate().catch((error: Error) => process.emitWarning(`instrumenter thread did not terminate: ${error.message}`));
      if (message.ok) resolve(message.result);
      else reject(revive(message.error));
    });
    worker.once("error", (error) => {
      answered = true;
      reject(new InstrumenterError(`instrumenter thread failed: ${describeThrown(error)}`, { cause: error }));
    });
    // Without this a thread that exits without a word (an abort inside Binaryen) would leave the caller waiting forever.
    worker.once("exit", (code) => {
      if (!answered) reject(new InstrumenterError(`instrumenter thread exited with code ${code} before answering`));
    });
  });
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

if (!isMainThread && parentPort && workerData?.wasm) {
  try {
    // Loaded here only: Binaryen is large, and the threads that import this file for
    // instrumentOffThread() never need it.
    const { instrument } = await import("./instrument.js");
    parentPort.postMessage({ ok: true, result: instrument(workerData.wasm as Uint8Array) });
  } catch (error) {
    const e = error as Error & Partial<ThrownData>;
    const data: ThrownData =
      error instanceof Error
        ? { name: e.name, message: describeThrown(error), code: e.code, feature: e.feature, where: e.where, limit: e.limit, value: e.value, max: e.max }
        : { name: "", message: describeThrown(error) };
    parentPort.postMessage({ ok: false, error: data });
  }
}
