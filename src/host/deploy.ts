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
import { protectionKey, type ProtectionRecord } from "../core/types.js";
import type { HostOps } from "./api.js";
import { GroupRunError, startGroup } from "./group/start.js";

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
    const lostAll: string[] = [];
    for (let attempt = 1; ; attempt++) {
      const hosts = host.liveHosts();
      if (attempt > 1 && manifest.mode !== "none" && hosts.length < 2) {
        throw new DeployError("HostsFailed", `group ${manifest.group}: host(s) ${lostAll.join(", ")} failed during the deploy, and ${hosts.length} live host(s) are left (mode ${manifest.mode} needs 2); nothing of it was started`);
      }
      enoughHosts(manifest, hosts);
      const records = place(manifest, group, hosts, attempt);
      for (const record of records) await host.store.put(vmKey(record.vm), record);
      const lost = await startProtectedGroup(host, manifest, records, module);
      if (lost.length === 0) return { group: manifest.group, vms: records };
      if (attempt >= DEPLOY_ATTEMPTS_MAX) {
        throw new DeployError("HostsFailed", `group ${manifest.group}: a host of its placement failed during each of ${attempt} attempts (last: ${lost.join(", ")}); nothing of it was started`);
      }
      lostAll.push(...lost);
      host.log.warn({ group: manifest.group, attempt, lost }, "a host failed while the group was being deployed: placing it again on the live hosts");
    }
  } catch (error) {
    if (error instanceof GroupRunError) throw error; // it runs on other hosts: its records stay
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
 * as a group of one, started by startGroup (src/host/group/start.ts) with
 * host-API requests to the hosts of its placement.
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
  const call = async <Op extends "group_prepare" | "group_run" | "group_abort">(h: string, op: Op, args: HostOps[Op]["args"], body?: Uint8Array): Promise<HostOps[Op]["result"]> => {
    if (h === host.id) return host.handleLocal(op, args, body ?? new Uint8Array(0));
    return (await host.peerConnection(h)).request(op, args, body);
  };
  return startGroup(
    {
      store: host.store,
      self: host.id,
      liveHosts: () => host.liveHosts(),
      loadModule: (m) => host.guestFor(m),
      calls: {
        prepare: (h, record, body) => call(h, "group_prepare", { record }, body),
        run: (h, group, routes) => call(h, "group_run", { group, routes }),
        abort: (h, group, incarnation) => call(h, "group_abort", { group, incarnation }),
      },
    },
    protection,
    module,
  );
}
