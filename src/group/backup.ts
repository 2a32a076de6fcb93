/**
 * The backup side of one group member, sans I/O: stages each delta (and
 * acknowledges it to the leader), folds staged deltas into the committed
 * image when the primary relays a commit, and during recovery goes to the
 * recovery cut (fold up to it, discard what is above) or is promoted in place.
 *
 * The bytes stay with the driver (`backup.stage`, `backup.fold`, ...); the
 * core keeps the epochs and each checkpoint's runtime state.
 */
import { assert } from "../util/assert.js";
import {
  STAGED_DELTAS_MAX,
  send,
  type CoreContext,
  type Effect,
  type Epoch,
  type GroupMessage,
  type Rank,
  type ReplicaReport,
  type RuntimeCheckpoint,
} from "./protocol.js";

type DeltaMsg = Extract<GroupMessage, { kind: "delta" }>;
type ImageMsg = Extract<GroupMessage, { kind: "image" }>;

export interface BackupStatus {
  rank: Rank;
  folded: Epoch;
  staged: Epoch[];
  committed: Epoch;
}

export class MemberBackup {
  private folded: Epoch;
  private foldedRuntime: RuntimeCheckpoint;
  private staged: { epoch: Epoch; runtime: RuntimeCheckpoint }[] = [];
  /** Highest committed cut heard of. */
  private committed: Epoch;

  private constructor(
    private readonly ctx: CoreContext,
    readonly rank: Rank,
    at: RuntimeCheckpoint,
    committed: Epoch,
  ) {
    this.folded = at.cut;
    this.foldedRuntime = at;
    this.committed = committed;
  }

  /** The backup deployed with the group: holds cut 0 (the driver installed the initial image). */
  static initial(ctx: CoreContext, rank: Rank, at: RuntimeCheckpoint): MemberBackup {
    assert(at.cut === 0, "a deployed backup holds cut 0");
    return new MemberBackup(ctx, rank, at, 0);
  }

  /** A new backup (re-protection): a full image at the recovery cut. */
  static install(ctx: CoreContext, m: ImageMsg, out: Effect[]): MemberBackup {
    assert(m.runtime.cut === m.epoch, "image runtime state is at the image's cut");
    const backup = new MemberBackup(ctx, m.rank, m.runtime, 0);
    out.push({ type: "backup.install", rank: m.rank, epoch: m.epoch, payload: m.payload });
    backup.ack(m.epoch, m.runtime, out);
    return backup;
  }

  /** Newest checkpoint held. */
  get hi(): Epoch {
    return this.staged.length ? this.staged[this.staged.length - 1].epoch : this.folded;
  }

  status(): BackupStatus {
    return { rank: this.rank, folded: this.folded, staged: this.staged.map((s) => s.epoch), committed: this.committed };
  }

  onDelta(m: DeltaMsg, out: Effect[]): void {
    assert(m.rank === this.rank && m.runtime.cut === m.epoch, "delta routed to its backup");
    assert(m.epoch === this.hi + 1, `backup ${this.rank}: delta ${m.epoch} does not follow ${this.hi}`);
    assert(this.staged.length < STAGED_DELTAS_MAX, `backup ${this.rank}: more than ${STAGED_DELTAS_MAX} staged deltas`);
    this.staged.push({ epoch: m.epoch, runtime: m.runtime });
    out.push({ type: "backup.stage", rank: this.rank, epoch: m.epoch, payload: m.payload });
    this.ack(m.epoch, m.runtime, out);
  }

  /** Cut committed (relayed by the primary): fold through it. */
  onCommit(cut: Epoch, out: Effect[]): void {
    assert(cut <= this.hi, `backup ${this.rank}: cut ${cut} committed but only ${this.hi} staged`);
    this.committed = Math.max(this.committed, cut);
    this.foldThrough(cut, out);
  }

  report(): ReplicaReport {
    return { rank: this.rank, role: "backup", reach: { lo: this.folded, hi: this.hi }, committed: this.committed };
  }

  /** Recovery, primary alive: go to cut `cut` (fold up to it, discard above), and say so to the leader. */
  rollback(cut: Epoch, out: Effect[]): void {
    this.goTo(cut, out);
    this.ack(cut, this.foldedRuntime, out);
  }

  /** Recovery, primary dead: go to cut `cut` and become the primary, in place (no memory moves). */
  promote(cut: Epoch, out: Effect[]): { runtime: RuntimeCheckpoint; committed: Epoch } {
    this.goTo(cut, out);
    out.push({ type: "backup.promote", rank: this.rank, epoch: cut });
    return { runtime: this.foldedRuntime, committed: Math.min(this.committed, cut) };
  }

  private goTo(cut: Epoch, out: Effect[]): void {
    assert(this.folded <= cut && cut <= this.hi, `backup ${this.rank}: cannot reach cut ${cut} (holds ${this.folded}..${this.hi})`);
    this.foldThrough(cut, out);
    if (this.staged.length) {
      out.push({ type: "backup.discard", rank: this.rank, after: cut });
      this.staged = [];
    }
  }

  private foldThrough(cut: Epoch, out: Effect[]): void {
    if (!this.staged.length || this.staged[0].epoch > cut) return;
    let last = this.staged[0];
    while (this.staged.length && this.staged[0].epoch <= cut) last = this.staged.shift()!;
    this.folded = last.epoch;
    this.foldedRuntime = last.runtime;
    out.push({ type: "backup.fold", rank: this.rank, through: last.epoch });
  }

  private ack(epoch: Epoch, runtime: RuntimeCheckpoint, out: Effect[]): void {
    send(out, this.ctx.record.leader, { kind: "staged", inc: this.ctx.inc, rank: this.rank, epoch, delivered: runtime.delivered });
  }
}
