/**
 * Protected groups across real host processes (real TCP, real `kill -9`):
 * group failover with exactly-once messages and rollback in place, a group of
 * 16 VMs, and what `vm` mode does that `group` mode must not (hold peer
 * messages until the sender's checkpoint commits).
 */
import { afterEach, describe, expect, it } from "vitest";
import { readFile } from "node:fs/promises";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { ClusterFile } from "../src/cluster/local-cluster.js";
import { parseManifest } from "../src/cluster/manifest.js";
import { guestPath } from "../src/guest/examples.js";
import { vmKey, type VmRecord } from "../src/host/records.js";
import { locateVm, LogFollower, requestAny, type FollowedRecord } from "../src/cli/client.js";
import { runBankDemo } from "../src/cli/demo-bank.js";
import type { GroupStatus } from "../src/host/group/driver.js";
import { readRecordings, replay } from "../src/sim/replay.js";
import { BANK_CHECKS_ALL_TRUE, startCluster, stopClusters, waitFor } from "./support/cluster.js";
import { HOST_DEFAULTS } from "../src/host/host.js";
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { hostCommand } from "../src/cli/demo.js";

// The product's default detector: a deploy that starts many VM threads must not look like a crash.
const DETECT_MS = HOST_DEFAULTS.detect_ms;
afterEach(stopClusters);

const cluster = (hosts: number) => startCluster(hosts, DETECT_MS);

async function deploy(c: ClusterFile, group: string, guest: string, mode: string, size: number): Promise<void> {
  const module = guestPath(guest);
  const manifest = parseManifest(`group: ${group}\nmode: ${mode}\nsize: ${size}\nmodule: ${JSON.stringify(module)}\n`, { source: "test", base_dir: "/" });
  await requestAny(c, "deploy", { manifest }, new Uint8Array(await readFile(module)));
}

async function groupStatus(c: ClusterFile, group: string): Promise<GroupStatus[]> {
  const all = await Promise.all(c.hosts.map((h) => requestAny(c, "status", {}, undefined, h.id)));
  return all.flatMap((s) => s.groups.filter((g) => g.group === group));
}

/** The store's record of `vm` (where its primary is), as a host reads it. */
async function recordOf(c: ClusterFile, vm: string): Promise<VmRecord> {
  return (await locateVm(c, vm))!;
}

describe("group failover (real processes, kill -9)", () => {
  it("bank: the total never changes, no transfer is lost or applied twice, survivors roll back in place; the hosts' recorded core events replay to the same actions", async () => {
    // The hosts (started by the demo, inheriting this environment) record their cores' events.
    const recordings = mkdtempSync(join(tmpdir(), "cohort-rec-"));
    process.env.COHORT_RECORD_CORE_EVENTS = recordings;
    let report: Awaited<ReturnType<typeof runBankDemo>>;
    try {
      report = await runBankDemo({ hosts: 3, size: 4, run_before_kill_ms: 1500, run_after_kill_ms: 2500, detect_ms: DETECT_MS, store: "embedded" }, () => undefined);
    } finally {
      delete process.env.COHORT_RECORD_CORE_EVENTS;
    }
    expect(report.checks).toEqual(BANK_CHECKS_ALL_TRUE);
    expect(report.promoted.length).toBeGreaterThan(0);
    expect(report.survived.length).toBeGreaterThan(0);
    expect(report.rounds_before_kill).toBeGreaterThan(3);
    expect(report.rounds_after_kill).toBeGreaterThan(3);
    expect(report.recovery_cut).toBeGreaterThan(0);
    // The daemon really drives the core: each host's recorded events give exactly its recorded
    // actions again, and the protocol-level invariants hold across the hosts (the killed host's
    // recording ends where kill -9 cut it).
    const replayed = replay(readRecordings(recordings));
    rmSync(recordings, { recursive: true, force: true });
    expect(replayed.files).toBe(3);
    expect(replayed.mismatches).toEqual([]);
    expect(replayed.violations).toEqual([]);
    expect(replayed.recoveries).toBe(1);
    expect(replayed.commits).toBeGreaterThan(10);
    expect(replayed.releases_checked).toBeGreaterThan(10);
  }, 40_000);

  it("a group of 16 VMs over 3 hosts: allreduce rounds stay exact and contiguous across a failover", async () => {
    const { cluster: c, store } = await cluster(3);
    const size = 16;
    await deploy(c, "wide", "allreduce", "group", size);
    const records: FollowedRecord[][] = [];
    const followers: LogFollower[] = [];
    const done: Promise<unknown>[] = [];
    for (let r = 0; r < size; r++) {
      const list: FollowedRecord[] = [];
      records.push(list);
      const f = new LogFollower(c, `wide-${r}`, 1, (x) => list.push(x), () => undefined);
      followers.push(f);
      done.push(f.run().catch(() => undefined));
    }
    await waitFor(() => records.every((l) => l.length >= 5), 20_000, "5 rounds on every rank");
    const before = (await store.get<VmRecord>(vmKey("wide-0")))!.value;
    const victim = c.hosts.find((h) => h.id === before.primary)!;
    const atKill = records.map((l) => l.length);
    process.kill(victim.pid, "SIGKILL");
    // Rounds the victim released just before may still arrive: count from the failover's record on.
    await waitFor(async () => (await store.get<VmRecord>(vmKey("wide-0")))!.value.incarnation > before.incarnation, 20_000, "the failover's record");
    const atFailover = records.map((l, r) => Math.max(l.length, atKill[r]));
    await waitFor(() => records.every((l, r) => l.length >= atFailover[r] + 5), 20_000, "5 more rounds on every rank after the failover");
    for (const f of followers) f.stop();
    await Promise.all(done);
    const expectedSum = (k: number) => (k * size * (size + 1)) / 2;
    records.forEach((list) => {
      list.forEach((rec, i) => {
        expect(rec.text.trim()).toBe(`round ${i + 1} sum ${expectedSum(i + 1)}`);
      });
    });
    const after = (await store.get<VmRecord>(vmKey("wide-0")))!.value;
    expect(after.primary).not.toBe(victim.id);
    expect(after.incarnation).toBe(before.incarnation + 1);
    await store.close();
  }, 60_000);
});

describe("a released log longer than one reply", () => {
  it("`cohort logs` prints all of it in order, and a follower from seq 1 gets all of it", async () => {
    const { cluster: c, dir } = await cluster(2);
    await deploy(c, "long", "allreduce", "none", 2);
    // ~110 bytes of JSON per record: 12,000 records are well past a 1 MiB message header.
    const released = async () => (await Promise.all(c.hosts.map((h) => requestAny(c, "status", {}, undefined, h.id)))).flatMap((s) => s.primaries).find((p) => p.vm === "long-0")?.released_seq ?? 0;
    await waitFor(async () => (await released()) >= 12_000, 30_000, "12,000 released records");
    const { stdout } = await promisify(execFile)(process.execPath, [hostCommand()[1], "logs", "long-0", "--state-dir", dir], { maxBuffer: 64 << 20 });
    const lines = stdout.trimEnd().split("\n");
    expect(lines.length).toBeGreaterThanOrEqual(12_000);
    lines.forEach((line, i) => expect(line).toBe(`round ${i + 1} sum ${3 * (i + 1)}`));
    const followed: FollowedRecord[] = [];
    const follower = new LogFollower(c, "long-0", 1, (r) => followed.push(r), () => undefined);
    const running = follower.run();
    await waitFor(() => followed.length >= lines.length + 100, 20_000, "the follower past what `cohort logs` printed");
    follower.stop();
    await running;
    followed.forEach((r, i) => expect(r.seq).toBe(i + 1));
  }, 60_000);
});

describe("modes: what leaves a VM before its checkpoint commits", () => {
  for (const mode of ["vm", "group"] as const) {
    it(`${mode} mode ${mode === "vm" ? "holds every peer message until the sender's checkpoint commits" : "sends peer messages at once"}`, async () => {
      const { cluster: c, store } = await cluster(2);
      await store.close();
      await deploy(c, "pp", "pingpong", mode, 2);
      let sent = { before: 0, after: 0, held: 0 };
      await waitFor(
        async () => {
          const primaries = (await groupStatus(c, "pp")).flatMap((g) => g.primaries);
          sent = primaries.reduce((a, p) => ({ before: a.before + p.sent_before_commit, after: a.after + p.sent_after_commit, held: a.held + p.held_total }), { before: 0, after: 0, held: 0 });
          return sent.before + sent.after > 50;
        },
        15_000,
        "50 peer messages",
      );
      if (mode === "vm") {
        expect(sent.before).toBe(0);
        expect(sent.held).toBeGreaterThan(0);
      } else {
        expect(sent.held).toBe(0);
        // Unbuffered: nearly every message leaves while its epoch is still uncommitted.
        expect(sent.before).toBeGreaterThan(sent.after);
      }
      const stats = JSON.parse((await requestAny(c, "vm_request", { vm: "pp-0", text: "stats" }, undefined, (await recordOf(c, "pp-0")).primary)).reply) as { round_trips: number };
      expect(stats.round_trips).toBeGreaterThan(0);
    }, 30_000);
  }
});
