/**
 * The failure detector on an idle cluster: no host is ever suspected while
 * all are alive, and a real `kill -9` is still found. CI runs a short soak
 * at the default timeout; COHORT_SOAK_MS=300000 runs the 5-minute one and
 * COHORT_SOAK_DETECT_MS=100 the lowest setting (README, "Tests").
 *
 * Then a host's main thread held busy (fault injection: SIGUSR2 with
 * $COHORT_FAULT_BLOCK_MAIN_MS): for 1 s, less than the wedge bound, its
 * heartbeat thread beats on and nobody fails it over; for 4 s its beats stop
 * at the bound and its peers fail it over before it is back.
 */
import { readFile } from "node:fs/promises";
import { afterEach, describe, expect, it } from "vitest";
import { hostLogPath } from "../src/cluster/local-cluster.js";
import { parseManifest } from "../src/cluster/manifest.js";
import { guestPath } from "../src/guest/examples.js";
import { requestAny, sleep } from "../src/cli/client.js";
import { startCluster, stopClusters, waitFor } from "./support/cluster.js";
import { HOST_DEFAULTS } from "../src/host/host.js";
import { mainLoopWedgedMs } from "../src/host/beat-thread.js";

const SOAK_MS = Number(process.env.COHORT_SOAK_MS ?? 15_000);
const DETECT_MS = Number(process.env.COHORT_SOAK_DETECT_MS ?? HOST_DEFAULTS.detect_ms);
afterEach(stopClusters);

describe("failure detector soak", () => {
  it(`${DETECT_MS} ms detector, idle protected group, ${SOAK_MS} ms: no false suspicion, no failover; a kill -9 is still found`, async () => {
    const { dir, cluster: c } = await startCluster(3, DETECT_MS);
    const module = guestPath("kv");
    const manifest = parseManifest(`group: idle\nmode: group\nsize: 3\nmodule: ${JSON.stringify(module)}\n`, { source: "test", base_dir: "/" });
    await requestAny(c, "deploy", { manifest }, new Uint8Array(await readFile(module)));
    const logs = async () => (await Promise.all(c.hosts.map((h) => readFile(hostLogPath(dir, h.id), "utf8")))).join("\n");
    const suspicions = (text: string) => text.split("\n").filter((l) => /"msg":"(peer failed|host suspected|this host stalled[^"]*)"/.test(l));
    await sleep(SOAK_MS);
    expect(suspicions(await logs())).toEqual([]);
    const { vms } = await requestAny(c, "records", {});
    expect(vms.filter((v) => v.group === "idle").map((v) => v.incarnation)).toEqual([1, 1, 1]);
    // The detector still works at this setting.
    process.kill(c.hosts[2].pid, "SIGKILL");
    await waitFor(async () => suspicions(await logs()).length >= 2, 5000, "both survivors to find the killed host");
  }, SOAK_MS + 60_000);
});

describe("a busy main thread is not a dead host; a wedged one is", () => {
  const wedged_ms = mainLoopWedgedMs(HOST_DEFAULTS.detect_ms);

  async function clusterBlockingFor(block_ms: number) {
    process.env.COHORT_FAULT_BLOCK_MAIN_MS = String(block_ms);
    try {
      const { dir, cluster } = await startCluster(3, HOST_DEFAULTS.detect_ms);
      const module = guestPath("kv");
      const manifest = parseManifest(`group: busy\nmode: group\nsize: 3\nmodule: ${JSON.stringify(module)}\n`, { source: "test", base_dir: "/" });
      await requestAny(cluster, "deploy", { manifest }, new Uint8Array(await readFile(module)));
      const failedIn = async (id: string, peer: string) =>
        (await readFile(hostLogPath(dir, id), "utf8")).split("\n").filter((l) => l.includes('"msg":"peer failed"') && l.includes(`"peer":"${peer}"`));
      const incarnations = async () => (await requestAny(cluster, "records", {})).vms.filter((v) => v.group === "busy").map((v) => v.incarnation);
      return { cluster, failedIn, incarnations };
    } finally {
      delete process.env.COHORT_FAULT_BLOCK_MAIN_MS;
    }
  }

  it(`held busy 1 s (< the ${wedged_ms} ms bound): no peer fails it, no failover`, async () => {
    const { cluster: c, failedIn, incarnations } = await clusterBlockingFor(1000);
    const [a, b, busy] = c.hosts;
    process.kill(busy.pid, "SIGUSR2");
    await sleep(2500);
    expect([...(await failedIn(a.id, busy.id)), ...(await failedIn(b.id, busy.id))]).toEqual([]);
    expect(await incarnations()).toEqual([1, 1, 1]);
  }, 60_000);

  it(`wedged 4 s (> the ${wedged_ms} ms bound): its peers fail it over before it is back`, async () => {
    const { cluster: c, failedIn, incarnations } = await clusterBlockingFor(4000);
    const [a, b, busy] = c.hosts;
    const signalled = Date.now();
    process.kill(busy.pid, "SIGUSR2");
    await waitFor(async () => (await failedIn(a.id, busy.id)).length > 0 && (await failedIn(b.id, busy.id)).length > 0, 10_000, "both peers to fail the wedged host");
    const at = Math.max(...[...(await failedIn(a.id, busy.id)), ...(await failedIn(b.id, busy.id))].map((l) => (JSON.parse(l) as { time: number }).time));
    expect(at - signalled).toBeGreaterThanOrEqual(wedged_ms);
    expect(at - signalled).toBeLessThan(4000);
    await waitFor(async () => (await incarnations()).every((i) => i >= 2), 15_000, "the group failed over");
  }, 60_000);
});
