/**
 * Pure decisions over the protection record: which hosts a group uses, and
 * the next record after hosts failed (the failover decision the coordinator
 * proposes by compare-and-swap).
 */
import type { HostId, ProtectionRecord, ReplicaPlacement } from "./types.js";

/** Hosts the record places a replica on (primaries and backups), sorted. */
export function hostsOf(record: ProtectionRecord): HostId[] {
  const hosts = new Set<HostId>();
  for (const p of record.placement) {
    hosts.add(p.primary);
    if (p.backup !== null) hosts.add(p.backup);
  }
  return [...hosts].sort();
}

/** Hosts of the record that are not declared failed in it. */
export function activeHostsOf(record: ProtectionRecord): HostId[] {
  return hostsOf(record).filter((h) => !record.failed.includes(h));
}

/** Hosts holding a primary (not declared failed). */
export function primaryHostsOf(record: ProtectionRecord): HostId[] {
  return [...new Set(record.placement.map((p) => p.primary))].filter((h) => !record.failed.includes(h)).sort();
}

/**
 * Does the record name a host (leader or replica) that is down now and not
 * yet declared failed in it? Then a failover decision is due.
 */
export function needsFailover(record: ProtectionRecord, live: ReadonlySet<HostId>): HostId[] {
  const named = new Set([...hostsOf(record), record.leader]);
  return [...named].filter((h) => !live.has(h) && !record.failed.includes(h)).sort();
}

/**
 * The record after `dead` hosts failed: members whose primary died move to
 * their backup's host; every member without a live backup gets one on the
 * live host with the fewest replicas of this group (lowest name on ties),
 * never its primary's host, or none if there is no such host (degraded).
 * A member with no surviving copy keeps its placement (it is lost). The
 * incarnation goes up by one and `coordinator` leads.
 */
export function planFailover(record: ProtectionRecord, dead: readonly HostId[], live: readonly HostId[], coordinator: HostId): ProtectionRecord {
  const down = new Set<HostId>([...record.failed, ...dead]);
  const alive = [...new Set(live)].filter((h) => !down.has(h)).sort();
  const placement: ReplicaPlacement[] = record.placement.map((p) => {
    const backupUp = p.backup !== null && !down.has(p.backup);
    if (!down.has(p.primary)) return { primary: p.primary, backup: backupUp ? p.backup : null };
    if (backupUp) return { primary: p.backup as HostId, backup: null };
    return { primary: p.primary, backup: p.backup }; // lost: no copy survives
  });
  if (record.mode !== "none") {
    const load = new Map<HostId, number>(alive.map((h) => [h, 0]));
    for (const p of placement) {
      if (load.has(p.primary)) load.set(p.primary, load.get(p.primary)! + 1);
      if (p.backup !== null && load.has(p.backup)) load.set(p.backup, load.get(p.backup)! + 1);
    }
    for (const p of placement) {
      if (down.has(p.primary) || (p.backup !== null && !down.has(p.backup))) continue;
      let best: HostId | null = null;
      for (const h of alive) if (h !== p.primary && (best === null || load.get(h)! < load.get(best)!)) best = h;
      p.backup = best;
      if (best !== null) load.set(best, load.get(best)! + 1);
    }
  }
  return { ...record, incarnation: record.incarnation + 1, leader: coordinator, placement, failed: [...down].sort() };
}

/**
 * Would `next` (planned from `current` after `dead` failed) only take
 * backups away? True when no dead host leads or holds a primary and no
 * member gets a new backup: every member keeps its backup or loses it.
 */
export function onlyDegrades(current: ProtectionRecord, next: ProtectionRecord, dead: readonly HostId[]): boolean {
  if (dead.includes(current.leader)) return false;
  return current.placement.every((p, rank) => !dead.includes(p.primary) && (next.placement[rank].backup === null || next.placement[rank].backup === p.backup));
}
