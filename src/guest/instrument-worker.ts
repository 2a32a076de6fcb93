/**
 * Runs instrument() on a worker thread. Binaryen needs up to seconds for a
 * large module; on a host's main thread that would silence its heartbeats and
 * make its peers declare it failed.
 */
import { isMainThread, parentPort, Worker, workerData } from "node:worker_threads";
import { fileURLToPath } from "node:url";
import type { InstrumentedModule } from "./module-info.js";
import { describeThrown } from "./errors.js";

const SELF = import.meta.url.endsWith(".ts") ? new URL("../../dist/src/guest/instrument-worker.js", import.meta.url) : new URL(import.meta.url);

export function instrumentOffThread(wasm: Uint8Array): Promise<InstrumentedModule> {
  return new Promise((resolve, reject) => {
    const worker = new Worker(fileURLToPath(SELF), { workerData: { wasm } });
    worker.once("message", (message: { ok: true; result: InstrumentedModule } | { ok: false; error: { name: string; message: string; code?: string; feature?: string; where?: string } }) => {
      worker.terminate().catch((error: Error) => process.emitWarning(`instrumenter thread did not terminate: ${error.message}`));
      if (message.ok) resolve(message.result);
      else reject(Object.assign(new Error(message.error.message), message.error));
    });
    worker.once("error", reject);
  });
}

if (!isMainThread && parentPort && workerData?.wasm) {
  try {
    // Loaded here only: Binaryen is large, and the threads that import this file for
    // instrumentOffThread() never need it.
    const { instrument } = await import("./instrument.js");
    parentPort.postMessage({ ok: true, result: instrument(workerData.wasm as Uint8Array) });
  } catch (error) {
    const e = error as Error & { code?: string; feature?: string; where?: string };
    parentPort.postMessage({ ok: false, error: { name: e.name, message: describeThrown(error), code: e.code, feature: e.feature, where: e.where } });
  }
}
