/**
 * `cohort bench pingpong` and `cohort bench allreduce`: the same guest group
 * run in every protection mode, one fresh local cluster (real host processes,
 * loopback TCP) per mode, in one run, so the modes compare as ratios on the
 * same machine at the same time. pingpong also measures `raw_tcp`: two plain
 * Node processes bouncing the same message, the floor of the transport.
 *
 * Each mode is measured `repeat` times, the modes interleaved (none, vm,
 * group, none, ...), and the median run is reported with every sample: on a
 * shared machine the load drifts, and interleaving spreads the drift over the
 * modes instead of charging it to whichever ran last.
 *
 * Clusters run with mutual TLS (as `cohort up` starts them); pingpong also
 * runs none and group mode on hosts started `--insecure` (`none_insecure`,
 * `group_insecure`), so the cost of TLS on the message path is one ratio of
 * the same run (`group_tls_vs_insecure`), and the message path's own cost is
 * measured against a raw socket of the same transport: `none_vs_raw_tls`
 * (TLS) and `none_insecure_vs_raw_tcp` (plain TCP). `none_vs_raw_tcp` mixes
 * the two costs.
 *
 * The guests measure themselves (pingpong: round trips and their latency on
 * the guest's clock; allreduce: completed rounds); the bench reads them
 * through `vm_request`, whose reply is released like any output.
 */
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { down, up, type ClusterFile } from "../cluster/local-cluster.js";
import { parseManifest, type ProtectionMode } from "../cluster/manifest.js";
import { guestPath } from "../guest/examples.js";
import { locateVm, requestAny, sleep } from "../cli/client.js";
import { hostCommand } from "../cli/demo.js";
import { measureRawTcp } from "./raw-tcp.js";
import { round } from "../util/stats.js";

export const GROUP_MODES: ProtectionMode[] = ["none", "vm", "group"];

export interface GroupBenchOptions {
  measure_ms: number;
  warmup_ms: number;
  hosts: number;
  repeat: number;
  progress: (line: string) => void;
}

/** The sample with the median `key` (the lower middle one for an even count). */
function median<T>(samples: T[], key: (t: T) => number): T {
  const sorted = [...samples].sort((a, b) => key(a) - key(b));
  return sorted[Math.floor((sorted.length - 1) / 2)];
}

export { GROUP_BENCH_DEFAULTS } from "./group-defaults.js";

interface RunningGroup {
  /** Sends a request to `vm` at its primary's host; resolves with the released reply. */
  ask(vm: string, text: string): Promise<string>;
}

/**
 * A fresh cluster with one group deployed; torn down after `body`. If the run
 * fails, its state directory (the hosts' logs) is kept and named in the error.
 */
async function withGroup<T>(guest: string, mode: ProtectionMode, size: number, hosts: number, body: (g: RunningGroup) => Promise<T>, tls = true): Promise<T> {
  const state_dir = await mkdtemp(join(tmpdir(), `cohort-bench-${guest}-`));
  let cluster: ClusterFile | null = null;
  let failed = false;
  try {
    cluster = await up({ hosts, state_dir, host_command: hostCommand(), tls });
    await sleep(600); // hosts see each other's heartbeats before placement
    const manifest = parseManifest(`group: ${guest}\nmode: ${mode}\nsize: ${size}\nmodule: ${JSON.stringify(guestPath(guest))}\n`, { source: "bench", base_dir: "/" });
    await requestAny(cluster, "deploy", { manifest }, new Uint8Array(await readFile(manifest.module)));
    const c: ClusterFile = cluster;
    const ask = async (vm: string, text: string) => {
      const record = await locateVm(c, vm);
      if (!record) throw new Error(`${vm} has no record`);
      const reply = await requestAny(c, "vm_request", { vm, text }, undefined, record.primary);
      return reply.reply;
    };
    return await body({ ask });
  } catch (error) {
    failed = true;
    throw new Error(`${guest}, mode ${mode}, ${size} VMs: ${(error as Error).message} (host logs kept in ${state_dir})`, { cause: error });
  } finally {
    if (cluster) await down({ state_dir }).catch(() => undefined);
    if (!failed) await rm(state_dir, { recursive: true, force: true });
  }
}

export interface PingpongModeResult {
  round_trips_per_s: number;
  latency_us_p50: number;
  latency_us_p99: number;
  round_trips: number;
  /** round_trips_per_s of every run, in run order (the fields above are the median run's). */
  samples: number[];
}

type PingpongRun = Omit<PingpongModeResult, "samples">;

export interface PingpongReport {
  bench: "pingpong";
  payload_bytes: number;
  measure_ms: number;
  repeat: number;
  /** Every mode runs over mutual TLS but raw_tcp, none_insecure and group_insecure (hosts started --insecure); raw_tls is raw_tcp's two processes over mutual TLS. */
  results: Record<"raw_tcp" | "raw_tls" | ProtectionMode | "none_insecure" | "group_insecure", PingpongModeResult>;
  ratios: { none_vs_raw_tcp: number; none_vs_raw_tls: number; none_insecure_vs_raw_tcp: number; group_vs_none: number; group_vs_vm: number; group_tls_vs_insecure: number };
}


export async function runPingpongBench(options: GroupBenchOptions): Promise<PingpongReport> {
  const runs: Record<keyof PingpongReport["results"], PingpongRun[]> = { raw_tcp: [], raw_tls: [], none: [], vm: [], group: [], none_insecure: [], group_insecure: [] };
  for (let i = 1; i <= options.repeat; i++) {
    options.progress(`run ${i}/${options.repeat}: raw_tcp: two Node processes, 64 bytes over loopback`);
    runs.raw_tcp.push(await measureRawTcp({ duration_ms: options.measure_ms, payload_bytes: 64, warmup_ms: options.warmup_ms }));
    options.progress(`run ${i}/${options.repeat}: raw_tls: the same two processes over mutual TLS`);
    runs.raw_tls.push(await measureRawTcp({ duration_ms: options.measure_ms, payload_bytes: 64, warmup_ms: options.warmup_ms, tls: true }));
    for (const mode of GROUP_MODES) {
      options.progress(`run ${i}/${options.repeat}: ${mode}: 2 VMs on ${options.hosts} hosts`);
      runs[mode].push(await measurePingpong(mode, options));
    }
    options.progress(`run ${i}/${options.repeat}: none_insecure: none mode, hosts without TLS`);
    runs.none_insecure.push(await measurePingpong("none", options, false));
    options.progress(`run ${i}/${options.repeat}: group_insecure: group mode, hosts without TLS`);
    runs.group_insecure.push(await measurePingpong("group", options, false));
  }
  const results = {} as PingpongReport["results"];
  for (const [mode, list] of Object.entries(runs) as [keyof PingpongReport["results"], PingpongRun[]][]) {
    const m = median(list, (r) => r.round_trips_per_s);
    results[mode] = { round_trips_per_s: m.round_trips_per_s, latency_us_p50: m.latency_us_p50, latency_us_p99: m.latency_us_p99, round_trips: m.round_trips, samples: list.map((r) => r.round_trips_per_s) };
  }
  const rate = (k: keyof PingpongReport["results"]) => results[k].round_trips_per_s;
  return {
    bench: "pingpong",
    payload_bytes: 64,
    measure_ms: options.measure_ms,
    repeat: options.repeat,
    results,
    ratios: { none_vs_raw_tcp: round(rate("none") / rate("raw_tcp"), 3), none_vs_raw_tls: round(rate("none") / rate("raw_tls"), 3),
      none_insecure_vs_raw_tcp: round(rate("none_insecure") / rate("raw_tcp"), 3), group_vs_none: round(rate("group") / rate("none"), 3), group_vs_vm: round(rate("group") / Math.max(rate("vm"), 1e-9), 2),
      group_tls_vs_insecure: round(rate("group") / rate("group_insecure"), 3),
    },
  };
}

function measurePingpong(mode: ProtectionMode, options: GroupBenchOptions, tls = true): Promise<PingpongRun> {
  return withGroup("pingpong", mode, 2, options.hosts, async (g) => {
    await sleep(options.warmup_ms);
    await g.ask("pingpong-0", "reset");
    await sleep(options.measure_ms);
    const stats = JSON.parse(await g.ask("pingpong-0", "stats")) as { round_trips: number; elapsed_ms: number; latency_us_p50: number; latency_us_p99: number };
    return {
      round_trips_per_s: round(stats.round_trips / (stats.elapsed_ms / 1000), 1),
      latency_us_p50: round(stats.latency_us_p50, 1),
      latency_us_p99: round(stats.latency_us_p99, 1),
      round_trips: stats.round_trips,
    };
  }, tls);
}

export interface AllreduceModeResult {
  iterations_per_s: number;
  iterations: number;
  /** How long the median run warmed up before measuring (see measureAllreduce). */
  warmup_ms: number;
  /** iterations_per_s of every run, in run order (the fields above are the median run's). */
  samples: number[];
}

export interface AllreduceReport {
  bench: "allreduce";
  measure_ms: number;
  hosts: number;
  repeat: number;
  results: Record<string, Record<ProtectionMode, AllreduceModeResult>>;
  ratios: Record<string, { group_vs_none: number; group_vs_vm: number }>;
}

const roundOf = (reply: string) => {
  const m = /^round (\d+) sum/.exec(reply);
  if (!m) throw new Error(`allreduce status reply ${JSON.stringify(reply)}`);
  return Number(m[1]);
};

export async function runAllreduceBench(options: GroupBenchOptions & { sizes: number[] }): Promise<AllreduceReport> {
  const results: AllreduceReport["results"] = {};
  const ratios: AllreduceReport["ratios"] = {};
  for (const size of options.sizes) {
    const key = `vms_${size}`;
    const runs: Record<ProtectionMode, AllreduceRun[]> = { none: [], vm: [], group: [] };
    for (let i = 1; i <= options.repeat; i++) {
      for (const mode of GROUP_MODES) {
        options.progress(`run ${i}/${options.repeat}: ${mode}: allreduce over ${size} VMs on ${options.hosts} hosts`);
        runs[mode].push(await measureAllreduce(mode, size, options));
      }
    }
    results[key] = {} as AllreduceReport["results"][string];
    for (const mode of GROUP_MODES) {
      const m = median(runs[mode], (r) => r.iterations_per_s);
      results[key][mode] = { ...m, samples: runs[mode].map((r) => r.iterations_per_s) };
    }
    const r = results[key];
    ratios[key] = { group_vs_none: round(r.group.iterations_per_s / r.none.iterations_per_s, 3), group_vs_vm: round(r.group.iterations_per_s / Math.max(r.vm.iterations_per_s, 1e-9), 2) };
  }
  return { bench: "allreduce", measure_ms: options.measure_ms, hosts: options.hosts, repeat: options.repeat, results, ratios };
}

type AllreduceRun = Omit<AllreduceModeResult, "samples">;

/** Warm-up windows: the rate has settled when two successive windows differ by at most SETTLED_RATIO. */
const SETTLE_WINDOW_MS = 1000;
const SETTLED_RATIO = 1.15;
/** Warm-up never lasts longer than this (a rate that never settles is measured anyway). */
const WARMUP_MAX_MS = 20_000;

/**
 * One allreduce run. Warm-up lasts warmup_ms and then until the rate settles:
 * a freshly deployed group speeds up for seconds while V8 optimises guest and
 * host code, the longer the more VMs share the machine's cores (8 VMs on 2
 * cores: several seconds past 3 s, in every mode), and a fixed warm-up measured
 * each mode at a different point of its ramp.
 */
function measureAllreduce(mode: ProtectionMode, size: number, options: GroupBenchOptions): Promise<AllreduceRun> {
  return withGroup("allreduce", mode, size, options.hosts, async (g) => {
    /** The round rank 0 completed, at the middle of the request that asked. */
    const sample = async () => {
      const t = performance.now();
      const r = roundOf(await g.ask("allreduce-0", "status"));
      return { round: r, at: (performance.now() + t) / 2 };
    };
    const rate = (a: { round: number; at: number }, b: { round: number; at: number }) => (b.round - a.round) / Math.max(b.at - a.at, 1e-9);
    const start = performance.now();
    await sleep(options.warmup_ms);
    let before = await sample();
    await sleep(SETTLE_WINDOW_MS);
    let last = await sample();
    for (;;) {
      if (performance.now() - start >= WARMUP_MAX_MS) break;
      await sleep(SETTLE_WINDOW_MS);
      const next = await sample();
      const [x, y] = [rate(before, last), rate(last, next)];
      before = last;
      last = next;
      if (Math.max(x, y) <= SETTLED_RATIO * Math.min(x, y)) break;
    }
    const warmup_ms = Math.round(performance.now() - start);
    const r0 = await sample();
    await sleep(options.measure_ms);
    const r1 = await sample();
    return { iterations_per_s: round(rate(r0, r1) * 1000, 1), iterations: r1.round - r0.round, warmup_ms };
  });
}
