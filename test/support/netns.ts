/**
 * Hosts in network namespaces, for tests that cut real links (test/partition.test.ts).
 *
 * createTopology(n) builds, in the root namespace, two bridges and one
 * namespace per host, each joined to both bridges by a veth pair:
 *
 *   peers bridge  169.254.<a>.0/24   host i listens on 169.254.<a>.<i>; the root namespace
 *                                    has 169.254.<a>.254 (the test and the CLI reach hosts there)
 *   store bridge  169.254.<b>.0/24   host i is 169.254.<b>.<i>; the root namespace has
 *                                    169.254.<b>.254, where the test's etcd listens
 *
 * <a> and <b> are drawn per run among subnets no address of the root namespace
 * and no other live run uses. Namespaces have `lo` up and no default route;
 * the root namespace does not forward (the test needs nothing routed), so a
 * host reaches exactly its two subnets.
 *
 * A partition is a link set down: `cut(i, { peers, store })` sets the root-side
 * end of host i's veth(s) down, `heal(i)` sets them up again. With the root end
 * down the namespace's own address on that veth stays reachable from inside the
 * namespace (its local route goes through `lo`), so a process started there
 * with `spawn(i, ...)` can still talk to the cut-off host.
 *
 * Every name starts with a per-run prefix (`cnp` and 4 hex digits: interface
 * names have at most 15 characters), so two runs never collide. destroy()
 * stops what spawn() started (by pid), then any process left in the
 * namespaces, and deletes the namespaces, veths and bridges; destroyAll() does
 * it for every topology of this process (afterEach/afterAll). A marker file per
 * run under MARKER_DIR names its owner's pid: a later run removes what a run
 * whose process is gone (killed before its cleanup ran) left behind.
 *
 * Needs root and iproute2's `ip`: netnsAvailable() says whether tests can run;
 * under CI=true a missing capability is an error, not a skip.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { closeSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";

export const IP_BINARY = "ip";
/** Markers of live runs: one JSON file per prefix (the owner's pid, its namespaces, links and subnets). */
export const MARKER_DIR = "/run/cohort-test-netns";

let availability: { ok: boolean; why: string } | null = null;

/** Whether this process can build namespaces (root, `ip`, a namespace that can be added); under CI=true a no is an error. */
export function netnsAvailable(): boolean {
  availability ??= probe();
  if (!availability.ok && process.env.CI === "true") throw new Error(`network namespace tests cannot run: ${availability.why} (.ci/run installs iproute2 and runs as root)`);
  return availability.ok;
}

function probe(): { ok: boolean; why: string } {
  if (process.platform !== "linux") return { ok: false, why: `not Linux (${process.platform})` };
  if (process.getuid?.() !== 0) return { ok: false, why: "not root" };
  const version = spawnSync(IP_BINARY, ["-V"], { encoding: "utf8" });
  if (version.status !== 0) return { ok: false, why: `\`${IP_BINARY}\` not found (Debian package iproute2)` };
  // Root is not enough in every container: try one namespace.
  const name = `cnp-probe-${process.pid}-${randomBytes(2).toString("hex")}`;
  const added = spawnSync(IP_BINARY, ["netns", "add", name], { encoding: "utf8" });
  if (added.status !== 0) return { ok: false, why: `\`ip netns add\` failed: ${added.stderr.trim()}` };
  spawnSync(IP_BINARY, ["netns", "del", name]);
  return { ok: true, why: "" };
}

/** Runs `ip args...`; throws with ip's stderr on failure. */
export function ip(...args: string[]): string {
  try {
    return execFileSync(IP_BINARY, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
  } catch (error) {
    const e = error as { stderr?: string; message: string };
    throw new Error(`ip ${args.join(" ")}: ${(e.stderr ?? e.message).trim()}`, { cause: error });
  }
}

/** `ip args...`, its failure ignored (cleanup of what may be gone already). */
function ipQuiet(...args: string[]): void {
  spawnSync(IP_BINARY, args, { stdio: "ignore" });
}

export interface NetnsHost {
  /** 1-based: host i is h<i> and has address .<i> on both subnets. */
  index: number;
  ns: string;
  /** Its address on the peers bridge (where it listens). */
  address: string;
  /** Its address on the store bridge. */
  store_address: string;
  /** Root-side ends of its veths: what cut() sets down. */
  peers_link: string;
  store_link: string;
}

export interface SpawnedProcess {
  child: ChildProcess;
  pid: number;
  /** Where its stdout and stderr go, if a file was given. */
  log: string | null;
  /** Resolves when it exited. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

export interface Topology {
  prefix: string;
  /** <a> and <b>: third octets of the peers and store subnets. */
  peers_net: number;
  store_net: number;
  /** The root namespace's address on the peers bridge. */
  root_peers_address: string;
  /** The root namespace's address on the store bridge (for an etcd: startEtcd({ host })). */
  store_address: string;
  hosts: NetnsHost[];
  /** Sets the root-side end of host i's peers and/or store veth down. */
  cut(index: number, links: { peers?: boolean; store?: boolean }): void;
  /** Sets both of host i's root-side ends up again. */
  heal(index: number): void;
  /**
   * `ip netns exec <ns of host i> argv...`: ip execs the command, so the pid is
   * the command's own. stdout and stderr go to `log` (appended) or are piped.
   */
  spawn(index: number, argv: string[], log?: string): SpawnedProcess;
  /** Stops its processes (SIGTERM, then SIGKILL after stop_timeout_ms), deletes namespaces, veths and bridges. */
  destroy(stop_timeout_ms?: number): Promise<void>;
}

interface Marker {
  pid: number;
  prefix: string;
  namespaces: string[];
  links: string[];
  subnets: number[];
}

const live = new Set<Topology>();

/** Destroys every topology this process created and has not destroyed yet. */
export async function destroyAll(): Promise<void> {
  for (const t of [...live]) await t.destroy();
}

export async function createTopology(count: number): Promise<Topology> {
  if (!Number.isInteger(count) || count < 1 || count > 200) throw new Error(`hosts must be 1..200, got ${count}`);
  sweepStale();
  const prefix = freePrefix();
  const [peers_net, store_net] = freeSubnets(2);
  const bridges = { peers: `${prefix}-bp`, store: `${prefix}-bs` };
  const hosts: NetnsHost[] = Array.from({ length: count }, (_, k) => {
    const index = k + 1;
    return {
      index,
      ns: `${prefix}-h${index}`,
      address: `169.254.${peers_net}.${index}`,
      store_address: `169.254.${store_net}.${index}`,
      peers_link: `${prefix}-${index}p`,
      store_link: `${prefix}-${index}s`,
    };
  });
  const marker: Marker = {
    pid: process.pid,
    prefix,
    namespaces: hosts.map((h) => h.ns),
    links: [bridges.peers, bridges.store, ...hosts.flatMap((h) => [h.peers_link, h.store_link])],
    subnets: [peers_net, store_net],
  };
  // Written first: whatever exists of this run is listed before it is made.
  mkdirSync(MARKER_DIR, { recursive: true });
  writeFileSync(join(MARKER_DIR, `${prefix}.json`), JSON.stringify(marker));

  const spawned: SpawnedProcess[] = [];
  let destroyed = false;
  const topology: Topology = {
    prefix,
    peers_net,
    store_net,
    root_peers_address: `169.254.${peers_net}.254`,
    store_address: `169.254.${store_net}.254`,
    hosts,
    cut(index, links) {
      const h = hostOf(index);
      if (links.peers) ip("link", "set", h.peers_link, "down");
      if (links.store) ip("link", "set", h.store_link, "down");
    },
    heal(index) {
      const h = hostOf(index);
      ip("link", "set", h.peers_link, "up");
      ip("link", "set", h.store_link, "up");
    },
    spawn(index, argv, log) {
      const h = hostOf(index);
      const fd = log ? openSync(log, "a") : null;
      try {
        const child = spawn(IP_BINARY, ["netns", "exec", h.ns, ...argv], { stdio: fd === null ? ["ignore", "pipe", "pipe"] : ["ignore", fd, fd] });
        if (child.pid === undefined) throw new Error(`could not start ${argv.join(" ")} in ${h.ns}`);
        const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
        child.on("error", () => undefined); // the exit event still says what happened
        const p: SpawnedProcess = { child, pid: child.pid, log: log ?? null, exited };
        spawned.push(p);
        return p;
      } finally {
        if (fd !== null) closeSync(fd);
      }
    },
    async destroy(stop_timeout_ms = 3000) {
      if (destroyed) return;
      destroyed = true;
      live.delete(topology);
      await stopProcesses(spawned, stop_timeout_ms);
      removeRun(marker);
    },
  };
  const hostOf = (index: number): NetnsHost => {
    const h = hosts[index - 1];
    if (!h) throw new Error(`no host ${index} in topology ${prefix}`);
    return h;
  };
  live.add(topology);

  try {
    for (const [bridge, net] of [[bridges.peers, peers_net], [bridges.store, store_net]] as const) {
      ip("link", "add", bridge, "type", "bridge");
      ip("addr", "add", `169.254.${net}.254/24`, "dev", bridge);
      ip("link", "set", bridge, "up");
    }
    for (const h of hosts) {
      ip("netns", "add", h.ns);
      ip("-n", h.ns, "link", "set", "lo", "up");
      for (const [link, bridge, address] of [[h.peers_link, bridges.peers, h.address], [h.store_link, bridges.store, h.store_address]] as const) {
        // The namespace's end is created in the namespace, named like the root end with an `n`.
        ip("link", "add", link, "type", "veth", "peer", "name", `${link}n`, "netns", h.ns);
        ip("link", "set", link, "master", bridge);
        ip("link", "set", link, "up");
        ip("-n", h.ns, "addr", "add", `${address}/24`, "dev", `${link}n`);
        ip("-n", h.ns, "link", "set", `${link}n`, "up");
      }
    }
  } catch (error) {
    await topology.destroy();
    throw error;
  }
  return topology;
}

/** SIGTERM to each process still running, SIGKILL after timeout_ms, by pid only (processes of Topology.spawn). */
export async function stopProcesses(processes: SpawnedProcess[], timeout_ms: number): Promise<void> {
  const running = processes.filter((p) => p.child.exitCode === null && p.child.signalCode === null);
  for (const p of running) p.child.kill("SIGTERM");
  const all = Promise.all(running.map((p) => p.exited));
  let timer: NodeJS.Timeout | undefined;
  const timedOut = await Promise.race([all.then(() => false), new Promise<boolean>((r) => (timer = setTimeout(() => r(true), timeout_ms)))]);
  clearTimeout(timer);
  if (timedOut) {
    for (const p of running) if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill("SIGKILL");
    await all;
  }
}

/**
 * Kills what is left in the run's namespaces (processes this harness or its
 * caller started there: nothing else enters them), deletes the namespaces,
 * links and bridges, and the marker.
 */
function removeRun(marker: Marker): void {
  for (const ns of marker.namespaces) {
    const pids = spawnSync(IP_BINARY, ["netns", "pids", ns], { encoding: "utf8" });
    for (const pid of (pids.stdout ?? "").split("\n").filter((l) => /^\d+$/.test(l))) {
      try {
        process.kill(Number(pid), "SIGKILL");
      } catch {
        // gone already
      }
    }
    ipQuiet("netns", "del", ns);
  }
  // Deleting a namespace deletes its veths (both ends) once nothing holds it; the bridges are ours to delete.
  for (const link of marker.links) ipQuiet("link", "del", link);
  rmSync(join(MARKER_DIR, `${marker.prefix}.json`), { force: true });
}

function readMarkers(): Marker[] {
  let files: string[];
  try {
    files = readdirSync(MARKER_DIR).filter((f) => f.endsWith(".json"));
  } catch {
    return [];
  }
  const markers: Marker[] = [];
  for (const f of files) {
    try {
      markers.push(JSON.parse(readFileSync(join(MARKER_DIR, f), "utf8")) as Marker);
    } catch {
      // being written, or damaged: not ours to judge
    }
  }
  return markers;
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** Removes what runs whose process is gone left behind. */
function sweepStale(): void {
  for (const m of readMarkers()) if (m.pid !== process.pid && !isAlive(m.pid)) removeRun(m);
}

function freePrefix(): string {
  const namespaces = new Set(spawnSync(IP_BINARY, ["netns", "list"], { encoding: "utf8" }).stdout.split("\n").map((l) => l.split(" ")[0]));
  const links = ip("-o", "link", "show");
  for (let attempt = 0; attempt < 100; attempt++) {
    const prefix = `cnp${randomBytes(2).toString("hex")}`;
    if (![...namespaces].some((n) => n.startsWith(`${prefix}-`)) && !links.includes(`${prefix}-`)) return prefix;
  }
  throw new Error("no free namespace prefix in 100 attempts");
}

/** `n` distinct third octets of 169.254.x.0/24 that no root address and no live run uses (169.254.169.x excluded). */
function freeSubnets(n: number): number[] {
  const used = new Set<number>([169]);
  for (const m of ip("-4", "-o", "addr", "show").matchAll(/inet 169\.254\.(\d+)\./g)) used.add(Number(m[1]));
  for (const marker of readMarkers()) for (const s of marker.subnets) used.add(s);
  const chosen: number[] = [];
  for (let attempt = 0; attempt < 1000 && chosen.length < n; attempt++) {
    const x = 16 + (randomBytes(1)[0] % 234); // 16..249
    if (!used.has(x)) {
      used.add(x);
      chosen.push(x);
    }
  }
  if (chosen.length < n) throw new Error("no free 169.254.x.0/24 subnet");
  return chosen;
}
