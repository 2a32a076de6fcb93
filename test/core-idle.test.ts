/**
 * Idle epochs cost nothing (docs/PROTOCOL.md "Idle epochs"): the leader ends
 * only epochs some member did something in (the `active` event and frame) or
 * output waits in, so an idle group asks for no capture, ships no delta and
 * stages nothing; an epoch with something in it still ends on every member,
 * ships, stages and commits. Two GroupCores (one per host) wired to each
 * other, with replica steps that succeed at once.
 */
import { describe, expect, it } from "vitest";
import { GroupCore } from "../src/core/node.js";
import type { CoreAction, CoreEvent } from "../src/core/events.js";
import type { GroupFrame } from "../src/core/frames.js";
import type { ProtectionRecord } from "../src/core/types.js";

/** Member 0 on h1 (backup h2), member 1 on h2 (backup h1), led by h1. */
const RECORD: ProtectionRecord = {
  group: "g",
  mode: "group",
  size: 2,
  incarnation: 1,
  leader: "h1",
  placement: [
    { primary: "h1", backup: "h2" },
    { primary: "h2", backup: "h1" },
  ],
  failed: [],
  epoch: { interval_ms: 20, min_interval_ms: 2, max_interval_ms: 100 },
  limits: { memory_mib: 64, call_cpu_ms: 1000, output_bytes_max: 1 << 20 },
};

const route = (port: number) => ({ address: `127.0.0.1:${port}`, token: `t${port}` });

/** The two hosts, frames delivered at once, every replica step done at once; counts what the group asked for. */
function group(record: ProtectionRecord) {
  const hosts = ["h1", "h2"];
  const cores = new Map(hosts.map((host) => [host, GroupCore.deployed({ host, record, now_ms: 0, detect_ms: 300, live: hosts, registered: hosts })]));
  let now_ms = 0;
  const seen = { ends: [] as number[], captures: [] as string[], deltas: [] as string[], stages: [] as string[], folds: [] as string[], released: [] as string[], committed: [] as number[] };
  /** The VM's epoch per rank (what it executes), as a VM thread would track it. */
  const vmEpoch = [1, 1];
  const queue: { host: string; event: CoreEvent }[] = [];
  const carryOut = (host: string, actions: CoreAction[]) => {
    for (const a of actions) {
      switch (a.type) {
        case "send":
          if (a.frame.k === "end") seen.ends.push(a.frame.e);
          if (a.frame.k === "delta") seen.deltas.push(`${a.frame.rank}@${a.frame.e}`);
          queue.push({ host: a.to, event: { type: "frame", from: host, frame: { ...a.frame, v: 1, g: record.group, from: host } as GroupFrame, body: a.body } });
          break;
        case "vm": {
          const step = a.step;
          if (step.op === "capture_to") {
            if (step.commit) seen.released.push(`${a.rank}<=${step.commit.epoch}`);
            if (vmEpoch[a.rank] === step.epoch) {
              seen.captures.push(`${a.rank}@${step.epoch}`);
              vmEpoch[a.rank]++;
              queue.push({ host, event: { type: "captured", rank: a.rank, epoch: step.epoch, delivered: [0, 0], delta: `delta ${a.rank}@${step.epoch}` } });
            }
          }
          if (step.op === "commit") seen.released.push(`${a.rank}<=${step.epoch}`);
          queue.push({ host, event: { type: "done", id: a.id, ok: true, value: {} } });
          break;
        }
        case "backup":
          if (a.step.op === "stage") seen.stages.push(`${a.rank}@${a.step.epoch}`);
          if (a.step.op === "commit") seen.folds.push(`${a.rank}<=${a.step.cut}`);
          queue.push({ host, event: { type: "done", id: a.id, ok: true, value: {} } });
          break;
        case "members":
          queue.push({ host, event: { type: "done", id: a.id, ok: true, value: {} } });
          break;
        case "notify":
          if (a.notice.kind === "committed") seen.committed.push(a.notice.cut);
          break;
        default:
          break;
      }
    }
  };
  const drain = () => {
    for (let n = 0; queue.length; n++) {
      expect(n).toBeLessThan(10_000);
      const { host, event } = queue.shift()!;
      const core = cores.get(host)!;
      carryOut(host, core.handle({ type: "tick", now_ms }));
      carryOut(host, core.handle(event));
    }
  };
  for (const [host, core] of cores) carryOut(host, core.handle({ type: "start", routes: [route(1), route(2)] }));
  drain();
  /** Runs the clocks for `ms`, a tick every millisecond. */
  const advance = (ms: number) => {
    const end = now_ms + ms;
    while (now_ms < end) {
      now_ms++;
      for (const [host, core] of cores) carryOut(host, core.handle({ type: "tick", now_ms }));
      drain();
    }
  };
  /** What VM threads say, at the same moment: each member `rank` (on its primary host) did something in its current epoch; with output, output waits too. */
  const act = (...what: [rank: number, output?: "reply" | "log"][]) => {
    for (const [rank, output] of what) {
      const host = record.placement[rank].primary;
      queue.push({ host, event: { type: "active", rank, epoch: vmEpoch[rank] } });
      if (output) queue.push({ host, event: { type: "output_pending", rank, epoch: vmEpoch[rank], urgent: output === "reply" } });
    }
    drain();
  };
  return { seen, advance, act, cores };
}

describe("idle epochs (core)", () => {
  it("an idle group ends no epoch: no capture, no delta shipped, nothing staged or folded, no frame at all", () => {
    const g = group(RECORD);
    g.advance(5000);
    expect(g.seen).toEqual({ ends: [], captures: [], deltas: [], stages: [], folds: [], released: [], committed: [] });
    expect(g.cores.get("h1")!.status().committed).toBe(0);
  });

  it("an epoch one member dirtied a page in ends on every member, ships both deltas, stages and commits; then the group is idle again", () => {
    const g = group(RECORD);
    g.advance(1000);
    g.act([1]); // member 1 (on h2, not the leader's host) wrote memory in epoch 1
    g.advance(200);
    expect(g.seen.ends).toEqual([1]);
    expect(g.seen.captures.sort()).toEqual(["0@1", "1@1"]);
    expect(g.seen.deltas.sort()).toEqual(["0@1", "1@1"]);
    expect(g.seen.stages.sort()).toEqual(["0@1", "1@1"]);
    expect(g.seen.committed).toEqual([1]);
    expect(g.seen.folds.sort()).toEqual(["0<=1", "1<=1"]);
    const before = JSON.stringify(g.seen);
    g.advance(5000);
    expect(JSON.stringify(g.seen)).toBe(before); // idle again: nothing more
  });

  it("output ends the epoch and is released once its cut commits; news of an epoch already ended adds none", () => {
    const g = group(RECORD);
    g.act([0, "reply"]); // a reply in member 0's epoch 1, on the leader's host
    g.advance(50);
    expect(g.seen.ends).toEqual([1]);
    expect(g.seen.committed).toEqual([1]);
    expect(g.seen.released).toContain("0<=1");
    // Late news of epoch 1 (the member captured it already): no further epoch.
    g.cores.get("h1")!.handle({ type: "active", rank: 0, epoch: 1 });
    g.advance(1000);
    expect(g.seen.ends).toEqual([1]);
    // Log output and a message delivered in epoch 2 on both members: epoch 2 ends (interval_ms), ships, commits.
    g.act([0, "log"], [1]);
    g.advance(200);
    expect(g.seen.ends).toEqual([1, 2]);
    expect(g.seen.deltas.filter((d) => d.endsWith("@2")).sort()).toEqual(["0@2", "1@2"]);
    expect(g.seen.committed).toEqual([1, 2]);
    expect(g.seen.released).toContain("0<=2");
  });
});
