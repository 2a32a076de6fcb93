/**
 * The CLI side of talking to a cluster: find the hosts, send a request to
 * one, and follow a VM's released output across failovers. Everything the
 * CLI knows of groups and VMs comes from the hosts over TCP (ops `records`
 * and `locate`, src/host/api.ts): it never opens the coordination store.
 *
 * A cluster is found one of two ways, both giving a ClusterAccess (the hosts
 * to ask first and the CLI's credential) that the rest of this module takes:
 * cluster.json in the state directory (clusterOrFail: the hosts `cohort up`
 * started), or the address of any host (clusterAt, `--host`): the first that
 * answers `records` names the others.
 *
 * Over mutual TLS when the access names a credential (`tls`: the cluster CA,
 * admin.crt and admin.key): each host's certificate must chain to the CA
 * and name the host the CLI meant to reach, or, dialing an address whose
 * host is not known yet, name some host.
 */
import { Connection } from "../host/connection.js";
import { MSG, parseLogPush } from "../host/messages.js";
import type { ReleasedRecord } from "../core/frames.js";
import type { VmRecord } from "../host/records.js";
import type { HostOp, HostOps } from "../host/api.js";
import { readCluster, type ClusterFile, type ClusterTls } from "../cluster/local-cluster.js";
import { readTlsMaterial, type ClientTls, type TlsMaterial } from "../tls/context.js";

/** What the CLI needs of a cluster: hosts to ask first (more are learned from their `records`) and its credential (null: plain TCP). */
export type ClusterAccess = Pick<ClusterFile, "hosts" | "tls">;

export async function clusterOrFail(state_dir: string): Promise<ClusterFile> {
  const cluster = await readCluster(state_dir);
  if (!cluster) throw new Error(`no cluster in ${state_dir} (start one with \`cohort up\`, or name a host of a running one with --host)`);
  return cluster;
}

const credentials = new Map<string, TlsMaterial>();

/** The CLI's TLS credential for this cluster (read once per process), or null if the cluster speaks plain TCP. */
export function clusterTls(cluster: ClusterAccess): TlsMaterial | null {
  if (!cluster.tls) return null;
  const key = `${cluster.tls.ca}\0${cluster.tls.cert}\0${cluster.tls.key}`;
  let material = credentials.get(key);
  if (!material) credentials.set(key, (material = readTlsMaterial(cluster.tls)));
  return material;
}

/**
 * How to dial `host` of `cluster`: mutual TLS expecting that host's
 * certificate (without `host`: any host's of the cluster CA), or plain TCP.
 */
export function dialTls(cluster: ClusterAccess, host?: string): ClientTls | null {
  const material = clusterTls(cluster);
  return material ? { material, ...(host !== undefined ? { peer: host } : {}) } : null;
}

/** OpenSSL's verdicts on a chain that does not lead to the CA the CLI trusts. */
const FOREIGN_CHAIN = new Set([
  "UNABLE_TO_VERIFY_LEAF_SIGNATURE",
  "UNABLE_TO_GET_ISSUER_CERT",
  "UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
  "SELF_SIGNED_CERT_IN_CHAIN",
  "DEPTH_ZERO_SELF_SIGNED_CERT",
  "CERT_SIGNATURE_FAILURE",
]);

/**
 * The cluster the hosts at `addresses` (host:port, `--host`) belong to, as
 * the first of them that answers `records` describes it: every registered
 * host, dialed with `tls` (the CLI's credential, or null for hosts started
 * `--insecure`). The address's host is not known before it answers, so its
 * certificate must chain to the CA and name some host. Throws, naming every
 * address tried and why it failed, if none answers.
 */
export async function clusterAt(addresses: readonly string[], tls: ClusterTls | null): Promise<ClusterAccess> {
  if (addresses.length === 0) throw new Error("no host address given");
  const seed: ClusterAccess = { hosts: [], tls };
  clusterTls(seed); // a credential that cannot be read or does not fit fails here, naming its files
  const errors: string[] = [];
  for (const address of addresses) {
    try {
      const { hosts } = await ask(seed, { id: null, address }, "records", {});
      if (hosts.length > 0) return { hosts, tls };
      errors.push(`${address}: answered, but no host is registered in its cluster's store`);
    } catch (error) {
      errors.push(`${address}: ${whyNot(error as Error & { code?: string }, tls)}`);
    }
  }
  throw new Error(`no host of the cluster answered at the address${addresses.length > 1 ? "es" : ""} given:\n${errors.map((e) => `  ${e}`).join("\n")}`);
}

/** A failed dial or request's reason, with what the user may have got wrong. */
function whyNot(e: Error & { code?: string }, tls: ClusterTls | null): string {
  if (e.code && FOREIGN_CHAIN.has(e.code)) return `${e.message} (${e.code}): the host's certificate was not issued by the CA in ${tls?.ca ?? "?"}`;
  if (e.code === "CERT_HAS_EXPIRED") return `${e.message}: the host's certificate has expired`;
  if (tls && e.code === "ECONNRESET") return `${e.message} (a host started --insecure speaks plain TCP: give --insecure instead of a credential)`;
  if (!tls && /connection closed/.test(e.message)) return `${e.message} (a host with TLS closes plain TCP connections: give --credentials)`;
  return e.message;
}

export interface RequestOptions {
  /** Skip this host (e.g. one that may be paused). */
  exclude?: string;
  /** Give up on a host that does not answer within this time and ask the next (default: the connection's 30 s). */
  timeout_ms?: number;
}

/**
 * Where host `id` listens: the access's hosts (the ones `cohort up` started,
 * or those registered when `--host` was asked), else the registrations the
 * hosts read from the store (a host restarted, as `h2.2`, or started by
 * hand). Null if nobody knows it.
 */
export async function hostAddress(cluster: ClusterAccess, id: string): Promise<string | null> {
  const known = cluster.hosts.find((h) => h.id === id) ?? learnedHosts(cluster).find((h) => h.id === id);
  if (known) return known.address;
  const { hosts } = await requestAny(cluster, "records", {});
  return hosts.find((h) => h.id === id)?.address ?? null;
}

/**
 * Hosts this process learned from `records` answers beyond the access's
 * own: asked too when none of those answer, so a long-running follower
 * keeps finding the cluster after every host it started with was replaced
 * by a restarted one.
 */
const learned = new WeakMap<ClusterAccess, Map<string, string>>();

function learnedHosts(cluster: ClusterAccess): { id: string; address: string }[] {
  return [...(learned.get(cluster) ?? new Map<string, string>())].map(([id, address]) => ({ id, address }));
}

function learn(cluster: ClusterAccess, hosts: readonly { id: string; address: string }[]): void {
  let map = learned.get(cluster);
  if (!map) learned.set(cluster, (map = new Map()));
  for (const h of hosts) if (!cluster.hosts.some((c) => c.id === h.id)) map.set(h.id, h.address);
}

/**
 * Ops that only read: one that reached a host and got no answer (the host
 * paused, or it closed the connection) is asked of the next host. Any other
 * op (a deploy, a request to a VM) may have been carried out by a host that
 * did not answer, so it is never sent twice: a deploy sent again after a
 * timeout answered "already deployed" for the group the first host was
 * still deploying.
 */
const READ_ONLY_OPS: ReadonlySet<HostOp> = new Set<HostOp>(["ping", "status", "records", "locate", "logs"]);

/**
 * How long a deploy is waited for: it starts every VM of the group on
 * several hosts, which takes seconds for large groups on a loaded machine
 * (the hosts bound its attempts themselves), not the 30 s of other requests.
 */
export const DEPLOY_TIMEOUT_MS = 300_000;

/** A request that reached a host which did not answer it: it may have been carried out there. */
class UnansweredError extends Error {
  override name = "UnansweredError";
}

/** Sends one request to the first host that answers (or to `host_id`). */
export async function requestAny<Op extends HostOp>(cluster: ClusterAccess, op: Op, args: HostOps[Op]["args"], body?: Uint8Array, host_id?: string, options: RequestOptions = {}): Promise<HostOps[Op]["result"]> {
  const timeout_ms = options.timeout_ms ?? (op === "deploy" ? DEPLOY_TIMEOUT_MS : undefined);
  const errors: string[] = [];
  let hosts: { id: string; address: string }[] = [...cluster.hosts, ...learnedHosts(cluster)];
  if (host_id && !hosts.some((h) => h.id === host_id)) {
    const address = await hostAddress(cluster, host_id);
    hosts = address ? [{ id: host_id, address }] : [];
  }
  for (const host of hosts) {
    if ((host_id && host.id !== host_id) || host.id === options.exclude) continue;
    try {
      return await ask(cluster, host, op, args, body, timeout_ms);
    } catch (error) {
      if (error instanceof UnansweredError && !READ_ONLY_OPS.has(op)) throw error;
      const e = error as Error & { code?: string };
      // An answer that says no is final; only unreachable hosts make us try the next one.
      if (e.code && e.code !== "ECONNREFUSED") throw error;
      errors.push(`${host.id}: ${e.message}`);
    }
  }
  throw new Error(`no host answered (${errors.join("; ")})`);
}

/** One request on a connection of its own to `host` (id null: whichever host listens at the address). */
async function ask<Op extends HostOp>(cluster: ClusterAccess, host: { id: string | null; address: string }, op: Op, args: HostOps[Op]["args"], body?: Uint8Array, timeout_ms?: number): Promise<HostOps[Op]["result"]> {
  let connection: Connection | null = null;
  try {
    connection = await Connection.open(host.address, `cli→${host.id ?? host.address}`, 1000, dialTls(cluster, host.id ?? undefined));
    connection.send(MSG.HELLO, { from: "cli" });
    let result: HostOps[Op]["result"];
    try {
      result = (await connection.request(op, args, body, timeout_ms)) as HostOps[Op]["result"];
    } catch (error) {
      const e = error as Error & { code?: string };
      // An answer that says no carries its code; a timeout or a closed connection leaves the outcome unknown.
      if (e.code && e.code !== "ConnectionClosed") throw error;
      throw new UnansweredError(`${host.id ?? host.address} did not answer ${op} (${e.message}); it may have been carried out there: \`cohort status\` shows what runs`, { cause: error });
    }
    if (op === "records") learn(cluster, (result as HostOps["records"]["result"]).hosts);
    return result;
  } finally {
    connection?.close("done");
  }
}

/** Where `vm` is (its record in the coordination store, as a host reads it), or null if there is no such VM. */
export async function locateVm(cluster: ClusterAccess, vm: string, options: RequestOptions = {}): Promise<VmRecord | null> {
  return (await requestAny(cluster, "locate", { vm }, undefined, undefined, options)).vm;
}

/**
 * The released output of `vm` its primary keeps, from `from_seq` to the
 * newest, page by page (a long log does not fit one reply); `onRecords` gets
 * each page in order. Returns the seq after the last record read.
 */
export async function readLog(cluster: ClusterAccess, vm: string, from_seq: number, onRecords: (records: ReleasedRecord[]) => void): Promise<number> {
  const record = await locateVm(cluster, vm);
  if (!record) throw new Error(`no VM named ${vm}`);
  let next = from_seq;
  for (;;) {
    const page = await requestAny(cluster, "logs", { vm, from_seq: next, follow: false }, undefined, record.primary);
    if (page.records.length) {
      onRecords(page.records);
      next = page.records[page.records.length - 1].seq + 1;
    }
    if (!page.more || !page.records.length) return next;
  }
}

/** A host that does not answer `locate` within this is passed over (it may be paused). */
const LOCATE_TIMEOUT_MS = 500;
/**
 * A follower whose stream brought nothing for WATCH_SILENCE_MS asks where the
 * VM is (its host may be paused); silent on, it asks again after twice that
 * wait, and so on up to WATCH_SILENCE_MAX_MS between questions. Looked at
 * every WATCH_TICK_MS.
 */
const WATCH_SILENCE_MS = 500;
const WATCH_SILENCE_MAX_MS = 4000;
const WATCH_TICK_MS = 100;
/** A follower's retries: FOLLOW_RETRY_MS, doubled per attempt that failed slowly (after FOLLOW_SLOW_ATTEMPT_MS), at most FOLLOW_RETRY_MAX_MS, jittered ±50%. */
const FOLLOW_RETRY_MS = 50;
const FOLLOW_RETRY_MAX_MS = 2000;
const FOLLOW_SLOW_ATTEMPT_MS = 250;
/** Longest wait of a follower's attempt for one answer, however slow the ones before were. */
const FOLLOW_TIMEOUT_MAX_MS = 8000;

export interface FollowedRecord extends ReleasedRecord {
  received_ms: number;
  host: string;
}

/**
 * Follows the released output of `vm` from `from_seq`: reads what the
 * primary's host has, then its pushes; when that host goes away, waits for
 * the VM's record to name a new primary and continues from the next sequence
 * number. Each record is delivered once, in order.
 */
export class LogFollower {
  private nextSeq: number;
  private connection: Connection | null = null;
  private stopped = false;

  constructor(
    private readonly cluster: ClusterAccess,
    private readonly vm: string,
    from_seq: number,
    private readonly onRecord: (record: FollowedRecord) => void,
    private readonly onNotice: (line: string) => void = () => {},
  ) {
    this.nextSeq = from_seq;
  }

  get lastSeq(): number {
    return this.nextSeq - 1;
  }

  async run(): Promise<void> {
    let lastHost = "";
    // Attempts in a row that failed slowly (a timeout: the hosts are busy, or one is paused). Each
    // waits twice as long before the next, so that many followers of a loaded cluster do not keep
    // it busier with handshakes that time out; an attempt refused at once (a dead host) waits little.
    let slow = 0;
    const retry = async (started_ms: number) => {
      if (Date.now() - started_ms >= FOLLOW_SLOW_ATTEMPT_MS) slow++;
      const base_ms = Math.min(FOLLOW_RETRY_MAX_MS, FOLLOW_RETRY_MS * 2 ** slow);
      await sleep(base_ms * (0.5 + Math.random()));
    };
    while (!this.stopped) {
      const started_ms = Date.now();
      // A cluster slow to answer gets longer to answer, too: handshakes that keep timing out never end.
      this.timeout_ms = Math.min(FOLLOW_TIMEOUT_MAX_MS, LOCATE_TIMEOUT_MS * 2 ** slow);
      const record = await locateVm(this.cluster, this.vm, { timeout_ms: this.timeout_ms }).catch(() => undefined);
      if (record === null) throw new Error(`no VM named ${this.vm}`);
      const address = record ? await hostAddress(this.cluster, record.primary).catch(() => null) : null;
      const host = record && address ? { id: record.primary, address } : undefined;
      if (!record || !host) {
        // no host answered: look again shortly
        await retry(started_ms);
        continue;
      }
      this.streaming = false;
      try {
        if (lastHost && host.id !== lastHost) this.onNotice(`-- ${this.vm} now on ${host.id} (incarnation ${record.incarnation})`);
        await this.followOn(host.id, host.address);
      } catch {
        // the host went away or does not run the VM (yet): look again shortly
      }
      lastHost = host.id;
      if (this.stopped) break;
      if (this.streaming) {
        slow = 0;
        await sleep(10);
      } else await retry(started_ms);
    }
  }

  /** Whether the current attempt got the primary's first page (it was streaming, not refused or timed out). */
  private streaming = false;
  /** How long the current attempt waits for each answer (a dial, a locate, the first page). */
  private timeout_ms = LOCATE_TIMEOUT_MS;

  stop(): void {
    this.stopped = true;
    this.connection?.close("follower stopped");
  }

  private async followOn(host: string, address: string): Promise<void> {
    const connection = await Connection.open(address, `logs→${host}`, this.timeout_ms, dialTls(this.cluster, host));
    // Stopped while it dialed: nobody would close this connection, and run() would wait on it for ever.
    if (this.stopped) {
      connection.close("follower stopped");
      return;
    }
    this.connection = connection;
    const closed = new Promise<void>((resolve) => connection.once("close", () => resolve()));
    // Pushes can be handled before the reply's continuation runs (a resolved promise runs later):
    // hold them until the reply's records are delivered, to keep sequence order.
    let early: ReleasedRecord[][] | null = [];
    connection.on("message", (type, header) => {
      if (type !== MSG.LOG) return;
      const { records } = parseLogPush(header);
      if (early) early.push(records);
      else this.deliver(host, records);
    });
    connection.send(MSG.HELLO, { from: "cli" });
    const reply = await connection.request("logs", { vm: this.vm, from_seq: this.nextSeq, follow: true }, undefined, Math.max(2000, this.timeout_ms));
    if (reply.role !== "primary") {
      connection.close("not the primary");
      throw new Error("not the primary");
    }
    this.streaming = true;
    this.deliver(host, reply.records);
    for (const records of early) this.deliver(host, records);
    early = null;
    // A paused host keeps its sockets open: once the stream has been silent a while, ask the other
    // hosts where the VM is, and leave when another host took over. Only while silent, and less
    // often the longer it stays so: each question is a connection of its own (a TLS handshake),
    // and 256 followers asking every 100 ms kept a cluster's hosts too busy to run the group they
    // followed. One question at a time.
    let asking = false;
    let wait_ms = WATCH_SILENCE_MS;
    let askAt_ms = Date.now() + wait_ms;
    const watch = setInterval(() => {
      if (asking || Date.now() < askAt_ms) return;
      asking = true;
      wait_ms = Math.min(2 * wait_ms, WATCH_SILENCE_MAX_MS);
      askAt_ms = Date.now() + wait_ms;
      locateVm(this.cluster, this.vm, { exclude: host, timeout_ms: LOCATE_TIMEOUT_MS })
        .then(
          (record) => {
            if (record && record.primary !== host) connection.close("primary moved");
          },
          () => undefined,
        )
        .finally(() => (asking = false));
    }, WATCH_TICK_MS);
    this.onHeard = () => {
      wait_ms = WATCH_SILENCE_MS;
      askAt_ms = Date.now() + wait_ms;
    };
    try {
      await closed;
    } finally {
      clearInterval(watch);
      this.onHeard = () => undefined;
    }
  }

  /** Called when the stream brings records (the watch of followOn waits again). */
  private onHeard: () => void = () => undefined;

  private deliver(host: string, records: ReleasedRecord[]): void {
    const now = Date.now();
    if (records.length) this.onHeard();
    for (const r of records) {
      if (r.seq < this.nextSeq) continue; // already delivered (re-released after a failover)
      if (r.seq > this.nextSeq) this.onNotice(`-- gap: expected output ${this.nextSeq}, got ${r.seq}`);
      this.nextSeq = r.seq + 1;
      this.onRecord({ ...r, received_ms: now, host });
    }
  }
}

export const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
