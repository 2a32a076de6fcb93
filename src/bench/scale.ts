/**
 * `cohort bench scale`: what a group of N VMs costs to deploy and to keep, on
 * one machine. For each size, two fresh local clusters (real host processes,
 * mutual TLS, as `cohort up` starts them), one after the other:
 *
 * - cold: a fresh state directory, so every host instruments the module
 *   (its instrumented-module cache is empty);
 * - cached: a fresh state directory holding the cold run's module cache, as
 *   a second deploy of the same guest finds it (each host still compiles
 *   the module once).
 *
 * Each deploys one group of the size (`kv`, mode group by default), times
 * the deploy request, lets the group run `settle_ms`, measures the hosts'
 * CPU over `idle_ms` (the group deployed and idle: nobody calls it) and the
 * TCP connections between the host processes (src/bench/tcp-connections.ts),
 * and reads every host's status and /proc: the longest main-loop stall and
 * the worst timer delay since the host started (deploy included), its
 * resident memory (VmRSS) and threads before the deploy and after the
 * settle, its replicas, and whether any VM of the group moved to a later
 * incarnation (a failover; nothing was killed, so any is a false one).
 *
 * Then the bank scenario of `cohort demo` (src/cli/demo-bank.ts) runs with a
 * group of the same size on a third fresh cluster of as many hosts: rounds
 * per second before a `kill -9` of the host of rank 0's primary, the
 * failover (kill to the first line the group released after it resumed) and
 * the scenario's checks (money conserved, no transfer lost or repeated).
 *
 * A deploy that fails is reported with its error and the sizes after it
 * still run. `results` is one summary per size; `runs` holds the details.
 */
import { cp, mkdtemp, readFile, rm } from "node:fs/promises";
import { existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { down, up, type ClusterFile } from "../cluster/local-cluster.js";
import { parseManifest, type ProtectionMode } from "../cluster/manifest.js";
import { guestPath } from "../guest/examples.js";
import { requestAny, sleep } from "../cli/client.js";
import { hostCommand } from "../cli/demo.js";
import type { HostStatus } from "../host/api.js";
import { round } from "../util/stats.js";
import { lateMaxSince } from "../util/lateness-log.js";
import { HOST_DEFAULTS } from "../host/host.js";
import { runBankDemo, type BankDemoReport } from "../cli/demo-bank.js";
import { connectionsBetween, type ConnectionCount } from "./tcp-connections.js";
import { processCpuNs } from "../util/proc-stat.js";

export interface ScaleBenchOptions {
  sizes: number[];
  hosts: number;
  guest: string;
  mode: ProtectionMode;
  /** How long the deployed group runs before the hosts are read. */
  settle_ms: number;
  /** Window over which the hosts' CPU is measured with the group deployed and idle. */
  idle_ms: number;
  /** The bank run: how long it runs before the kill, and after it. */
  bank_before_kill_ms: number;
  bank_after_kill_ms: number;
  progress: (line: string) => void;
}

export { SCALE_BENCH_DEFAULTS } from "./group-defaults.js";

export interface ScaleHost {
  id: string;
  /** Primaries and backups of the group on this host. */
  primaries: number;
  backups: number;
  rss_mib_before: number;
  rss_mib_after: number;
  threads_before: number;
  threads_after: number;
  /** Longest gap between two main-loop ticks since the host started (its own start included). */
  stall_ms_max: number;
  /** Worst lateness of the main loop's tick since the host started (its own start included). */
  delay_ms_max: number;
  /** Worst lateness of the main loop's tick from the deploy request to the hosts being read (deploy, settle, idle window). */
  late_ms_max_from_deploy: number;
}

export interface ScaleRun {
  /** The deploy request, from sending it to its answer; null if it failed. */
  deploy_ms: number | null;
  /** How the hosts got the instrumented module, from their logs: every one from the cache, every one by instrumenting it, or some each way. */
  module: "cache" | "instrumented" | "mixed" | "unknown";
  error: string | null;
  /** Where the hosts' logs were kept: the run's state directory when its deploy failed, else null (removed). */
  logs_kept_in: string | null;
  /** VMs of the group at a later incarnation than the deploy's, after the settle (nothing was killed: false failovers). */
  vms_failed_over: number;
  /** Every VM of the group healthy after the settle. */
  healthy: boolean;
  /** (Sum over the hosts of VmRSS after - before) / size. */
  rss_mib_per_vm: number;
  /** (Sum over the hosts of threads after - before) / size: the group's threads come from the hosts' spares, which are replaced SPARES_REFILL_QUIET_MS after the last was taken, so a settle shorter than that counts too few. */
  threads_per_vm: number;
  /** The hosts' CPU (all their threads, % of one core, summed) over `idle_ms` after the settle, the group deployed and idle. */
  idle_cpu_pct: number;
  /** Established TCP connections between the host processes after the settle, and the most between one pair of hosts: the idle group sends no messages, so these are the hosts' peer links (the bank run counts the message paths too). */
  connections: number;
  connections_per_host_pair_max: number;
  hosts: ScaleHost[];
}

/** The bank scenario at one size: rounds, failover and checks, or why it did not run. */
export interface ScaleBankRun {
  rounds_per_s: number | null;
  /** TCP connections between the host processes while the bank group ran (peer links and the VMs' message paths), and the most between one pair of hosts. */
  connections: number | null;
  connections_per_host_pair_max: number | null;
  failover_ms: number | null;
  checks_ok: boolean;
  /** Worst lateness of a surviving host's main-loop tick from the bank group's deploy to the end of its run (the failover and re-protection included). */
  late_ms_max: number | null;
  error: string | null;
  report: BankDemoReport | null;
}

/** One size, in the benchmark's summary form. */
export interface ScaleSummary {
  vms: number;
  /** Deploy with the module in the hosts' cache, and with an empty cache. */
  deploy_ms: number | null;
  deploy_cold_ms: number | null;
  rss_mib_per_vm: number;
  threads_per_vm: number;
  rounds_per_s: number | null;
  failover_ms: number | null;
  bank_checks_ok: boolean;
  /** TCP connections between the hosts while the bank group of this size ran (the kv group sends no messages). */
  connections: number | null;
  connections_per_host_pair_max: number | null;
  idle_cpu_pct: number;
  /**
   * Worst lateness of any host's main-loop tick in the cold and cached runs
   * (from the deploy request to the end of the idle window) and, on the
   * surviving hosts, in the bank run (from its deploy to the end of its run,
   * failover and re-protection included). The hosts' own starts are not in
   * it (the per-host figures since start are in `runs`).
   */
  host_main_thread_stall_ms_max: number;
  /** The same for the bank run alone (null when it did not run). */
  bank_main_thread_stall_ms_max: number | null;
  /** VMs that failed over with nothing killed, in the cold and cached runs. */
  false_failovers: number;
}

export interface ScaleReport {
  bench: "scale";
  hosts: number;
  group: { guest: string; mode: ProtectionMode };
  settle_ms: number;
  idle_ms: number;
  results: ScaleSummary[];
  runs: Record<string, { cold: ScaleRun; cached: ScaleRun; bank: ScaleBankRun }>;
}

/** VmRSS (MiB) and Threads of a live process, from /proc/<pid>/status. */
async function memoryOf(pid: number): Promise<{ rss_mib: number; threads: number }> {
  const text = await readFile(`/proc/${pid}/status`, "utf8");
  const field = (name: string) => {
    const m = new RegExp(`^${name}:\\s+(\\d+)`, "m").exec(text);
    if (!m) throw new Error(`/proc/${pid}/status has no ${name}`);
    return Number(m[1]);
  };
  return { rss_mib: field("VmRSS") / 1024, threads: field("Threads") };
}

async function statuses(cluster: ClusterFile): Promise<HostStatus[]> {
  const out: HostStatus[] = [];
  for (const h of cluster.hosts) out.push(await requestAny(cluster, "status", {}, undefined, h.id));
  return out;
}

/** How each host got the module, from the lines host.ts logs (loadModule). */
async function moduleSource(state_dir: string, cluster: ClusterFile): Promise<ScaleRun["module"]> {
  let cache = 0;
  let instrumented = 0;
  for (const h of cluster.hosts) {
    const log = await readFile(join(state_dir, "logs", `${h.id}.log`), "utf8").catch(() => "");
    if (log.includes("module read from the instrumented-module cache")) cache++;
    if (log.includes('"msg":"module instrumented"')) instrumented++;
  }
  if (cache + instrumented === 0) return "unknown";
  return instrumented === 0 ? "cache" : cache === 0 ? "instrumented" : "mixed";
}

async function measure(options: ScaleBenchOptions, size: number, cache_from: string | null): Promise<{ run: ScaleRun; state_dir: string }> {
  const state_dir = await mkdtemp(join(tmpdir(), "cohort-bench-scale-"));
  if (cache_from && existsSync(join(cache_from, "cache"))) await cp(join(cache_from, "cache"), join(state_dir, "cache"), { recursive: true });
  let cluster: ClusterFile | null = null;
  try {
    cluster = await up({ hosts: options.hosts, state_dir, host_command: hostCommand(), tls: true });
    await sleep(600); // hosts see each other's heartbeats before placement
    const before = new Map<string, { rss_mib: number; threads: number }>();
    for (const h of cluster.hosts) before.set(h.id, await memoryOf(h.pid));
    const manifest = parseManifest(`group: scale\nmode: ${options.mode}\nsize: ${size}\nmodule: ${JSON.stringify(guestPath(options.guest))}\n`, { source: "bench", base_dir: "/" });
    const module = new Uint8Array(await readFile(manifest.module));
    const start = performance.now();
    const deployAt_ms = Date.now();
    let deploy_ms: number | null = null;
    let error: string | null = null;
    try {
      await requestAny(cluster, "deploy", { manifest }, module);
      deploy_ms = Math.round(performance.now() - start);
    } catch (e) {
      error = (e as Error).message;
    }
    await sleep(options.settle_ms);
    try {
      return { run: await readHosts(options, size, cluster, before, { deploy_ms, error, at_ms: deployAt_ms }, state_dir), state_dir };
    } catch (e) {
      // A host that went away meanwhile (declared failed under load, it rejoined as a fresh host elsewhere) is a result too.
      const why = `reading the hosts after the deploy failed: ${(e as Error).message}`;
      return {
        run: { deploy_ms, module: await moduleSource(state_dir, cluster), error: error ?? why, logs_kept_in: state_dir, vms_failed_over: 0, healthy: false, rss_mib_per_vm: 0, threads_per_vm: 0, idle_cpu_pct: 0, connections: 0, connections_per_host_pair_max: 0, hosts: [] },
        state_dir,
      };
    }
  } finally {
    if (cluster) await down({ state_dir }).catch(() => undefined);
  }
}

/** The hosts of a deployed run, after its settle: idle CPU, connections, each host's replicas, memory, threads and stalls. */
async function readHosts(
  options: ScaleBenchOptions,
  size: number,
  cluster: ClusterFile,
  before: Map<string, { rss_mib: number; threads: number }>,
  deployed: { deploy_ms: number | null; error: string | null; at_ms: number },
  state_dir: string,
): Promise<ScaleRun> {
  const { deploy_ms, error } = deployed;
  const cpuNsOf = () => cluster.hosts.reduce((n, h) => n + processCpuNs(h.pid), 0);
  const idleFrom = { at_ms: performance.now(), cpu_ns: cpuNsOf() };
  await sleep(options.idle_ms);
  const idle_cpu_pct = round(((cpuNsOf() - idleFrom.cpu_ns) / 1e9 / ((performance.now() - idleFrom.at_ms) / 1000)) * 100, 2);
  const links = connectionsBetween(cluster.hosts.map((h) => h.pid));
  const hosts: ScaleHost[] = [];
  let vms_failed_over = 0;
  let healthy = error === null;
  const seen = new Set<string>();
  for (const s of await statuses(cluster)) {
    const primaries = s.primaries.filter((p) => p.group === "scale");
    const backups = s.backups.filter((b) => b.vm.startsWith("scale-"));
    for (const p of primaries) {
      seen.add(p.vm);
      if (p.incarnation > 1) vms_failed_over++;
      if (options.mode !== "none" && !p.protected) healthy = false;
    }
    const b = before.get(s.id)!;
    const a = await memoryOf(s.pid);
    hosts.push({
      id: s.id,
      primaries: primaries.length,
      backups: backups.length,
      rss_mib_before: round(b.rss_mib, 1),
      rss_mib_after: round(a.rss_mib, 1),
      threads_before: b.threads,
      threads_after: a.threads,
      stall_ms_max: s.main_loop.stall_ms_max,
      delay_ms_max: s.main_loop.delay_ms_max,
      late_ms_max_from_deploy: lateMaxSince(s.main_loop.late_seconds, deployed.at_ms),
    });
  }
  if (seen.size !== size) healthy = false;
  const rss = hosts.reduce((n, h) => n + h.rss_mib_after - h.rss_mib_before, 0);
  const threads = hosts.reduce((n, h) => n + h.threads_after - h.threads_before, 0);
  return { deploy_ms, module: await moduleSource(state_dir, cluster), error, logs_kept_in: error === null ? null : state_dir, vms_failed_over, healthy, rss_mib_per_vm: round(rss / size, 1), threads_per_vm: round(threads / size, 2), idle_cpu_pct, connections: links.total, connections_per_host_pair_max: links.pair_max, hosts };
}

/** The bank scenario with a group of `size` on `options.hosts` fresh hosts (default detector, embedded store). */
async function bank(options: ScaleBenchOptions, size: number): Promise<ScaleBankRun> {
  let links: ConnectionCount | null = null;
  let late_ms_max: number | null = null;
  try {
    const report = await runBankDemo(
      {
        hosts: options.hosts,
        size,
        run_before_kill_ms: options.bank_before_kill_ms,
        run_after_kill_ms: options.bank_after_kill_ms,
        detect_ms: HOST_DEFAULTS.detect_ms,
        store: "embedded",
        before_kill: (cluster) => (links = connectionsBetween(cluster.hosts.map((h) => h.pid))),
        after_run: async (cluster, deployAt_ms) => {
          const survivors = await Promise.all(cluster.hosts.map((h) => requestAny(cluster, "status", {}, undefined, h.id, { timeout_ms: 2000 }).catch(() => null)));
          late_ms_max = Math.max(0, ...survivors.flatMap((s) => (s ? [lateMaxSince(s.main_loop.late_seconds, deployAt_ms)] : [])));
        },
      },
      () => undefined,
    );
    const counted = links as ConnectionCount | null;
    return {
      connections: counted?.total ?? null,
      connections_per_host_pair_max: counted?.pair_max ?? null,
      rounds_per_s: report.rounds_per_s,
      failover_ms: report.failover_ms,
      checks_ok: Object.values(report.checks).every(Boolean),
      late_ms_max,
      error: null,
      report,
    };
  } catch (error) {
    return { rounds_per_s: null, connections: null, connections_per_host_pair_max: null, failover_ms: null, checks_ok: false, late_ms_max, error: (error as Error).message, report: null };
  }
}

function summary(size: number, cold: ScaleRun, cached: ScaleRun, bankRun: ScaleBankRun): ScaleSummary {
  return {
    vms: size,
    deploy_ms: cached.deploy_ms,
    deploy_cold_ms: cold.deploy_ms,
    rss_mib_per_vm: cached.rss_mib_per_vm,
    threads_per_vm: cached.threads_per_vm,
    rounds_per_s: bankRun.rounds_per_s,
    failover_ms: bankRun.failover_ms,
    bank_checks_ok: bankRun.checks_ok,
    connections: bankRun.connections,
    connections_per_host_pair_max: bankRun.connections_per_host_pair_max,
    idle_cpu_pct: cached.idle_cpu_pct,
    host_main_thread_stall_ms_max: Math.max(bankRun.late_ms_max ?? 0, ...[...cold.hosts, ...cached.hosts].map((h) => h.late_ms_max_from_deploy)),
    bank_main_thread_stall_ms_max: bankRun.late_ms_max,
    false_failovers: cold.vms_failed_over + cached.vms_failed_over,
  };
}

export async function runScaleBench(options: ScaleBenchOptions): Promise<ScaleReport> {
  const runs: ScaleReport["runs"] = {};
  const results: ScaleSummary[] = [];
  for (const size of options.sizes) {
    options.progress(`${size} VMs: cold deploy (empty module cache) on ${options.hosts} hosts`);
    const cold = await measure(options, size, null);
    // A run whose deploy failed keeps its state directory (the hosts' logs), named in the report.
    const done = (m: { run: ScaleRun; state_dir: string }) => (m.run.error === null ? rm(m.state_dir, { recursive: true, force: true }) : Promise.resolve());
    try {
      options.progress(`${size} VMs: cached deploy (module cache of the cold run) on ${options.hosts} hosts`);
      const cached = await measure(options, size, cold.state_dir);
      await done(cached);
      options.progress(`${size} VMs: bank scenario (kill -9 of a host) on ${options.hosts} hosts`);
      const bankRun = await bank(options, size);
      runs[`vms_${size}`] = { cold: cold.run, cached: cached.run, bank: bankRun };
      results.push(summary(size, cold.run, cached.run, bankRun));
    } finally {
      await done(cold);
    }
  }
  return { bench: "scale", hosts: options.hosts, group: { guest: options.guest, mode: options.mode }, settle_ms: options.settle_ms, idle_ms: options.idle_ms, results, runs };
}
