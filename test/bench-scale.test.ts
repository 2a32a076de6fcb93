/**
 * `cohort bench scale` (src/bench/scale.ts) on the smallest cluster that has
 * backups: a 2-VM group on 2 real host processes, deployed cold and then with
 * the cold run's module cache. Checks that what it reports is what happened
 * (every replica counted on its host, the cached run read the module from the
 * cache, the hosts grew by the VMs' threads), not how fast it was.
 */
import { describe, expect, it } from "vitest";
import { runScaleBench } from "../src/bench/scale.js";

describe("bench scale", () => {
  it("deploys a group cold and cached, and reports its replicas, memory, threads, stalls and failovers per host", async () => {
    const report = await runScaleBench({ sizes: [2], hosts: 2, guest: "kv", mode: "group", settle_ms: 300, progress: () => undefined });
    const { cold, cached } = report.results.vms_2;
    for (const run of [cold, cached]) {
      expect(run.error).toBeNull();
      expect(run.logs_kept_in).toBeNull();
      expect(run.deploy_ms).toBeGreaterThan(0);
      expect(run.healthy).toBe(true);
      expect(run.vms_failed_over).toBe(0);
      expect(run.hosts.map((h) => h.id).sort()).toEqual(["h1", "h2"]);
      // Placement spreads a primary and a backup over the two hosts for each VM.
      expect(run.hosts.reduce((n, h) => n + h.primaries, 0)).toBe(2);
      expect(run.hosts.reduce((n, h) => n + h.backups, 0)).toBe(2);
      for (const h of run.hosts) {
        expect(h.rss_mib_after).toBeGreaterThan(0);
        // A primary's VM thread and a backup's thread at least, on every host that holds them.
        expect(h.threads_after - h.threads_before).toBeGreaterThanOrEqual(h.primaries + h.backups);
        expect(h.stall_ms_max).toBeGreaterThanOrEqual(0);
      }
      expect(run.threads_per_vm).toBeGreaterThanOrEqual(2);
    }
    // On one machine the hosts share the cache directory: the first to need the module instruments it.
    expect(["instrumented", "mixed"]).toContain(cold.module);
    expect(cached.module).toBe("cache");
  }, 60_000);
});
