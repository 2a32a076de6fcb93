/**
 * Loads Binaryen and the instrumenter into this thread, once. Loading is the
 * cold cost of instrumenting: V8 parses Binaryen (≈ 15 MB of JS and wasm) and
 * compiles the parts of it an instrumentation runs, which takes a second or
 * more, against tens of milliseconds for instrumenting an example guest once
 * that is done. So the loader also instruments a small built-in module
 * (warmUp), and reports load and instrumentation times apart.
 */
import type { instrument as Instrument } from "./instrument.js";

export interface LoadedInstrumenter {
  instrument: typeof Instrument;
  /** What loading took in this thread (import of Binaryen and the warm-up), paid once. */
  load_ms: number;
  /** True for the caller whose call loaded it; later callers get the same load_ms. */
  loaded_now: boolean;
}

let loading: Promise<Omit<LoadedInstrumenter, "loaded_now">> | null = null;

export async function loadInstrumenter(): Promise<LoadedInstrumenter> {
  if (loading) return { ...(await loading), loaded_now: false };
  loading = (async () => {
    const started = performance.now();
    const { instrument, warmUp } = await import("./instrument.js");
    warmUp();
    return { instrument, load_ms: performance.now() - started };
  })();
  try {
    return { ...(await loading), loaded_now: true };
  } catch (error) {
    loading = null; // a failed import is tried again by the next caller
    throw error;
  }
}
