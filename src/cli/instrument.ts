/**
 * `cohort instrument <module>`: instruments a module in this process (no
 * cache), or says why it cannot be protected, and times it. Binaryen's load
 * (parsing it and compiling its code, once per process: the cold cost) is
 * timed apart from the module's own instrumentation.
 */
import { readFile, writeFile } from "node:fs/promises";
import { resolveGuest } from "../guest/examples.js";
import { checkModuleLimits } from "../guest/limits.js";
import { loadInstrumenter } from "../guest/load-instrumenter.js";
import type { ModuleInfo } from "../guest/module-info.js";
import { round } from "../util/stats.js";

export interface InstrumentResult {
  /** Size of the instrumented module. */
  bytes: number;
  /** Size of the module as given. */
  input_bytes: number;
  info: ModuleInfo;
  timings: {
    /** Loading Binaryen into this process, cold (import and warm-up). */
    binaryen_load_ms: number;
    /** Instrumenting the module once Binaryen is loaded. */
    instrument_ms: number;
  };
}

export async function instrumentCommand(module: string, output: string | null): Promise<InstrumentResult> {
  const bytes = new Uint8Array(await readFile(resolveGuest(module)));
  checkModuleLimits(bytes); // before Binaryen is loaded: a refused module costs no load
  const { instrument, load_ms } = await loadInstrumenter();
  const started = performance.now();
  const result = instrument(bytes);
  const instrument_ms = performance.now() - started;
  if (output) await writeFile(output, result.wasm);
  return {
    bytes: result.wasm.length,
    input_bytes: bytes.length,
    info: result.info,
    timings: { binaryen_load_ms: round(load_ms, 1), instrument_ms: round(instrument_ms, 1) },
  };
}

/** The line `cohort instrument` prints on stderr. */
export function formatTimings({ input_bytes, bytes, timings }: InstrumentResult): string {
  return `instrumented ${input_bytes} → ${bytes} bytes in ${timings.instrument_ms} ms (Binaryen loaded in ${timings.binaryen_load_ms} ms, cold, once per process)`;
}
