/**
 * Real host processes on a real etcd (test/support/etcd.ts): the bank group's
 * failover after a `kill -9` is decided through etcd, with the same checks as
 * on the embedded store (test/cluster-group.test.ts), and what the hosts
 * recorded is in etcd, not in files.
 */
import { Etcd3 } from "etcd3";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runBankDemo } from "../src/cli/demo-bank.js";
import { etcdAvailable, startEtcd, type RunningEtcd } from "./support/etcd.js";

// As in the other multi-process group tests: VM threads booting on a 2-core machine must not look like a crash.
const DETECT_MS = 1000;

describe.skipIf(!etcdAvailable())("a cluster on etcd (real processes, kill -9)", () => {
  let etcd: RunningEtcd;
  beforeAll(async () => {
    etcd = await startEtcd();
  }, 30_000);
  afterAll(async () => {
    await etcd?.destroy();
  });

  it("bank: the failover is decided through etcd; total conserved, nothing lost or applied twice", async () => {
    const report = await runBankDemo(
      { hosts: 3, size: 4, run_before_kill_ms: 1500, run_after_kill_ms: 2500, detect_ms: DETECT_MS, store: `etcd://${etcd.endpoint}/it` },
      () => undefined,
    );
    expect(report.checks).toEqual({
      total_conserved: true,
      no_duplicate_transfer: true,
      rounds_contiguous: true,
      resumed_after_kill: true,
      new_primary_elsewhere: true,
      memory_moved_only_for_lost_replicas: true,
      processes_cleaned_up: true,
    });
    expect(report.rounds_after_kill).toBeGreaterThan(3);
    // The decision is in etcd: the group's record (under the demo's own prefix) moved to a new incarnation.
    const raw = new Etcd3({ hosts: `http://${etcd.endpoint}` });
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
