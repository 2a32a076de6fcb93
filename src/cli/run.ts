/**
 * `cohort run <guest>`: one VM protected by a backup, in this process. The VM
 * is a group of one on an in-process cluster of three hosts (primary,
 * backup, spare; src/host/group/in-process.ts), driven by the same protocol
 * core and driver as the daemon: checkpoints, output released only at
 * commit, and (with --failover-at-ms) the primary's host killed, the backup
 * promoted and the spare made the new backup.
 */
import { readFile } from "node:fs/promises";
import { pino } from "pino";
import { resolveGuest } from "../guest/examples.js";
import { loadGuest } from "../guest/load.js";
import { parseManifest } from "../cluster/manifest.js";
import type { ProtectionRecord } from "../core/types.js";
import type { Notice } from "../core/events.js";
import { InProcessCluster } from "../host/group/in-process.js";
import type { GroupMember } from "../host/group/member.js";
import { percentile, round } from "../util/stats.js";
import { sleep } from "./client.js";

export interface RunOptions {
  interval_ms: number;
  duration_ms: number;
  failover_at_ms: number | null;
  json: boolean;
  quiet: boolean;
}

export interface RunSummary {
  guest: string;
  /** Cuts committed. */
  epochs: number;
  released: number;
  output_contiguous: boolean;
  pause_us_p50: number;
  pause_us_max: number;
  /** From the guest's output to its release (its cut committed). */
  release_latency_ms_p50: number;
  release_latency_ms_p99: number;
  /** The failover: the recovery cut and the time from the kill until the group ran again. */
  failover: { cut: number; promote_ms: number } | null;
}

const HOSTS = ["h1", "h2", "h3"];
/** How often released output is collected from the primary. */
const POLL_MS = 5;

export async function runGuest(guestName: string, options: RunOptions, write: (line: string) => void): Promise<RunSummary> {
  const path = resolveGuest(guestName);
  const module = new Uint8Array(await readFile(path));
  const guest = await loadGuest(path);
  const manifest = parseManifest(JSON.stringify({ group: "run", mode: "group", module: path, epoch: { interval_ms: options.interval_ms } }), { source: "cohort run", base_dir: "/" });
  let committed = 0;
  let killedAt: number | null = null;
  let failover: RunSummary["failover"] = null;
  let cut = 0;
  const cluster = new InProcessCluster({
    hosts: HOSTS,
    guest,
    // The failover is the point of --failover-at-ms, and the summary reports it: no warnings on stderr.
    log: pino({ level: "error" }, pino.destination(2)),
    onNotice: (_host, _group, n: Notice) => {
      if (n.kind === "committed") committed = Math.max(committed, n.cut);
      if (n.kind === "cut_chosen") cut = n.cut ?? 0;
      if (n.kind === "resumed" && killedAt !== null) failover = { cut, promote_ms: Number((performance.now() - killedAt).toFixed(1)) };
    },
  });
  const record: ProtectionRecord = {
    group: manifest.group,
    mode: manifest.mode,
    size: 1,
    incarnation: 1,
    leader: HOSTS[0],
    placement: [{ primary: HOSTS[0], backup: HOSTS[1] }],
    failed: [],
    epoch: manifest.epoch,
    limits: manifest.limits,
  };
  const pauses: number[] = [];
  const latencies: number[] = [];
  const watched = new Set<GroupMember>();
  let released = 0;
  let lastSeq = 0;
  let contiguous = true;
  /** Released output of the VM's current primary, and its checkpoint pauses. */
  const collect = () => {
    for (const [host, table] of cluster.tables) {
      const driver = cluster.isLive(host) ? table.get(record.group) : undefined;
      const member = driver?.members.get(0);
      if (!driver || !member) continue;
      if (!watched.has(member)) {
        watched.add(member);
        member.on("captured", (c) => pauses.push(c.pause_us));
      }
      const found = driver.outputLogOf(0);
      if (found?.role !== "primary") continue;
      for (const r of found.log.since(lastSeq + 1)) {
        contiguous &&= r.seq === lastSeq + 1;
        lastSeq = r.seq;
        released++;
        latencies.push(r.released_ms - r.produced_ms);
        if (!options.json && !options.quiet) write(r.text.replace(/\n$/, ""));
      }
    }
  };
  try {
    await cluster.deploy(record, module);
    const started = performance.now();
    while (performance.now() - started < options.duration_ms) {
      await sleep(POLL_MS);
      collect();
      if (options.failover_at_ms !== null && killedAt === null && performance.now() - started >= options.failover_at_ms) {
        killedAt = performance.now();
        await cluster.kill(HOSTS[0]);
        if (!options.json) write(`-- host ${HOSTS[0]} (primary and leader) killed; the backup on ${HOSTS[1]} takes over`);
      }
    }
    collect();
  } finally {
    await cluster.stop();
  }
  if (failover !== null && !options.json) {
    const f = failover as { cut: number; promote_ms: number };
    write(`-- recovered at cut ${f.cut}, running again ${f.promote_ms} ms after the kill`);
  }
  return {
    guest: guestName,
    epochs: committed,
    released,
    output_contiguous: contiguous,
    pause_us_p50: round(percentile(pauses, 0.5), 1),
    pause_us_max: round(percentile(pauses, 1), 1),
    release_latency_ms_p50: round(percentile(latencies, 0.5), 2),
    release_latency_ms_p99: round(percentile(latencies, 0.99), 2),
    failover,
  };
}
