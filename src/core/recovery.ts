/**
 * Group recovery's pure decision: given every surviving host's report, which
 * cut the group goes back to and which members need a new backup image.
 *
 * group mode: the recovery cut is the newest cut every member's surviving
 * copies can reach, and never below the newest committed cut any replica
 * knows (released output is never undone). A member whose primary survived
 * rolls back in place; one whose primary died is promoted from its backup;
 * only a member whose backup is new (or cannot reach the cut) gets an image,
 * so a VM that kept both replicas moves no memory (invariant 6).
 *
 * vm mode: a promoted member goes to its backup's newest checkpoint, and so
 * does a survivor whose backup survived (in place); a survivor with a new
 * backup keeps its state and its backup gets a fresh image.
 *
 * none mode: nothing to restore (no backups); members of a dead host are lost.
 */
import { assert } from "../util/assert.js";
import type { BackupReport, PrimaryReport } from "./frames.js";
import type { Epoch, HostId, ProtectionRecord, Rank } from "./types.js";

export interface HostReport {
  primaries: PrimaryReport[];
  backups: BackupReport[];
}

export interface RecoveryPlan {
  /** group mode: the recovery cut; vm and none mode: null (each member has its own target). */
  cut: Epoch | null;
  /** vm mode: member → the checkpoint it goes to (its backup's newest staged, promoted or in place). */
  targets: Record<number, Epoch>;
  /** Members whose (new) backup gets a full image. */
  images: Rank[];
  /** The newest committed cut any replica reported (group mode; 0 otherwise). */
  committed: Epoch;
  /** Members with no surviving copy: the group cannot recover. */
  lost: Rank[];
  /**
   * Reports that cannot all be true (a committed cut some member's copies
   * cannot reach): there is no safe cut, the plan must not be carried out.
   * Honest reports never disagree so (a cut commits only once every
   * member's backup staged it); which report lies cannot be told.
   */
  refused?: string;
}

export function planRecovery(record: ProtectionRecord, reports: ReadonlyMap<HostId, HostReport>): RecoveryPlan {
  const primaries = new Map<Rank, PrimaryReport>();
  const backups = new Map<HostId, Map<Rank, BackupReport>>();
  for (const [host, report] of reports) {
    for (const p of report.primaries) {
      if (record.placement[p.rank]?.primary === host) primaries.set(p.rank, p);
    }
    backups.set(host, new Map(report.backups.filter((b) => b.has_image).map((b) => [b.rank, b])));
  }
  const backupAt = (host: HostId | null, rank: Rank) => (host === null ? undefined : backups.get(host)?.get(rank));
  // A member is lost when neither a primary nor a backup with an image survives where the record puts its primary.
  const lost = record.placement.flatMap((p, rank) => (primaries.has(rank) || backupAt(p.primary, rank) ? [] : [rank]));
  const targets: Record<number, Epoch> = {};
  if (lost.length) return { cut: null, targets, images: [], committed: 0, lost };
  if (record.mode !== "group") {
    const images: Rank[] = [];
    record.placement.forEach((p, rank) => {
      const kept = backupAt(p.backup, rank);
      if (!primaries.has(rank)) targets[rank] = backupAt(p.primary, rank)!.hi;
      // vm mode: a survivor whose backup survived goes back in place to the newest checkpoint that
      // backup staged. Later ones never committed (nothing of them left the VM), and their deltas may
      // be lost (in flight at the failover, or captured after the freeze): the next delta must follow
      // what the backup holds.
      else if (record.mode === "vm" && kept) targets[rank] = kept.hi;
      if (record.mode === "vm" && p.backup !== null && !(primaries.has(rank) && kept)) images.push(rank);
    });
    return { cut: null, targets, images, committed: 0, lost };
  }
  let committed = 0;
  for (const p of primaries.values()) committed = Math.max(committed, p.committed);
  for (const m of backups.values()) for (const b of m.values()) committed = Math.max(committed, b.lo);
  let cut = Infinity;
  record.placement.forEach((p, rank) => {
    const primary = primaries.get(rank);
    cut = Math.min(cut, primary ? primary.hi : backupAt(p.primary, rank)!.hi);
    // A surviving backup that reaches the committed cut bounds the cut too: it then needs no image.
    const b = backupAt(p.backup, rank);
    if (b && b.hi >= committed) cut = Math.min(cut, b.hi);
  });
  assert(Number.isFinite(cut), "a group has members");
  if (cut < committed) {
    return { cut: null, targets, images: [], committed, lost, refused: `reports claim cut ${committed} committed, but the members' copies reach only ${cut}: no safe recovery cut` };
  }
  const images: Rank[] = [];
  record.placement.forEach((p, rank) => {
    const b = backupAt(p.backup, rank);
    if (p.backup !== null && !(b && b.lo <= cut && b.hi >= cut)) images.push(rank);
  });
  return { cut, targets, images, committed, lost };
}
