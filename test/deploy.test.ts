/**
 * Deploys that meet trouble, on real processes: a host of the placement
 * suspected mid-deploy (SIGSTOP longer than the detector) costs one attempt
 * and the group runs on the live hosts; a deploy that cannot start leaves
 * nothing behind. Needs `npm run build`, which `npm test` runs first.
 */
import { afterEach, describe, expect, it } from "vitest";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { ClusterFile } from "../src/cluster/local-cluster.js";
import { parseManifest } from "../src/cluster/manifest.js";
import { guestPath } from "../src/guest/examples.js";
import { LogFollower, requestAny, type FollowedRecord } from "../src/cli/client.js";
import { HOST_DEFAULTS } from "../src/host/host.js";
import { fixtureBytes } from "./support/guests.js";
import { startCluster, stopClusters, waitFor } from "./support/cluster.js";

const DETECT_MS = HOST_DEFAULTS.detect_ms;
afterEach(stopClusters);

async function deploy(c: ClusterFile, group: string, module: string, bytes: Uint8Array, size = 3) {
  const manifest = parseManifest(`group: ${group}\nmode: group\nsize: ${size}\nmodule: ${JSON.stringify(module)}\n`, { source: "test", base_dir: "/" });
  return requestAny(c, "deploy", { manifest }, bytes, "h1");
}

async function groupsOn(c: ClusterFile, host: string): Promise<string[]> {
  const s = await requestAny(c, "status", {}, undefined, host);
  return s.groups.map((g) => `${g.group}@${g.incarnation}`);
}

describe("deploy under trouble (real processes)", () => {
  it("a host suspected during the deploy (SIGSTOP) costs one attempt: the group runs on the live hosts; the resumed host keeps nothing of the given-up attempt", async () => {
    const { cluster: c } = await startCluster(4, DETECT_MS);
    const module = guestPath("ticker");
    const victim = c.hosts.find((h) => h.id === "h3")!;
    // Stopped before the deploying host (h1) notices: the first placement names it, and its group_prepare cannot be answered.
    process.kill(victim.pid, "SIGSTOP");
    let result: Awaited<ReturnType<typeof deploy>>;
    try {
      result = await deploy(c, "tick", module, new Uint8Array(await readFile(module)));
    } finally {
      process.kill(victim.pid, "SIGCONT");
    }
    // The second attempt, under the next incarnation, on the hosts that answer.
    expect(result.vms.map((v) => v.incarnation)).toEqual([2, 2, 2]);
    for (const v of result.vms) {
      expect([v.primary, v.backup]).not.toContain("h3");
      expect(v.primary).not.toBe(v.backup);
    }
    // The group runs: each VM's released output is contiguous from its first tick.
    for (const v of result.vms) {
      const records: FollowedRecord[] = [];
      const follower = new LogFollower(c, v.vm, 1, (r) => records.push(r), () => undefined);
      const done = follower.run().catch(() => undefined);
      await waitFor(() => records.length >= 5, 15_000, `5 ticks of ${v.vm}`);
      follower.stop();
      await done;
      records.forEach((r, i) => expect(r.seq).toBe(i + 1));
    }
    // Whatever of attempt 1 the resumed host read from its sockets and prepared is stopped once the store says the attempt was given up.
    await waitFor(async () => (await groupsOn(c, "h3")).length === 0, 15_000, "h3 to hold nothing of the given-up attempt");
    const { vms } = await requestAny(c, "records", {});
    expect(vms.filter((v) => v.group === "tick").map((v) => v.incarnation)).toEqual([2, 2, 2]);
    for (const h of ["h1", "h2", "h4"]) expect(await groupsOn(c, h)).not.toContain("tick@1");
  });

  it("a deploy whose guest fails to boot leaves nothing: its name is free again, and a good module deploys under it", async () => {
    const { cluster: c } = await startCluster(3, DETECT_MS);
    const dir = await mkdtemp(join(tmpdir(), "cohort-deploy-"));
    try {
      const bad = join(dir, "boot-trap.wasm");
      await writeFile(bad, fixtureBytes("boot-trap"));
      await expect(deploy(c, "app", bad, new Uint8Array(await readFile(bad)))).rejects.toThrow(/failed to boot/);
      const after = await requestAny(c, "records", {});
      expect(after.groups.map((g) => g.group)).not.toContain("app");
      expect(after.vms.filter((v) => v.group === "app")).toEqual([]);
      for (const h of c.hosts) expect(await groupsOn(c, h.id)).toEqual([]);
      const good = guestPath("ticker");
      const result = await deploy(c, "app", good, new Uint8Array(await readFile(good)));
      expect(result.vms.map((v) => v.incarnation)).toEqual([1, 1, 1]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
