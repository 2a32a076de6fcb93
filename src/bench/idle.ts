/**
 * `cohort bench idle`: what an idle group costs. A fresh local cluster (real
 * host processes, as `cohort up` starts them) with nothing deployed is the
 * floor (heartbeats, lease renewals, store watches); the same cluster with
 * an idle group (`kv`, mode group, 8 VMs on 3 hosts by default; `mode` picks
 * vm or none mode instead: nobody sends
 * it a request) is what protection adds when nothing happens.
 *
 * CPU is each host process's time on a CPU, every thread of it counted
 * (main, heartbeat, VM threads: src/util/proc-stat.ts processCpuNs, exact
 * where /proc's utime and stime are sampled at 10 ms ticks), at the start
 * and end of the measured window, summed over the hosts, as % of one core. From the hosts' `status`:
 * the leader's committed cut (epochs/s), the deltas each host shipped and
 * their bytes (summed over the hosts), and the checkpoints the backups
 * staged.
 *
 * The third case, `beats_only`, is the floor under the floor: as many
 * processes as hosts that run nothing but a host's heartbeat thread and
 * beat each other (src/bench/beats-only.ts), settled at most
 * BEATS_ONLY_SETTLE_MS. On a machine where a thread's wake-up is dear, it
 * shows how much of the hosts' floor the heartbeats alone cost.
 *
 * Each case is measured `repeat` times, the cases interleaved (floor, group,
 * beats only, floor, ...); the median sample is reported with every sample,
 * since the machine may be shared.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { down, up, type ClusterFile } from "../cluster/local-cluster.js";
import { parseManifest, type ProtectionMode } from "../cluster/manifest.js";
import { guestPath } from "../guest/examples.js";
import { requestAny, sleep } from "../cli/client.js";
import { hostCommand } from "../cli/demo.js";
import type { HostStatus } from "../host/api.js";
import { HOST_DEFAULTS } from "../host/host.js";
import { round } from "../util/stats.js";
import { processCpuNs } from "../util/proc-stat.js";
import { freeUdpPort } from "../util/udp-port.js";

export interface IdleBenchOptions {
  measure_ms: number;
  /** After deploy (or after the hosts see each other, for the floor), before measuring. */
  settle_ms: number;
  hosts: number;
  size: number;
  guest: string;
  mode: ProtectionMode;
  repeat: number;
  progress: (line: string) => void;
}

export { IDLE_BENCH_DEFAULTS } from "./group-defaults.js";

export interface IdleSample {
  /** CPU of every host process over the window, summed, in % of one core. */
  cpu_percent: number;
  /** Cuts the leader committed per second (0 for the floor, and in vm and none mode, which have no leader). */
  epochs_per_s: number;
  deltas_per_s: number;
  delta_bytes_per_s: number;
  /** Checkpoints staged by backups per second. */
  staged_per_s: number;
  window_ms: number;
}

export interface IdleCase {
  /** The median sample (by CPU). */
  median: IdleSample;
  samples: IdleSample[];
}

export interface IdleReport {
  bench: "idle";
  hosts: number;
  group: { guest: string; mode: ProtectionMode; size: number };
  measure_ms: number;
  settle_ms: number;
  repeat: number;
  results: { floor: IdleCase; idle_group: IdleCase; beats_only: IdleCase };
  /** idle_group CPU over the floor's (medians) and what the group adds, in % of one core; the floor over beats_only. */
  ratios: { idle_group_vs_floor: number; added_cpu_percent: number; floor_vs_beats_only: number };
}

interface Counters {
  at_ms: number;
  cpu_ns: number;
  committed: number;
  deltas: number;
  delta_bytes: number;
  staged: number;
}

async function counters(cluster: ClusterFile): Promise<Counters> {
  const statuses: HostStatus[] = [];
  for (const h of cluster.hosts) statuses.push(await requestAny(cluster, "status", {}, undefined, h.id));
  const at_ms = performance.now();
  let cpu_ns = 0;
  for (const s of statuses) cpu_ns += processCpuNs(s.pid);
  let committed = 0;
  let deltas = 0;
  let delta_bytes = 0;
  let staged = 0;
  for (const s of statuses) {
    for (const g of s.groups) {
      if (g.committed !== null) committed = Math.max(committed, g.committed);
      deltas += g.deltas_shipped;
      delta_bytes += g.delta_bytes_shipped;
      for (const b of g.backups) staged += b.staged;
    }
  }
  return { at_ms, cpu_ns, committed, deltas, delta_bytes, staged };
}

async function measure(options: IdleBenchOptions, withGroup: boolean): Promise<IdleSample> {
  const state_dir = await mkdtemp(join(tmpdir(), "cohort-bench-idle-"));
  let cluster: ClusterFile | null = null;
  let failed = false;
  try {
    cluster = await up({ hosts: options.hosts, state_dir, host_command: hostCommand(), tls: true });
    await sleep(600); // hosts see each other's heartbeats before placement
    if (withGroup) {
      const manifest = parseManifest(`group: idle\nmode: ${options.mode}\nsize: ${options.size}\nmodule: ${JSON.stringify(guestPath(options.guest))}\n`, { source: "bench", base_dir: "/" });
      await requestAny(cluster, "deploy", { manifest }, new Uint8Array(await readFile(manifest.module)));
    }
    await sleep(options.settle_ms);
    const a = await counters(cluster);
    await sleep(options.measure_ms);
    const b = await counters(cluster);
    const s = (b.at_ms - a.at_ms) / 1000;
    return {
      cpu_percent: round(((b.cpu_ns - a.cpu_ns) / 1e9 / s) * 100, 2),
      epochs_per_s: round((b.committed - a.committed) / s, 1),
      deltas_per_s: round((b.deltas - a.deltas) / s, 1),
      delta_bytes_per_s: Math.round((b.delta_bytes - a.delta_bytes) / s),
      staged_per_s: round((b.staged - a.staged) / s, 1),
      window_ms: Math.round(b.at_ms - a.at_ms),
    };
  } catch (error) {
    failed = true;
    throw new Error(`idle bench (${withGroup ? "group" : "floor"}): ${(error as Error).message} (host logs kept in ${state_dir})`, { cause: error });
  } finally {
    if (cluster) await down({ state_dir }).catch(() => undefined);
    if (!failed) await rm(state_dir, { recursive: true, force: true });
  }
}

/** Settle of the beats-only processes: they load little and have no heap to shrink. */
export const BEATS_ONLY_SETTLE_MS = 10_000;
/** How long the beats-only processes may take to start and hear each other. */
const BEATS_ONLY_READY_MS = 10_000;
const BEATS_ONLY_SCRIPT = import.meta.url.endsWith(".ts") ? new URL("../../dist/src/bench/beats-only.js", import.meta.url) : new URL("./beats-only.js", import.meta.url);

/** Starts `count` beats-only processes that beat each other; resolves once each has heard all the others. */
async function startBeatsOnly(count: number, heartbeat_ms: number, detect_ms: number): Promise<ChildProcess[]> {
  const ids = Array.from({ length: count }, (_, i) => `b${i + 1}`);
  const ports: number[] = [];
  for (let i = 0; i < count; i++) ports.push(await freeUdpPort());
  const children: ChildProcess[] = [];
  const allHeard: Promise<void>[] = [];
  for (const [i, id] of ids.entries()) {
    const peers = ids.flatMap((p, j) => (j === i ? [] : [{ id: p, port: ports[j] }]));
    const child = spawn(process.execPath, [fileURLToPath(BEATS_ONLY_SCRIPT), JSON.stringify({ id, port: ports[i], peers, heartbeat_ms, detect_ms })], { stdio: ["ignore", "pipe", "inherit"] });
    children.push(child);
    allHeard.push(
      new Promise<void>((resolve, reject) => {
        const heard = new Set<string>();
        createInterface({ input: child.stdout! }).on("line", (line) => {
          if (line.startsWith("heard ")) heard.add(line.slice("heard ".length));
          if (heard.size === peers.length) resolve();
        });
        child.once("exit", (code) => reject(new Error(`beats-only process ${id} exited (code ${code})`)));
      }),
    );
  }
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([Promise.all(allHeard), new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`beats-only processes did not hear each other within ${BEATS_ONLY_READY_MS} ms`)), BEATS_ONLY_READY_MS)))]);
  } catch (error) {
    await stopAll(children);
    throw error;
  } finally {
    clearTimeout(timer);
  }
  return children;
}

async function stopAll(children: ChildProcess[]): Promise<void> {
  await Promise.all(
    children.map(async (c) => {
      if (c.exitCode !== null || c.signalCode !== null) return;
      c.kill("SIGTERM");
      await once(c, "exit");
    }),
  );
}

async function measureBeatsOnly(options: IdleBenchOptions): Promise<IdleSample> {
  const children = await startBeatsOnly(options.hosts, HOST_DEFAULTS.heartbeat_ms, HOST_DEFAULTS.detect_ms);
  try {
    await sleep(Math.min(options.settle_ms, BEATS_ONLY_SETTLE_MS));
    const cpuNs = () => children.reduce((n, c) => n + processCpuNs(c.pid!), 0);
    const a = { at_ms: performance.now(), cpu_ns: cpuNs() };
    await sleep(options.measure_ms);
    const b = { at_ms: performance.now(), cpu_ns: cpuNs() };
    const s = (b.at_ms - a.at_ms) / 1000;
    return { cpu_percent: round(((b.cpu_ns - a.cpu_ns) / 1e9 / s) * 100, 2), epochs_per_s: 0, deltas_per_s: 0, delta_bytes_per_s: 0, staged_per_s: 0, window_ms: Math.round(b.at_ms - a.at_ms) };
  } finally {
    await stopAll(children);
  }
}

function summarise(samples: IdleSample[]): IdleCase {
  const sorted = [...samples].sort((x, y) => x.cpu_percent - y.cpu_percent);
  return { median: sorted[Math.floor((sorted.length - 1) / 2)], samples };
}

export async function runIdleBench(options: IdleBenchOptions): Promise<IdleReport> {
  const floor: IdleSample[] = [];
  const group: IdleSample[] = [];
  const beatsOnly: IdleSample[] = [];
  for (let i = 1; i <= options.repeat; i++) {
    options.progress(`run ${i}/${options.repeat}: floor: ${options.hosts} hosts, nothing deployed`);
    floor.push(await measure(options, false));
    options.progress(`run ${i}/${options.repeat}: idle group: ${options.size} ${options.guest} VMs (mode ${options.mode}) on ${options.hosts} hosts`);
    group.push(await measure(options, true));
    options.progress(`run ${i}/${options.repeat}: beats only: ${options.hosts} processes that only run a host's heartbeat thread`);
    beatsOnly.push(await measureBeatsOnly(options));
  }
  const results = { floor: summarise(floor), idle_group: summarise(group), beats_only: summarise(beatsOnly) };
  const f = results.floor.median.cpu_percent;
  const g = results.idle_group.median.cpu_percent;
  return {
    bench: "idle",
    hosts: options.hosts,
    group: { guest: options.guest, mode: options.mode, size: options.size },
    measure_ms: options.measure_ms,
    settle_ms: options.settle_ms,
    repeat: options.repeat,
    results,
    ratios: {
      idle_group_vs_floor: round(g / Math.max(f, 0.1), 2),
      added_cpu_percent: round(g - f, 1),
      floor_vs_beats_only: round(f / Math.max(results.beats_only.median.cpu_percent, 0.01), 2),
    },
  };
}
