/**
 * The group leader (group mode), sans I/O: ends epoch e on every primary host,
 * collects the `staged` acks of every member's backup, and commits cut e once
 * all of them staged it. The commit carries the members' delivered vectors
 * at the cut, so senders trim their logs.
 *
 * One epoch in flight (EPOCHS_INFLIGHT_MAX). A commit rides on the next `end`
 * if that leaves within min_interval_ms, else it goes out alone then: one
 * frame and one VM step per member fewer per epoch, for at most
 * min_interval_ms more output latency. Epoch boundaries are adaptive
 * (epoch-timer.ts): output waiting anywhere in the group ends the epoch at
 * the minimum interval.
 *
 * Idle epochs are not ended: the leader ends epoch e only once some member
 * did something in it (`active`, from the `active` event and frame) or
 * output waits. A checkpoint of an epoch nobody did anything in would equal
 * the previous one, so an idle group captures, ships, stages, folds and
 * commits nothing. Not ending an epoch is always safe (epochs only get
 * longer); what happened in an epoch is always reported, so every epoch
 * with something in it is ended and commits.
 */
import { assert } from "../util/assert.js";
import { EpochTimer } from "./epoch-timer.js";
import { ACK_EPOCHS_MAX, EPOCHS_INFLIGHT_MAX, type Epoch, type EpochTiming, type Rank } from "./types.js";

export interface CutCommit {
  c: Epoch;
  /** d[r] = receiver r's delivered vector at the cut. */
  d: number[][];
}

/** What the leader wants sent now. */
export type LeaderOutput = { kind: "end"; e: Epoch; commit: CutCommit | null } | { kind: "commit"; commit: CutCommit };

export class Leader {
  private ended: Epoch;
  private committedCut: Epoch;
  /** epoch → rank → delivered vector at that checkpoint. */
  private readonly acks = new Map<Epoch, Map<Rank, number[]>>();
  private readonly timer: EpochTimer;
  /** Committed, not told yet: rides on the next `end`, or leaves alone at `commitDue_ms`. */
  private untold: CutCommit | null = null;
  private commitDue_ms = Infinity;
  /** Newest epoch some member reported doing something in. */
  private activeEpoch: Epoch = 0;

  constructor(
    private readonly size: number,
    private readonly timing: EpochTiming,
    committed: Epoch,
    now_ms: number,
  ) {
    this.ended = committed;
    this.committedCut = committed;
    this.timer = new EpochTimer(timing, now_ms);
  }

  get committed(): Epoch {
    return this.committedCut;
  }

  get endedEpoch(): Epoch {
    return this.ended;
  }

  /** Some member has output waiting (`urgent`: someone blocks on it): end the epoch soon (see EpochTimer). */
  outputPending(urgent: boolean, e?: Epoch): void {
    // Output of an epoch this leader ended already: its checkpoint is being taken, its commit is on its way.
    if (e !== undefined && e <= this.ended) return;
    this.timer.outputPending(urgent);
  }

  /** Some member did something in epoch `e`: epoch e is worth ending (epochs this leader ended already are being captured). */
  active(e: Epoch): void {
    if (e > this.activeEpoch) this.activeEpoch = e;
  }

  /** Whether the epoch running now (ended + 1) has anything in it: activity reported, or output waiting. */
  private get worthEnding(): boolean {
    return this.activeEpoch > this.ended || this.timer.outputWaiting;
  }

  /** When `tick` has something to do next. */
  deadline(): number {
    return Math.min(this.worthEnding ? this.timer.due() : Infinity, this.commitDue_ms);
  }

  onStaged(rank: Rank, e: Epoch, delivered: number[], now_ms: number): void {
    if (e <= this.committedCut || e > this.ended) return; // committed already, or not an epoch this leader ended
    assert(rank >= 0 && rank < this.size, `staged ack of rank ${rank}`);
    let row = this.acks.get(e);
    if (!row) {
      assert(this.acks.size < ACK_EPOCHS_MAX, `leader: acks for more than ${ACK_EPOCHS_MAX} epochs`);
      this.acks.set(e, (row = new Map()));
    }
    row.set(rank, delivered);
    // Backups stage in epoch order, so cuts complete in order.
    for (;;) {
      const next = this.committedCut + 1;
      const complete = this.acks.get(next);
      if (!complete || complete.size < this.size) break;
      this.acks.delete(next);
      this.committedCut = next;
      this.untold = { c: next, d: Array.from({ length: this.size }, (_, r) => complete.get(r)!) }; // a newer cut supersedes an older untold one
    }
    if (this.untold && this.commitDue_ms === Infinity) this.commitDue_ms = now_ms + this.timing.min_interval_ms;
    // A commit makes room for the next epoch if the boundary was held back.
    if (this.ended - this.committedCut < EPOCHS_INFLIGHT_MAX) this.timer.unblocked();
  }

  tick(now_ms: number): LeaderOutput | null {
    if (this.worthEnding && now_ms >= this.timer.due()) {
      if (this.ended - this.committedCut >= EPOCHS_INFLIGHT_MAX) {
        this.timer.blocked(now_ms);
      } else {
        this.ended++;
        this.timer.ended(now_ms);
        const commit = this.untold;
        this.untold = null;
        this.commitDue_ms = Infinity;
        return { kind: "end", e: this.ended, commit };
      }
    }
    if (this.untold && now_ms >= this.commitDue_ms) {
      const commit = this.untold;
      this.untold = null;
      this.commitDue_ms = Infinity;
      return { kind: "commit", commit };
    }
    return null;
  }
}
