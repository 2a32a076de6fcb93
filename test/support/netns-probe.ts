/**
 * Watches one host from inside its network namespace (started there with
 * Topology.spawn, test/support/netns.ts), where the host stays reachable while
 * its links are cut. Prints JSON lines on stdout, each stamped with `at_ms`
 * (Date.now() here: one kernel, one clock for every namespace):
 *
 *   {"t":"record", seq, epoch, text, released_ms, role, at_ms}
 *       each record of <vm>'s released output the host pushes (op `logs`,
 *       follow), from seq 1; `role` is what the host answered for the VM:
 *       "primary" (its own released output) or "backup" (a mirror of another
 *       host's). Only this host: never another, whatever the store says.
 *   {"t":"status", id, primaries, groups, lease, at_ms}
 *       the host's `status` every --status-ms: the VMs it runs a primary of
 *   {"t":"follow", event, reason?, at_ms}
 *       the log connection opened or closed (it is opened again, from the
 *       next seq, every 250 ms until it works)
 *
 * Usage: node --import <tsx> test/support/netns-probe.ts <state dir> <host id> <vm> [status ms]
 * where <state dir>/cluster.json lists the host and the admin credential.
 */
import { Connection } from "../../src/host/connection.js";
import { MSG, parseLogPush } from "../../src/host/messages.js";
import { dialTls } from "../../src/cli/client.js";
import { readCluster, type ClusterFile } from "../../src/cluster/local-cluster.js";
import type { ReleasedRecord } from "../../src/core/frames.js";

const [state_dir, host_id, vm, status_ms_arg] = process.argv.slice(2);
if (!state_dir || !host_id || !vm) {
  process.stderr.write("usage: netns-probe.ts <state dir> <host id> <vm> [status ms]\n");
  process.exit(2);
}
const status_ms = Number(status_ms_arg ?? 200);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const emit = (line: Record<string, unknown>) => process.stdout.write(`${JSON.stringify({ ...line, at_ms: Date.now() })}\n`);

const cluster = (await readCluster(state_dir)) as ClusterFile;
const host = cluster.hosts.find((h) => h.id === host_id);
if (!host) throw new Error(`${host_id} is not in ${state_dir}/cluster.json`);
let stopping = false;
process.once("SIGTERM", () => {
  stopping = true;
  process.exit(0);
});

let next_seq = 1;

async function followOnce(): Promise<void> {
  const connection = await Connection.open(host!.address, `probe→${host_id}`, 1000, dialTls(cluster, host_id));
  const closed = new Promise<string>((resolve) => connection.once("close", (reason) => resolve(reason)));
  let role = "?";
  let early: ReleasedRecord[][] | null = [];
  const deliver = (records: ReleasedRecord[]) => {
    for (const r of records) {
      if (r.seq < next_seq) continue;
      next_seq = r.seq + 1;
      emit({ t: "record", seq: r.seq, epoch: r.epoch, text: r.text, released_ms: r.released_ms, role });
    }
  };
  connection.on("message", (type, header) => {
    if (type !== MSG.LOG) return;
    const { records } = parseLogPush(header);
    if (early) early.push(records);
    else deliver(records);
  });
  connection.send(MSG.HELLO, { from: "cli" });
  try {
    const reply = await connection.request("logs", { vm, from_seq: next_seq, follow: true }, undefined, 2000);
    role = reply.role;
    emit({ t: "follow", event: "opened", role });
    deliver(reply.records);
    for (const records of early) deliver(records);
    early = null;
  } catch (error) {
    connection.close("request failed");
    throw error;
  }
  emit({ t: "follow", event: "closed", reason: await closed });
}

async function follow(): Promise<void> {
  let last_error = "";
  while (!stopping) {
    try {
      await followOnce();
    } catch (error) {
      const message = (error as Error).message;
      if (message !== last_error) emit({ t: "follow", event: "failed", reason: message });
      last_error = message;
    }
    await sleep(250);
  }
}

async function watchStatus(): Promise<void> {
  let connection: Connection | null = null;
  while (!stopping) {
    try {
      if (!connection) {
        connection = await Connection.open(host!.address, `probe-status→${host_id}`, 1000, dialTls(cluster, host_id));
        connection.send(MSG.HELLO, { from: "cli" });
      }
      if (connection.isClosed) {
        connection = null;
        continue;
      }
      const s = await connection.request("status", {}, undefined, 1000);
      emit({ t: "status", id: s.id, primaries: s.primaries.map((p) => p.vm), groups: s.groups.map((g) => ({ group: g.group, incarnation: g.incarnation, state: g.state, leader: g.leader })), lease: s.lease });
    } catch (error) {
      emit({ t: "status", error: (error as Error).message });
      connection?.close("status failed");
      connection = null;
    }
    await sleep(status_ms);
  }
}

await Promise.all([follow(), watchStatus()]);
