/** `cohort bench instrument`: the report's shape and figures (not their values: machines are noisy). */
import { describe, expect, it } from "vitest";
import { formatInstrumentReport, runInstrumentBench } from "../src/bench/instrument.js";
import { builtGuests } from "../src/guest/examples.js";

describe("bench instrument", () => {
  it("reports, per guest, a cold load, the first instrumentation, p50 and max of the runs, and bytes in and out", async () => {
    const lines: string[] = [];
    const report = await runInstrumentBench({ guests: ["store_loop", "sort"], runs: 2, progress: (line) => lines.push(line) });
    expect(report.bench).toBe("instrument");
    expect(report.runs).toBe(2);
    expect(report.results.map((r) => r.guest)).toEqual(["store_loop", "sort"]);
    for (const r of report.results) {
      // Each guest gets a fresh thread: each pays (and reports) Binaryen's cold load.
      expect(r.cold_load_ms).toBeGreaterThan(0);
      expect(r.first_ms).toBeGreaterThan(0);
      expect(r.instrument_ms_p50).toBeGreaterThan(0);
      expect(r.instrument_ms_max).toBeGreaterThanOrEqual(r.instrument_ms_p50);
      expect(r.bytes_out).toBeGreaterThan(r.bytes_in);
      expect(r.rss_mib).toBeGreaterThan(0);
    }
    expect(lines).toEqual(["instrument: store_loop ...", "instrument: sort ..."]);
    expect(JSON.parse(JSON.stringify(report))).toEqual(report);
    expect(formatInstrumentReport(report)).toMatch(/store_loop .*\n.*sort/);
  }, 60_000);

  it("by default covers every built guest", () => {
    expect(builtGuests()).toEqual(expect.arrayContaining(["ticker", "kv", "bank", "allreduce", "ring", "phases", "store_loop"]));
  });
});
