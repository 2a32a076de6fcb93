/**
 * Groups on an in-process cluster (src/host/group/in-process.ts): the same
 * core, driver and VM threads as the daemon, with frames handed over in
 * process. What `cohort run` stands on, and a quick check of whole
 * failovers: a single VM (a group of one) and a 4-member bank group, each
 * with the host of a primary killed.
 */
import { afterEach, describe, expect, it } from "vitest";
import { pino } from "pino";
import type { ProtectionRecord } from "../src/core/types.js";
import { InProcessCluster } from "../src/host/group/in-process.js";
import { compileGuest, instrumentCached } from "../src/guest/module-cache.js";
import { builtBytes } from "./support/guests.js";
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { GROUP_BACKUP_THREADS_MAX, GROUP_PRIMARY_THREADS_MAX } from "../src/host/group/driver.js";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { readRecordings, replay } from "../src/sim/replay.js";
import type { ReleasedRecord } from "../src/core/frames.js";

// Epochs of 10 ms throughout (log output does not stretch them past max_interval_ms): the bank
// test's recording then holds enough commits around its failover for the replay to check.
const EPOCH = { interval_ms: 10, min_interval_ms: 2, max_interval_ms: 10 };
const LIMITS = { memory_mib: 64, call_cpu_ms: 1000, output_bytes_max: 1 << 20 };
let cluster: InProcessCluster | null = null;
afterEach(async () => {
  await cluster?.stop();
  cluster = null;
});

async function start(guestName: string, hosts: string[], record_dir?: string): Promise<{ c: InProcessCluster; module: Uint8Array }> {
  const module = builtBytes(guestName);
  const guest = await compileGuest(await instrumentCached(module, null));
  cluster = new InProcessCluster({ hosts, guest, log: pino({ level: "error" }), record_dir });
  return { c: cluster, module };
}

/** Released output of `rank` on whichever live host holds its primary, from `from_seq`. */
function releasedOf(c: InProcessCluster, group: string, rank: number, from_seq = 1): ReleasedRecord[] {
  for (const [host, table] of c.tables) {
    const found = c.isLive(host) ? table.get(group)?.outputLogOf(rank) : undefined;
    if (found?.role === "primary") return found.log.since(from_seq);
  }
  return [];
}

async function until(what: string, check: () => boolean, limit_ms = 10_000): Promise<void> {
  const started = Date.now();
  while (!check()) {
    if (Date.now() - started > limit_ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

describe("groups on an in-process cluster", () => {
  it("a host's prepared replicas of a given-up deploy attempt: a later attempt supersedes them, the same or an older one is refused, a started group is never replaced", async () => {
    const { c, module } = await start("ticker", ["h1", "h2"]);
    const table = c.tables.get("h1")!;
    const attempt = (incarnation: number): ProtectionRecord => ({ group: "t", mode: "group", size: 1, incarnation, leader: "h1", placement: [{ primary: "h1", backup: "h2" }], failed: [], epoch: EPOCH, limits: LIMITS });
    await table.prepare(attempt(1), module);
    await expect(table.prepare(attempt(1), module)).rejects.toThrow(/already has replicas/);
    await table.prepare(attempt(2), module);
    expect(table.get("t")!.record.incarnation).toBe(2);
    await expect(table.prepare(attempt(1), module)).rejects.toThrow(/already has replicas/);
    expect(await table.abort("t", 1)).toBe(false); // not the attempt it holds
    table.get("t")!.run([null]);
    await expect(table.prepare(attempt(3), module)).rejects.toThrow(/already has replicas/);
    expect(await table.abort("t", 2)).toBe(false); // started: only its protocol stops it
    expect(table.get("t")!.hasStarted).toBe(true);
  });

  it("a host that fails while a deploy has the group only prepared is the deploy's to handle: the prepared replicas decide no failover", async () => {
    const { c, module } = await start("ticker", ["h1", "h2", "h3"]);
    const record: ProtectionRecord = { group: "p", mode: "group", size: 2, incarnation: 1, leader: "h1", placement: [{ primary: "h1", backup: "h2" }, { primary: "h2", backup: "h1" }], failed: [], epoch: EPOCH, limits: LIMITS };
    await c.store.put("protection/p", record);
    await c.tables.get("h1")!.prepare(record, module);
    await c.tables.get("h2")!.prepare(record, module);
    await c.kill("h2");
    // Time for a decision that must not come (a prepared core that reacted proposed at once and wrote within a few ms).
    await new Promise((r) => setTimeout(r, 500));
    // No decision of its own: the record is the deploy's attempt 1, and h1 still holds that attempt, unstarted, for the deploy to abort.
    expect((await c.store.get<ProtectionRecord>("protection/p"))!.value).toMatchObject({ incarnation: 1, failed: [] });
    expect(c.tables.get("h1")!.get("p")!.hasStarted).toBe(false);
    expect(await c.tables.get("h1")!.abort("p", 1)).toBe(true);
  });

  it("a single VM: output released in order, and it continues with no gap or duplicate after its primary's host dies", async () => {
    const { c, module } = await start("ticker", ["h1", "h2", "h3"]);
    const record: ProtectionRecord = { group: "t", mode: "group", size: 1, incarnation: 1, leader: "h1", placement: [{ primary: "h1", backup: "h2" }], failed: [], epoch: EPOCH, limits: LIMITS };
    await c.deploy(record, module);
    const seen: ReleasedRecord[] = [];
    const collect = () => seen.push(...releasedOf(c, "t", 0, (seen.at(-1)?.seq ?? 0) + 1));
    await until("output", () => (collect(), seen.length >= 20));
    await c.kill("h1");
    const atKill = seen.length;
    await until("output after the failover", () => (collect(), seen.length >= atKill + 20));
    expect(seen.map((r) => r.seq)).toEqual(seen.map((_, i) => i + 1));
    expect(seen.map((r) => Number(r.text.trim()))).toEqual(seen.map((_, i) => i + 1));
    const now = (await c.store.get<ProtectionRecord>("protection/t"))!.value;
    expect(now).toMatchObject({ incarnation: 2, leader: "h2", placement: [{ primary: "h2", backup: "h3" }], failed: ["h1"] });
  });

  it("a group's replicas on a host share its thread pools: 12 bank VMs over 2 hosts start a few threads, not 24, and every rank runs", async () => {
    const { c, module } = await start("bank", ["h1", "h2"]);
    const threads = () => readdirSync("/proc/self/task").length;
    const before = threads();
    const size = 12;
    const placement = Array.from({ length: size }, (_, rank) => (rank % 2 === 0 ? { primary: "h1", backup: "h2" } : { primary: "h2", backup: "h1" }));
    await c.deploy({ group: "pooled", mode: "group", size, incarnation: 1, leader: "h1", placement, failed: [], epoch: EPOCH, limits: LIMITS }, module);
    // Per host: the primaries' pool and the backups' (no spare threads in this process).
    expect(threads() - before).toBeLessThanOrEqual(2 * (GROUP_PRIMARY_THREADS_MAX + GROUP_BACKUP_THREADS_MAX));
    await until("a released round on every rank", () => Array.from({ length: size }, (_, rank) => releasedOf(c, "pooled", rank).length).every((n) => n > 0));
  });

  it("a bank group of 4: the total never changes and no round repeats or goes missing across a failover; its recorded core events replay, and a tampered recording is caught", async () => {
    const recordings = mkdtempSync(join(tmpdir(), "cohort-rec-"));
    const { c, module } = await start("bank", ["h1", "h2", "h3"], recordings);
    const placement = [
      { primary: "h1", backup: "h2" },
      { primary: "h2", backup: "h3" },
      { primary: "h3", backup: "h1" },
      { primary: "h1", backup: "h3" },
    ];
    const record: ProtectionRecord = { group: "b", mode: "group", size: 4, incarnation: 1, leader: "h2", placement, failed: [], epoch: EPOCH, limits: LIMITS };
    await c.deploy(record, module);
    const LINE = /^bank round=(\d+) rank=(\d+) balance=(\d+) recv=(\d+) dup=(\d+) total=(\d+)$/;
    const seen: ReleasedRecord[][] = [[], [], [], []];
    const collect = () => seen.forEach((list, rank) => list.push(...releasedOf(c, "b", rank, (list.at(-1)?.seq ?? 0) + 1)));
    await until("rounds", () => (collect(), seen.every((l) => l.length >= 10)));
    await c.kill("h1"); // primaries of ranks 0 and 3, backups of 0 and 2
    const atKill = seen.map((l) => l.length);
    await until("rounds after the failover", () => (collect(), seen.every((l, r) => l.length >= atKill[r] + 10)));
    const totals = new Set<number>();
    seen.forEach((list, rank) => {
      const rounds = list.map((r) => {
        const m = LINE.exec(r.text.trim());
        expect(m, r.text).not.toBeNull();
        const [round, rk, , recv, dup, total] = m!.slice(1).map(Number);
        expect(rk).toBe(rank);
        expect(dup).toBe(0); // no transfer delivered twice
        expect(recv).toBe(3 * round); // none lost
        totals.add(total);
        return round;
      });
      expect(rounds).toEqual(rounds.map((_, i) => i + 1));
    });
    expect(totals.size).toBe(1);
    await c.stop();
    await new Promise((r) => setTimeout(r, 100)); // the recorders' last writes
    const recorded = readRecordings(recordings);
    const clean = replay(recorded);
    expect(clean).toMatchObject({ files: 3, mismatches: [], violations: [], recoveries: 1 });
    expect(clean.commits).toBeGreaterThan(10);
    // The leader (h2) loses the acks of one rank's backup: replay answers other actions, and the
    // commits the recording shows without every ack are output commit violations.
    const leader = recorded.get("h2-b.jsonl")!;
    const tampered = new Map(recorded);
    tampered.set("h2-b.jsonl", leader.filter((l) => !(l.kind === "step" && l.event.type === "frame" && l.event.frame.k === "staged" && l.event.frame.rank === 1)));
    const caught = replay(tampered);
    expect(caught.mismatches.length).toBeGreaterThan(0);
    expect(caught.violations.some((v) => v.invariant === "inv1")).toBe(true);
    rmSync(recordings, { recursive: true, force: true });
  });
  it("deltas go back to their VM threads once sent: each primary's captures reuse a few pooled buffers (group and vm mode)", async () => {
    const { c, module } = await start("ticker", ["h1", "h2"]);
    for (const mode of ["group", "vm"] as const) {
      const group = `p-${mode}`;
      const record: ProtectionRecord = { group, mode, size: 1, incarnation: 1, leader: "h1", placement: [{ primary: "h1", backup: "h2" }], failed: [], epoch: EPOCH, limits: LIMITS };
      await c.deploy(record, module);
      const member = c.tables.get("h1")!.get(group)!.members.get(0)!;
      await until(`40 checkpoints in ${mode} mode`, () => member.committed >= 40);
      const pool = (await member.vm.status()).delta_pool!;
      expect(pool.taken).toBeGreaterThanOrEqual(40);
      // Deltas in flight when asked are still lent; the rest came back and were lent again.
      expect(pool.allocated).toBeLessThanOrEqual(4);
      expect(pool.reused).toBeGreaterThanOrEqual(pool.taken - 4);
      expect(pool.returned + pool.lent).toBe(pool.taken);
      expect(pool.forgotten).toBe(0);
    }
  });
});
