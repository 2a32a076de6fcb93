/**
 * Single-VM protection on real processes: `cohort host` daemons on loopback,
 * real TCP, failures injected with SIGKILL and SIGSTOP. Needs `npm run build`
 * (dist/ and build/guests/), which `npm test` runs first.
 */
import { afterEach, describe, expect, it } from "vitest";
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { readFile, writeFile } from "node:fs/promises";
import { closeSync, openSync } from "node:fs";
import { connect } from "node:net";
import { join } from "node:path";
import { promisify } from "node:util";
import { hostLogPath, type ClusterFile } from "../src/cluster/local-cluster.js";
import { parseManifest } from "../src/cluster/manifest.js";
import { guestPath } from "../src/guest/examples.js";
import { vmKey, type VmRecord } from "../src/host/records.js";
import { LogFollower, requestAny, sleep, type FollowedRecord } from "../src/cli/client.js";
import { hostCommand } from "../src/cli/demo.js";
import { fixtureBytes } from "./support/guests.js";
import { startCluster, stopClusters, waitFor } from "./support/cluster.js";
import { HOST_DEFAULTS, heartbeatFor } from "../src/host/host.js";
import { lateMaxSince } from "../src/util/lateness-log.js";

const run = promisify(execFile);
// The product's default detector: a deploy that starts many VM threads must not look like a crash.
const DETECT_MS = HOST_DEFAULTS.detect_ms;
afterEach(stopClusters);

const cluster = (hosts: number) => startCluster(hosts, DETECT_MS);

async function deploy(c: ClusterFile, group: string, module: string, interval_ms = 20): Promise<void> {
  const manifest = parseManifest(`group: ${group}\nmode: vm\nmodule: ${JSON.stringify(module)}\nepoch:\n  interval_ms: ${interval_ms}\n`, { source: "test", base_dir: "/" });
  const { readFile } = await import("node:fs/promises");
  await requestAny(c, "deploy", { manifest }, new Uint8Array(await readFile(module)));
}

function follow(c: ClusterFile, vm: string): { records: FollowedRecord[]; notices: string[]; follower: LogFollower; done: Promise<unknown> } {
  const records: FollowedRecord[] = [];
  const notices: string[] = [];
  const follower = new LogFollower(c, vm, 1, (r) => records.push(r), (n) => notices.push(n));
  return { records, notices, follower, done: follower.run().catch(() => undefined) };
}

/** Sends `bytes` on a fresh connection; true if the host closes it within 3 s. */
function closedAfterSending(host: string, port: number, bytes: Uint8Array): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ host, port }, () => socket.write(bytes));
    socket.on("close", () => resolve(true));
    socket.on("error", () => undefined);
    setTimeout(() => {
      socket.destroy();
      resolve(false);
    }, 3000);
  });
}

function expectContiguous(records: FollowedRecord[]): void {
  expect(records.length).toBeGreaterThan(0);
  records.forEach((r, i) => {
    expect(r.seq).toBe(i + 1);
    expect(Number(r.text.trim())).toBe(i + 1);
  });
}

describe("a killed host restarted with the same id rejoins", () => {
  it("it takes part as <id>.2, takes the degraded VM's new backup, and a failover then promotes it: output with no gap", async () => {
    const { dir, cluster: c, store } = await cluster(2);
    await deploy(c, "ticker", guestPath("ticker"));
    const before = (await store.get<VmRecord>(vmKey("ticker-0")))!.value;
    const f = follow(c, "ticker-0");
    await waitFor(() => f.records.length >= 20, 5000, "output before the kill");
    // The backup's host dies: with two hosts there is no spare, the VM is degraded and releases nothing.
    const backupHost = c.hosts.find((h) => h.id === before.backup)!;
    process.kill(backupHost.pid, "SIGKILL");
    const degraded = async () => JSON.parse((await run(process.execPath, [hostCommand()[1], "status", "--json", "--state-dir", dir])).stdout).groups[0].vms[0].health === "degraded";
    await waitFor(degraded, 5000, "the VM degraded");
    // The same host id started again, empty (a new process on the same state directory and store).
    const [node, bin] = hostCommand();
    const restarted: ChildProcess[] = [];
    const restart = (id: string) => {
      const out = openSync(join(dir, "logs", `${id}-restarted.log`), "a");
      restarted.push(spawn(node, [bin, "host", "--id", id, "--port", "0", "--state-dir", dir, "--store", "embedded", "--detect-ms", String(DETECT_MS), "--tls-dir", join(dir, "tls")], { stdio: ["ignore", out, out] }));
      closeSync(out);
    };
    restart(backupHost.id);
    try {
      const rejoined = `${backupHost.id}.2`;
      await waitFor(async () => (await store.get<VmRecord>(vmKey("ticker-0")))!.value.backup === rejoined, 10_000, `the new backup on ${rejoined}`);
      // Registered under its new identity (the killed process's registration lapses with its lease).
      expect((await requestAny(c, "records", {})).hosts.map((h) => h.id)).toContain(rejoined);
      // The `cohort status` a user runs finds the rejoined host through the others' records (it is not in cluster.json).
      const status = await run(process.execPath, [bin, "status", "--state-dir", dir]);
      expect(status.stdout).toMatch(new RegExp(`ticker-0 +primary ${before.primary} +backup ${rejoined.replace(".", "\\.")} .*healthy`));
      expect(status.stdout).toMatch(new RegExp(`${rejoined.replace(".", "\\.")} +127\\.0\\.0\\.1:\\d+ +pid \\d+ +up`));
      // The primary's host dies now: the rejoined host's backup is promoted. With no spare host it waits,
      // degraded, until the killed host is restarted too and rejoins as the new backup; then the output goes on.
      const seqAtKill = f.follower.lastSeq;
      process.kill(c.hosts.find((h) => h.id === before.primary)!.pid, "SIGKILL");
      await waitFor(async () => (await store.get<VmRecord>(vmKey("ticker-0")))!.value.primary === rejoined, 10_000, `the backup on ${rejoined} promoted`);
      restart(before.primary);
      await waitFor(() => f.follower.lastSeq > seqAtKill + 20, 10_000, "output from the rejoined hosts");
      expect((await store.get<VmRecord>(vmKey("ticker-0")))!.value.backup).toBe(`${before.primary}.2`);
      f.follower.stop();
      await f.done;
      expectContiguous(f.records);
      const after = (await store.get<VmRecord>(vmKey("ticker-0")))!.value;
      expect(after.primary).toBe(rejoined);
    } finally {
      for (const p of restarted) p.kill("SIGKILL");
      await store.close();
    }
  }, 60_000);
});

describe("a request to a degraded VM", () => {
  it("times out saying why: its backup's host is gone and no spare took over, so nothing is released", async () => {
    const { cluster: c, store } = await cluster(2);
    await deploy(c, "kv", guestPath("kv"));
    const record = (await store.get<VmRecord>(vmKey("kv-0")))!.value;
    expect((await requestAny(c, "vm_request", { vm: "kv-0", text: "put a 1" }, undefined, record.primary)).reply).toBe("ok");
    process.kill(c.hosts.find((h) => h.id === record.backup)!.pid, "SIGKILL");
    await sleep(3 * DETECT_MS);
    const error = await requestAny(c, "vm_request", { vm: "kv-0", text: "get a" }, undefined, record.primary).then(
      () => null,
      (e: Error & { code?: string }) => e,
    );
    expect(error?.code).toBe("Timeout");
    expect(error?.message).toMatch(new RegExp(`kv-0 is degraded \\(its backup's host ${record.backup} is not answering\\)`));
    await store.close();
  });
});

describe("single-VM protection across host processes", () => {
  it("kill -9 of the primary's host: the backup promotes, output continues with no gap and no duplicate", async () => {
    const { cluster: c, store } = await cluster(3);
    await deploy(c, "ticker", guestPath("ticker"));
    const before = (await store.get<VmRecord>(vmKey("ticker-0")))!.value;
    expect(before.backup).not.toBe(before.primary);
    const f = follow(c, "ticker-0");
    await waitFor(() => f.records.length >= 20, 5000, "output before the kill");
    const victim = c.hosts.find((h) => h.id === before.primary)!;
    const seqAtKill = f.follower.lastSeq;
    const killedAt = Date.now();
    process.kill(victim.pid, "SIGKILL");
    await waitFor(() => f.follower.lastSeq > seqAtKill + 20, 10_000, "output after the kill");
    const firstAfter = f.records.find((r) => r.seq > seqAtKill)!;
    f.follower.stop();
    await f.done;
    expectContiguous(f.records);
    const after = (await store.get<VmRecord>(vmKey("ticker-0")))!.value;
    expect(after.primary).toBe(before.backup);
    expect(after.incarnation).toBe(before.incarnation + 1);
    // Re-protected on the third host.
    await waitFor(async () => (await store.get<VmRecord>(vmKey("ticker-0")))!.value.backup !== null, 5000, "a new backup");
    const reprotected = (await store.get<VmRecord>(vmKey("ticker-0")))!.value;
    expect(reprotected.backup).not.toBe(victim.id);
    expect(reprotected.backup).not.toBe(reprotected.primary);
    // Detection + promotion + re-protection, measured end to end (not a speed assertion: a bound on a hang).
    expect(firstAfter.received_ms - killedAt).toBeLessThan(5000);
    await store.close();
  });

  it("two failovers in a row (4 hosts): the output stays contiguous and its whole history stays readable", async () => {
    const { cluster: c, store } = await cluster(4);
    await deploy(c, "ticker", guestPath("ticker"));
    const f = follow(c, "ticker-0");
    for (let round = 0; round < 2; round++) {
      await waitFor(() => f.records.length >= 20 * (round + 1), 5000, `output before kill ${round + 1}`);
      const record = (await store.get<VmRecord>(vmKey("ticker-0")))!.value;
      // Wait until the current primary has a backup that the store names, then kill the primary.
      await waitFor(async () => (await store.get<VmRecord>(vmKey("ticker-0")))!.value.backup !== null, 5000, "a named backup");
      const seq = f.follower.lastSeq;
      process.kill(c.hosts.find((h) => h.id === record.primary)!.pid, "SIGKILL");
      // A bound on a hang, not a speed check: it leaves room for one detach-and-retry of a new backup (5 s).
      await waitFor(() => f.follower.lastSeq > seq + 10, 20_000, `output after kill ${round + 1}`);
    }
    f.follower.stop();
    await f.done;
    expectContiguous(f.records);
    // A new reader from the start gets the whole stream from the twice-promoted primary.
    const again = follow(c, "ticker-0");
    await waitFor(() => again.follower.lastSeq >= f.follower.lastSeq, 5000, "history");
    again.follower.stop();
    await again.done;
    expect(again.notices.filter((n) => n.includes("gap"))).toEqual([]);
    expectContiguous(again.records);
    await store.close();
  });

  it("kill -9 during heavy checkpointing (1 MiB dirtied every 2 ms)", async () => {
    const { dir, cluster: c, store } = await cluster(3);
    const wasm = join(dir, "heavy.wasm");
    await writeFile(wasm, fixtureBytes("heavy"));
    await deploy(c, "heavy", wasm, 5);
    const before = (await store.get<VmRecord>(vmKey("heavy-0")))!.value;
    const f = follow(c, "heavy-0");
    await waitFor(() => f.records.length >= 30, 10_000, "output before the kill");
    const seqAtKill = f.follower.lastSeq;
    process.kill(c.hosts.find((h) => h.id === before.primary)!.pid, "SIGKILL");
    await waitFor(() => f.follower.lastSeq > seqAtKill + 30, 15_000, "output after the kill");
    f.follower.stop();
    await f.done;
    expectContiguous(f.records);
    await store.close();
  });

  it("output is never released before its cut commits: with the backup frozen nothing is released, and the frozen-out output never appears", async () => {
    const { cluster: c, store } = await cluster(3);
    await deploy(c, "ticker", guestPath("ticker"));
    const record = (await store.get<VmRecord>(vmKey("ticker-0")))!.value;
    const primary = c.hosts.find((h) => h.id === record.primary)!;
    // The backup and the only other host are frozen, so the primary cannot find any backup.
    const frozen = c.hosts.filter((h) => h.id !== record.primary);
    const f = follow(c, "ticker-0");
    await waitFor(() => f.records.length >= 10, 5000, "output");
    for (const h of frozen) process.kill(h.pid, "SIGSTOP");
    try {
      await sleep(100); // commits already acknowledged may still land
      const frozenAt = f.follower.lastSeq;
      await sleep(1000); // the ticker keeps counting (~100 counts) on the primary; none may be released
      expect(f.follower.lastSeq).toBe(frozenAt);
      process.kill(primary.pid, "SIGKILL");
    } finally {
      for (const h of frozen) process.kill(h.pid, "SIGCONT");
    }
    const seqAtKill = f.follower.lastSeq;
    await waitFor(() => f.follower.lastSeq > seqAtKill + 10, 10_000, "output after promotion");
    f.follower.stop();
    await f.done;
    // The promoted backup continues from its own cut: no count appears twice or is skipped.
    expectContiguous(f.records);
    await store.close();
  });

  it("a paused primary (SIGSTOP) is taken over; when it resumes it is fenced (its VM stops), its process rejoins as a fresh host, and the stream stays contiguous", async () => {
    const { cluster: c, store } = await cluster(3);
    await deploy(c, "ticker", guestPath("ticker"));
    const before = (await store.get<VmRecord>(vmKey("ticker-0")))!.value;
    const primary = c.hosts.find((h) => h.id === before.primary)!;
    const f = follow(c, "ticker-0");
    await waitFor(() => f.records.length >= 10, 5000, "output");
    process.kill(primary.pid, "SIGSTOP");
    try {
      await waitFor(async () => (await store.get<VmRecord>(vmKey("ticker-0")))!.value.incarnation > before.incarnation, 5000, "takeover");
    } finally {
      process.kill(primary.pid, "SIGCONT");
    }
    // Fenced by the only group it held, the instance ends: the same process (same pid) takes part as <id>.2, empty.
    const fresh = `${primary.id}.2`;
    await waitFor(async () => (await store.get<{ pid: number }>(`hosts/${fresh}`))?.value.pid === primary.pid, 5000, `the paused process registered again as ${fresh}`);
    const status = await requestAny(c, "status", {}, undefined, fresh);
    expect(status.primaries).toEqual([]);
    const count = f.records.length;
    await waitFor(() => f.records.length >= count + 10, 5000, "output after the takeover");
    f.follower.stop();
    await f.done;
    expectContiguous(f.records);
    await store.close();
  });

  it("a malformed frame closes only that connection; the host keeps serving", async () => {
    const { cluster: c } = await cluster(2);
    await deploy(c, "ticker", guestPath("ticker"));
    const f = follow(c, "ticker-0");
    await waitFor(() => f.records.length >= 5, 5000, "output");
    for (const host of c.hosts) {
      const [h, p] = host.address.split(":");
      expect(await closedAfterSending(h, Number(p), Buffer.from("this is not a cohort frame at all, just bytes"))).toBe(true);
      // Oversized declared length: refused from the header alone.
      const header = Buffer.alloc(12);
      header.writeUInt32LE(0x52464843, 0);
      header.writeUInt8(1, 4);
      header.writeUInt8(3, 5);
      header.writeUInt32LE(0xfffffff0, 8);
      expect(await closedAfterSending(h, Number(p), header)).toBe(true);
    }
    const count = f.records.length;
    await waitFor(() => f.records.length >= count + 10, 5000, "output after the bad frames");
    expect(await requestAny(c, "ping", {})).toHaveProperty("id");
    f.follower.stop();
    await f.done;
    expectContiguous(f.records);
  });

  it("a backup that disconnects (SIGSTOP) is replaced, and its return harms nothing", async () => {
    const { cluster: c, store } = await cluster(3);
    await deploy(c, "ticker", guestPath("ticker"));
    const record = (await store.get<VmRecord>(vmKey("ticker-0")))!.value;
    const backup = c.hosts.find((h) => h.id === record.backup)!;
    const f = follow(c, "ticker-0");
    await waitFor(() => f.records.length >= 10, 5000, "output");
    process.kill(backup.pid, "SIGSTOP");
    try {
      await waitFor(async () => {
        const r = (await store.get<VmRecord>(vmKey("ticker-0")))!.value;
        return r.backup !== null && r.backup !== backup.id;
      }, 5000, "a replacement backup");
      const count = f.records.length;
      await waitFor(() => f.records.length >= count + 10, 5000, "output with the new backup");
    } finally {
      process.kill(backup.pid, "SIGCONT");
    }
    await sleep(2 * DETECT_MS);
    const count = f.records.length;
    await waitFor(() => f.records.length >= count + 10, 5000, "output after the old backup returned");
    const now = (await store.get<VmRecord>(vmKey("ticker-0")))!.value;
    expect(now.primary).toBe(record.primary); // the returning backup did not take over
    f.follower.stop();
    await f.done;
    expectContiguous(f.records);
    await store.close();
  });

  it("a host paused for less than its failover takes (SIGSTOP ~1.5 detection periods) resumes without declaring its live peers failed", async () => {
    const { dir, cluster: c, store } = await cluster(3);
    await deploy(c, "ticker", guestPath("ticker"));
    const before = (await store.get<VmRecord>(vmKey("ticker-0")))!.value;
    const backup = c.hosts.find((h) => h.id === before.backup)!;
    const f = follow(c, "ticker-0");
    await waitFor(() => f.records.length >= 10, 5000, "output");
    // A host holding only a backup is decided on one more period after it is suspected: it wakes up first.
    const pausedAt_ms = Date.now();
    process.kill(backup.pid, "SIGSTOP");
    await sleep(1.5 * DETECT_MS);
    process.kill(backup.pid, "SIGCONT");
    await sleep(4 * DETECT_MS);
    const count = f.records.length;
    await waitFor(() => f.records.length >= count + 10, 5000, "output after the pause");
    // Its own stall was not taken for its peers' silence: nobody was declared failed, nothing moved.
    const after = (await store.get<VmRecord>(vmKey("ticker-0")))!.value;
    expect(after.incarnation).toBe(before.incarnation);
    expect([after.primary, after.backup]).toEqual([before.primary, before.backup]);
    const log = await readFile(hostLogPath(dir, backup.id), "utf8");
    expect(log).not.toContain('"msg":"peer failed"');
    expect(log).toContain("this host stalled");
    // Its status reports the stall (src/host/api.ts main_loop): the gap between two ticks spans the
    // pause (1.5 periods; checked against 1.2 for the timers' slack), and the tick after it was late
    // by that less one tick interval (the pause may have begun just after a tick).
    const paused = await requestAny(c, "status", {}, undefined, backup.id);
    expect(paused.main_loop.stall_ms_max).toBeGreaterThanOrEqual(1.2 * DETECT_MS);
    expect(paused.main_loop.delay_ms_max).toBeGreaterThanOrEqual(1.2 * DETECT_MS - heartbeatFor(DETECT_MS));
    // And its per-second log places it in the pause's window (what `bench scale` reads per window).
    expect(lateMaxSince(paused.main_loop.late_seconds, pausedAt_ms)).toBeGreaterThanOrEqual(1.2 * DETECT_MS - heartbeatFor(DETECT_MS));
    expect(lateMaxSince(paused.main_loop.late_seconds, Date.now() + 1000)).toBe(0);
    f.follower.stop();
    await f.done;
    expectContiguous(f.records);
    await store.close();
  });

  it("cohort deploy refuses a malformed manifest with the bad field's path; status and logs work from the CLI", async () => {
    const { dir } = await cluster(2);
    const bin = hostCommand()[1];
    const bad = join(dir, "bad.yaml");
    await writeFile(bad, "group: ticker\nmode: sometimes\nmodule: nowhere.wasm\nepoch:\n  interval_ms: 0\n");
    const failed = await run(process.execPath, [bin, "deploy", bad, "--state-dir", dir]).catch((e: { code: number; stderr: string }) => e);
    expect((failed as { code: number }).code).not.toBe(0);
    expect((failed as { stderr: string }).stderr).toMatch(/mode/);
    expect((failed as { stderr: string }).stderr).toMatch(/epoch\.interval_ms/);
    const good = join(dir, "ticker.yaml");
    await writeFile(good, `group: ticker\nmode: vm\nmodule: ${JSON.stringify(guestPath("ticker"))}\n`);
    await run(process.execPath, [bin, "deploy", good, "--state-dir", dir]);
    await sleep(500);
    const status = JSON.parse((await run(process.execPath, [bin, "status", "--json", "--state-dir", dir])).stdout);
    expect(status.hosts).toHaveLength(2);
    const vm = status.groups[0].vms[0];
    expect(vm.vm).toBe("ticker-0");
    expect(vm.health).toBe("healthy");
    expect(vm.backup).not.toBe(vm.primary);
    const logs = (await run(process.execPath, [bin, "logs", "ticker-0", "--state-dir", dir])).stdout.trim().split("\n");
    expect(logs.length).toBeGreaterThan(3);
    logs.forEach((line, i) => expect(line).toBe(String(i + 1)));
  });
});
