/**
 * Placement and start of a group, run by whichever host the CLI asked. Every
 * VM gets its primary and its backup on two different live hosts; the records
 * are created in the store first (create-only), then every host the placement
 * names prepares its replicas, and only then do they run.
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
    readonly code: "GroupExists" | "NotEnoughHosts",
    message: string,
  ) {
    super(message);
  }
}

export async function deployGroup(host: Host, manifest: Manifest, module: Uint8Array): Promise<{ group: string; vms: VmRecord[] }> {
  const hosts = host.liveHosts();
  const protectedMode = manifest.mode !== "none";
  if (protectedMode && hosts.length < 2) {
    throw new DeployError("NotEnoughHosts", `mode ${manifest.mode} needs a primary and a backup on different hosts; ${hosts.length} live host(s)`);
  }
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
  // Spread primaries round-robin from a group-dependent offset; the backup is the next host.
  const offset = [...manifest.group].reduce((s, c) => s + c.charCodeAt(0), 0) % hosts.length;
  const records: VmRecord[] = group.vms.map((vm, rank) => ({
    vm,
    group: manifest.group,
    rank,
    mode: manifest.mode,
    primary: hosts[(offset + rank) % hosts.length],
    backup: protectedMode ? hosts[(offset + rank + 1) % hosts.length] : null,
    incarnation: 1,
    health: protectedMode ? "healthy" : "degraded",
    interval_ms: manifest.epoch.interval_ms,
    min_interval_ms: manifest.epoch.min_interval_ms,
    max_interval_ms: manifest.epoch.max_interval_ms,
    limits: manifest.limits,
    size: manifest.size,
  }));
  for (const record of records) await host.store.put(vmKey(record.vm), record);
  await startProtectedGroup(host, manifest, records, module);
  return { group: manifest.group, vms: records };
}

/**
 * Every manifest runs as one protected group (src/host/group/), a single VM
 * as a group of one:
 * the record of its placement goes to the store, every host it names prepares
 * its replicas (primaries booted but not running, backups at the deployed
 * state), and only then are the primaries started, so no message or delta
 * reaches a host that is not ready for it.
 */
async function startProtectedGroup(host: Host, manifest: Manifest, records: VmRecord[], module: Uint8Array): Promise<void> {
  const protection: ProtectionRecord = {
    group: manifest.group,
    mode: manifest.mode,
    size: manifest.size,
    incarnation: 1,
    leader: records[0].primary,
    placement: records.map((r) => ({ primary: r.primary, backup: r.backup })),
    failed: [],
    epoch: manifest.epoch,
    limits: manifest.limits,
  };
  await host.store.put(protectionKey(manifest.group), protection);
  const hosts = hostsOf(protection);
  const call = async <Op extends "group_prepare" | "group_run">(h: string, op: Op, args: HostOps[Op]["args"], body?: Uint8Array): Promise<HostOps[Op]["result"]> => {
    if (h === host.id) return host.handleLocal(op, args, body ?? new Uint8Array(0));
    return (await host.peerConnection(h)).request(op, args, body);
  };
  // This host first: it instruments the module into the cluster's cache, so the others only read
  // it (instrumenting on every host at once starves the hosts' heartbeats on a small machine).
  const first = hosts.includes(host.id) ? host.id : hosts[0];
  const prepared = [await call(first, "group_prepare", { record: protection }, module)];
  prepared.push(...(await Promise.all(hosts.filter((h) => h !== first).map((h) => call(h, "group_prepare", { record: protection }, module)))));
  // Every primary's message path listens now; each host hands the whole table to its VMs.
  const routes: (Route | null)[] = protection.placement.map(() => null);
  for (const p of prepared) for (const [rank, route] of Object.entries(p.routes)) routes[Number(rank)] = route;
  assert(routes.every((r) => r !== null), "a group member has no message path after group_prepare");
  await Promise.all(hosts.map((h) => call(h, "group_run", { group: manifest.group, routes })));
}
