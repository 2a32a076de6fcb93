/**
 * The group's epoch clock and commit rule (group mode), run on the leader's
 * host: ends epoch e on every primary host, collects the `staged` acks of
 * every member's backup, and commits cut e once all of them staged it
 * (DESIGN.md "The checkpoint path" steps 4-5). The commit carries the
 * members' delivered vectors at the cut, so senders trim their logs.
 *
 * Epoch boundaries are adaptive (src/host/epoch-clock.ts): output waiting
 * anywhere in the group ends the epoch at the minimum interval.
 */
import { assert } from "../../util/assert.js";
import { EpochClock, type EpochTiming } from "../epoch-clock.js";

/** Epochs ended and not yet committed; beyond this the leader stretches the epoch. */
export const EPOCHS_INFLIGHT_MAX = 4;

export interface LeaderIo {
  /** Tell every primary host: end epoch `e`. */
  endEpoch(e: number): void;
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

  constructor(
    private readonly size: number,
    timing: EpochTiming,
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
      this.io.commit(next, matrix);
    }
    // A commit makes room for the next epoch if the clock was held back.
    this.clock.kick();
  }

  private tick(): void {
    if (this.stopped || this.ended - this.committedCut >= EPOCHS_INFLIGHT_MAX) return; // tried again later
    this.ended++;
    this.clock.ended();
    this.io.endEpoch(this.ended);
  }
}
