/**
 * The daemon's group leader (src/host/group/leader.ts) on a fake clock: one
 * epoch in flight, commits only once every member's backup staged the cut,
 * and a commit riding on the next `end` when that leaves within
 * min_interval_ms, else going out alone then.
 */
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { GroupLeader, type CutCommit } from "../src/host/group/leader.js";

const TIMING = { interval_ms: 20, min_interval_ms: 2, max_interval_ms: 100 };

function leader(size = 2) {
  const ends: { e: number; commit: CutCommit | null; at: number }[] = [];
  const commits: { c: number; d: number[][]; at: number }[] = [];
  const l = new GroupLeader(size, TIMING, 0, {
    endEpoch: (e, commit) => ends.push({ e, commit, at: Date.now() }),
    commit: (c, d) => commits.push({ c, d, at: Date.now() }),
  });
  return { l, ends, commits };
}

beforeEach(() => {
  vi.useFakeTimers();
  vi.setSystemTime(1_000_000);
});
afterEach(() => {
  vi.useRealTimers();
});

describe("group leader", () => {
  it("ends no new epoch while one is uncommitted, and commits only when every backup staged it", async () => {
    const { l, ends, commits } = leader();
    l.start();
    await vi.advanceTimersByTimeAsync(20);
    expect(ends.map((x) => x.e)).toEqual([1]);
    l.outputPending();
    await vi.advanceTimersByTimeAsync(500); // output waits, but epoch 1 is not committed
    expect(ends.map((x) => x.e)).toEqual([1]);
    l.onStaged(0, 1, [0, 3]);
    await vi.advanceTimersByTimeAsync(500);
    expect(ends.map((x) => x.e)).toEqual([1]); // rank 1's backup has not staged 1
    expect(commits).toEqual([]);
    expect(l.committed).toBe(0);
    l.onStaged(1, 1, [5, 0]);
    expect(l.committed).toBe(1);
    await vi.advanceTimersByTimeAsync(0);
    // Output was waiting: the next end leaves at once and carries the commit with the delivered matrix.
    expect(ends[1]).toMatchObject({ e: 2, commit: { c: 1, d: [[0, 3], [5, 0]] } });
    await vi.advanceTimersByTimeAsync(50);
    expect(commits).toEqual([]); // told once, on the end
    l.stop();
  });

  it("a commit with no end due within min_interval_ms goes out alone, min_interval_ms after the cut committed", async () => {
    const { l, ends, commits } = leader();
    l.start();
    await vi.advanceTimersByTimeAsync(20);
    const stagedAt = Date.now();
    l.onStaged(0, 1, [0, 1]);
    l.onStaged(1, 1, [1, 0]);
    await vi.advanceTimersByTimeAsync(1);
    expect(commits).toEqual([]);
    await vi.advanceTimersByTimeAsync(1);
    expect(commits).toEqual([{ c: 1, d: [[0, 1], [1, 0]], at: stagedAt + TIMING.min_interval_ms }]);
    // Nothing waits for output: the next end comes at the (doubled) idle interval and carries no commit.
    await vi.advanceTimersByTimeAsync(100);
    expect(ends[1]).toMatchObject({ e: 2, commit: null });
    l.stop();
  });

  it("ignores acks of epochs it did not end or already committed", async () => {
    const { l, commits } = leader();
    l.start();
    await vi.advanceTimersByTimeAsync(20);
    l.onStaged(0, 2, [0, 0]);
    l.onStaged(1, 2, [0, 0]);
    expect(l.committed).toBe(0);
    l.onStaged(0, 1, [0, 0]);
    l.onStaged(1, 1, [0, 0]);
    l.onStaged(1, 1, [0, 0]);
    expect(l.committed).toBe(1);
    await vi.advanceTimersByTimeAsync(5);
    expect(commits.map((c) => c.c)).toEqual([1]);
    l.stop();
  });
});
