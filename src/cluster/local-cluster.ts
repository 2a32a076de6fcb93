/**
 * A local cluster: N `cohort host` processes on loopback sharing one state
 * directory (`cohort up` / `cohort down`).
 *
 *   <state_dir>/cluster.json     the hosts `up` started (ClusterFile); written atomically
 *   <state_dir>/cluster.lock     held while an `up` or `down` runs (one at a time)
 *   <state_dir>/logs/h<i>.log    stdout and stderr of host h<i> (appended to)
 *   <state_dir>/store/           the embedded coordination store (src/store/embedded.ts), unless
 *                                the cluster uses etcd (`store` in cluster.json, src/store/open.ts)
 *   <state_dir>/tls/             the cluster CA (ca.crt, ca.key) and each host's certificate and key
 *                                (h<i>.crt, h<i>.key), made by `up` (src/tls/ca.ts); the CA is kept
 *   <state_dir>/admin.crt, .key  the CLI's credential (`tls` in cluster.json); keys are mode 0600
 *
 * Protocol with the host daemon: `up` starts each host as
 * `[...host_command, "--id", "h<i>", "--port", "0", "--state-dir", <abs state_dir>, "--store", <store>,
 *  "--tls-dir", <abs state_dir>/tls (or "--insecure" with `tls: false`), ...extra_args]`,
 * in the caller's session (see spawnHost), and waits until the host has put its HostRecord under `hosts/h<i>`
 * in the cluster's coordination store with `pid` equal to the pid
 * `up` spawned. So host_command must start the daemon itself (e.g.
 * `node bin/cohort.js host` or `node --import tsx ...`), not a wrapper that
 * forks it (`npx ...`), whose pid would differ.
 *
 * Safety: `down` signals exactly the pids in cluster.json and only while they
 * still belong to the process `up` started: a pid that is gone, a zombie, or
 * was reused by a process started after the host registered is reported as
 * already gone and never signalled.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { closeSync, openSync, writeSync } from "node:fs";
import * as fsp from "node:fs/promises";
import * as path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { z } from "zod";
import { HOST_ID_RE, hostGenerationKey } from "../host/instance.js";
import { acquireFileLock, type FileLock, isProcessAlive, processStartMs } from "../store/embedded.js";
import { openStore, parseStoreSpec, STORE_DEFAULT } from "../store/open.js";
import { type CoordinationStore, StoreError } from "../store/store.js";

export interface HostRecord {
  id: string;
  /** "127.0.0.1:port" */
  address: string;
  pid: number;
  started_at_ms: number;
}

export interface ClusterFile {
  state_dir: string;
  /** The coordination store the hosts use (src/store/open.ts): "embedded" or etcd://... */
  store: string;
  hosts: HostRecord[];
  created_at_ms: number;
  /** The CLI's credential: the cluster CA's certificate and the admin certificate and key (paths). null: the hosts speak plain TCP. */
  tls: ClusterTls | null;
}

export interface ClusterTls {
  ca: string;
  cert: string;
  key: string;
}

export interface UpOptions {
  hosts: number;
  state_dir: string;
  /** argv prefix that starts one host, e.g. [process.execPath, "/abs/bin/cohort.js", "host"] */
  host_command: string[];
  /** How long to wait for every host to register (default 10 s). */
  ready_timeout_ms?: number;
  /** Appended to every host's argv. */
  extra_args?: string[];
  /** The hosts' coordination store (src/store/open.ts; default "embedded"), passed as `--store`. */
  store?: string;
  /**
   * Mutual TLS between hosts, VMs and the CLI (default true): a CA and a
   * certificate per host in <state_dir>/tls, the admin credential beside
   * cluster.json. false starts the hosts with `--insecure` (benchmarks
   * measure what TLS costs with it).
   */
  tls?: boolean;
}

export interface DownOptions {
  state_dir: string;
  /** How long to wait after SIGTERM before SIGKILL (default 5 s). */
  timeout_ms?: number;
}

export interface DownResult {
  /** Pids that were running and were stopped (SIGTERM, or SIGKILL after the timeout). */
  stopped: number[];
  /** Pids in cluster.json that were no longer running (never signalled). */
  already_gone: number[];
  /** The subset of `stopped` that needed SIGKILL. */
  killed: number[];
}

export type LocalClusterErrorCode =
  | "InvalidArgument"
  /** cluster.json names hosts that are still running. */
  | "AlreadyRunning"
  /** Another `up` or `down` holds cluster.lock. */
  | "Busy"
  /** A host command could not be started at all. */
  | "SpawnFailed"
  /** Some host did not register in time or exited first; everything `up` started was stopped. */
  | "HostsNotReady"
  /** cluster.json cannot be read back. */
  | "InvalidClusterFile"
  /** A host survived SIGKILL; cluster.json is kept. */
  | "StopFailed";

export class LocalClusterError extends Error {
  override name = "LocalClusterError";

  constructor(
    /** Stable, machine-readable; messages may change, codes do not. */
    readonly code: LocalClusterErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

export const LOCAL_CLUSTER_DEFAULTS = {
  ready_timeout_ms: 10_000,
  stop_timeout_ms: 5_000,
  poll_ms: 50,
  /** After SIGKILL, how long to wait for the kernel to remove a process. */
  kill_wait_ms: 3_000,
} as const;

/** The state directory: $COHORT_STATE_DIR, else ./.cohort (absolute). */
export function defaultStateDir(): string {
  const env = process.env.COHORT_STATE_DIR;
  return path.resolve(env !== undefined && env !== "" ? env : ".cohort");
}

export function clusterFilePath(state_dir: string): string {
  return path.join(path.resolve(state_dir), "cluster.json");
}

export function hostLogPath(state_dir: string, id: string): string {
  return path.join(path.resolve(state_dir), "logs", `${id}.log`);
}

const hostRecordSchema = z.object({
  id: z.string().regex(HOST_ID_RE),
  address: z.string().regex(/^[^\s]+:\d{1,5}$/),
  pid: z.number().int().positive(),
  started_at_ms: z.number().int().nonnegative(),
});

const clusterFileSchema = z.object({
  state_dir: z.string(),
  // Cluster files written before the store was selectable used the embedded one.
  store: z.string().default(STORE_DEFAULT),
  hosts: z.array(hostRecordSchema),
  created_at_ms: z.number().int().nonnegative(),
  // Cluster files written before TLS: plain TCP.
  tls: z.object({ ca: z.string(), cert: z.string(), key: z.string() }).nullable().default(null),
});

/** cluster.json of `state_dir`, or null if there is none. Throws LocalClusterError("InvalidClusterFile") if it is damaged. */
export async function readCluster(state_dir: string): Promise<ClusterFile | null> {
  const file = clusterFilePath(state_dir);
  let text: string;
  try {
    text = await fsp.readFile(file, "utf8");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw e;
  }
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (e) {
    throw new LocalClusterError("InvalidClusterFile", `${file} is not valid JSON: ${(e as Error).message}`, { cause: e });
  }
  const parsed = clusterFileSchema.safeParse(doc);
  if (!parsed.success) {
    const issues = parsed.error.issues.map((i) => `${i.path.join(".") || "(root)"}: ${i.message}`).join("; ");
    throw new LocalClusterError("InvalidClusterFile", `${file} is not a cluster file: ${issues}`);
  }
  return parsed.data;
}

/**
 * Whether the process named by a host record is still the one that
 * registered: alive, and (where /proc tells) started no later than it
 * registered. A reused pid belongs to a process started after our host died,
 * hence after it registered. The 2 s slack covers the 1 s resolution of the
 * boot time and clock adjustments.
 */
export function isHostProcess(rec: Pick<HostRecord, "pid" | "started_at_ms">): boolean {
  if (!isProcessAlive(rec.pid)) return false;
  const start = processStartMs(rec.pid);
  return start === null || start <= rec.started_at_ms + 2_000;
}

interface Started {
  id: string;
  pid: number;
  log: string;
  child: ChildProcess;
  exit: { code: number | null; signal: NodeJS.Signals | null } | null;
  record: HostRecord | null;
}

/**
 * Starts a local cluster and returns once every host has registered. Refuses
 * if cluster.json names hosts that are still running. On failure (a host
 * exits or does not register within ready_timeout_ms) it kills everything it
 * started and throws an error naming the hosts and their log files.
 */
export async function up(opts: UpOptions): Promise<ClusterFile> {
  if (!Number.isSafeInteger(opts.hosts) || opts.hosts < 1 || opts.hosts > 1000) {
    throw new LocalClusterError("InvalidArgument", `hosts must be an integer from 1 to 1000, got ${String(opts.hosts)}`);
  }
  if (opts.host_command.length === 0) throw new LocalClusterError("InvalidArgument", "host_command is empty");
  const ready_timeout_ms = opts.ready_timeout_ms ?? LOCAL_CLUSTER_DEFAULTS.ready_timeout_ms;
  const state_dir = path.resolve(opts.state_dir);
  await fsp.mkdir(path.join(state_dir, "logs"), { recursive: true });

  const store_spec = opts.store ?? STORE_DEFAULT;
  const store = openStore(store_spec, state_dir); // a bad spec throws before anything starts
  const lock = await lockCluster(state_dir, "up").catch(async (e: unknown) => {
    await store.close();
    throw e;
  });
  const started: Started[] = [];
  try {
    const existing = await readCluster(state_dir);
    if (existing !== null) {
      const running = existing.hosts.filter(isHostProcess);
      if (running.length > 0) {
        throw new LocalClusterError(
          "AlreadyRunning",
          `a cluster is already running in ${state_dir}: ${running.map((h) => `${h.id} (pid ${h.pid}, ${h.address})`).join(", ")}; ` +
            `stop it with \`cohort down\` first`,
        );
      }
      await fsp.rm(clusterFilePath(state_dir), { force: true });
    }
    await removeDeadHostRecords(store);
    // A new cluster: its hosts start from their first generation (src/host/instance.ts), so they take part as h1, h2, ...
    for (let i = 1; i <= opts.hosts; i++) await store.delete(hostGenerationKey(`h${i}`));

    const ids = Array.from({ length: opts.hosts }, (_, i) => `h${i + 1}`);
    let tls: ClusterTls | null = null;
    let tls_args = ["--insecure"];
    if (opts.tls ?? true) {
      // Loaded here only: the certificate builder is not needed by the commands that merely read cluster.json.
      const { localClusterTls } = await import("../tls/ca.js");
      const made = await localClusterTls(state_dir, ids);
      tls = made.admin;
      tls_args = ["--tls-dir", made.tls_dir];
    }
    const [command, ...prefix] = opts.host_command;
    for (const id of ids) {
      // On etcd the hosts share no files: each has its own state directory (its module cache). The embedded
      // store is files in the state directory, which the hosts of one machine share.
      const host_state_dir = parseStoreSpec(store_spec).kind === "embedded" ? state_dir : hostStateDir(state_dir, id);
      const args = [...prefix, "--id", id, "--port", "0", "--state-dir", host_state_dir, "--store", store_spec, ...tls_args, ...(opts.extra_args ?? [])];
      started.push(await spawnHost(id, command, args, hostLogPath(state_dir, id)));
    }

    const deadline = Date.now() + ready_timeout_ms;
    let store_error: unknown = null;
    for (;;) {
      for (const s of started) {
        if (s.record !== null) continue;
        try {
          const got = await store.get<unknown>(`hosts/${s.id}`);
          const rec = got === null ? null : hostRecordSchema.safeParse(got.value);
          if (rec?.success && rec.data.id === s.id && rec.data.pid === s.pid) s.record = rec.data;
          store_error = null;
        } catch (e) {
          if (!(e instanceof StoreError)) throw e;
          store_error = e; // transient (a lock, a rename in progress): ask again
        }
      }
      const waiting = started.filter((s) => s.record === null);
      if (waiting.length === 0) break;
      const exited = waiting.filter((s) => s.exit !== null);
      if (exited.length > 0 || Date.now() >= deadline) {
        throw new LocalClusterError("HostsNotReady", await notReadyMessage(started, waiting, ready_timeout_ms, store_error));
      }
      await sleep(LOCAL_CLUSTER_DEFAULTS.poll_ms);
    }

    const cluster: ClusterFile = {
      state_dir,
      store: store_spec,
      hosts: started.map((s) => s.record as HostRecord),
      created_at_ms: Date.now(),
      tls,
    };
    await writeFileAtomic(clusterFilePath(state_dir), `${JSON.stringify(cluster, null, 2)}\n`);
    started.length = 0; // handed over to cluster.json
    return cluster;
  } finally {
    if (started.length > 0) await killStarted(started, store);
    await store.close();
    await lock.release();
  }
}

/**
 * Stops the hosts in cluster.json: SIGTERM to each pid still running, up to
 * timeout_ms for them to exit, then SIGKILL. Removes cluster.json and the
 * `hosts/*` records of processes that are gone. Never signals a process that
 * is not in cluster.json. Without cluster.json there is nothing to do.
 */
export async function down(opts: DownOptions): Promise<DownResult> {
  const state_dir = path.resolve(opts.state_dir);
  const timeout_ms = opts.timeout_ms ?? LOCAL_CLUSTER_DEFAULTS.stop_timeout_ms;
  const result: DownResult = { stopped: [], already_gone: [], killed: [] };
  if ((await readCluster(state_dir)) === null) return result;

  const lock = await lockCluster(state_dir, "down");
  let store: CoordinationStore | null = null;
  try {
    const cluster = await readCluster(state_dir);
    if (cluster === null) return result; // another down was faster
    store = openStore(cluster.store, state_dir);
    const targets: HostRecord[] = [];
    for (const h of cluster.hosts) {
      if (isHostProcess(h) && signal(h.pid, "SIGTERM")) targets.push(h);
      else result.already_gone.push(h.pid);
    }
    let alive = await waitForExit(targets, timeout_ms);
    for (const h of alive) {
      if (isHostProcess(h) && signal(h.pid, "SIGKILL")) result.killed.push(h.pid);
    }
    alive = await waitForExit(alive, LOCAL_CLUSTER_DEFAULTS.kill_wait_ms);
    if (alive.length > 0) {
      throw new LocalClusterError(
        "StopFailed",
        `host(s) ${alive.map((h) => `${h.id} (pid ${h.pid})`).join(", ")} still running after SIGKILL; ${clusterFilePath(state_dir)} kept`,
      );
    }
    result.stopped = targets.map((h) => h.pid);
    await removeDeadHostRecords(store);
    await fsp.rm(clusterFilePath(state_dir), { force: true });
    return result;
  } finally {
    await store?.close();
    await lock.release();
  }
}

// ---- internals ----------------------------------------------------------------

async function lockCluster(state_dir: string, what: string): Promise<FileLock> {
  try {
    return await acquireFileLock(path.join(state_dir, "cluster.lock"), { timeout_ms: 0, stale_ms: 1_000, label: `cohort ${what}` });
  } catch (e) {
    if (e instanceof StoreError && e.code === "StoreUnavailable") {
      throw new LocalClusterError("Busy", `another \`cohort up\` or \`cohort down\` is running in ${state_dir} (${e.message})`, { cause: e });
    }
    throw e;
  }
}

/** Where host `id` of a cluster on etcd keeps its files (module cache): nothing is shared between hosts. */
export function hostStateDir(state_dir: string, id: string): string {
  return path.join(path.resolve(state_dir), "hosts", id);
}

/** Deletes the `hosts/*` records whose process is gone (or that are not host records). */
async function removeDeadHostRecords(store: CoordinationStore): Promise<void> {
  for (const { key, value } of await store.list<unknown>("hosts/")) {
    const rec = hostRecordSchema.safeParse(value);
    if (!rec.success || !isHostProcess(rec.data)) await store.delete(key);
  }
}

async function spawnHost(id: string, command: string, args: string[], log: string): Promise<Started> {
  const fd = openSync(log, "a");
  let child: ChildProcess;
  try {
    writeSync(fd, `--- ${new Date().toISOString()} cohort up: starting ${id}: ${[command, ...args].join(" ")}\n`);
    // Not detached: a detached child calls setsid(), and on Linux with autogroup scheduling (the
    // default on desktop and many server kernels) every session is its own scheduling group. Each
    // host then got an equal share of the CPU as a whole, its main thread (heartbeats, the protocol)
    // no longer ranked above its own VM threads across cores (see src/util/thread-priority.ts),
    // and a 16-VM deploy over 3 hosts on 2 cores left main threads runnable but unscheduled for
    // 300-470 ms: peers declared live hosts failed. In the caller's session the hosts share one
    // group. They survive `up`'s exit all the same (unref below; their stdio is a log file, never
    // the terminal), and a Ctrl-C while `up` or `demo` still runs stops them with it.
    child = spawn(command, args, { stdio: ["ignore", fd, fd] });
  } finally {
    closeSync(fd);
  }
  if (child.pid === undefined) {
    const error = await new Promise<Error>((resolve) => {
      child.once("error", resolve);
      setTimeout(() => resolve(new Error("no pid")), 1_000).unref();
    });
    throw new LocalClusterError("SpawnFailed", `cannot start host ${id} (${command}): ${error.message}`, { cause: error });
  }
  const s: Started = { id, pid: child.pid, log, child, exit: null, record: null };
  child.once("exit", (code, sig) => (s.exit = { code, signal: sig }));
  child.on("error", () => {}); // e.g. a failed kill(); the exit event still tells what happened
  child.unref(); // a CLI that ran `up` may exit while the hosts run on
  return s;
}

/** SIGKILLs the host processes `up` started and waits for them to exit. */
async function killStarted(started: Started[], store: CoordinationStore): Promise<void> {
  for (const s of started) {
    if (s.exit !== null) continue;
    // Our child's pid cannot be reused before we reap it, so this reaches only what we started.
    signal(s.pid, "SIGKILL");
  }
  const deadline = Date.now() + LOCAL_CLUSTER_DEFAULTS.kill_wait_ms;
  while (started.some((s) => s.exit === null) && Date.now() < deadline) await sleep(10);
  for (const s of started) {
    try {
      const rec = await store.get<HostRecord>(`hosts/${s.id}`);
      if (rec !== null && rec.value.pid === s.pid) await store.delete(`hosts/${s.id}`);
    } catch {
      // best effort: a stale record of a dead pid is ignored by the next up
    }
  }
}

async function notReadyMessage(started: Started[], waiting: Started[], timeout_ms: number, store_error: unknown): Promise<string> {
  // Either some host exited (we stop at once) or the timeout passed.
  const exited = waiting.filter((s) => s.exit !== null);
  const failed = exited.length > 0 ? exited : waiting;
  const pending = exited.length > 0 ? waiting.filter((s) => s.exit === null) : [];
  const lines = [
    `cohort up: ${failed.length} of ${started.length} host(s) did not come up: ` +
      failed
        .map((s) => {
          const why =
            s.exit === null ? `did not register within ${timeout_ms} ms`
            : `exited before registering (${s.exit.signal !== null ? `signal ${s.exit.signal}` : `exit code ${s.exit.code}`})`;
          return `${s.id} (pid ${s.pid}) ${why}, see ${s.log}`;
        })
        .join("; "),
  ];
  if (pending.length > 0) lines.push(`(${pending.map((s) => s.id).join(", ")} had not registered yet either)`);
  if (store_error !== null) lines.push(`last store error: ${(store_error as Error).message}`);
  for (const s of failed) {
    const tail = await logTail(s.log, 10);
    if (tail !== "") lines.push(`--- last lines of ${s.log}:`, tail);
  }
  lines.push("every host this `up` started has been stopped");
  return lines.join("\n");
}

async function logTail(file: string, max_lines: number): Promise<string> {
  try {
    const fh = await fsp.open(file, "r");
    try {
      const { size } = await fh.stat();
      const len = Math.min(size, 4096);
      const buf = Buffer.alloc(len);
      await fh.read(buf, 0, len, size - len);
      return buf.toString("utf8").trimEnd().split("\n").slice(-max_lines).join("\n");
    } finally {
      await fh.close();
    }
  } catch {
    return "";
  }
}

/** Sends `sig`; false if the process no longer exists. */
function signal(pid: number, sig: NodeJS.Signals): boolean {
  try {
    process.kill(pid, sig);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ESRCH") return false;
    throw e;
  }
}

/** Polls until the hosts' processes are gone; returns those still running at the timeout. */
async function waitForExit(hosts: HostRecord[], timeout_ms: number): Promise<HostRecord[]> {
  const deadline = Date.now() + timeout_ms;
  let alive = hosts.filter(isHostProcess);
  while (alive.length > 0 && Date.now() < deadline) {
    await sleep(25);
    alive = alive.filter(isHostProcess);
  }
  return alive;
}

async function writeFileAtomic(file: string, text: string): Promise<void> {
  const tmp = `${file}.${process.pid}.tmp`;
  try {
    const fh = await fsp.open(tmp, "w");
    try {
      await fh.writeFile(text, "utf8");
      await fh.datasync();
    } finally {
      await fh.close();
    }
    await fsp.rename(tmp, file);
  } catch (e) {
    await fsp.rm(tmp, { force: true });
    throw e;
  }
}
