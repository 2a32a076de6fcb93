/**
 * `cohort bench scale` (src/bench/scale.ts) on a small cluster: a 2-VM group
 * on 3 real host processes, deployed cold and then with the cold run's module
 * cache, then the bank scenario with its kill -9. Checks that what it reports
 * is what happened (every replica counted on its host, the cached run read
 * the module from the cache, the hosts grew by the VMs' threads, the peer
 * links counted, the failover's checks held), not how fast it was.
 */
import { describe, expect, it } from "vitest";
import { runScaleBench } from "../src/bench/scale.js";
import { GROUP_BACKUP_THREADS_MAX, GROUP_PRIMARY_THREADS_MAX } from "../src/host/group/driver.js";
// The group's threads come from the hosts' spares, replaced once none was taken for this long: counted after it.
import { SPARES_REFILL_QUIET_MS } from "../src/vm/vm.js";

/**
 * The idle window: /proc counts CPU in 10 ms ticks, and three idle hosts use
 * about 1.5 % of a core each (docs/SIZING.md), about 2 ticks in 500 ms,
 * sometimes none: long enough to count some.
 */
const IDLE_MS = 2000;

describe("bench scale", () => {
  it("deploys a group cold and cached, and reports its replicas, memory, threads, stalls and failovers per host", async () => {
    const report = await runScaleBench({ sizes: [2], hosts: 3, guest: "kv", mode: "group", settle_ms: SPARES_REFILL_QUIET_MS + 500, idle_ms: IDLE_MS, bank_before_kill_ms: 1500, bank_after_kill_ms: 2000, progress: () => undefined });
    const { cold, cached, bank } = report.runs.vms_2;
    for (const run of [cold, cached]) {
      expect(run.error).toBeNull();
      expect(run.logs_kept_in).toBeNull();
      expect(run.deploy_ms).toBeGreaterThan(0);
      expect(run.healthy).toBe(true);
      expect(run.vms_failed_over).toBe(0);
      expect(run.hosts.map((h) => h.id).sort()).toEqual(["h1", "h2", "h3"]);
      // Placement spreads a primary and a backup over the two hosts for each VM.
      expect(run.hosts.reduce((n, h) => n + h.primaries, 0)).toBe(2);
      expect(run.hosts.reduce((n, h) => n + h.backups, 0)).toBe(2);
      for (const h of run.hosts) {
        expect(h.rss_mib_after).toBeGreaterThan(0);
        // The group's thread pools on this host: at least one thread where it holds a replica, at most
        // the pools' maximum (plus the instrumenter thread of a cold deploy).
        const grown = h.threads_after - h.threads_before;
        if (h.primaries + h.backups > 0) expect(grown).toBeGreaterThanOrEqual(1);
        expect(grown).toBeLessThanOrEqual(Math.min(h.primaries, GROUP_PRIMARY_THREADS_MAX) + Math.min(h.backups, GROUP_BACKUP_THREADS_MAX) + 1);
        expect(h.stall_ms_max).toBeGreaterThanOrEqual(0);
        // Lateness from the deploy on is part of the lateness since the host started.
        expect(h.late_ms_max_from_deploy).toBeLessThanOrEqual(h.delay_ms_max + 1);
      }
      expect(run.threads_per_vm).toBeGreaterThan(0);
      // Every pair of the 3 hosts keeps peer links (one each way), and the VMs' message paths add theirs.
      expect(run.connections).toBeGreaterThanOrEqual(6);
      expect(run.connections_per_host_pair_max).toBeGreaterThanOrEqual(2);
      expect(run.idle_cpu_pct).toBeGreaterThan(0);
    }
    // The bank scenario at the same size: it ran, failed over after the kill, and every check held.
    expect(bank.error).toBeNull();
    expect(bank.checks_ok).toBe(true);
    expect(bank.failover_ms).toBeGreaterThan(0);
    // The surviving hosts were read before the bank's cluster stopped.
    expect(bank.late_ms_max).not.toBeNull();
    expect(bank.rounds_per_s).toBeGreaterThan(0);
    const [summary] = report.results;
    // Peer links between the 3 hosts, plus the message path between the bank's two VMs (on two hosts).
    expect(bank.connections).toBeGreaterThan(6);
    expect(summary).toMatchObject({ vms: 2, deploy_ms: cached.deploy_ms, deploy_cold_ms: cold.deploy_ms, failover_ms: bank.failover_ms, connections: bank.connections, false_failovers: 0, bank_checks_ok: true });
    // On one machine the hosts share the cache directory: the first to need the module instruments it.
    expect(["instrumented", "mixed"]).toContain(cold.module);
    expect(cached.module).toBe("cache");
  }, 120_000);
});
