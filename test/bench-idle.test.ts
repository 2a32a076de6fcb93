import { describe, expect, it } from "vitest";
import { runIdleBench } from "../src/bench/idle.js";

describe("cohort bench idle (short)", () => {
  it("measures the floor, an idle group and processes that only beat each other, each from real processes", async () => {
    const lines: string[] = [];
    const report = await runIdleBench({ measure_ms: 1000, settle_ms: 1000, hosts: 3, size: 2, guest: "kv", mode: "group", repeat: 1, progress: (line) => lines.push(line) });
    expect(lines.some((l) => l.includes("beats only"))).toBe(true);
    for (const c of [report.results.floor, report.results.idle_group, report.results.beats_only]) {
      expect(c.samples).toHaveLength(1);
      // Three processes that beat every 100 ms cannot cost nothing over a second.
      expect(c.median.cpu_percent).toBeGreaterThan(0);
      expect(c.median.window_ms).toBeGreaterThanOrEqual(1000);
    }
    expect(report.results.beats_only.median.epochs_per_s).toBe(0);
    expect(report.ratios.floor_vs_beats_only).toBeGreaterThan(0);
  }, 120_000);
});
