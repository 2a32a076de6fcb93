/**
 * `cohort sim`: the deterministic simulation of the group protocol core
 * (src/sim/), many runs until a number of steps, one JSON summary. A
 * violation prints the failing schedule, its shrunk form and that run's
 * timeline, and the command fails; `--replay` runs one printed schedule again.
 */
import { runCampaign, type CampaignSummary } from "../sim/campaign.js";
import { simulate, MUTATIONS, type Mutation, type Schedule } from "../sim/simulator.js";
import { readRecordings, replay } from "../sim/replay.js";

export interface SimCommandOptions {
  seed: number;
  steps: number;
  hosts?: number;
  size?: number;
  mutation?: Mutation;
  json: boolean;
}

export function isMutation(name: string): name is Mutation {
  return (MUTATIONS as readonly string[]).includes(name);
}

/** Runs the campaign, prints, and returns the exit code. */
export function runSimCommand(options: SimCommandOptions, print: (line: string) => void): number {
  const summary = runCampaign({ seed: options.seed, steps: options.steps, hosts: options.hosts, size: options.size, mutation: options.mutation }, () => performance.now());
  const { failure, ...figures } = summary;
  if (options.json) print(JSON.stringify(failure ? { ...figures, failure } : figures));
  else printHuman(summary, print);
  return failure ? 1 : 0;
}

function printHuman(s: CampaignSummary, print: (line: string) => void): void {
  print(`seed ${s.seed}: ${s.runs} runs, ${s.steps} steps (${s.steps_per_s} steps/s), ${s.commits} commits, ${s.recoveries} recoveries, ${s.crashes} crashes (${s.rejoins} restarted and rejoined), ${s.pauses} pauses, ${s.halts} halts, ${s.store_outages} with a store outage`);
  print(`second failures by step: ${Object.entries(s.second_failures_by_step).map(([k, n]) => `${k} ${n}`).join(", ")}`);
  if (!s.failure) {
    print("violations: 0");
    return;
  }
  const f = s.failure;
  print(`VIOLATION in run ${f.run}:`);
  for (const v of f.violations) print(`  ${v.invariant} at ${v.at_ms} ms: ${v.message}`);
  print(`schedule: ${JSON.stringify(f.schedule)}`);
  print(`shrunk:   ${JSON.stringify(f.shrunk)}`);
  for (const v of f.shrunk_violations) print(`  ${v.invariant} at ${v.at_ms} ms: ${v.message}`);
  for (const line of f.shrunk_timeline) print(`  | ${line}`);
  print(`replay: cohort sim --replay '${JSON.stringify(f.shrunk)}'`);
}

/** Runs one schedule (as a failure prints it) and prints its result; exit code 1 on a violation. */
export function replaySchedule(json: string, print: (line: string) => void): number {
  const schedule = JSON.parse(json) as Schedule;
  const result = simulate(schedule);
  print(JSON.stringify({ ...result, timeline: undefined }));
  for (const line of result.timeline) print(`| ${line}`);
  return result.violation_count ? 1 : 0;
}

/** Replays the recordings in `dir` through the core; exit code 1 on a different action or a violation. */
export function replayRecordingCommand(dir: string, json: boolean, print: (line: string) => void): number {
  const report = replay(readRecordings(dir));
  if (json) print(JSON.stringify(report));
  else {
    print(`${report.files} recordings, ${report.steps} events replayed: ${report.mismatches.length} with other actions than recorded`);
    print(`${report.commits} commits, ${report.recoveries} recoveries, ${report.releases_checked} releases checked: ${report.violations.length} violations`);
    for (const m of report.mismatches) print(`  ${m.file} step ${m.step} (${m.event}): recorded ${m.recorded} replayed ${m.replayed}`);
    for (const v of report.violations) print(`  ${v.invariant} ${v.file} step ${v.step}: ${v.message}`);
  }
  return report.files === 0 || report.mismatches.length || report.violations.length ? 1 : 0;
}
