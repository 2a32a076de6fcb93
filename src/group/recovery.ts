/**
 * Group recovery (DESIGN.md "Failure handling"): the pure decisions and the
 * coordinator's procedure.
 *
 * Pure functions:
 *   recoveryCut      newest cut every member's surviving copy can reach (>= committed)
 *   isDirty          does a record name a failed host (as leader or replica)?
 *   coordinatorFor   who decides: the record's leader if it lives, else the
 *                    lowest-numbered live host that the record places a replica on
 *   planRecovery     the next record: incarnation + 1, backups promoted where the
 *                    primary died, new backups for members that lost a replica
 *
 * Procedure (RecoveryCoordinator, run by the new leader after its CAS won):
 *   1. recover  → every live host: adopt the incarnation (older messages are
 *                 refused from now on), stop the primaries, report each replica's
 *                 reachable cuts and the highest commit it heard of
 *   2. decide   the recovery cut R (recoveryCut) and which new backups need an image
 *   3. rollback → every live host: surviving primaries roll back in place to R;
 *                 backups of dead primaries fold to R and are promoted in place;
 *                 surviving backups fold to R, discard above, and ack R to the leader;
 *                 primaries without a surviving backup ship an image at R to the new
 *                 one (the only memory that moves); every restored member announces
 *                 its delivered vector to every sender, which re-sends its log above it
 *   4. resume   → every live host once all rolled back: run epoch R+1
 *   5. re-protected when every member's backup holds R: the leader commits R
 *      (output of epochs <= R leaves only then).
 *
 * A failure during recovery (a host the record names) aborts it; the next
 * coordinator starts over with a newer incarnation. Members do not resume until
 * every one rolled back, so the cuts that survive an aborted recovery still
 * describe one execution.
 */
import { assert } from "../util/assert.js";
import {
  send,
  type CoreContext,
  type Effect,
  type Epoch,
  type GroupRecord,
  type HostId,
  type Placement,
  type Rank,
  type Reach,
  type ReplicaReport,
} from "./protocol.js";

// ---- pure decisions ----------------------------------------------------------------------

/** The surviving copies of one member, as reported (null: no such copy). */
export interface MemberCopies {
  rank: Rank;
  /** A surviving primary: cuts it can roll back to in place. */
  primary: Reach | null;
  /** A surviving backup holding an image: cuts it has fully staged. */
  backup: Reach | null;
}

export type CutDecision = { kind: "cut"; cut: Epoch } | { kind: "lost"; ranks: Rank[] };

/**
 * Cuts a member can be restored to. With both replicas alive the pair must
 * agree at the cut without moving memory, so it is the intersection (it is
 * never empty: the primary captured every epoch its backup staged, and only
 * commits what its backup staged).
 */
export function memberReach(c: MemberCopies): Reach | null {
  if (c.primary && c.backup) {
    const reach = { lo: Math.max(c.primary.lo, c.backup.lo), hi: Math.min(c.primary.hi, c.backup.hi) };
    assert(reach.lo <= reach.hi, `member ${c.rank}: primary ${c.primary.lo}..${c.primary.hi} and backup ${c.backup.lo}..${c.backup.hi} share no cut`);
    return reach;
  }
  return c.primary ?? c.backup;
}

/**
 * Recovery cut = the newest cut every member's surviving copy can reach.
 * It must be >= the last committed cut (released output is never undone):
 * a violation is a protocol bug and throws AssertionError.
 */
export function recoveryCut(members: readonly MemberCopies[], committed: Epoch): CutDecision {
  const lost: Rank[] = [];
  let cut = Infinity;
  let floor = -Infinity;
  for (const m of members) {
    const reach = memberReach(m);
    if (!reach) {
      lost.push(m.rank);
      continue;
    }
    assert(reach.lo <= reach.hi, `member ${m.rank}: empty reach ${reach.lo}..${reach.hi}`);
    cut = Math.min(cut, reach.hi);
    floor = Math.max(floor, reach.lo);
  }
  if (lost.length) return { kind: "lost", ranks: lost };
  assert(members.length > 0 && Number.isFinite(cut), "a group has members");
  assert(cut >= committed, `output commit: recovery cut ${cut} is below the committed cut ${committed}`);
  assert(cut >= floor, `recovery cut ${cut} is below a member's oldest reachable cut ${floor}`);
  return { kind: "cut", cut };
}

/** Hosts a record places replicas on. */
export function placedHosts(record: GroupRecord): Set<HostId> {
  const hosts = new Set<HostId>();
  for (const p of record.placement) {
    hosts.add(p.primary);
    if (p.backup !== null) hosts.add(p.backup);
  }
  return hosts;
}

/**
 * Does `record` need a recovery: does it name, as leader or replica host, a
 * host now known failed that it does not list as failed already? (A record
 * that lists a host as failed was written after that failure.)
 */
export function isDirty(record: GroupRecord, failed: ReadonlySet<HostId>): boolean {
  const fresh = (h: HostId) => failed.has(h) && !record.failed.includes(h);
  if (fresh(record.leader)) return true;
  for (const h of placedHosts(record)) if (fresh(h)) return true;
  return false;
}

/** Who must run the recovery for `record`, given the hosts known failed; null if nobody is left. */
export function coordinatorFor(record: GroupRecord, failed: ReadonlySet<HostId>): HostId | null {
  if (!failed.has(record.leader) && !record.failed.includes(record.leader)) return record.leader;
  let best: HostId | null = null;
  for (const h of placedHosts(record)) {
    if (failed.has(h) || record.failed.includes(h)) continue;
    if (best === null || h < best) best = h;
  }
  return best;
}

/**
 * The next record after `failed` hosts died: the primary stays where it lives,
 * else the backup's host becomes the primary's (promotion); a member without a
 * live backup gets one on the live host with the fewest replicas (lowest id on
 * ties), never its primary's host. A member with both hosts dead keeps its
 * placement: recovery will report it lost.
 */
export function planRecovery(record: GroupRecord, failed: ReadonlySet<HostId>, hosts: number, leader: HostId): GroupRecord {
  const down = new Set<HostId>([...record.failed, ...failed]);
  assert(!down.has(leader), "the coordinator is alive");
  const alive: HostId[] = [];
  for (let h = 0; h < hosts; h++) if (!down.has(h)) alive.push(h);
  const placement: Placement[] = record.placement.map((p) => {
    const primaryUp = !down.has(p.primary);
    const backupUp = p.backup !== null && !down.has(p.backup);
    if (primaryUp) return { primary: p.primary, backup: backupUp ? p.backup : null };
    if (backupUp) return { primary: p.backup as HostId, backup: null };
    return { primary: p.primary, backup: null };
  });
  const load = new Map<HostId, number>(alive.map((h) => [h, 0]));
  for (const p of placement) {
    if (load.has(p.primary)) load.set(p.primary, load.get(p.primary)! + 1);
    if (p.backup !== null) load.set(p.backup, load.get(p.backup)! + 1);
  }
  for (const p of placement) {
    if (p.backup !== null || down.has(p.primary)) continue;
    let best: HostId | null = null;
    for (const h of alive) {
      if (h === p.primary) continue;
      if (best === null || load.get(h)! < load.get(best)!) best = h;
    }
    if (best !== null) {
      p.backup = best;
      load.set(best, load.get(best)! + 1);
    }
  }
  return { group: record.group, incarnation: record.incarnation + 1, leader, placement, failed: [...down].sort((a, b) => a - b) };
}

// ---- the procedure -----------------------------------------------------------------------

export interface RecoveryOutcome {
  cut: Epoch;
  /** Highest committed cut any participant heard of (<= cut). */
  committed: Epoch;
  promoted: Rank[];
  rolledBack: Rank[];
  images: Rank[];
}

export type RecoveryProgress =
  | { kind: "pending" }
  | { kind: "done"; outcome: RecoveryOutcome }
  | { kind: "lost"; ranks: Rank[] }
  /** A host the record names failed: a newer incarnation must take over. */
  | { kind: "aborted" };

const PENDING: RecoveryProgress = { kind: "pending" };

export class RecoveryCoordinator {
  private phase: "reports" | "rollback" | "finished" = "reports";
  private readonly reports = new Map<HostId, readonly ReplicaReport[]>();
  private readonly alive: Set<HostId>;
  private readonly awaiting: Set<HostId>;
  private outcome: RecoveryOutcome | null = null;
  private committed: Epoch;

  /**
   * `ctx` has adopted the new record already (this host's replicas are frozen
   * and `ownReports` describe them); `alive` includes this host.
   */
  constructor(
    private readonly ctx: CoreContext,
    alive: readonly HostId[],
    version: number,
    previousCommitted: Epoch,
    out: Effect[],
  ) {
    assert(ctx.record.leader === ctx.host && alive.includes(ctx.host), "the coordinator leads the new incarnation");
    this.alive = new Set(alive);
    this.awaiting = new Set(alive);
    this.committed = previousCommitted;
    // A host placed by the record failed after the proposal: this incarnation is stillborn.
    for (const h of placedHosts(ctx.record)) if (!this.alive.has(h) && !ctx.record.failed.includes(h)) this.phase = "finished";
    if (this.phase === "finished") return;
    for (const h of alive) {
      if (h !== ctx.host) send(out, h, { kind: "recover", inc: ctx.inc, record: ctx.record, version });
    }
  }

  /** Processes this host's own report (after the constructor). */
  start(ownReports: readonly ReplicaReport[], out: Effect[]): RecoveryProgress {
    if (this.phase === "finished") return { kind: "aborted" };
    return this.onReport(this.ctx.host, ownReports, out);
  }

  onReport(host: HostId, replicas: readonly ReplicaReport[], out: Effect[]): RecoveryProgress {
    if (this.phase !== "reports" || !this.awaiting.has(host)) return PENDING;
    this.reports.set(host, replicas);
    this.awaiting.delete(host);
    return this.phase === "reports" && this.awaiting.size === 0 ? this.decide(out) : PENDING;
  }

  onRolledBack(host: HostId): RecoveryProgress {
    if (this.phase !== "rollback" || !this.awaiting.has(host)) return PENDING;
    this.awaiting.delete(host);
    return this.awaiting.size === 0 ? this.finish() : PENDING;
  }

  hostFailed(host: HostId, out: Effect[]): RecoveryProgress {
    if (this.phase === "finished" || !this.alive.has(host)) return PENDING;
    if (placedHosts(this.ctx.record).has(host) && !this.ctx.record.failed.includes(host)) {
      this.phase = "finished";
      return { kind: "aborted" };
    }
    // A host without replicas: nothing to wait for from it.
    this.alive.delete(host);
    this.awaiting.delete(host);
    if (this.awaiting.size) return PENDING;
    return this.phase === "reports" ? this.decide(out) : this.finish();
  }

  private decide(out: Effect[]): RecoveryProgress {
    const { placement } = this.ctx.record;
    const copies: MemberCopies[] = [];
    const promoted: Rank[] = [];
    const rolledBack: Rank[] = [];
    const images: Rank[] = [];
    for (const replicas of this.reports.values()) for (const r of replicas) this.committed = Math.max(this.committed, r.committed);
    for (let rank = 0; rank < placement.length; rank++) {
      const pl = placement[rank];
      const atPrimary = (this.reports.get(pl.primary) ?? []).filter((r) => r.rank === rank);
      const primary = atPrimary.find((r) => r.role === "primary");
      const promotable = atPrimary.find((r) => r.role === "backup");
      const backup = pl.backup === null ? undefined : (this.reports.get(pl.backup) ?? []).find((r) => r.rank === rank && r.role === "backup");
      assert(!(primary && promotable), `member ${rank}: a primary and a backup on one host`);
      if (primary) {
        copies.push({ rank, primary: primary.reach, backup: backup?.reach ?? null });
        rolledBack.push(rank);
      } else if (promotable) {
        assert(!backup, `member ${rank}: a backup to promote and another backup`);
        copies.push({ rank, primary: null, backup: promotable.reach });
        promoted.push(rank);
      } else {
        assert(!backup, `member ${rank}: its primary's host holds no copy, yet its backup does`);
        copies.push({ rank, primary: null, backup: null });
      }
      if (pl.backup !== null && (!backup || this.ctx.config.fault === "reimage-all")) images.push(rank);
    }
    const decision = recoveryCut(copies, this.committed);
    if (decision.kind === "lost") {
      this.phase = "finished";
      return { kind: "lost", ranks: decision.ranks };
    }
    this.outcome = { cut: decision.cut, committed: this.committed, promoted, rolledBack, images };
    this.phase = "rollback";
    for (const h of this.alive) {
      this.awaiting.add(h);
      send(out, h, { kind: "rollback", inc: this.ctx.inc, cut: decision.cut, image: images });
    }
    return PENDING;
  }

  private finish(): RecoveryProgress {
    assert(this.outcome, "rollback follows a decision");
    this.phase = "finished";
    return { kind: "done", outcome: this.outcome };
  }

  /** Hosts that took part (the group continues on them). */
  get participants(): HostId[] {
    return [...this.alive];
  }
}
