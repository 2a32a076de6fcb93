/**
 * One attempt at starting a deployed group on the hosts its record names: the
 * record goes to the store, every host prepares its replicas (primaries booted
 * but not running, backups at the deployed state), and only then are the
 * primaries started, so no message or delta reaches a host that is not ready
 * for it. The daemon's deploy (src/host/deploy.ts) reaches the hosts with
 * host-API requests; the in-process cluster (in-process.ts) calls their
 * GroupTables. One sequence for both.
 */
import type { Route } from "../../core/frames.js";
import { hostsOf } from "../../core/record.js";
import { protectionKey, type ProtectionRecord } from "../../core/types.js";
import type { CoordinationStore } from "../../store/store.js";
import { assert } from "../../util/assert.js";

/**
 * A live host refused to run the prepared group after others started it
 * (a bug, or a host that lost its replicas meanwhile). The group is left to
 * its protocol: its records stay, since replicas elsewhere run on them.
 */
export class GroupRunError extends Error {
  override name = "GroupRunError";
}

/** How a start reaches each host of the placement (`group_prepare`, `group_run`, `group_abort` in the host API). */
export interface GroupStartCalls {
  prepare(host: string, record: ProtectionRecord, module: Uint8Array): Promise<{ routes: Record<number, Route> }>;
  run(host: string, group: string, routes: (Route | null)[]): Promise<unknown>;
  /** Stops the host's replicas of that incarnation if they were prepared and never started. */
  abort(host: string, group: string, incarnation: number): Promise<unknown>;
}

export interface GroupStartHosts {
  store: CoordinationStore;
  calls: GroupStartCalls;
  /** The host running the start, if it is one of the cluster's. */
  self: string | null;
  liveHosts(): string[];
  /**
   * Makes the module ready where the hosts will look for it, before any of
   * them prepares (the daemon: instruments it into its instrumented-module
   * cache, or reads it from there). A module that cannot be loaded fails the
   * start here, before any host holds a replica of it.
   */
  loadModule(module: Uint8Array): Promise<unknown>;
}

/**
 * Answers the hosts of the placement that failed before the group started,
 * or whose connection closed while they prepared (the attempt was given up:
 * every other host's prepared replicas are stopped); empty once it runs. Any
 * other failure is thrown, after the same clean-up. A host that fails once
 * `run` went out is the protocol's to handle, like any failure of a running
 * group.
 */
export async function startGroup(env: GroupStartHosts, record: ProtectionRecord, module: Uint8Array): Promise<string[]> {
  await env.store.put(protectionKey(record.group), record);
  const hosts = hostsOf(record);
  const prepared: { routes: Record<number, Route> }[] = [];
  // Hosts whose connection closed during their prepare: declared failed meanwhile (perhaps heard
  // again since, a host that flaps under load), they cost an attempt like a host that stays failed.
  const cutOff = new Set<string>();
  const prepare = (h: string) =>
    env.calls.prepare(h, record, module).catch((error: unknown) => {
      if ((error as { code?: unknown } | null)?.code === "ConnectionClosed") cutOff.add(h);
      throw error;
    });
  try {
    // The module first, once, on the starting host: hosts of one machine share its instrumented-module
    // cache and then only read it (instrumenting on every host at once starved the hosts' heartbeats
    // on a small machine). Then every host prepares at once: a host that waited for the first one's
    // whole prepare made a deploy of 8 VMs take twice as long.
    await env.loadModule(module);
    const all = await Promise.allSettled(hosts.map((h) => prepare(h)));
    const failed = all.find((o): o is PromiseRejectedResult => o.status === "rejected");
    if (failed) throw failed.reason;
    for (const o of all) if (o.status === "fulfilled") prepared.push(o.value);
  } catch (error) {
    const live = new Set(env.liveHosts());
    // Every named host that answers stops what it prepared; one that does not stops it itself (GroupTable, PREPARED_WAIT_MS).
    await Promise.allSettled(hosts.filter((h) => h === env.self || live.has(h)).map((h) => env.calls.abort(h, record.group, record.incarnation)));
    const lost = hosts.filter((h) => h !== env.self && (!live.has(h) || cutOff.has(h)));
    if (lost.length > 0) return lost;
    throw error;
  }
  // Every primary's message path listens now; each host hands the whole table to its VMs.
  const routes: (Route | null)[] = record.placement.map(() => null);
  for (const p of prepared) for (const [rank, route] of Object.entries(p.routes)) routes[Number(rank)] = route;
  assert(routes.every((r) => r !== null), "a group member has no message path after group_prepare");
  const ran = await Promise.allSettled(hosts.map((h) => env.calls.run(h, record.group, routes)));
  const live = new Set(env.liveHosts());
  ran.forEach((r, i) => {
    // A host that failed meanwhile is the group's to fail over; any other refusal is a start error.
    if (r.status === "rejected" && (hosts[i] === env.self || live.has(hosts[i]))) {
      throw new GroupRunError(`group ${record.group}: host ${hosts[i]} did not start its replicas (${(r.reason as Error).message}); the other hosts run theirs`, { cause: r.reason });
    }
  });
  return [];
}
