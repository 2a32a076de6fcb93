/**
 * `cohort demo --scenario ticker`: a 3-host local cluster on loopback, the
 * ticker guest deployed with a backup, the primary's host killed with
 * SIGKILL mid-run, and the released output checked: every count once, in
 * order, nothing lost. Cleans up every process it started.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import { fileURLToPath } from "node:url";
import { down, up, type ClusterFile } from "../cluster/local-cluster.js";
import { parseManifest } from "../cluster/manifest.js";
import { guestPath } from "../guest/examples.js";
import { withPrefixSegment } from "../store/open.js";
import { locateVm, LogFollower, requestAny, sleep, type FollowedRecord } from "./client.js";
import { readFile } from "node:fs/promises";

export interface DemoOptions {
  scenario: "ticker";
  hosts: number;
  run_before_kill_ms: number;
  run_after_kill_ms: number;
  detect_ms: number;
  interval_ms: number;
  /** Coordination store of the demo's cluster (src/store/open.ts); etcd keys go under a fresh prefix segment. */
  store: string;
}

export interface DemoReport {
  scenario: string;
  hosts: number;
  killed_host: string;
  failover_ms: number | null;
  /** Produced by the guest → released by its host (the cut committed), for output before the kill. */
  release_latency_ms_p50: number | null;
  release_latency_ms_p99: number | null;
  interval_ms: number;
  detect_ms: number;
  released: number;
  lost: number;
  duplicated: number;
  checks: { output_contiguous: boolean; resumed_after_kill: boolean; new_primary_elsewhere: boolean; processes_cleaned_up: boolean };
}

export function hostCommand(): string[] {
  const bin = fileURLToPath(new URL(import.meta.url.endsWith(".ts") ? "../../bin/cohort.js" : "../../../bin/cohort.js", import.meta.url));
  return [process.execPath, bin, "host"];
}

/**
 * What every demo scenario shares: a local cluster in a fresh state directory,
 * the scenario itself, then `down` (whose result is the report's
 * processes_cleaned_up check) and the directory removed (kept with
 * COHORT_DEMO_KEEP_STATE). The scenario stops its log followers before it returns or throws.
 */
export async function withDemoCluster<R extends { checks: { processes_cleaned_up: boolean } }>(
  options: { hosts: number; detect_ms: number; store: string },
  say: (line: string) => void,
  scenario: (cluster: ClusterFile, state_dir: string) => Promise<R>,
): Promise<R> {
  const state_dir = await mkdtemp(join(tmpdir(), "cohort-demo-"));
  let cluster: ClusterFile | null = null;
  let cleaned = false;
  try {
    say(`starting ${options.hosts} hosts in ${state_dir}`);
    const store = withPrefixSegment(options.store, `demo-${basename(state_dir).toLowerCase().replace(/[^a-z0-9-]/g, "")}`);
    cluster = await up({ hosts: options.hosts, state_dir, host_command: hostCommand(), extra_args: ["--detect-ms", String(options.detect_ms)], store });
    await sleep(3 * options.detect_ms); // hosts see each other's heartbeats before placement
    const report = await scenario(cluster, state_dir);
    const stopped = await down({ state_dir });
    cleaned = true;
    report.checks.processes_cleaned_up = [...stopped.stopped, ...stopped.already_gone].length === options.hosts;
    return report;
  } finally {
    if (cluster && !cleaned) await down({ state_dir }).catch(() => undefined);
    if (process.env.COHORT_DEMO_KEEP_STATE) say(`state kept in ${state_dir}`);
    else await rm(state_dir, { recursive: true, force: true });
  }
}

export function runDemo(options: DemoOptions, say: (line: string) => void): Promise<DemoReport> {
  return withDemoCluster(options, say, async (cluster) => {
    let follower: LogFollower | null = null;
    try {
      const manifest = parseManifest(`group: ticker\nmode: vm\nmodule: ${JSON.stringify(guestPath("ticker"))}\nepoch:\n  interval_ms: ${options.interval_ms}\n`, { source: "demo", base_dir: "/" });
      await requestAny(cluster, "deploy", { manifest }, new Uint8Array(await readFile(manifest.module)));
      const before = await locateVm(cluster, "ticker-0");
      if (!before) throw new Error("ticker-0 has no record after deploy");
      say(`ticker-0: primary ${before.primary}, backup ${before.backup}`);
      const records: FollowedRecord[] = [];
      follower = new LogFollower(cluster, "ticker-0", 1, (r) => records.push(r), (line) => say(line));
      const following = follower.run().catch((error: Error) => say(`follower: ${error.message}`));
      await sleep(options.run_before_kill_ms);
      const victim = cluster.hosts.find((h) => h.id === before.primary)!;
      const seqAtKill = follower.lastSeq;
      const killedAt = Date.now();
      process.kill(victim.pid, "SIGKILL");
      say(`killed ${victim.id} (pid ${victim.pid}) with SIGKILL after output ${seqAtKill}`);
      await sleep(options.run_after_kill_ms);
      follower.stop();
      await following;
      const after = await locateVm(cluster, "ticker-0");
      const firstAfter = records.find((r) => r.seq > seqAtKill);
      const counts = records.map((r) => Number(r.text.trim()));
      let lost = 0;
      let duplicated = 0;
      for (let i = 1; i < counts.length; i++) {
        if (counts[i] <= counts[i - 1]) duplicated++;
        else lost += counts[i] - counts[i - 1] - 1;
      }
      if (counts.length && counts[0] !== 1) lost += counts[0] - 1;
      const latencies = records.filter((r) => r.seq <= seqAtKill).map((r) => r.released_ms - r.produced_ms).sort((a, b) => a - b);
      const pct = (p: number) => (latencies.length ? latencies[Math.min(latencies.length - 1, Math.floor(p * (latencies.length - 1) + 0.5))] : null);
      const report: DemoReport = {
        scenario: options.scenario,
        hosts: options.hosts,
        killed_host: victim.id,
        failover_ms: firstAfter ? firstAfter.received_ms - killedAt : null,
        release_latency_ms_p50: pct(0.5),
        release_latency_ms_p99: pct(0.99),
        interval_ms: options.interval_ms,
        detect_ms: options.detect_ms,
        released: records.length,
        lost,
        duplicated,
        checks: {
          output_contiguous: lost === 0 && duplicated === 0 && records.every((r, i) => r.seq === i + 1),
          resumed_after_kill: !!firstAfter,
          new_primary_elsewhere: !!after && after.primary !== victim.id && after.incarnation > before.incarnation,
          processes_cleaned_up: false,
        },
      };
      return report;
    } finally {
      follower?.stop();
    }
  });
}
