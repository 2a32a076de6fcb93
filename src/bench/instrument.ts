/**
 * `cohort bench instrument`: what instrumenting a guest costs, per built
 * guest, on the instrumenter thread hosts use (src/guest/instrument-worker.ts).
 *
 *  - cold_load_ms: a fresh thread loading Binaryen (import, and the warm-up
 *    that has V8 compile the code an instrumentation runs): paid once per
 *    thread, i.e. once per host process while it keeps instrumenting.
 *  - first_ms: the guest's first instrumentation on that thread, right after.
 *  - instrument_ms_p50 / _max: `runs` more instrumentations of the guest on
 *    the same thread (instrument() alone, timed on the thread).
 *  - bytes_in / bytes_out: the guest before and after instrumentation.
 *  - rss_mib: this process's resident memory with the thread alive.
 */
import { readFile } from "node:fs/promises";
import { builtGuests, guestPath } from "../guest/examples.js";
import { InstrumenterThread } from "../guest/instrument-worker.js";
import { percentileOfSorted, round } from "../util/stats.js";

export interface InstrumentBenchResult {
  guest: string;
  bytes_in: number;
  bytes_out: number;
  cold_load_ms: number;
  first_ms: number;
  instrument_ms_p50: number;
  instrument_ms_max: number;
  rss_mib: number;
}

export interface InstrumentBenchReport {
  bench: "instrument";
  runs: number;
  results: InstrumentBenchResult[];
}

export interface InstrumentBenchOptions {
  /** Built guests to instrument (default: every guest in build/guests). */
  guests?: string[];
  /** Instrumentations per guest after the first. */
  runs: number;
  progress: (line: string) => void;
}

async function guestCase(name: string, runs: number): Promise<InstrumentBenchResult> {
  const bytes = new Uint8Array(await readFile(guestPath(name)));
  // A thread of its own per guest, so every guest's cold figure is a real cold load.
  const thread = new InstrumenterThread();
  try {
    const first = await thread.instrument(bytes);
    const times: number[] = [];
    for (let i = 0; i < runs; i++) times.push((await thread.instrument(bytes)).timings.instrument_ms);
    times.sort((a, b) => a - b);
    return {
      guest: name,
      bytes_in: bytes.length,
      bytes_out: first.wasm.length,
      cold_load_ms: round(first.timings.binaryen_load_ms, 1),
      first_ms: round(first.timings.instrument_ms, 1),
      instrument_ms_p50: round(percentileOfSorted(times, 0.5), 1),
      instrument_ms_max: round(times.at(-1) ?? 0, 1),
      rss_mib: round(process.memoryUsage().rss / 2 ** 20, 0),
    };
  } finally {
    await thread.close();
  }
}

export async function runInstrumentBench(options: InstrumentBenchOptions): Promise<InstrumentBenchReport> {
  const results: InstrumentBenchResult[] = [];
  for (const name of options.guests ?? builtGuests()) {
    options.progress(`instrument: ${name} ...`);
    results.push(await guestCase(name, options.runs));
  }
  return { bench: "instrument", runs: options.runs, results };
}

export function formatInstrumentReport(report: InstrumentBenchReport): string {
  const lines = [
    `Instrumenting the built guests on the instrumenter thread (a fresh thread per guest; p50 and max of ${report.runs} runs after the first)`,
    "",
    "  guest         bytes in  bytes out  cold load ms  first ms  p50 ms  max ms  rss MiB",
  ];
  for (const r of report.results) {
    lines.push(
      `  ${r.guest.padEnd(12)} ${String(r.bytes_in).padStart(9)} ${String(r.bytes_out).padStart(10)} ${r.cold_load_ms.toFixed(1).padStart(13)} ` +
        `${r.first_ms.toFixed(1).padStart(9)} ${r.instrument_ms_p50.toFixed(1).padStart(7)} ${r.instrument_ms_max.toFixed(1).padStart(7)} ${String(r.rss_mib).padStart(8)}`,
    );
  }
  return lines.join("\n");
}
