/**
 * `cohort bench store` (src/bench/store.ts) against a real etcd and the
 * embedded store: every operation ran and was timed, and nothing the
 * benchmark wrote is left in the store.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { runStoreBench, type StoreBenchReport } from "../src/bench/store.js";
import { openStore } from "../src/store/open.js";
import { runCli } from "./support/cli.js";
import { etcdAvailable, useEtcd } from "./support/etcd.js";

function expectMeasured(report: StoreBenchReport): void {
  for (const op of ["put", "cas", "keepalive", "list"] as const) {
    const r = report.results[op];
    expect(r.ops, op).toBeGreaterThan(0);
    expect(r.ops_per_s, op).toBeGreaterThan(0);
    expect(r.latency_ms_p99, op).toBeGreaterThanOrEqual(r.latency_ms_p50);
  }
}

describe.skipIf(!etcdAvailable())("bench store on a real etcd", () => {
  const etcd = useEtcd();

  it("times puts, compare-and-swaps, lease renewals and lists, and leaves nothing behind", async () => {
    const store = openStore(`etcd://${etcd().endpoint}/bench-test`, "");
    try {
      await store.put("keep/me", { x: 1 });
      const report = await runStoreBench({ store, store_name: "etcd", measure_ms: 300, concurrency: 4, list_keys: 10, progress: () => undefined });
      expectMeasured(report);
      expect(await store.list("bench/")).toEqual([]);
      expect((await store.list("")).map((e) => e.key)).toEqual(["keep/me"]);
    } finally {
      await store.close();
    }
  }, 30_000);

  it("the command prints one JSON report on stdout, progress on stderr", async () => {
    const r = await runCli(["bench", "store", "--json", "--store", `etcd://${etcd().endpoint}/bench-cli`, "--measure-ms", "200", "--concurrency", "2", "--list-keys", "5"], { cwd: tmpdir(), env: process.env, limit_ms: 30_000 });
    expect(r.code, r.stderr).toBe(0);
    const report = JSON.parse(r.stdout) as StoreBenchReport;
    expect(report).toMatchObject({ bench: "store", concurrency: 2, list_keys: 5 });
    expectMeasured(report);
    expect(r.stderr).toContain("keepalive");
  }, 30_000);
});

describe("bench store on the embedded store", () => {
  it("times the same operations and removes what it wrote", async () => {
    const dir = await mkdtemp(join(tmpdir(), "cohort-bench-store-test-"));
    const store = openStore("embedded", dir);
    try {
      const report = await runStoreBench({ store, store_name: "embedded", measure_ms: 200, concurrency: 2, list_keys: 5, progress: () => undefined });
      expectMeasured(report);
      expect(await store.list("")).toEqual([]);
    } finally {
      await store.close();
      await rm(dir, { recursive: true, force: true });
    }
  }, 30_000);
});
