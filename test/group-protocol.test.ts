/**
 * The group protocol core (src/group/), sans I/O: the recovery-cut decision
 * as a table, the node driven by hand, and the deterministic simulator under
 * property-based schedules checking invariants 1, 2, 3, 6 and liveness.
 */
import * as fc from "fast-check";
import { describe, expect, it } from "vitest";
import { AssertionError } from "../src/util/assert.js";
import { GroupNode } from "../src/group/node.js";
import {
  EPOCHS_INFLIGHT_MAX,
  type Effect,
  type GroupConfig,
  type GroupMessage,
  type GroupMessageKind,
  type GroupRecord,
} from "../src/group/protocol.js";
import { coordinatorFor, isDirty, planRecovery, recoveryCut, type MemberCopies } from "../src/group/recovery.js";
import { simulate, type CrashPlan, type CrashTarget, type CrashTrigger, type SimOptions, type SimReport } from "../src/group/sim/simulator.js";

const r = (lo: number, hi: number) => ({ lo, hi });
/** Soak runs: GROUP_PROTOCOL_RUNS=5 multiplies the property runs (default budget: well under a minute on 2 cores). */
const RUNS = Math.max(1, Number(process.env.GROUP_PROTOCOL_RUNS ?? 1));

/** A short description of what went wrong, for failing properties. */
function explain(report: SimReport): string {
  return JSON.stringify({ violations: report.violations.slice(0, 5), lost: report.lost, quiescent: report.quiescent, timeline: report.timeline }, null, 1);
}

function expectClean(report: SimReport): void {
  expect(report.violations, explain(report)).toEqual([]);
  expect(report.quiescent, explain(report)).toBe(true);
}

// ---- the recovery cut ------------------------------------------------------------------------

describe("recoveryCut (pure)", () => {
  type Row = [name: string, members: MemberCopies[], committed: number, expected: ReturnType<typeof recoveryCut>];
  const table: Row[] = [
    [
      "everyone survived: newest cut both replicas of every member hold",
      [
        { rank: 0, primary: r(5, 9), backup: r(5, 8) },
        { rank: 1, primary: r(5, 9), backup: r(5, 9) },
      ],
      5,
      { kind: "cut", cut: 8 },
    ],
    [
      "a dead primary: its backup's newest fully staged cut bounds the cut",
      [
        { rank: 0, primary: null, backup: r(4, 7) },
        { rank: 1, primary: r(5, 9), backup: r(5, 8) },
      ],
      5,
      { kind: "cut", cut: 7 },
    ],
    [
      "a dead backup: the surviving primary can reach any captured cut it keeps undo for",
      [
        { rank: 0, primary: r(5, 9), backup: null },
        { rank: 1, primary: r(5, 9), backup: r(5, 9) },
      ],
      5,
      { kind: "cut", cut: 9 },
    ],
    [
      "the primary is ahead of its backup (deltas in flight): the pair agrees only up to the backup",
      [
        { rank: 0, primary: r(3, 9), backup: r(3, 6) },
        { rank: 1, primary: null, backup: r(4, 9) },
      ],
      4,
      { kind: "cut", cut: 6 },
    ],
    [
      "a member reaching only the committed cut pins the cut there",
      [
        { rank: 0, primary: r(6, 6), backup: null },
        { rank: 1, primary: r(5, 9), backup: r(6, 9) },
        { rank: 2, primary: null, backup: r(6, 8) },
      ],
      6,
      { kind: "cut", cut: 6 },
    ],
    [
      "a freshly promoted member (lo = its recovery cut) after an aborted recovery",
      [
        { rank: 0, primary: r(7, 7), backup: r(7, 7) },
        { rank: 1, primary: r(5, 10), backup: r(6, 9) },
      ],
      6,
      { kind: "cut", cut: 7 },
    ],
    ["one member without any copy is lost", [{ rank: 0, primary: r(1, 2), backup: null }, { rank: 1, primary: null, backup: null }], 1, { kind: "lost", ranks: [1] }],
    [
      "every member without a copy is reported",
      [
        { rank: 0, primary: null, backup: null },
        { rank: 1, primary: r(1, 1), backup: r(1, 1) },
        { rank: 2, primary: null, backup: null },
      ],
      1,
      { kind: "lost", ranks: [0, 2] },
    ],
    ["a single member", [{ rank: 0, primary: r(0, 3), backup: r(1, 2) }], 0, { kind: "cut", cut: 2 }],
  ];

  it.each(table)("%s", (_name, members, committed, expected) => {
    expect(recoveryCut(members, committed)).toEqual(expected);
  });

  it.each<[string, MemberCopies[], number]>([
    ["a cut below the committed one (released output would be undone)", [{ rank: 0, primary: r(3, 4), backup: null }, { rank: 1, primary: r(3, 9), backup: null }], 5],
    ["a primary and backup sharing no cut", [{ rank: 0, primary: r(7, 9), backup: r(3, 5) }], 3],
    ["a member that cannot go back to the others' newest common cut", [{ rank: 0, primary: r(8, 9), backup: null }, { rank: 1, primary: r(3, 6), backup: null }], 3],
  ])("refuses (AssertionError) %s", (_name, members, committed) => {
    expect(() => recoveryCut(members, committed)).toThrow(AssertionError);
  });
});

describe("failover decisions (pure)", () => {
  const record: GroupRecord = {
    group: "g",
    incarnation: 4,
    leader: 2,
    placement: [
      { primary: 2, backup: 0 },
      { primary: 0, backup: 1 },
      { primary: 1, backup: 3 },
    ],
    failed: [],
  };

  it("the leader coordinates while it lives; else the lowest-numbered live host holding a replica", () => {
    expect(coordinatorFor(record, new Set([0]))).toBe(2);
    expect(coordinatorFor(record, new Set([2]))).toBe(0);
    expect(coordinatorFor(record, new Set([2, 0]))).toBe(1);
    expect(coordinatorFor({ ...record, failed: [0] }, new Set([2]))).toBe(1);
  });

  it("a record needs recovery only if it names a newly failed host", () => {
    expect(isDirty(record, new Set([4]))).toBe(false); // a host without replicas
    expect(isDirty(record, new Set([3]))).toBe(true);
    expect(isDirty({ ...record, failed: [3] }, new Set([3]))).toBe(false);
  });

  it("promotes backups of dead primaries, gives new backups to members that lost one, bumps the incarnation", () => {
    const next = planRecovery(record, new Set([0]), 5, 2);
    expect(next.incarnation).toBe(5);
    expect(next.leader).toBe(2);
    expect(next.failed).toEqual([0]);
    expect(next.placement[0].primary).toBe(2); // kept
    expect(next.placement[1].primary).toBe(1); // promoted
    expect(next.placement[2]).toEqual({ primary: 1, backup: 3 }); // kept both
    for (const p of next.placement) {
      expect(p.backup).not.toBeNull();
      expect(p.backup).not.toBe(p.primary);
      expect(p.backup).not.toBe(0);
    }
    // Least-loaded live hosts first: host 4 held nothing.
    expect(next.placement[0].backup).toBe(4);
  });
});

// ---- the node, driven by hand (the sans-I/O API) ----------------------------------------------

describe("GroupNode driven by hand", () => {
  const config: GroupConfig = { group: "g", size: 2, hosts: 3, mode: "group", timing: { heartbeat_ms: 5, detect_ms: 30, epoch_ms: 8 } };
  const record: GroupRecord = {
    group: "g",
    incarnation: 1,
    leader: 0,
    placement: [
      { primary: 0, backup: 1 },
      { primary: 1, backup: 2 },
    ],
    failed: [],
  };
  const sends = (effects: Effect[], kind?: GroupMessage["kind"]) =>
    effects.flatMap((e) => (e.type === "send" && (!kind || e.message.kind === kind) ? [e.message] : []));

  it("holds a message from a later sender epoch until the receiver enters it, drops duplicates", () => {
    const receiver = GroupNode.deploy(config, 1, structuredClone(record), 1);
    const msg = (seq: number, s: number): GroupMessage => ({ kind: "group", inc: 1, from: 0, to: 1, s, seq, payload: `p${seq}` });
    // Receiver in epoch 1; a message sent in epoch 2 waits.
    expect(receiver.handle({ type: "message", from: 0, message: msg(1, 2) }).filter((e) => e.type === "vm.deliver")).toEqual([]);
    // end-epoch 1: capture, enter epoch 2, deliver.
    const fx = receiver.handle({ type: "message", from: 0, message: { kind: "end-epoch", inc: 1, epoch: 1 } });
    expect(fx.map((e) => e.type)).toEqual(["vm.capture", "vm.deliver"]);
    // The re-sent copy is dropped; a stale incarnation is refused.
    expect(receiver.handle({ type: "message", from: 0, message: msg(1, 2) })).toEqual([]);
    const stale: GroupMessage = { kind: "group", inc: 0, from: 0, to: 1, s: 2, seq: 2, payload: "p2" };
    expect(receiver.handle({ type: "message", from: 0, message: stale })).toEqual([]);
  });

  it("logs a send, ships the capture to the backup with the runtime state, releases output only at commit", () => {
    const sender = GroupNode.deploy(config, 0, structuredClone(record), 1);
    const sent = sends(sender.handle({ type: "vm.send", rank: 0, to: 1, payload: "hello" }), "group");
    expect(sent).toEqual([{ kind: "group", inc: 1, from: 0, to: 1, s: 1, seq: 1, payload: "hello" }]);
    expect(sender.handle({ type: "vm.output", rank: 0, payload: "out-1" }).filter((e) => e.type === "release")).toEqual([]);
    // This host leads: its timer ends epoch 1 (to both primary hosts, itself included).
    sender.handle({ type: "tick", now: 0 });
    const ends = sends(sender.handle({ type: "tick", now: config.timing.epoch_ms }), "end-epoch");
    expect(ends).toEqual([
      { kind: "end-epoch", inc: 1, epoch: 1 },
      { kind: "end-epoch", inc: 1, epoch: 1 },
    ]);
    const cap = sender.handle({ type: "message", from: 0, message: ends[0] });
    expect(cap).toContainEqual({ type: "vm.capture", rank: 0, inc: 1, epoch: 1 });
    const [delta] = sends(sender.handle({ type: "vm.captured", rank: 0, inc: 1, epoch: 1, payload: "bytes", bytes: 5 }), "delta");
    expect(delta).toMatchObject({ kind: "delta", rank: 0, epoch: 1, payload: "bytes" });
    if (delta.kind !== "delta") throw new Error("unreachable");
    expect(delta.runtime.log[1].map((e) => e.seq)).toEqual([1]); // the sender log travels with the checkpoint
    // The leader (this host) commits once both backups staged epoch 1.
    const staged = (rank: number, delivered: number[]): GroupMessage => ({ kind: "staged", inc: 1, rank, epoch: 1, delivered });
    expect(sender.handle({ type: "message", from: 1, message: staged(0, [0, 0]) }).some((e) => e.type === "release")).toBe(false);
    const commitFx = sender.handle({ type: "message", from: 2, message: staged(1, [1, 0]) });
    const [commit] = sends(commitFx, "commit");
    expect(commit).toMatchObject({ kind: "commit", cut: 1 });
    const done = sender.handle({ type: "message", from: 0, message: commit });
    expect(done.find((e) => e.type === "release")).toMatchObject({ rank: 0, records: [{ seq: 1, epoch: 1, payload: "out-1" }] });
    expect(sends(done, "backup-commit")).toEqual([{ kind: "backup-commit", inc: 1, rank: 0, cut: 1 }]);
    expect(sender.status().primaries[0].logged).toBe(0); // trimmed: receiver 1 delivered seq 1 at cut 1
  });

  it("limits the pipeline to EPOCHS_INFLIGHT_MAX uncommitted epochs", () => {
    const leader = GroupNode.deploy(config, 0, structuredClone(record), 1);
    let ended = 0;
    for (let now = 0; now < 200; now++) ended += sends(leader.handle({ type: "tick", now }), "end-epoch").length;
    expect(ended).toBe(EPOCHS_INFLIGHT_MAX * 2); // two primary hosts, no acks ever
  });
});

// ---- the simulator: scenarios -----------------------------------------------------------------

describe("simulated group: scenarios", () => {
  it("is deterministic given a seed", () => {
    const options: SimOptions = { seed: 7, size: 5, hosts: 4, crashes: [{ target: "any", index: 1, trigger: { kind: "time", afterMs: 120 } }] };
    const a = simulate(options);
    const b = simulate(options);
    expect(b).toEqual(a);
    expectClean(a);
  });

  it("without failures, commits steadily, delivers every message once and releases every output", () => {
    const report = simulate({ seed: 1, size: 8, hosts: 4, sendRate: 0.4, outputRate: 0.2 });
    expectClean(report);
    expect(report.commits).toBeGreaterThan(30);
    expect(report.messages).toBeGreaterThan(300);
    expect(report.released).toBe(report.outputs);
    expect(report.record.incarnation).toBe(1);
  });

  it("vm mode (Remus-style buffering of peer messages) is safe too", () => {
    expectClean(simulate({ seed: 2, size: 6, hosts: 4, mode: "vm", crashes: [{ target: "primaries", index: 0, trigger: { kind: "time", afterMs: 150 } }] }));
  });

  it("the leader's host dies in the middle of a commit: the lowest-numbered surviving replica host leads", () => {
    let seen = 0;
    for (let seed = 1; seed <= 6; seed++) {
      const report = simulate({ seed, size: 6, hosts: 5, crashes: [{ target: "leader", index: 0, trigger: { kind: "commit", nth: 10 } }] });
      expectClean(report);
      expect(report.crashes).toHaveLength(1);
      expect(report.crashes[0].wasLeader).toBe(true);
      const dead = report.crashes[0].host;
      const holders = new Set<number>();
      for (const p of report.records[0].placement) {
        holders.add(p.primary);
        if (p.backup !== null) holders.add(p.backup);
      }
      holders.delete(dead);
      expect(report.record.leader).toBe(Math.min(...holders));
      expect(report.recoveries[0].cut).toBeGreaterThanOrEqual(report.crashes[0].committed);
      seen++;
    }
    expect(seen).toBe(6);
  });

  it("a host holding only backups dies: nobody is promoted, only its members get an image", () => {
    let seen = 0;
    for (let seed = 1; seed <= 40 && seen < 3; seed++) {
      const report = simulate({ seed, size: 4, hosts: 6, crashes: [{ target: "backups-only", index: 0, trigger: { kind: "time", afterMs: 100 } }] });
      const crash = report.crashes[0];
      if (!crash || crash.primaries.length || !crash.backups.length) continue;
      seen++;
      expectClean(report);
      expect(report.recoveries).toHaveLength(1);
      expect(report.recoveries[0].promoted).toEqual([]);
      expect(report.recoveries[0].images.sort()).toEqual(crash.backups);
      for (const rank of crash.keptBoth) expect(report.imageBytes[rank]).toBe(0);
    }
    expect(seen).toBe(3);
  });

  it("a host holding nothing dies: no recovery, no incarnation change", () => {
    let seen = 0;
    for (let seed = 1; seed <= 40 && seen < 2; seed++) {
      const report = simulate({ seed, size: 2, hosts: 6, crashes: [{ target: "empty", index: 0, trigger: { kind: "time", afterMs: 80 } }] });
      const crash = report.crashes[0];
      if (crash.primaries.length || crash.backups.length) continue;
      seen++;
      expectClean(report);
      expect(report.record.incarnation).toBe(1);
      expect(report.imageBytes).toEqual([0, 0]);
    }
    expect(seen).toBe(2);
  });

  it("a second crash during recovery restarts it, or reports the members it lost plainly", () => {
    const outcomes = { restarted: 0, lost: 0 };
    for (let seed = 1; seed <= 12; seed++) {
      const report = simulate({
        seed,
        size: 5,
        hosts: 5,
        crashes: [
          { target: "primaries", index: seed, trigger: { kind: "time", afterMs: 100 } },
          { target: "any", index: seed, trigger: { kind: "message", message: "rollback", nth: 2 } },
        ],
      });
      expect(report.violations, explain(report)).toEqual([]);
      if (report.lost) {
        outcomes.lost++;
      } else {
        expect(report.quiescent, explain(report)).toBe(true);
        if (report.crashes.length === 2) outcomes.restarted++;
      }
    }
    expect(outcomes.restarted).toBeGreaterThan(0);
  });
});

// ---- the simulator: properties ----------------------------------------------------------------

const targets: CrashTarget[] = ["leader", "backups-only", "primaries", "empty", "any"];
const anyKinds: GroupMessageKind[] = ["end-epoch", "commit", "backup-commit", "delta", "staged", "group", "delivered"];
const recoveryKinds: GroupMessageKind[] = ["recover", "report", "rollback", "rolled-back", "image", "resume", "delivered"];

const firstTrigger: fc.Arbitrary<CrashTrigger> = fc.oneof(
  fc.record({ kind: fc.constant("time" as const), afterMs: fc.integer({ min: 1, max: 280 }) }),
  // "during commit": right after the leader decided a commit, its messages partly out
  fc.record({ kind: fc.constant("commit" as const), nth: fc.integer({ min: 1, max: 30 }) }),
  fc.record({ kind: fc.constant("message" as const), message: fc.constantFrom(...anyKinds), nth: fc.integer({ min: 1, max: 150 }) }),
);
const plan = (trigger: fc.Arbitrary<CrashTrigger>): fc.Arbitrary<CrashPlan> => fc.record({ target: fc.constantFrom(...targets), index: fc.nat(7), trigger });

interface Schedule {
  seed: number;
  size: number;
  hosts: number;
  mode: "group" | "vm";
  sendRate: number;
  outputRate: number;
  epochMs: number;
  delay: { baseMax: number; jitter: number };
  first: CrashPlan | null;
  second: CrashPlan | null;
}

const schedule = (second: fc.Arbitrary<CrashPlan | null>): fc.Arbitrary<Schedule> =>
  fc.record({
    seed: fc.integer(),
    size: fc.integer({ min: 2, max: 16 }),
    hosts: fc.integer({ min: 3, max: 6 }),
    mode: fc.constantFrom<"group" | "vm">("group", "group", "vm"),
    sendRate: fc.double({ min: 0, max: 0.7, noNaN: true }),
    outputRate: fc.double({ min: 0, max: 0.3, noNaN: true }),
    epochMs: fc.integer({ min: 3, max: 14 }),
    delay: fc.record({ baseMax: fc.double({ min: 0.2, max: 4, noNaN: true }), jitter: fc.double({ min: 0, max: 4, noNaN: true }) }),
    first: fc.option(plan(firstTrigger), { freq: 5 }),
    second,
  });

function run(s: Schedule): SimReport {
  const crashes = [s.first, s.second].filter((p): p is CrashPlan => p !== null);
  return simulate({
    seed: s.seed,
    size: s.size,
    hosts: s.hosts,
    mode: s.mode,
    sendRate: s.sendRate,
    outputRate: s.outputRate,
    timing: { epoch_ms: s.epochMs },
    delay: s.delay,
    crashes: s.first ? crashes : [],
  });
}

describe("simulated group: properties", () => {
  it("single-failure model: any host, any moment, a second crash only after re-protection — invariants 1, 2, 3, 6 and liveness hold", () => {
    const afterReprotect = plan(fc.record({ kind: fc.constant("after-reprotect" as const), delayMs: fc.integer({ min: 0, max: 120 }) }));
    fc.assert(
      fc.property(schedule(fc.option(afterReprotect, { freq: 2 })), (s) => {
        const report = run(s);
        expectClean(report);
        expect(report.lost).toBeNull();
        // Liveness: every crash that hit a replica was recovered, and the group committed new cuts after.
        if (report.recoveries.length) {
          const last = report.recoveries[report.recoveries.length - 1];
          expect(report.committed).toBeGreaterThanOrEqual(last.cut + 2);
        }
        // Invariant 6 (also checked per recovery by the checker): with one crash, members that kept both replicas moved nothing.
        if (report.crashes.length === 1) for (const rank of report.crashes[0].keptBoth) expect(report.imageBytes[rank]).toBe(0);
      }),
      { numRuns: 1000 * RUNS },
    );
  });

  it("a second crash at any moment after the first (also mid-recovery): never unsafe; either recovers or reports the loss", () => {
    const anytime = plan(
      fc.oneof(
        fc.record({ kind: fc.constant("message" as const), message: fc.constantFrom(...recoveryKinds), nth: fc.integer({ min: 1, max: 8 }) }),
        fc.record({ kind: fc.constant("time" as const), afterMs: fc.integer({ min: 0, max: 80 }) }),
      ),
    );
    fc.assert(
      fc.property(schedule(anytime.map((p): CrashPlan | null => p)), (s) => {
        const report = run(s);
        expect(report.violations, explain(report)).toEqual([]);
        if (!report.lost) expect(report.quiescent, explain(report)).toBe(true);
      }),
      { numRuns: 500 * RUNS },
    );
  });
});

// ---- the checkers catch broken variants -------------------------------------------------------

describe("the checkers catch a broken core", () => {
  const invariantsOf = (report: SimReport) => new Set(report.violations.map((v) => v.invariant));

  it("delivering s > r breaks invariant 2 (consistent cut)", () => {
    const report = simulate({ seed: 3, size: 4, hosts: 4, sendRate: 0.5, fault: "deliver-future" });
    expect(invariantsOf(report)).toContain("inv2");
  });

  it("releasing output before its cut commits breaks invariant 1 (output commit)", () => {
    const report = simulate({ seed: 3, size: 4, hosts: 4, outputRate: 0.3, fault: "release-early" });
    expect(invariantsOf(report)).toContain("inv1");
  });

  it("not re-sending sender logs after a rollback breaks invariant 3 (exactly once)", () => {
    const caught = [1, 2, 3, 4, 5].some((seed) => {
      const report = simulate({ seed, size: 4, hosts: 4, sendRate: 0.6, fault: "skip-resend", crashes: [{ target: "primaries", index: 0, trigger: { kind: "time", afterMs: 150 } }] });
      return invariantsOf(report).has("inv3");
    });
    expect(caught).toBe(true);
  });

  it("shipping images to backups that survived breaks invariant 6 (no memory moves for intact VMs)", () => {
    const report = simulate({ seed: 3, size: 4, hosts: 5, fault: "reimage-all", crashes: [{ target: "backups-only", index: 0, trigger: { kind: "time", afterMs: 150 } }] });
    expect(report.crashes[0].keptBoth.length).toBeGreaterThan(0);
    expect(invariantsOf(report)).toContain("inv6");
  });

  it("the same schedules are clean without the fault", () => {
    expectClean(simulate({ seed: 3, size: 4, hosts: 4, sendRate: 0.5, outputRate: 0.3 }));
    expectClean(simulate({ seed: 3, size: 4, hosts: 5, crashes: [{ target: "backups-only", index: 0, trigger: { kind: "time", afterMs: 150 } }] }));
  });
});
