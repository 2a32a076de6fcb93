/** The per-second lateness log hosts report (src/util/lateness-log.ts): worst per second, bounded, windowed. */
import { describe, expect, it } from "vitest";
import { LatenessLog, SECONDS_KEPT, lateMaxSince } from "../src/util/lateness-log.js";

describe("LatenessLog", () => {
  it("keeps the worst lateness of each second, ignoring lateness under its floor", () => {
    const log = new LatenessLog(10);
    log.record(1_000, 5); // under the floor
    log.record(1_100, 30);
    log.record(1_900, 20);
    log.record(2_050, 70);
    log.record(2_500, 40);
    expect(log.list()).toEqual([
      { at_ms: 1_000, late_ms: 30 },
      { at_ms: 2_000, late_ms: 70 },
    ]);
  });

  it("answers the worst lateness of a window, from the second its start falls in", () => {
    const log = new LatenessLog(0);
    log.record(1_500, 90);
    log.record(5_200, 40);
    log.record(7_900, 60);
    expect(lateMaxSince(log.list(), 5_900)).toBe(60);
    expect(lateMaxSince(log.list(), 5_000)).toBe(60);
    expect(lateMaxSince(log.list(), 1_999)).toBe(90);
    expect(lateMaxSince(log.list(), 8_000)).toBe(0);
  });

  it("holds at most SECONDS_KEPT seconds, dropping the oldest", () => {
    const log = new LatenessLog(0);
    for (let s = 0; s < SECONDS_KEPT + 5; s++) log.record(s * 1000, s);
    const kept = log.list();
    expect(kept).toHaveLength(SECONDS_KEPT);
    expect(kept[0]).toEqual({ at_ms: 5_000, late_ms: 5 });
  });
});
