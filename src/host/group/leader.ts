/**
 * The group's epoch clock and commit rule (group mode), run on the leader's
 * host: ends epoch e on every primary host, collects the `staged` acks of
 * every member's backup, and commits cut e once all of them staged it
 * (DESIGN.md "The checkpoint path" steps 4-5). The commit carries the
 * members' delivered vectors at the cut, so senders trim their logs.
 *
 * A commit rides on the next `end` if that leaves within min_interval_ms,
 * else it goes out alone then: one frame and one VM step per member fewer
 * per epoch, for at most min_interval_ms more output latency.
 *
 * Epoch boundaries are adaptive (src/host/epoch-clock.ts): output waiting
 * anywhere in the group ends the epoch at the minimum interval.
 */
import { assert } from "../../util/assert.js";
import { EpochClock, type EpochTiming } from "../epoch-clock.js";

/**
 * Epochs ended and not yet committed; beyond this the leader stretches the
 * epoch. One: the next epoch ends once the previous cut committed, so an epoch
 * lasts at least one commit round trip. More in flight shortens epochs under
 * continuous output but multiplies checkpoint work when the hosts are busy:
 * with 4, `cohort bench allreduce` over 8 VMs ran group mode at about half the
 * rounds of none mode, the checkpoint work crowding out the guests (and their
 * replies waited longer, not shorter).
 */
export const EPOCHS_INFLIGHT_MAX = 1;

export interface CutCommit {
  c: number;
  /** delivered[r] = receiver r's vector at the cut. */
  d: number[][];
}

export interface LeaderIo {
  /** Tell every host: end epoch `e` (and, if given, cut `commit.c` committed). */
  endEpoch(e: number, commit: CutCommit | null): void;
  /** Tell every host: cut `c` committed, with delivered[r] = receiver r's vector at the cut. */
  commit(c: number, delivered: number[][]): void;
}

export class GroupLeader {
  private ended: number;
  private committedCut: number;
  /** epoch → rank → delivered vector at that checkpoint. */
  private readonly staged = new Map<number, Map<number, number[]>>();
  private readonly clock: EpochClock;
  private stopped = false;
  /** Committed, not told yet: rides on the next `end`, or leaves alone when `commitTimer` fires. */
  private untold: CutCommit | null = null;
  private commitTimer: NodeJS.Timeout | null = null;

  constructor(
    private readonly size: number,
    private readonly timing: EpochTiming,
    committed: number,
    private readonly io: LeaderIo,
  ) {
    this.ended = committed;
    this.committedCut = committed;
    this.clock = new EpochClock(timing, () => this.tick());
  }

  get committed(): number {
    return this.committedCut;
  }

  start(): void {
    this.clock.start();
  }

  stop(): void {
    this.stopped = true;
    this.clock.stop();
    if (this.commitTimer) clearTimeout(this.commitTimer);
    this.commitTimer = null;
  }

  /** Some member has output waiting: end the epoch soon. */
  outputPending(): void {
    this.clock.outputPending();
  }

  onStaged(rank: number, e: number, delivered: number[]): void {
    if (this.stopped || e <= this.committedCut || e > this.ended) return;
    assert(rank >= 0 && rank < this.size, `staged ack of rank ${rank}`);
    let acks = this.staged.get(e);
    if (!acks) this.staged.set(e, (acks = new Map()));
    acks.set(rank, delivered);
    // Backups stage in epoch order, so cuts complete in order.
    for (;;) {
      const next = this.committedCut + 1;
      const complete = this.staged.get(next);
      if (!complete || complete.size < this.size) break;
      const matrix = Array.from({ length: this.size }, (_, r) => complete.get(r)!);
      this.staged.delete(next);
      this.committedCut = next;
      this.untold = { c: next, d: matrix }; // a newer cut supersedes an untold older one
    }
    if (this.untold && !this.commitTimer) {
      this.commitTimer = setTimeout(() => {
        this.commitTimer = null;
        this.tellCommit();
      }, this.timing.min_interval_ms);
    }
    // A commit makes room for the next epoch if the clock was held back.
    this.clock.kick();
  }

  private tick(): void {
    if (this.stopped || this.ended - this.committedCut >= EPOCHS_INFLIGHT_MAX) return; // tried again later
    this.ended++;
    this.clock.ended();
    const commit = this.untold;
    this.untold = null;
    if (this.commitTimer) clearTimeout(this.commitTimer);
    this.commitTimer = null;
    this.io.endEpoch(this.ended, commit);
  }

  private tellCommit(): void {
    if (this.stopped || !this.untold) return;
    const { c, d } = this.untold;
    this.untold = null;
    this.io.commit(c, d);
  }
}
