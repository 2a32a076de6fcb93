/**
 * Many simulated runs (`cohort sim`, test/sim.test.ts): random schedules
 * derived from one seed (groups, modes, traffic, crashes and pauses at random
 * times, second failures at every kind of recovery step, store outages around
 * a failure, with compare-and-swaps whose answer is lost), run until a number
 * of steps was handled; the first violation stops the campaign, and its
 * schedule is shrunk to a short one that still fails the same invariant.
 */
import { MUTATIONS, simulate, STEP_KINDS, type FailurePlan, type Mutation, type RunResult, type Schedule, type StepKind, DETECT_MS } from "./simulator.js";
import type { Invariant, Violation } from "./checker.js";
import type { Mode } from "../core/types.js";
import { Rng } from "./rng.js";

export interface CampaignOptions {
  seed: number;
  /** Stop once this many steps (events handled by GroupCores) were simulated. */
  steps: number;
  /** Fixed host count / group size (else random per run). */
  hosts?: number;
  size?: number;
  mode?: Mode;
  mutation?: Mutation;
  /** Runs are independent: a campaign may be split by run index ranges (parallel CI jobs). */
  firstRun?: number;
}

export interface CampaignSummary {
  seed: number;
  steps: number;
  runs: number;
  commits: number;
  recoveries: number;
  crashes: number;
  /** Crashed hosts that restarted as fresh instances and rejoined (Schedule failures' restart_ms). */
  rejoins: number;
  pauses: number;
  halts: number;
  /** Runs with a store outage (see Schedule.store_outage). */
  store_outages: number;
  second_failures_by_step: Record<StepKind, number>;
  violations: number;
  steps_per_s: number;
  /** The first failing run: its index, schedule, what it violated, and the shrunk schedule. */
  failure?: CampaignFailure;
}

export interface CampaignFailure {
  run: number;
  schedule: Schedule;
  violations: Violation[];
  shrunk: Schedule;
  shrunk_violations: Violation[];
  shrunk_timeline: string[];
}

/** The schedule of run `run` of a campaign with seed `seed`: a pure function of both. */
export function scheduleFor(seed: number, run: number, options: Pick<CampaignOptions, "hosts" | "size" | "mode" | "mutation"> = {}): Schedule {
  const rng = new Rng((seed ^ Math.imul(run + 1, 0x9e3779b1)) >>> 0);
  const mode: Mode = options.mode ?? (rng.chance(0.68) ? "group" : rng.chance(0.8) ? "vm" : "none");
  const hosts = options.hosts ?? rng.int(3, 6);
  const size = options.size ?? rng.int(2, 6);
  const traffic_ms = rng.int(150, 350);
  const failures: FailurePlan[] = [];
  if (!rng.chance(0.08)) {
    const pause = rng.chance(0.2);
    failures.push({
      kind: pause ? "pause" : "crash",
      at_ms: rng.int(20, traffic_ms - 20),
      target: "any",
      index: rng.int(0, 15),
      // Short pauses go unnoticed; long ones are suspected, declared failed and fenced (simulator.ts pause()).
      pause_ms: pause ? (rng.chance(0.3) ? rng.range(2, 0.6 * DETECT_MS) : rng.range(2.2 * DETECT_MS, 5 * DETECT_MS)) : undefined,
    });
    const seconds = rng.chance(0.8) ? (rng.chance(0.15) ? 2 : 1) : 0;
    for (let i = 0; i < seconds; i++) {
      // A crash after the resume hits a re-protection still in flight only when the recovery shipped
      // images: drawn more often so that it is not the rare one.
      const kinds = STEP_KINDS.filter((k) => k !== "vm_promotion" || mode === "vm").flatMap((k) => (k === "after_resume" ? [k, k, k] : [k]));
      const step = mode === "vm" && rng.chance(0.35) ? "vm_promotion" : rng.pick(kinds);
      const pause2 = rng.chance(0.12);
      failures.push({
        kind: pause2 ? "pause" : "crash",
        step,
        nth: rng.chance(0.7) ? 1 : 2,
        target: rng.chance(0.5) ? "self" : "other",
        index: rng.int(0, 15),
        pause_ms: pause2 ? rng.range(2.2 * DETECT_MS, 5 * DETECT_MS) : undefined,
      });
    }
  }
  const schedule: Schedule = { seed: rng.int(0, 2 ** 31 - 1), hosts, size, mode, traffic_ms, send_rate: rng.range(0, 0.6), output_rate: rng.range(0, 0.3), failures, mutation: options.mutation };
  // Store outages come from a stream of their own, so adding them left every other draw as it was.
  const outages = new Rng((seed ^ Math.imul(run + 1, 0x85ebca6b) ^ 0x5bd1e995) >>> 0);
  const first = failures[0]?.at_ms;
  if (first !== undefined && outages.chance(0.25)) {
    // Around the first failure, so that its decision meets the outage: starting before or after it.
    const from_ms = Math.max(0, first + outages.range(-DETECT_MS, 2 * DETECT_MS));
    schedule.store_outage = { from_ms, until_ms: from_ms + outages.range(0.5 * DETECT_MS, 6 * DETECT_MS) };
  }
  // Restarts too come from a stream of their own: some crashed hosts come back as fresh instances,
  // often while the failover is still under way, so second failures meet the healing that follows.
  const restarts = new Rng((seed ^ Math.imul(run + 1, 0xc2b2ae35) ^ 0x27d4eb2f) >>> 0);
  for (const f of schedule.failures) {
    if (f.kind === "crash" && restarts.chance(0.35)) f.restart_ms = restarts.chance(0.5) ? restarts.range(0.5 * DETECT_MS, 3 * DETECT_MS) : restarts.range(3 * DETECT_MS, 15 * DETECT_MS);
  }
  return schedule;
}

export function runCampaign(options: CampaignOptions, clock: () => number = () => 0): CampaignSummary {
  const summary: CampaignSummary = {
    seed: options.seed,
    steps: 0,
    runs: 0,
    commits: 0,
    recoveries: 0,
    crashes: 0,
    rejoins: 0,
    pauses: 0,
    halts: 0,
    store_outages: 0,
    second_failures_by_step: Object.fromEntries(STEP_KINDS.map((k) => [k, 0])) as Record<StepKind, number>,
    violations: 0,
    steps_per_s: 0,
  };
  const started = clock();
  let elapsed = 0;
  for (let run = options.firstRun ?? 0; summary.steps < options.steps; run++) {
    const schedule = scheduleFor(options.seed, run, options);
    const r = simulate(schedule);
    summary.runs++;
    summary.steps += r.steps;
    summary.commits += r.commits;
    summary.recoveries += r.recoveries;
    summary.crashes += r.crashes;
    summary.rejoins += r.rejoins;
    summary.pauses += r.pauses;
    if (r.halted) summary.halts++;
    if (schedule.store_outage) summary.store_outages++;
    for (const k of STEP_KINDS) summary.second_failures_by_step[k] += r.second_failures_by_step[k];
    if (r.violation_count) {
      elapsed = clock() - started; // the simulated runs only, not the shrinking
      summary.violations += r.violation_count;
      const shrunk = shrink(schedule, r);
      summary.failure = { run, schedule, violations: r.violations, shrunk: shrunk.schedule, shrunk_violations: shrunk.result.violations, shrunk_timeline: shrunk.result.timeline };
      break;
    }
  }
  if (!summary.failure) elapsed = clock() - started;
  summary.steps_per_s = elapsed > 0 ? Math.round((summary.steps / elapsed) * 1000) : 0;
  return summary;
}

/** How big a schedule is, for shrinking: failures first, then traffic. */
function weight(s: Schedule): number {
  return s.failures.length * 1e6 + s.failures.filter((f) => f.restart_ms !== undefined).length * 2e5 + (s.store_outage ? 5e5 : 0) + s.size * 1e4 + s.hosts * 1e3 + s.traffic_ms + (s.send_rate + s.output_rate) * 100;
}

/** Smaller variants of a schedule, most promising first. */
function candidates(s: Schedule): Schedule[] {
  const out: Schedule[] = [];
  if (s.store_outage) out.push({ ...s, store_outage: undefined });
  s.failures.forEach((_, i) => out.push({ ...s, failures: s.failures.filter((_, j) => j !== i) }));
  s.failures.forEach((f, i) => {
    if (f.restart_ms !== undefined) out.push({ ...s, failures: s.failures.map((g, j) => (j === i ? { ...g, restart_ms: undefined } : g)) });
    if (f.kind === "pause") out.push({ ...s, failures: s.failures.map((g, j) => (j === i ? { ...g, kind: "crash" as const, pause_ms: undefined } : g)) });
    if (f.at_ms !== undefined && f.at_ms > 20) out.push({ ...s, failures: s.failures.map((g, j) => (j === i ? { ...g, at_ms: Math.max(20, Math.floor(f.at_ms! / 2)) } : g)) });
    if ((f.nth ?? 1) > 1) out.push({ ...s, failures: s.failures.map((g, j) => (j === i ? { ...g, nth: 1 } : g)) });
  });
  if (s.size > 2) out.push({ ...s, size: s.size - 1 });
  if (s.hosts > 3) out.push({ ...s, hosts: s.hosts - 1 });
  if (s.traffic_ms > 60) {
    const traffic_ms = Math.max(60, Math.floor(s.traffic_ms / 2));
    out.push({ ...s, traffic_ms, failures: s.failures.map((f) => (f.at_ms !== undefined ? { ...f, at_ms: Math.min(f.at_ms, traffic_ms - 10) } : f)) });
  }
  if (s.send_rate > 0) out.push({ ...s, send_rate: 0 }, { ...s, send_rate: Math.round(s.send_rate * 50) / 100 });
  if (s.output_rate > 0) out.push({ ...s, output_rate: 0 }, { ...s, output_rate: Math.round(s.output_rate * 50) / 100 });
  return out.filter((c) => weight(c) < weight(s));
}

/** Runs a schedule's variants, keeping any that still violates one of the same invariants, until none does: a short failing schedule. */
export function shrink(schedule: Schedule, result: RunResult, budget = 300): { schedule: Schedule; result: RunResult } {
  const target = new Set<Invariant>(result.violations.map((v) => v.invariant));
  let best = { schedule, result };
  let tries = 0;
  for (let improved = true; improved && tries < budget; ) {
    improved = false;
    for (const c of candidates(best.schedule)) {
      if (++tries > budget) break;
      const r = simulate(c);
      if (r.violations.some((v) => target.has(v.invariant))) {
        best = { schedule: c, result: r };
        improved = true;
        break;
      }
    }
  }
  return best;
}

export { MUTATIONS };
