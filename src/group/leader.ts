/**
 * The group leader, sans I/O: drives group epochs and commits cuts.
 *
 *   every epoch_ms: end-epoch e → every primary host (at most EPOCHS_INFLIGHT_MAX uncommitted)
 *   staged e from every member's backup → commit e → every primary host
 *     (each primary releases output <= e, trims its sender log with the
 *      receivers' delivered vectors at cut e, and relays the commit to its backup)
 *
 * One leader per incarnation, on the host the group record names. After a
 * failure the new leader first runs the recovery (src/group/recovery.ts); it
 * then resumes the group at recovery cut R + 1 and commits R itself as soon as
 * every member's backup holds R — which is the moment the group is protected
 * again (new backups installed), and the moment output of epochs <= R may leave.
 */
import { assert } from "../util/assert.js";
import {
  EPOCHS_INFLIGHT_MAX,
  send,
  type CoreContext,
  type Effect,
  type Epoch,
  type GroupMessage,
  type HostId,
  type ReplicaReport,
} from "./protocol.js";
import { RecoveryCoordinator, type RecoveryProgress } from "./recovery.js";

type StagedMsg = Extract<GroupMessage, { kind: "staged" }>;

/** Ack table entries: epochs waiting to commit (and, during recovery, the recovery cut's). */
const ACK_EPOCHS_MAX = EPOCHS_INFLIGHT_MAX + 2;

export interface LeaderStatus {
  phase: "running" | "recovering" | "halted";
  inc: number;
  committed: Epoch;
  nextEpoch: Epoch;
  /** Recovery cut not yet committed (the group is not protected again yet). */
  reprotecting: Epoch | null;
}

export class Leader {
  private phase: LeaderStatus["phase"];
  private committed: Epoch;
  /** Next epoch to end. */
  private nextEpoch: Epoch;
  /** Lowest epoch not committed that is waiting for acks. */
  private nextToCommit: Epoch;
  private nextEpochAt: number | null = null;
  /** Per epoch, per rank: the receiver's delivered vector at that checkpoint (null: not staged yet). */
  private readonly acks = new Map<Epoch, (readonly number[] | null)[]>();
  private reprotectCut: Epoch | null = null;
  private recovery: RecoveryCoordinator | null = null;
  private hosts: HostId[] = [];

  private constructor(
    private readonly ctx: CoreContext,
    phase: LeaderStatus["phase"],
    committed: Epoch,
  ) {
    this.phase = phase;
    this.committed = committed;
    this.nextEpoch = committed + 1;
    this.nextToCommit = committed + 1;
  }

  /** The leader of a freshly deployed group (cut 0 committed). */
  static initial(ctx: CoreContext, hosts: readonly HostId[]): Leader {
    const leader = new Leader(ctx, "running", 0);
    leader.hosts = [...hosts];
    return leader;
  }

  /**
   * This host won the CAS for `ctx.record` (adopted, own replicas frozen with
   * `ownReports`): run the recovery, then lead.
   */
  static recover(ctx: CoreContext, alive: readonly HostId[], version: number, previousCommitted: Epoch, ownReports: readonly ReplicaReport[], out: Effect[]): Leader {
    const leader = new Leader(ctx, "recovering", previousCommitted);
    leader.hosts = [...alive];
    out.push({ type: "notify", notice: { kind: "recovering", inc: ctx.inc, leader: ctx.host, failed: [...ctx.record.failed] } });
    const degraded = ctx.record.placement.flatMap((p, rank) => (p.backup === null ? [rank] : []));
    if (degraded.length) out.push({ type: "notify", notice: { kind: "degraded", inc: ctx.inc, ranks: degraded } });
    leader.recovery = new RecoveryCoordinator(ctx, alive, version, previousCommitted, out);
    leader.progress(leader.recovery.start(ownReports, out), out);
    return leader;
  }

  get committedCut(): Epoch {
    return this.committed;
  }

  status(): LeaderStatus {
    return { phase: this.phase, inc: this.ctx.inc, committed: this.committed, nextEpoch: this.nextEpoch, reprotecting: this.reprotectCut };
  }

  tick(now: number, out: Effect[]): void {
    if (this.phase !== "running") return;
    if (this.nextEpochAt === null) this.nextEpochAt = now + this.ctx.config.timing.epoch_ms;
    if (now < this.nextEpochAt) return;
    this.nextEpochAt = now + this.ctx.config.timing.epoch_ms;
    const e = this.nextEpoch;
    if (e - this.committed > EPOCHS_INFLIGHT_MAX) return; // the epoch stretches until a commit
    this.nextEpoch = e + 1;
    for (const h of this.primaryHosts()) send(out, h, { kind: "end-epoch", inc: this.ctx.inc, epoch: e });
  }

  onStaged(m: StagedMsg, out: Effect[]): void {
    if (this.phase === "halted") return;
    if (this.phase === "running" && m.epoch < this.nextToCommit) return; // already committed
    let row = this.acks.get(m.epoch);
    if (!row) {
      assert(this.acks.size < ACK_EPOCHS_MAX, `leader: acks for more than ${ACK_EPOCHS_MAX} epochs`);
      row = new Array<readonly number[] | null>(this.ctx.config.size).fill(null);
      this.acks.set(m.epoch, row);
    }
    row[m.rank] = m.delivered;
    this.tryCommit(out);
  }

  onReport(host: HostId, replicas: readonly ReplicaReport[], out: Effect[]): void {
    if (this.recovery) this.progress(this.recovery.onReport(host, replicas, out), out);
  }

  onRolledBack(host: HostId, out: Effect[]): void {
    if (this.recovery) this.progress(this.recovery.onRolledBack(host), out);
  }

  /** A host is suspected; during recovery that may abort it (the node then proposes a newer incarnation). */
  hostFailed(host: HostId, out: Effect[]): void {
    this.hosts = this.hosts.filter((h) => h !== host);
    if (this.recovery) this.progress(this.recovery.hostFailed(host, out), out);
  }

  private progress(p: RecoveryProgress, out: Effect[]): void {
    switch (p.kind) {
      case "pending":
        return;
      case "aborted":
        this.recovery = null;
        this.phase = "halted"; // the node starts a newer incarnation
        return;
      case "lost":
        this.recovery = null;
        this.phase = "halted";
        out.push({ type: "notify", notice: { kind: "lost", inc: this.ctx.inc, ranks: p.ranks } });
        return;
      case "done": {
        const { outcome } = p;
        this.hosts = this.recovery!.participants;
        this.recovery = null;
        assert(outcome.cut >= outcome.committed, "recovery cut >= committed cut");
        this.phase = "running";
        this.committed = outcome.committed;
        this.nextEpoch = outcome.cut + 1;
        this.nextToCommit = outcome.cut;
        this.reprotectCut = outcome.cut;
        this.nextEpochAt = null;
        for (const e of [...this.acks.keys()]) if (e !== outcome.cut) this.acks.delete(e);
        for (const h of this.hosts) send(out, h, { kind: "resume", inc: this.ctx.inc, epoch: outcome.cut + 1 });
        out.push({ type: "notify", notice: { kind: "recovered", inc: this.ctx.inc, ...outcome } });
        this.tryCommit(out);
        return;
      }
    }
  }

  private tryCommit(out: Effect[]): void {
    while (this.phase === "running" && this.nextToCommit < this.nextEpoch) {
      const c = this.nextToCommit;
      const row = this.acks.get(c);
      if (!row || row.some((d) => d === null)) return;
      const delivered = row as readonly (readonly number[])[];
      assert(c >= this.committed, `leader: commit ${c} below committed ${this.committed}`);
      this.committed = c;
      this.nextToCommit = c + 1;
      for (const e of [...this.acks.keys()]) if (e <= c) this.acks.delete(e);
      out.push({ type: "notify", notice: { kind: "committed", inc: this.ctx.inc, cut: c } });
      for (const h of this.primaryHosts()) send(out, h, { kind: "commit", inc: this.ctx.inc, cut: c, delivered });
      if (this.reprotectCut === c) {
        this.reprotectCut = null;
        out.push({ type: "notify", notice: { kind: "reprotected", inc: this.ctx.inc, cut: c } });
      }
    }
  }

  private primaryHosts(): HostId[] {
    return [...new Set(this.ctx.record.placement.map((p) => p.primary))];
  }
}
