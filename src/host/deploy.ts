/**
 * Placement and start of a group, run by whichever host the CLI asked. Every
 * VM gets its primary and its backup on two different live hosts; the records
 * are created in the store first (the group's create-only, which holds its
 * name), then every host the placement names prepares its replicas, and only
 * then do they run. A host that fails before they run costs an attempt (the
 * group is placed again on the live hosts); a deploy that fails otherwise
 * stops what it prepared and removes its records.
 */
import type { Manifest } from "../cluster/manifest.js";
import { groupKey, vmKey, vmName, type GroupRecord, type VmRecord } from "./records.js";
import type { Host } from "./host.js";
import { hostsOf } from "../core/record.js";
import { protectionKey, type ProtectionRecord } from "../core/types.js";
import type { Route } from "../core/frames.js";
import type { HostOps } from "./api.js";
import { assert } from "../util/assert.js";

export class DeployError extends Error {
  override name = "DeployError";
  constructor(
    readonly code: "GroupExists" | "NotEnoughHosts" | "HostsFailed",
    message: string,
  ) {
    super(message);
  }
}

/**
 * Attempts of one deploy. A host of the placement that fails, or is suspected,
 * before the group starts costs an attempt: its replicas elsewhere are
 * stopped and the group is placed again on the hosts still live, under the
 * next incarnation (frames of the given-up attempt are then stale everywhere).
 */
export const DEPLOY_ATTEMPTS_MAX = 3;

export async function deployGroup(host: Host, manifest: Manifest, module: Uint8Array): Promise<{ group: string; vms: VmRecord[] }> {
  enoughHosts(manifest, host.liveHosts());
  const group: GroupRecord = {
    group: manifest.group,
    mode: manifest.mode,
    size: manifest.size,
    vms: Array.from({ length: manifest.size }, (_, r) => vmName(manifest.group, r)),
    module: manifest.module,
    deployed_at_ms: Date.now(),
  };
  if ((await host.store.cas(groupKey(manifest.group), 0, group)) === null) {
    throw new DeployError("GroupExists", `group ${manifest.group} is already deployed`);
  }
  try {
    for (let attempt = 1; ; attempt++) {
      const hosts = host.liveHosts();
      enoughHosts(manifest, hosts);
      const records = place(manifest, group, hosts, attempt);
      for (const record of records) await host.store.put(vmKey(record.vm), record);
      const lost = await startProtectedGroup(host, manifest, records, module);
      if (lost.length === 0) return { group: manifest.group, vms: records };
      if (attempt >= DEPLOY_ATTEMPTS_MAX) {
        throw new DeployError("HostsFailed", `group ${manifest.group}: a host of its placement failed during each of ${attempt} attempts (last: ${lost.join(", ")}); nothing of it was started`);
      }
      host.log.warn({ group: manifest.group, attempt, lost }, "a host failed while the group was being deployed: placing it again on the live hosts");
    }
  } catch (error) {
    // A deploy that does not start leaves nothing behind: its records go, and its name is free again.
    await forget(host, group).catch((e: Error) => host.log.error({ err: e, group: group.group }, "removing the records of a failed deploy failed"));
    throw error;
  }
}

function enoughHosts(manifest: Manifest, hosts: string[]): void {
  if (manifest.mode !== "none" && hosts.length < 2) {
    throw new DeployError("NotEnoughHosts", `mode ${manifest.mode} needs a primary and a backup on different hosts; ${hosts.length} live host(s)`);
  }
}

/** Primaries round-robin from a group-dependent offset; each VM's backup on the next host. */
function place(manifest: Manifest, group: GroupRecord, hosts: string[], incarnation: number): VmRecord[] {
  const protectedMode = manifest.mode !== "none";
  const offset = [...manifest.group].reduce((s, c) => s + c.charCodeAt(0), 0) % hosts.length;
  return group.vms.map((vm, rank) => ({
    vm,
    group: manifest.group,
    rank,
    mode: manifest.mode,
    primary: hosts[(offset + rank) % hosts.length],
    backup: protectedMode ? hosts[(offset + rank + 1) % hosts.length] : null,
    incarnation,
    health: protectedMode ? "healthy" : "degraded",
    interval_ms: manifest.epoch.interval_ms,
    min_interval_ms: manifest.epoch.min_interval_ms,
    max_interval_ms: manifest.epoch.max_interval_ms,
    limits: manifest.limits,
    size: manifest.size,
  }));
}

/** Deletes a deploy's records: its protection record, its VMs' and, last, the group's (which holds its name). */
async function forget(host: Host, group: GroupRecord): Promise<void> {
  await host.store.delete(protectionKey(group.group));
  for (const vm of group.vms) await host.store.delete(vmKey(vm));
  await host.store.delete(groupKey(group.group));
}

/**
 * Every manifest runs as one protected group (src/host/group/), a single VM
 * as a group of one:
 * the record of its placement goes to the store, every host it names prepares
 * its replicas (primaries booted but not running, backups at the deployed
 * state), and only then are the primaries started, so no message or delta
 * reaches a host that is not ready for it.
 *
 * Answers the hosts of the placement that failed before the group started
 * (the attempt was given up: every other host's prepared replicas are
 * stopped); empty once it runs. Any other failure is thrown, after the same
 * clean-up. A host that fails once `group_run` went out is the protocol's
 * to handle, like any failure of a running group.
 */
async function startProtectedGroup(host: Host, manifest: Manifest, records: VmRecord[], module: Uint8Array): Promise<string[]> {
  const protection: ProtectionRecord = {
    group: manifest.group,
    mode: manifest.mode,
    size: manifest.size,
    incarnation: records[0].incarnation,
    leader: records[0].primary,
    placement: records.map((r) => ({ primary: r.primary, backup: r.backup })),
    failed: [],
    epoch: manifest.epoch,
    limits: manifest.limits,
  };
  await host.store.put(protectionKey(manifest.group), protection);
  const hosts = hostsOf(protection);
  const call = async <Op extends "group_prepare" | "group_run" | "group_abort">(h: string, op: Op, args: HostOps[Op]["args"], body?: Uint8Array): Promise<HostOps[Op]["result"]> => {
    if (h === host.id) return host.handleLocal(op, args, body ?? new Uint8Array(0));
    return (await host.peerConnection(h)).request(op, args, body);
  };
  let prepared: HostOps["group_prepare"]["result"][];
  try {
    // This host first: it instruments the module into the cluster's cache, so the others only read
    // it (instrumenting on every host at once starves the hosts' heartbeats on a small machine).
    const first = hosts.includes(host.id) ? host.id : hosts[0];
    prepared = [await call(first, "group_prepare", { record: protection }, module)];
    const others = await Promise.allSettled(hosts.filter((h) => h !== first).map((h) => call(h, "group_prepare", { record: protection }, module)));
    const failed = others.find((o): o is PromiseRejectedResult => o.status === "rejected");
    if (failed) throw failed.reason;
    prepared.push(...others.map((o) => (o as PromiseFulfilledResult<HostOps["group_prepare"]["result"]>).value));
  } catch (error) {
    const live = new Set(host.liveHosts());
    // Every named host that answers stops what it prepared; one that does not stops it itself (GroupTable's PREPARED_WAIT_MS).
    await Promise.allSettled(hosts.filter((h) => h === host.id || live.has(h)).map((h) => call(h, "group_abort", { group: manifest.group, incarnation: protection.incarnation })));
    const lost = hosts.filter((h) => h !== host.id && !live.has(h));
    if (lost.length > 0) return lost;
    throw error;
  }
  // Every primary's message path listens now; each host hands the whole table to its VMs.
  const routes: (Route | null)[] = protection.placement.map(() => null);
  for (const p of prepared) for (const [rank, route] of Object.entries(p.routes)) routes[Number(rank)] = route;
  assert(routes.every((r) => r !== null), "a group member has no message path after group_prepare");
  const ran = await Promise.allSettled(hosts.map((h) => call(h, "group_run", { group: manifest.group, routes })));
  const live = new Set(host.liveHosts());
  ran.forEach((r, i) => {
    // A host that failed meanwhile is the group's to fail over; any other refusal is a deploy error.
    if (r.status === "rejected" && (hosts[i] === host.id || live.has(hosts[i]))) throw r.reason;
  });
  return [];
}
