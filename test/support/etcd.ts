/**
 * A real etcd server for tests: Debian's `etcd` binary (package etcd-server,
 * installed by .ci/run), one member on free loopback ports with a temporary
 * data directory, stopped by its own pid. `startEtcd({ host })` serves clients
 * on another local address instead (e.g. a bridge's address that hosts in
 * network namespaces reach, test/support/netns.ts); its peer port stays on
 * loopback, where nobody else needs it. Without the binary, tests that need
 * it are skipped outside CI and fail under CI=true (see etcdAvailable).
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Etcd3 } from "etcd3";
import { afterAll, beforeAll } from "vitest";

export const ETCD_BINARY = process.env.COHORT_ETCD_BINARY ?? "etcd";

/** Whether tests that need etcd can run; under CI=true a missing etcd is an error, not a skip. */
export function etcdAvailable(): boolean {
  const found = spawnSync(ETCD_BINARY, ["--version"], { stdio: "ignore" }).status === 0;
  if (!found && process.env.CI === "true") throw new Error(`${ETCD_BINARY} not found: .ci/run installs Debian's etcd-server`);
  return found;
}

export interface RunningEtcd {
  /** host:port of its client URL. */
  endpoint: string;
  pid: number;
  data_dir: string;
  /** SIGSTOP of the server (an etcd that hangs); resolves once every thread of it is stopped (the signal is not synchronous: a request sent at once could still be answered). */
  pause(): Promise<void>;
  resume(): void;
  /** Stops the server (SIGTERM, then SIGKILL after 5 s); keeps the data directory. */
  stop(): Promise<void>;
  /** Starts it again on the same ports and data. */
  restart(): Promise<void>;
  /** Stops it and removes its data directory. */
  destroy(): Promise<void>;
}

async function freePort(host = "127.0.0.1"): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, host, () => {
      const address = server.address();
      const port = typeof address === "object" && address ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

/** Whether every thread of `pid` is in the stopped state (`T` in /proc/<pid>/task/<tid>/stat). */
async function allThreadsStopped(pid: number): Promise<boolean> {
  const tasks = await readdir(`/proc/${pid}/task`);
  const states = await Promise.all(tasks.map(async (t) => (await readFile(`/proc/${pid}/task/${t}/stat`, "utf8").catch(() => ") T")).replace(/^.*\) /s, "")[0]));
  return states.every((s) => s === "T" || s === "t");
}

export interface EtcdOptions {
  /** IPv4 address of this machine the client URL listens on (default 127.0.0.1); it must exist already. */
  host?: string;
}

/** Starts one etcd member and waits until it answers a read. */
export async function startEtcd(options: EtcdOptions = {}): Promise<RunningEtcd> {
  const host = options.host ?? "127.0.0.1";
  const data_dir = await mkdtemp(join(tmpdir(), "cohort-etcd-"));
  const [clientPort, peerPort] = [await freePort(host), await freePort()];
  const client = `http://${host}:${clientPort}`;
  const peer = `http://127.0.0.1:${peerPort}`;
  const args = [
    "--name", "test",
    "--data-dir", join(data_dir, "data"),
    "--listen-client-urls", client,
    "--advertise-client-urls", client,
    "--listen-peer-urls", peer,
    "--initial-advertise-peer-urls", peer,
    "--initial-cluster", `test=${peer}`,
    "--logger", "zap",
    "--log-level", "error",
  ];
  let child: ChildProcess | null = null;
  let stderr = "";
  const launch = async () => {
    stderr = "";
    const c = spawn(ETCD_BINARY, args, { stdio: ["ignore", "ignore", "pipe"] });
    c.stderr!.setEncoding("utf8").on("data", (d: string) => (stderr = (stderr + d).slice(-4000)));
    child = c;
    await waitReady(`${host}:${clientPort}`, c, () => stderr);
  };
  const stop = async () => {
    const c = child;
    child = null;
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => c.once("exit", () => resolve()));
    c.kill("SIGCONT");
    c.kill("SIGTERM");
    const timer = setTimeout(() => c.kill("SIGKILL"), 5000);
    await exited;
    clearTimeout(timer);
  };
  await launch();
  return {
    endpoint: `${host}:${clientPort}`,
    get pid() {
      return child?.pid ?? -1;
    },
    data_dir,
    pause: async () => {
      const pid = child?.pid;
      if (!child || pid === undefined) return;
      child.kill("SIGSTOP");
      const until = Date.now() + 5000;
      while (!(await allThreadsStopped(pid))) {
        if (Date.now() > until) throw new Error(`etcd (pid ${pid}) did not stop within 5 s of SIGSTOP`);
        await new Promise((r) => setTimeout(r, 5));
      }
    },
    resume: () => child?.kill("SIGCONT"),
    stop,
    restart: async () => {
      await stop();
      await launch();
    },
    destroy: async () => {
      await stop();
      await rm(data_dir, { recursive: true, force: true });
    },
  };
}

async function waitReady(endpoint: string, child: ChildProcess, stderr: () => string, timeout_ms = 20_000): Promise<void> {
  const started = Date.now();
  const probe = new Etcd3({ hosts: `http://${endpoint}`, dialTimeout: 500 });
  try {
    for (;;) {
      if (child.exitCode !== null) throw new Error(`etcd exited with ${child.exitCode}: ${stderr()}`);
      try {
        await probe.get("probe").options({ deadline: Date.now() + 500 }).string();
        return;
      } catch {
        if (Date.now() - started > timeout_ms) throw new Error(`etcd at ${endpoint} not ready after ${timeout_ms} ms: ${stderr()}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  } finally {
    probe.close();
  }
}

/**
 * One etcd for the enclosing `describe`: started before its tests, destroyed
 * after them. Returns a getter (the server exists only once beforeAll ran).
 */
export function useEtcd(): () => RunningEtcd {
  let etcd: RunningEtcd | undefined;
  beforeAll(async () => {
    etcd = await startEtcd();
  }, 30_000);
  afterAll(async () => {
    await etcd?.destroy();
  });
  return () => {
    if (!etcd) throw new Error("etcd is not started (useEtcd's beforeAll has not run)");
    return etcd;
  };
}
