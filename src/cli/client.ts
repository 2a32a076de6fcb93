/**
 * The CLI side of talking to a cluster: find the hosts (cluster.json in the
 * state directory, and the coordination store it names), send a request to
 * one, and follow a VM's released output across failovers.
 */
import { Connection } from "../host/connection.js";
import { MSG, parseLogPush } from "../host/messages.js";
import type { ReleasedRecord } from "../core/frames.js";
import { vmKey, type VmRecord } from "../host/records.js";
import type { HostOp, HostOps } from "../host/api.js";
import { readCluster, type ClusterFile } from "../cluster/local-cluster.js";
import { openStore } from "../store/open.js";
import type { CoordinationStore } from "../store/store.js";

/** The coordination store of a cluster `up` started (the caller closes it). */
export function clusterStore(cluster: ClusterFile): CoordinationStore {
  return openStore(cluster.store, cluster.state_dir);
}

export async function clusterOrFail(state_dir: string): Promise<ClusterFile> {
  const cluster = await readCluster(state_dir);
  if (!cluster) throw new Error(`no cluster in ${state_dir} (start one with \`cohort up\`)`);
  return cluster;
}

/** Sends one request to the first host that answers (or to `host_id`). */
export async function requestAny<Op extends HostOp>(cluster: ClusterFile, op: Op, args: HostOps[Op]["args"], body?: Uint8Array, host_id?: string): Promise<HostOps[Op]["result"]> {
  const errors: string[] = [];
  for (const host of cluster.hosts) {
    if (host_id && host.id !== host_id) continue;
    let connection: Connection | null = null;
    try {
      connection = await Connection.open(host.address, `cli→${host.id}`, 1000);
      connection.send(MSG.HELLO, { from: "cli" });
      return await connection.request(op, args, body);
    } catch (error) {
      const e = error as Error & { code?: string };
      // An answer that says no is final; only unreachable hosts make us try the next one.
      if (e.code && e.code !== "ECONNREFUSED") throw error;
      errors.push(`${host.id}: ${e.message}`);
    } finally {
      connection?.close("done");
    }
  }
  throw new Error(`no host answered (${errors.join("; ")})`);
}

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
  private readonly store: CoordinationStore;

  constructor(
    private readonly cluster: ClusterFile,
    private readonly vm: string,
    from_seq: number,
    private readonly onRecord: (record: FollowedRecord) => void,
    private readonly onNotice: (line: string) => void = () => {},
  ) {
    this.nextSeq = from_seq;
    this.store = clusterStore(cluster);
  }

  get lastSeq(): number {
    return this.nextSeq - 1;
  }

  async run(): Promise<void> {
    let lastHost = "";
    while (!this.stopped) {
      const record = await this.store.get<VmRecord>(vmKey(this.vm));
      if (!record) throw new Error(`no VM named ${this.vm}`);
      const cluster = await clusterOrFail(this.cluster.state_dir);
      const host = cluster.hosts.find((h) => h.id === record.value.primary);
      if (!host) throw new Error(`primary host ${record.value.primary} of ${this.vm} is not in the cluster`);
      try {
        if (lastHost && host.id !== lastHost) this.onNotice(`-- ${this.vm} now on ${host.id} (incarnation ${record.value.incarnation})`);
        await this.followOn(host.id, host.address);
      } catch {
        // the host went away or does not run the VM (yet): look again shortly
      }
      lastHost = host.id;
      if (!this.stopped) await sleep(10);
    }
  }

  stop(): void {
    this.stopped = true;
    this.connection?.close("follower stopped");
    this.store.close().catch((error: Error) => this.onNotice(`-- store not closed: ${error.message}`));
  }

  private async followOn(host: string, address: string): Promise<void> {
    const connection = await Connection.open(address, `logs→${host}`, 500);
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
    const reply = await connection.request("logs", { vm: this.vm, from_seq: this.nextSeq, follow: true }, undefined, 2000);
    if (reply.role !== "primary") {
      connection.close("not the primary");
      throw new Error("not the primary");
    }
    this.deliver(host, reply.records);
    for (const records of early) this.deliver(host, records);
    early = null;
    // A paused host keeps its sockets open: watch the VM's record, and leave when another host takes over.
    const watch = setInterval(() => {
      this.store.get<VmRecord>(vmKey(this.vm)).then(
        (record) => {
          if (record && record.value.primary !== host) connection.close("primary moved");
        },
        () => undefined,
      );
    }, 100);
    try {
      await closed;
    } finally {
      clearInterval(watch);
    }
  }

  private deliver(host: string, records: ReleasedRecord[]): void {
    const now = Date.now();
    for (const r of records) {
      if (r.seq < this.nextSeq) continue; // already delivered (re-released after a failover)
      if (r.seq > this.nextSeq) this.onNotice(`-- gap: expected output ${this.nextSeq}, got ${r.seq}`);
      this.nextSeq = r.seq + 1;
      this.onRecord({ ...r, received_ms: now, host });
    }
  }
}

export const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
