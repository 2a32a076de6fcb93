/**
 * When the next epoch ends: adaptive epochs (docs/ARCHITECTURE.md "Adaptive
 * epochs"), as pure arithmetic on the times it is told. Its owner (a group's
 * leader, a vm/none member's own clock) asks `due()` and ends an epoch when
 * the time has come and it can.
 *
 * - Someone waits for output (a reply to a client request; in vm mode also
 *   held peer messages): the epoch ends min_interval_ms after the previous
 *   one, so a reply waits about one commit round trip rather than half an
 *   epoch; the next epochs start again from interval_ms.
 * - Only log output waits, or nothing: interval_ms, doubling after each such
 *   epoch up to max_interval_ms. Nobody blocks on a log line, and every
 *   epoch costs each host a few milliseconds of CPU (the members' captures,
 *   delta, `staged` and `commit` frames, a backup's stage and fold) that it
 *   takes from the VMs: with a guest that logs on every step, `cohort bench
 *   allreduce` measured group/none 0.55–0.65 with log epochs held at
 *   interval_ms (20), 0.80–0.93 with them stretched to 100. A log line is
 *   released within about max_interval_ms plus a commit round trip.
 *   (An epoch in which nothing at all happened is not ended: the owner asks
 *   only when something did, see leader.ts.)
 * - A boundary that came while the owner could not end the epoch (one still
 *   uncommitted, no backup) is retried min_interval_ms later (`blocked`), or
 *   at once when a commit makes room (`unblocked`).
 */
import type { EpochTiming } from "./types.js";

export class EpochTimer {
  private lastEnd_ms: number;
  private idle_ms: number;
  /** Output of the current epoch waits: "urgent" (someone blocks on it), "log", or nothing. */
  private waiting: "urgent" | "log" | null = null;
  /** Set while a boundary passed that the owner could not act on: retry at this time. */
  private retryAt_ms: number | null = null;

  constructor(
    private readonly timing: EpochTiming,
    now_ms: number,
  ) {
    this.lastEnd_ms = now_ms;
    this.idle_ms = timing.interval_ms;
  }

  /** Output waits for a commit: end the epoch soon (`urgent`: someone blocks on it), or at the stretched interval (log output). */
  outputPending(urgent: boolean): void {
    if (urgent) this.waiting = "urgent";
    else if (this.waiting === null) this.waiting = "log";
  }

  /** Whether output of the current epoch waits for a commit. */
  get outputWaiting(): boolean {
    return this.waiting !== null;
  }

  /** When the owner should next try to end an epoch. `alsoWaiting`: more reasons than output to hurry. */
  due(alsoWaiting = false): number {
    const wait = this.waiting === "urgent" || alsoWaiting ? this.timing.min_interval_ms : this.idle_ms;
    const boundary = this.lastEnd_ms + Math.max(wait, this.timing.min_interval_ms);
    return this.retryAt_ms === null ? boundary : Math.max(boundary, this.retryAt_ms);
  }

  /** The owner ended an epoch at `now_ms`. */
  ended(now_ms: number): void {
    this.lastEnd_ms = now_ms;
    this.idle_ms = this.waiting === "urgent" ? this.timing.interval_ms : Math.min(this.timing.max_interval_ms, this.idle_ms * 2);
    this.waiting = null;
    this.retryAt_ms = null;
  }

  /** The boundary came but the owner could not end the epoch: try again min_interval_ms later. */
  blocked(now_ms: number): void {
    this.retryAt_ms = now_ms + this.timing.min_interval_ms;
  }

  /** Room for another epoch (a commit): the boundary as soon as it is due. */
  unblocked(): void {
    this.retryAt_ms = null;
  }
}
