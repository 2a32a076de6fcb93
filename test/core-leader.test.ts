/**
 * The group leader (src/core/leader.ts), pure: one epoch in flight, commits
 * only once every member's backup staged the cut, and a commit riding on the
 * next `end` when that leaves within min_interval_ms, else going out alone
 * then; an epoch in which no member did anything (no `active`, no output
 * waiting) is not ended. Time is whatever the test says it is.
 */
import { describe, expect, it } from "vitest";
import { Leader, type LeaderOutput } from "../src/core/leader.js";

const TIMING = { interval_ms: 20, min_interval_ms: 2, max_interval_ms: 100 };

/** Ticks the leader every millisecond from `from` to `to` (inclusive), collecting what it sends and when. */
function run(l: Leader, from: number, to: number, sent: (LeaderOutput & { at: number })[]): void {
  for (let t = from; t <= to; t++) {
    const out = l.tick(t);
    if (out) sent.push({ ...out, at: t });
  }
}

describe("group leader (core)", () => {
  it("ends no new epoch while one is uncommitted, and commits only when every backup staged it", () => {
    const l = new Leader(2, TIMING, 0, 0);
    l.active(1);
    const sent: (LeaderOutput & { at: number })[] = [];
    run(l, 0, 20, sent);
    expect(sent).toEqual([{ kind: "end", e: 1, commit: null, at: 20 }]);
    l.outputPending(true);
    run(l, 21, 520, sent); // output waits, but epoch 1 is not committed
    expect(sent).toHaveLength(1);
    l.onStaged(0, 1, [0, 3], 520);
    run(l, 521, 1020, sent);
    expect(sent).toHaveLength(1); // rank 1's backup has not staged 1
    expect(l.committed).toBe(0);
    l.onStaged(1, 1, [5, 0], 1020);
    expect(l.committed).toBe(1);
    run(l, 1020, 1100, sent);
    // Output was waiting: the next end leaves at once and carries the commit with the delivered matrix.
    expect(sent[1]).toEqual({ kind: "end", e: 2, commit: { c: 1, d: [[0, 3], [5, 0]] }, at: 1020 });
    expect(sent.filter((s) => s.kind === "commit")).toEqual([]); // told once, on the end
  });

  it("a commit with no end due within min_interval_ms goes out alone, min_interval_ms after the cut committed", () => {
    const l = new Leader(2, TIMING, 0, 0);
    l.active(1);
    const sent: (LeaderOutput & { at: number })[] = [];
    run(l, 0, 20, sent);
    l.onStaged(0, 1, [0, 1], 20);
    l.onStaged(1, 1, [1, 0], 20);
    run(l, 21, 21, sent);
    expect(sent).toHaveLength(1);
    run(l, 22, 22, sent);
    expect(sent[1]).toEqual({ kind: "commit", commit: { c: 1, d: [[0, 1], [1, 0]] }, at: 20 + TIMING.min_interval_ms });
    // Nothing waits for output: the next end comes at the doubled idle interval and carries no commit.
    l.active(2);
    run(l, 23, 200, sent);
    expect(sent[2]).toEqual({ kind: "end", e: 2, commit: null, at: 20 + 2 * TIMING.interval_ms });
  });

  it("ignores acks of epochs it did not end or already committed", () => {
    const l = new Leader(2, TIMING, 0, 0);
    l.active(1);
    const sent: (LeaderOutput & { at: number })[] = [];
    run(l, 0, 20, sent);
    l.onStaged(0, 2, [0, 0], 20);
    l.onStaged(1, 2, [0, 0], 20);
    expect(l.committed).toBe(0);
    l.onStaged(0, 1, [0, 0], 20);
    l.onStaged(1, 1, [0, 0], 20);
    l.onStaged(1, 1, [0, 0], 20);
    expect(l.committed).toBe(1);
    run(l, 21, 25, sent);
    expect(sent.filter((s) => s.kind === "commit").map((s) => (s.kind === "commit" ? s.commit.c : -1))).toEqual([1]);
  });

  it("epochs without output double up to max_interval_ms; a reply brings them back to min_interval_ms", () => {
    const l = new Leader(1, TIMING, 0, 0);
    const sent: (LeaderOutput & { at: number })[] = [];
    l.active(1);
    for (let t = 0; t <= 1000; t++) {
      const out = l.tick(t);
      if (out?.kind === "end") {
        sent.push({ ...out, at: t });
        l.onStaged(0, out.e, [0], t);
        l.active(out.e + 1); // the member keeps doing something, without output
      }
    }
    const gaps = sent.slice(1).map((s, i) => s.at - sent[i].at);
    expect(gaps.slice(0, 4)).toEqual([40, 80, 100, 100]);
    l.outputPending(true);
    const last = sent[sent.length - 1].at;
    let next: LeaderOutput | null = null;
    let at = 1001;
    for (; at < 2000 && next?.kind !== "end"; at++) next = l.tick(at);
    // The boundary is min_interval_ms after the last end, or now if that has passed.
    expect(at - 1).toBe(Math.max(last + TIMING.min_interval_ms, 1001));
  });

  it("log output stretches epochs like no output, up to max_interval_ms; a reply ends one min_interval_ms after the last, and the stretch starts over", () => {
    const l = new Leader(1, TIMING, 0, 0);
    const ends: number[] = [];
    const tickTo = (to: number, from: number, each: () => void) => {
      for (let t = from; t <= to; t++) {
        const out = l.tick(t);
        if (out?.kind === "end") {
          ends.push(t);
          l.onStaged(0, out.e, [0], t);
          each();
        }
      }
    };
    // A guest that logs all the time: every epoch has log output waiting, and still the epochs grow.
    l.outputPending(false);
    tickTo(600, 0, () => l.outputPending(false));
    const gaps = ends.slice(1).map((t, i) => t - ends[i]);
    expect(ends[0]).toBe(TIMING.interval_ms);
    expect(gaps.slice(0, 4)).toEqual([40, 80, 100, 100]);
    // A reply on top of the log output: the epoch ends min_interval_ms after the last end (or now, if that passed).
    const last = ends[ends.length - 1];
    l.outputPending(true);
    tickTo(Math.max(last + TIMING.min_interval_ms, 601), 601, () => l.outputPending(false));
    expect(ends[ends.length - 1]).toBe(Math.max(last + TIMING.min_interval_ms, 601));
    // After it, log epochs start from interval_ms again.
    const afterReply = ends[ends.length - 1];
    tickTo(afterReply + 200, afterReply + 1, () => l.outputPending(false));
    expect(ends.filter((t) => t > afterReply).map((t, i, a) => t - (i ? a[i - 1] : afterReply)).slice(0, 3)).toEqual([20, 40, 80]);
  });

  it("ends no epoch nothing happened in; activity or output in the running epoch ends it, activity in an ended one does not", () => {
    const l = new Leader(2, TIMING, 0, 0);
    const sent: (LeaderOutput & { at: number })[] = [];
    run(l, 0, 1000, sent);
    expect(sent).toEqual([]); // idle: no end, no commit
    expect(l.deadline()).toBe(Infinity);
    // A member did something in epoch 1: the epoch ends at once (its boundary passed long ago).
    l.active(1);
    expect(l.deadline()).toBe(TIMING.interval_ms);
    run(l, 1001, 1001, sent);
    expect(sent).toEqual([{ kind: "end", e: 1, commit: null, at: 1001 }]);
    // Late news of epoch 1 (captured already): not a reason to end epoch 2.
    l.active(1);
    l.onStaged(0, 1, [0, 0], 1002);
    l.onStaged(1, 1, [0, 0], 1002);
    run(l, 1002, 3000, sent);
    // The commit of cut 1 still goes out (alone), and nothing more.
    expect(sent.map((s) => s.kind)).toEqual(["end", "commit"]);
    expect(l.committed).toBe(1);
    expect(l.deadline()).toBe(Infinity);
    // Output waiting ends the epoch even if no activity was told (output is made by something the member did).
    l.outputPending(true);
    run(l, 3001, 3001, sent);
    expect(sent[2]).toEqual({ kind: "end", e: 2, commit: null, at: 3001 });
  });
});
