import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { type ClusterFile, down, LocalClusterError, readCluster, up, type UpOptions } from "../src/cluster/local-cluster.js";
import { EmbeddedStore, processStartMs } from "../src/store/embedded.js";
import { isAlive, killQuietly, tsNodeCommand } from "./support/child.js";
import { procStatFields } from "../src/util/proc-stat.js";

const STUB = fileURLToPath(new URL("./support/stub-host.mjs", import.meta.url));

let dir: string;
const extra_pids: number[] = [];

/** Every pid a stub host ever had in this test's state dir (each stub records its own). */
async function stubPids(): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  const pids = join(dir, "stub-pids");
  if (!existsSync(pids)) return out;
  for (const name of await readdir(pids)) out.set(name.replace(/\.pid$/, ""), Number(await readFile(join(pids, name), "utf8")));
  return out;
}

function options(hosts: number, more: Partial<UpOptions> = {}): UpOptions {
  return { hosts, state_dir: dir, host_command: tsNodeCommand(STUB), ready_timeout_ms: 15_000, ...more };
}

async function failure(p: Promise<unknown>): Promise<LocalClusterError> {
  const e = await p.then(
    () => null,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(LocalClusterError);
  return e as LocalClusterError;
}

/** Connects and reads the stub's greeting (its id). */
function hello(address: string): Promise<string> {
  const [host, port] = address.split(":");
  return new Promise((resolve, reject) => {
    const socket = connect({ host, port: Number(port) });
    let data = "";
    socket.setEncoding("utf8").on("data", (d: string) => (data += d));
    socket.once("end", () => resolve(data.trim()));
    socket.once("error", reject);
  });
}

/** The session id of a process (Linux: /proc/<pid>/stat, the field after state, ppid and pgrp). */
function sessionOf(pid: number): number {
  return Number(procStatFields(pid)?.[6 - 3]); // field 6: session
}

async function hostKeys(): Promise<string[]> {
  const store = new EmbeddedStore(dir);
  try {
    return (await store.list("hosts/")).map((r) => r.key);
  } finally {
    await store.close();
  }
}

/** A process that is not part of any cluster. */
function bystander(): number {
  const child = spawn(process.execPath, ["-e", "setInterval(() => {}, 60000)"], { stdio: "ignore" });
  extra_pids.push(child.pid!);
  return child.pid!;
}

async function waitGone(pid: number, ms = 5000): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (isAlive(pid) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  return !isAlive(pid);
}

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "cohort-test-"));
});

afterEach(async () => {
  for (const pid of (await stubPids()).values()) killQuietly(pid);
  for (const pid of extra_pids.splice(0)) killQuietly(pid);
  await rm(dir, { recursive: true, force: true });
});

describe("local cluster", () => {
  it("up starts N listening hosts, records them, refuses a second up; down stops exactly them", async () => {
    const cluster = await up(options(3));
    const pids = cluster.hosts.map((h) => h.pid);
    const ports = cluster.hosts.map((h) => h.address.split(":")[1]);
    expect(cluster.state_dir).toBe(dir);
    expect(cluster.hosts.map((h) => h.id)).toEqual(["h1", "h2", "h3"]);
    expect(new Set(pids).size).toBe(3);
    expect(new Set(ports).size).toBe(3);
    for (const h of cluster.hosts) expect(h.address).toMatch(/^127\.0\.0\.1:\d+$/);
    // The pids are those of the processes that are actually the hosts.
    expect(Object.fromEntries(await stubPids())).toEqual({ h1: pids[0], h2: pids[1], h3: pids[2] });
    // Each one really listens there.
    for (const h of cluster.hosts) expect(await hello(h.address)).toBe(h.id);
    // In the caller's session, so on an autogroup kernel one scheduling group (see spawnHost).
    for (const pid of pids) expect(sessionOf(pid)).toBe(sessionOf(process.pid));
    expect(await readCluster(dir)).toEqual(cluster);
    expect(JSON.parse(await readFile(join(dir, "cluster.json"), "utf8"))).toEqual(cluster);
    expect(await hostKeys()).toEqual(["hosts/h1", "hosts/h2", "hosts/h3"]);
    for (const h of cluster.hosts) expect(await readFile(join(dir, "logs", `${h.id}.log`), "utf8")).toContain(`registered ${h.address}`);

    const again = await failure(up(options(2)));
    expect(again.code).toBe("AlreadyRunning");
    expect(again.message).toContain("cohort down");
    expect(again.message).toContain(`pid ${pids[0]}`);
    expect((await stubPids()).size).toBe(3); // refused before starting anything
    expect(await readCluster(dir)).toEqual(cluster);

    const other = bystander();
    const result = await down({ state_dir: dir });
    expect([...result.stopped].sort()).toEqual([...pids].sort());
    expect(result.already_gone).toEqual([]);
    expect(result.killed).toEqual([]);
    for (const pid of pids) expect(isAlive(pid)).toBe(false);
    expect(isAlive(other)).toBe(true);
    expect(await readCluster(dir)).toBeNull();
    expect(await hostKeys()).toEqual([]);
    for (const h of cluster.hosts) expect(await readFile(join(dir, "logs", `${h.id}.log`), "utf8")).toContain("SIGTERM, exiting");

    expect(await down({ state_dir: dir })).toEqual({ stopped: [], already_gone: [], killed: [] });
  });

  it("a host that never registers fails up with an error naming it and its log, and leaves no process behind", async () => {
    const t0 = Date.now();
    const e = await failure(up(options(3, { ready_timeout_ms: 2500, extra_args: ["--stub-fail", "h2:never-register"] })));
    expect(Date.now() - t0).toBeGreaterThanOrEqual(2500);
    expect(e.code).toBe("HostsNotReady");
    expect(e.message).toContain("1 of 3 host(s) did not come up");
    expect(e.message).toMatch(/h2 \(pid \d+\) did not register within 2500 ms/);
    expect(e.message).toContain(join(dir, "logs", "h2.log"));
    expect(e.message).toContain("not registering"); // the log's tail
    expect(e.message).not.toMatch(/h1 \(pid/);
    const started = await stubPids();
    expect([...started.keys()].sort()).toEqual(["h1", "h2", "h3"]);
    for (const pid of started.values()) expect(await waitGone(pid)).toBe(true);
    expect(await readCluster(dir)).toBeNull();
    expect(await hostKeys()).toEqual([]);
    // And the state dir is usable again.
    const cluster = await up(options(1));
    expect(cluster.hosts).toHaveLength(1);
    await down({ state_dir: dir });
  });

  it("a host that exits before registering fails up at once, with its log's last lines", async () => {
    const t0 = Date.now();
    const e = await failure(up(options(2, { ready_timeout_ms: 30_000, extra_args: ["--stub-fail", "h1:exit"] })));
    expect(Date.now() - t0).toBeLessThan(15_000);
    expect(e.code).toBe("HostsNotReady");
    expect(e.message).toMatch(/h1 \(pid \d+\) exited before registering \(exit code 3\)/);
    expect(e.message).toContain("1 of 2 host(s) did not come up");
    expect(e.message).not.toMatch(/h2 \(pid/);
    expect(e.message).toContain("failing on purpose");
    for (const pid of (await stubPids()).values()) expect(await waitGone(pid)).toBe(true);
    expect(await readCluster(dir)).toBeNull();
  });

  it("a host command that cannot be started fails up with SpawnFailed", async () => {
    const e = await failure(up(options(2, { host_command: [join(dir, "no-such-command")] })));
    expect(e.code).toBe("SpawnFailed");
    expect(e.message).toContain("no-such-command");
    expect(await readCluster(dir)).toBeNull();
  });

  it("down SIGKILLs a host that ignores SIGTERM after timeout_ms", async () => {
    const cluster = await up(options(2, { extra_args: ["--stub-fail", "h2:ignore-term"] }));
    const t0 = Date.now();
    const result = await down({ state_dir: dir, timeout_ms: 500 });
    expect(Date.now() - t0).toBeGreaterThanOrEqual(500);
    expect([...result.stopped].sort()).toEqual(cluster.hosts.map((h) => h.pid).sort());
    expect(result.killed).toEqual([cluster.hosts[1].pid]);
    // SIGKILL is final, but the kernel (and our reaper) may take a moment to let the pid go.
    for (const h of cluster.hosts) expect(await waitGone(h.pid)).toBe(true);
    expect(await readCluster(dir)).toBeNull();
  });

  it("up replaces a cluster file whose hosts are all gone; down reports hosts that died as already gone", async () => {
    const first = await up(options(2));
    for (const h of first.hosts) process.kill(h.pid, "SIGKILL");
    for (const h of first.hosts) expect(await waitGone(h.pid)).toBe(true);
    const second = await up(options(2));
    expect(second.hosts.map((h) => h.pid)).not.toEqual(first.hosts.map((h) => h.pid));
    process.kill(second.hosts[0].pid, "SIGKILL");
    expect(await waitGone(second.hosts[0].pid)).toBe(true);
    const result = await down({ state_dir: dir });
    expect(result).toEqual({ stopped: [second.hosts[1].pid], already_gone: [second.hosts[0].pid], killed: [] });
    expect(await hostKeys()).toEqual([]);
  });

  it.skipIf(processStartMs(process.pid) === null)("down never signals a process that merely reuses a recorded pid", async () => {
    const other = bystander();
    await new Promise((r) => setTimeout(r, 100));
    const start = processStartMs(other)!;
    // A cluster file whose host "registered" long before this process started:
    // the pid was reused, the host itself is gone.
    const fake: ClusterFile = {
      state_dir: dir,
      store: "embedded",
      hosts: [{ id: "h1", address: "127.0.0.1:1", pid: other, started_at_ms: start - 60_000 }],
      created_at_ms: start - 60_000,
      tls: null,
    };
    await writeFile(join(dir, "cluster.json"), JSON.stringify(fake));
    expect(await down({ state_dir: dir, timeout_ms: 200 })).toEqual({ stopped: [], already_gone: [other], killed: [] });
    expect(isAlive(other)).toBe(true);
    expect(await readCluster(dir)).toBeNull();
  });

  it("readCluster rejects a damaged cluster file; up refuses to guess", async () => {
    await writeFile(join(dir, "cluster.json"), JSON.stringify({ state_dir: dir, hosts: [{ id: "h1", pid: -1 }], created_at_ms: 1 }));
    const e = await failure(readCluster(dir));
    expect(e.code).toBe("InvalidClusterFile");
    expect(e.message).toContain("hosts.0");
    expect((await failure(up(options(1)))).code).toBe("InvalidClusterFile");
    expect((await stubPids()).size).toBe(0);
  });
});
