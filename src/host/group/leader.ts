/**
 * The group's epoch clock and commit rule (group mode), run on the leader's
 * host: ends epoch e on every primary host, collects the `staged` acks of
 * every member's backup, and commits cut e once all of them staged it
 * (DESIGN.md "The checkpoint path" steps 4-5). The commit carries the
 * members' delivered vectors at the cut, so senders trim their logs.
 *
 * Adaptive epochs as for a single VM: output waiting anywhere in the group →
 * the epoch ends min_interval_ms after the previous end; idle → interval_ms,
 * doubling up to max_interval_ms.
 */
import type { Manifest } from "../../cluster/manifest.js";
import { assert } from "../../util/assert.js";

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
  private timer: NodeJS.Timeout | null = null;
  private dueAt = Infinity;
  private lastEndMs = 0;
  private idleMs: number;
  private outputWaiting = false;
  private stopped = false;
  readonly stats = { commits: 0, commit_ms_last: 0 };
  private readonly endedAtMs = new Map<number, number>();

  constructor(
    private readonly size: number,
    private readonly timing: Manifest["epoch"],
    committed: number,
    private readonly io: LeaderIo,
  ) {
    this.ended = committed;
    this.committedCut = committed;
    this.idleMs = timing.interval_ms;
  }

  get committed(): number {
    return this.committedCut;
  }

  get endedEpoch(): number {
    return this.ended;
  }

  start(): void {
    this.lastEndMs = Date.now();
    this.scheduleNext();
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  /** Some member has output waiting: end the epoch soon. */
  outputPending(): void {
    this.outputWaiting = true;
    this.scheduleAt(Math.max(Date.now(), this.lastEndMs + this.timing.min_interval_ms));
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
      this.stats.commits++;
      this.stats.commit_ms_last = Date.now() - (this.endedAtMs.get(next) ?? Date.now());
      this.endedAtMs.delete(next);
      this.io.commit(next, matrix);
    }
    // A commit makes room for the next epoch if the clock was held back.
    if (!this.timer) this.scheduleNext();
  }

  private scheduleAt(at_ms: number): void {
    if (this.stopped || (this.timer && this.dueAt <= at_ms)) return;
    if (this.timer) clearTimeout(this.timer);
    this.dueAt = at_ms;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.dueAt = Infinity;
      this.tick();
    }, Math.max(0, at_ms - Date.now()));
  }

  private scheduleNext(): void {
    const wait = this.outputWaiting ? this.timing.min_interval_ms : this.idleMs;
    this.scheduleAt(this.lastEndMs + Math.max(wait, this.timing.min_interval_ms));
  }

  private tick(): void {
    if (this.stopped) return;
    if (this.ended - this.committedCut >= EPOCHS_INFLIGHT_MAX) return; // the next commit reschedules
    this.ended++;
    this.endedAtMs.set(this.ended, Date.now());
    this.lastEndMs = Date.now();
    this.idleMs = this.outputWaiting ? this.timing.interval_ms : Math.min(this.timing.max_interval_ms, this.idleMs * 2);
    this.outputWaiting = false;
    this.io.endEpoch(this.ended);
    this.scheduleNext();
  }
}
