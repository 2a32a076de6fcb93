import { describe, expect, it } from "vitest";
import { PAUSE_WARMUP_CAPTURES, pauseCase, pauseGuest } from "../src/bench/checkpoint.js";

describe("checkpoint pause bench", () => {
  it("reports the pause next to the page-copy floor, in the fields it always had plus the new ones", async () => {
    const guest = await pauseGuest(1);
    const r = await pauseCase(guest, 1, 300, 20);
    // The fields of earlier versions, unchanged; 1 MiB has only 256 pages.
    expect(r).toMatchObject({ memory_mib: 1, dirty_pages: 256, dirty_pages_requested: 300, samples: 20 });
    // 256 whole pages plus their indices, the globals, the runtime state and the header: a little over 1 MiB.
    expect(r.delta_bytes).toBeGreaterThan(256 * 4096);
    expect(r.delta_bytes).toBeLessThan(256 * 4096 + 4096);
    expect(r.pause_us_p50).toBeGreaterThan(0);
    expect(r.pause_us_p99).toBeGreaterThanOrEqual(r.pause_us_p50);
    expect(r.warmup_samples).toBe(PAUSE_WARMUP_CAPTURES);
    expect(r.copy_floor_us_p50).toBeGreaterThan(0);
    expect(r.copy_floor_us_p99).toBeGreaterThanOrEqual(r.copy_floor_us_p50);
    expect(r.pause_over_floor).toBeCloseTo(r.pause_us_p50 / r.copy_floor_us_p50, 1);
    expect(r.p99_over_p50).toBeCloseTo(r.pause_us_p99 / r.pause_us_p50, 1);
    expect(r.preempted_samples).toBeGreaterThanOrEqual(0);
    expect(r.preempted_samples).toBeLessThanOrEqual(20);
    if (r.preempted_samples < 20) expect(r.pause_us_p99_not_preempted).toBeGreaterThan(0);
    else expect(r.pause_us_p99_not_preempted).toBeNull();
  });
});
