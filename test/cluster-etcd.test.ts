/**
 * Real host processes on a real etcd (test/support/etcd.ts): the bank group's
 * failover after a `kill -9` is decided through etcd, with the same checks as
 * on the embedded store (test/cluster-group.test.ts), and what the hosts
 * recorded is in etcd, not in files.
 */
import { spawnSync } from "node:child_process";
import { existsSync, readdirSync } from "node:fs";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Etcd3 } from "etcd3";
import { afterEach, describe, expect, it } from "vitest";
import { LogFollower, requestAny, type FollowedRecord } from "../src/cli/client.js";
import { runBankDemo } from "../src/cli/demo-bank.js";
import { parseManifest } from "../src/cluster/manifest.js";
import { hostStateDir } from "../src/cluster/local-cluster.js";
import { guestPath } from "../src/guest/examples.js";
import { etcdAvailable, useEtcd } from "./support/etcd.js";
import { BANK_CHECKS_ALL_TRUE, startCluster, stopClusters, waitFor } from "./support/cluster.js";
import { HOST_DEFAULTS } from "../src/host/host.js";

// The product's default detector: a deploy that starts many VM threads must not look like a crash.
const DETECT_MS = HOST_DEFAULTS.detect_ms;

describe.skipIf(!etcdAvailable())("a cluster on etcd (real processes, kill -9)", () => {
  const etcd = useEtcd();
  afterEach(stopClusters);

  it("the CLI learns the cluster from the hosts over TCP: `status` works with the store it names unreachable, and no store file exists", async () => {
    const { dir, cluster: c, store } = await startCluster(2, DETECT_MS, `etcd://${etcd().endpoint}/status-test`);
    try {
      expect(c.store).toBe(`etcd://${etcd().endpoint}/status-test`);
      const module = guestPath("kv");
      const manifest = parseManifest(`group: kv\nmode: group\nsize: 2\nmodule: ${JSON.stringify(module)}\n`, { source: "test", base_dir: "/" });
      await requestAny(c, "deploy", { manifest }, new Uint8Array(await readFile(module)));
      // cluster.json now names a store nobody can reach: a CLI that opened the store itself would fail.
      const file = join(dir, "cluster.json");
      await writeFile(file, JSON.stringify({ ...JSON.parse(await readFile(file, "utf8")), store: "etcd://127.0.0.1:1/nowhere" }));
      const status = spawnSync(process.execPath, ["bin/cohort.js", "status", "--json", "--state-dir", dir], { encoding: "utf8" });
      expect(status.stderr).toBe("");
      const report = JSON.parse(status.stdout) as { hosts: { up: boolean }[]; groups: { group: string; vms: { vm: string; primary: string }[] }[] };
      expect(report.hosts.map((h) => h.up)).toEqual([true, true]);
      expect(report.groups.map((g) => g.group)).toEqual(["kv"]);
      expect(report.groups[0].vms.map((v) => v.vm)).toEqual(["kv-0", "kv-1"]);
      expect((await store.get<{ primary: string }>("vms/kv-0"))!.value.primary).toBe(report.groups[0].vms[0].primary);
      expect(existsSync(join(dir, "store"))).toBe(false); // the hosts, `up` and the CLI wrote no embedded store
      // Nothing shared on disk: each host instrumented the module into its own state directory's cache.
      expect(existsSync(join(dir, "cache"))).toBe(false);
      for (const h of c.hosts) expect(readdirSync(join(hostStateDir(dir, h.id), "cache")).length).toBeGreaterThan(0);
    } finally {
      await store.close();
    }
  }, 60_000);

  it("etcd stopped under a running cluster: the group keeps running and releasing; a failure meanwhile is decided once etcd is back", async () => {
    const { cluster: c, store } = await startCluster(3, DETECT_MS, `etcd://${etcd().endpoint}/outage`);
    const records: FollowedRecord[] = [];
    let follower: LogFollower | null = null;
    try {
      const module = guestPath("ticker");
      const manifest = parseManifest(`group: ticker\nmode: vm\nmodule: ${JSON.stringify(module)}\n`, { source: "test", base_dir: "/" });
      await requestAny(c, "deploy", { manifest }, new Uint8Array(await readFile(module)));
      const before = (await store.get<{ primary: string; backup: string; incarnation: number }>("vms/ticker-0"))!.value;
      follower = new LogFollower(c, "ticker-0", 1, (r) => records.push(r));
      const following = follower.run().catch(() => undefined);
      await waitFor(() => records.length >= 20, 10_000, "output before the outage");

      // etcd down: the store is on no per-epoch path, so output keeps being released.
      await etcd().stop();
      const atStop = records.length;
      await new Promise((r) => setTimeout(r, 3000));
      expect(records.length).toBeGreaterThan(atStop + 50); // the ticker logs every 20 ms

      // The primary's host dies while etcd is down: nobody can decide, so nothing is promoted yet...
      const victim = c.hosts.find((h) => h.id === before.primary)!;
      process.kill(victim.pid, "SIGKILL");
      // What the killed host released just before may still be in the follower's socket: let it arrive.
      await new Promise((r) => setTimeout(r, 100));
      const atKill = follower.lastSeq;
      await new Promise((r) => setTimeout(r, 2 * DETECT_MS + 500));
      expect(follower.lastSeq).toBe(atKill);
      // ...and once etcd is back, the failover is decided and the output continues with no gap.
      await etcd().restart();
      await waitFor(() => follower!.lastSeq > atKill + 20, 20_000, "output after etcd came back");
      const after = (await store.get<{ primary: string; incarnation: number }>("vms/ticker-0"))!.value;
      expect(after.primary).toBe(before.backup);
      expect(after.incarnation).toBe(before.incarnation + 1);
      follower.stop();
      await following;
      records.forEach((r, i) => expect(r.seq).toBe(i + 1));
    } finally {
      follower?.stop();
      if (!etcd().pid || etcd().pid < 0) await etcd().restart();
      await store.close();
    }
  }, 90_000);

  it("bank: the failover is decided through etcd; total conserved, nothing lost or applied twice", async () => {
    const report = await runBankDemo(
      { hosts: 3, size: 4, run_before_kill_ms: 1500, run_after_kill_ms: 2500, detect_ms: DETECT_MS, store: `etcd://${etcd().endpoint}/it` },
      () => undefined,
    );
    expect(report.checks).toEqual(BANK_CHECKS_ALL_TRUE);
    expect(report.rounds_after_kill).toBeGreaterThan(3);
    // The decision is in etcd: the group's record (under the demo's own prefix) moved to a new incarnation.
    const raw = new Etcd3({ hosts: `http://${etcd().endpoint}` });
    try {
      const all = await raw.getAll().prefix("it/").strings();
      const keys = Object.keys(all).filter((k) => /^it\/demo-[a-z0-9-]+\/protection\/bank$/.test(k));
      expect(keys).toHaveLength(1);
      const record = JSON.parse(all[keys[0]]) as { version: number; value: { incarnation: number } };
      expect(record.value.incarnation).toBeGreaterThanOrEqual(2);
      const prefix = keys[0].slice(0, -"protection/bank".length);
      expect(Object.keys(all)).toEqual(expect.arrayContaining([`${prefix}groups/bank`, `${prefix}vms/bank-0`]));
    } finally {
      raw.close();
    }
  }, 60_000);
});
