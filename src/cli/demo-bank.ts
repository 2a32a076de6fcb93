/**
 * `cohort demo --scenario bank`: the bank group (examples/bank: rounds of
 * random transfers between every pair of ranks, then a group-wide sum) on a
 * 3-host local cluster in `group` mode; the host holding the primaries of
 * rank 0 (and others) is killed with SIGKILL while transfers run; every
 * rank's released output is checked across the failover: the total is the
 * same in every line, no transfer is applied twice or lost, no round is
 * skipped or repeated.
 */
import { readFile } from "node:fs/promises";
import { hostLogPath, type ClusterFile } from "../cluster/local-cluster.js";
import { parseManifest } from "../cluster/manifest.js";
import { guestPath } from "../guest/examples.js";
import { vmName } from "../host/records.js";
import { locateVm, LogFollower, requestAny, sleep, type FollowedRecord } from "./client.js";
import { withDemoCluster } from "./demo.js";
import { round } from "../util/stats.js";

export interface BankDemoOptions {
  hosts: number;
  size: number;
  /** Before the kill: until every rank released a line (at most `wait_max_ms`), then this long. */
  run_before_kill_ms: number;
  /** At least this long after the kill, and until every rank released a line produced after the recovery (at most `wait_max_ms`). */
  run_after_kill_ms: number;
  /** Longest wait for those lines, before and after the kill (default BANK_WAIT_MAX_MS); past it the checks say what did not happen. */
  wait_max_ms?: number;
  detect_ms: number;
  /** Coordination store of the demo's cluster (src/store/open.ts). */
  store: string;
  /** Called with the running cluster just before the kill (a benchmark reads the hosts then). */
  before_kill?: (cluster: ClusterFile) => void;
  /** Called once the run is over, before the cluster is stopped, with when the deploy was asked for (wall clock). */
  after_run?: (cluster: ClusterFile, deployAt_ms: number) => Promise<void>;
}

/** examples/bank: accounts per rank and their starting balance. */
const ACCOUNTS = 8;
const INITIAL_BALANCE = 1000;
/**
 * Longest wait for every rank's lines: a round of a 256-rank group is 65,280
 * transfers and takes seconds on a small machine, so fixed windows that suit
 * 4 ranks left big groups no time to finish a round and reported them
 * stuck.
 */
export const BANK_WAIT_MAX_MS = 60_000;
const LINE = /^bank round=(\d+) rank=(\d+) balance=(\d+) recv=(\d+) dup=(\d+) total=(\d+)$/;

export interface BankDemoReport {
  scenario: "bank";
  hosts: number;
  size: number;
  mode: "group";
  killed_host: string;
  /** Ranks whose primary was on the killed host (promoted) and the others (rolled back in place). */
  promoted: number[];
  survived: number[];
  failover_ms: number | null;
  /** From the hosts' logs: the recovery cut, and the members that got a full image (a new backup). */
  recovery_cut: number | null;
  images: number[];
  detect_ms: number;
  /** From the deploy's return to the kill. */
  ran_before_kill_ms: number;
  /** Rounds every rank completed per second, over the `run_before_kill_ms` before the kill (from when every rank had released a line). */
  rounds_per_s: number;
  released: number;
  rounds_before_kill: number;
  rounds_after_kill: number;
  lost: number;
  duplicated: number;
  checks: {
    total_conserved: boolean;
    no_duplicate_transfer: boolean;
    rounds_contiguous: boolean;
    resumed_after_kill: boolean;
    new_primary_elsewhere: boolean;
    /** Invariant 6: only members that lost a replica on the killed host moved memory. */
    memory_moved_only_for_lost_replicas: boolean;
    processes_cleaned_up: boolean;
  };
}

export function runBankDemo(options: BankDemoOptions, say: (line: string) => void): Promise<BankDemoReport> {
  return withDemoCluster(options, say, async (cluster, state_dir) => {
    const followers: LogFollower[] = [];
    const { size } = options;
    const vms = Array.from({ length: size }, (_, r) => vmName("bank", r));
    try {
      const manifest = parseManifest(`group: bank\nmode: group\nsize: ${size}\nmodule: ${JSON.stringify(guestPath("bank"))}\n`, { source: "demo", base_dir: "/" });
      const deployAt_ms = Date.now();
      await requestAny(cluster, "deploy", { manifest }, new Uint8Array(await readFile(manifest.module)));
      const before = await Promise.all(vms.map(async (vm) => (await locateVm(cluster, vm))!));
      for (const r of before) say(`${r.vm}: primary ${r.primary}, backup ${r.backup}`);
      const records: FollowedRecord[][] = vms.map(() => []);
      const running = vms.map((vm, rank) => {
        const follower = new LogFollower(cluster, vm, 1, (r) => records[rank].push(r), (line) => say(line));
        followers.push(follower);
        return follower.run().catch((error: Error) => say(`follower ${vm}: ${error.message}`));
      });
      const wait_max_ms = options.wait_max_ms ?? BANK_WAIT_MAX_MS;
      const followedAt = Date.now();
      // Running: every rank released its first line (the group started, every follower follows).
      await until(() => records.every((list) => list.length > 0), followedAt + wait_max_ms);
      const markedAt = Date.now();
      const roundsAtMark = Math.min(...records.map((list) => list.length));
      await sleep(options.run_before_kill_ms);
      const ran_before_kill_ms = Date.now() - followedAt;
      const rounds_per_s = round(((Math.min(...records.map((list) => list.length)) - roundsAtMark) * 1000) / (Date.now() - markedAt), 2);
      options.before_kill?.(cluster);
      const victimId = before[0].primary;
      const victim = cluster.hosts.find((h) => h.id === victimId)!;
      const promoted = before.filter((r) => r.primary === victimId).map((r) => r.rank);
      const survived = before.filter((r) => r.primary !== victimId).map((r) => r.rank);
      const countAtKill = records.map((list) => list.length);
      const killedAt = Date.now();
      process.kill(victim.pid, "SIGKILL");
      say(`killed ${victim.id} (pid ${victim.pid}) with SIGKILL; it held the primaries of ranks ${promoted.join(", ")}`);
      await sleep(options.run_after_kill_ms);
      // Until every rank released a line of an epoch past the recovery cut: produced after the group resumed.
      await until(async () => {
        const cut = (await recoveryFromLogs(state_dir, cluster.hosts.map((h) => h.id)))?.cut;
        return cut != null && records.every((list, rank) => list.slice(countAtKill[rank]).some((r) => r.epoch > cut));
      }, killedAt + wait_max_ms);
      for (const f of followers) f.stop();
      await Promise.all(running);
      await options.after_run?.(cluster, deployAt_ms);
      const after = await Promise.all(vms.map(async (vm) => (await locateVm(cluster, vm))!));

      const total = size * ACCOUNTS * INITIAL_BALANCE;
      let conserved = true;
      let noDuplicate = true;
      let contiguous = true;
      let lost = 0;
      let duplicated = 0;
      const balances = new Map<number, number[]>(); // round -> balance per rank
      records.forEach((list, rank) => {
        let last = 0;
        for (const record of list) {
          const m = LINE.exec(record.text.trim());
          if (!m) {
            contiguous = false;
            continue;
          }
          const [round, r, balance, recv, dup, t] = m.slice(1).map(Number);
          if (r !== rank) contiguous = false;
          if (t !== total) conserved = false;
          if (dup !== 0 || recv !== (size - 1) * round) noDuplicate = false;
          if (round <= last) duplicated++;
          else if (round > last + 1) lost += round - last - 1;
          last = Math.max(last, round);
          const row = balances.get(round) ?? new Array<number>(size).fill(NaN);
          row[rank] = balance;
          balances.set(round, row);
        }
      });
      for (const row of balances.values()) {
        if (row.every((b) => !Number.isNaN(b)) && row.reduce((a, b) => a + b, 0) !== total) conserved = false;
      }
      if (lost || duplicated) contiguous = false;
      const recovery = await recoveryFromLogs(state_dir, cluster.hosts.map((h) => h.id));
      // The first line the group produced after it resumed: epoch above the recovery cut (lines of
      // epochs up to the cut were produced before the kill, some released only by the recovery).
      const resumedLine = (r: FollowedRecord) => (recovery?.cut != null ? r.epoch > recovery.cut : true);
      const firstAfter = records
        .flatMap((list, rank) => list.slice(countAtKill[rank]).filter(resumedLine))
        .sort((a, b) => a.received_ms - b.received_ms)[0];
      const lostReplica = (rank: number) => before[rank].primary === victimId || before[rank].backup === victimId;
      const report: BankDemoReport = {
        scenario: "bank",
        hosts: options.hosts,
        size,
        mode: "group",
        killed_host: victim.id,
        promoted,
        survived,
        failover_ms: firstAfter ? firstAfter.received_ms - killedAt : null,
        recovery_cut: recovery?.cut ?? null,
        images: recovery?.images ?? [],
        detect_ms: options.detect_ms,
        ran_before_kill_ms,
        rounds_per_s,
        released: records.reduce((n, list) => n + list.length, 0),
        rounds_before_kill: Math.min(...countAtKill),
        rounds_after_kill: Math.min(...records.map((list, rank) => list.length - countAtKill[rank])),
        lost,
        duplicated,
        checks: {
          total_conserved: conserved,
          no_duplicate_transfer: noDuplicate && duplicated === 0,
          rounds_contiguous: contiguous,
          resumed_after_kill: records.every((list, rank) => list.length > countAtKill[rank]),
          new_primary_elsewhere: promoted.every((rank) => after[rank].primary !== victimId && after[rank].incarnation > before[rank].incarnation),
          memory_moved_only_for_lost_replicas: recovery !== null && recovery.images.every(lostReplica),
          processes_cleaned_up: false,
        },
      };
      return report;
    } finally {
      for (const f of followers) f.stop();
    }
  });
}

/** Polls `done` every 250 ms until it holds or `deadline_ms` (wall clock) passes. */
async function until(done: () => boolean | Promise<boolean>, deadline_ms: number): Promise<void> {
  while (!(await done()) && Date.now() < deadline_ms) await sleep(250);
}

/** The coordinator's "recovery: cut chosen" line (pino JSON) from the hosts' logs. */
async function recoveryFromLogs(state_dir: string, hosts: string[]): Promise<{ cut: number; images: number[] } | null> {
  for (const id of hosts) {
    const text = await readFile(hostLogPath(state_dir, id), "utf8").catch(() => "");
    for (const line of text.split("\n")) {
      if (!line.includes("recovery: cut chosen")) continue;
      const entry = JSON.parse(line) as { cut: number; images: number[] };
      return { cut: entry.cut, images: entry.images };
    }
  }
  return null;
}
