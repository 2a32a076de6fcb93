/**
 * The coordination-store record of a protected group (a manifest with
 * size >= 2): placement of every member's primary and backup, the group's
 * leader, its incarnation and the hosts declared failed. Changed only by
 * compare-and-swap; every change bumps the incarnation, so the CAS that wins is
 * the failover decision and every message of an older incarnation is stale.
 */
import type { Manifest } from "../../cluster/manifest.js";

export interface Placement {
  primary: string;
  /** null: no backup (mode none, or degraded: no spare host). */
  backup: string | null;
}

export interface ProtectionRecord {
  group: string;
  mode: Manifest["mode"];
  size: number;
  incarnation: number;
  /** Host that ends epochs and commits cuts (group mode) and coordinates recovery. */
  leader: string;
  /** Indexed by rank. */
  placement: Placement[];
  /** Hosts declared failed: fenced, never placed again. */
  failed: string[];
  epoch: Manifest["epoch"];
  limits: Manifest["limits"];
}

export const protectionKey = (group: string) => `protection/${group}`;

/** Hosts the record places a replica on (primaries and backups), sorted. */
export function hostsOf(record: ProtectionRecord): string[] {
  const hosts = new Set<string>();
  for (const p of record.placement) {
    hosts.add(p.primary);
    if (p.backup) hosts.add(p.backup);
  }
  return [...hosts].sort();
}

/**
 * The record after `dead` hosts failed: members whose primary died move to
 * their backup's host; every member without a live backup gets one on another
 * live host (round-robin from the rank, so backups spread), or none if there
 * is no such host (degraded). The leader is `coordinator`.
 */
export function planFailover(record: ProtectionRecord, dead: readonly string[], live: readonly string[], coordinator: string): ProtectionRecord {
  const isDead = (h: string | null) => h !== null && dead.includes(h);
  const placement = record.placement.map((p, rank): Placement => {
    let primary = p.primary;
    let backup = p.backup;
    if (isDead(primary)) {
      if (backup === null || isDead(backup)) return { primary, backup }; // lost: no copy survives
      primary = backup;
      backup = null;
    }
    if (record.mode !== "none" && (backup === null || isDead(backup))) {
      const candidates = live.filter((h) => h !== primary);
      backup = candidates.length ? candidates[rank % candidates.length] : null;
    }
    return { primary, backup };
  });
  return { ...record, incarnation: record.incarnation + 1, leader: coordinator, placement, failed: [...new Set([...record.failed, ...dead])].sort() };
}

/** Ranks with no surviving copy after `dead` failed. */
export function lostRanks(record: ProtectionRecord, dead: readonly string[]): number[] {
  return record.placement.flatMap((p, rank) => (dead.includes(p.primary) && (p.backup === null || dead.includes(p.backup)) ? [rank] : []));
}
