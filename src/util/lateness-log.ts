/**
 * The worst lateness of a loop in each second of the last SECONDS_KEPT, for
 * seconds with any lateness of at least `floor_ms`: what a caller needs to
 * know how late the loop ran during its own window (a benchmark's deploy, a
 * failover) rather than since the process started (a host's own start,
 * loading its modules and dialing its peers, is slower than anything after).
 * Bounded: one entry per second, the oldest dropped.
 */
import { assert } from "./assert.js";

export const SECONDS_KEPT = 600;

export interface LateSecond {
  /** Wall-clock second (ms since the epoch, floored to the second). */
  at_ms: number;
  late_ms: number;
}

export class LatenessLog {
  private readonly seconds: LateSecond[] = [];

  constructor(private readonly floor_ms: number) {
    assert(floor_ms >= 0, "a lateness floor is not negative");
  }

  record(now_ms: number, late_ms: number): void {
    if (late_ms < this.floor_ms) return;
    const at_ms = Math.floor(now_ms / 1000) * 1000;
    const last = this.seconds.at(-1);
    if (last && last.at_ms === at_ms) {
      last.late_ms = Math.max(last.late_ms, late_ms);
      return;
    }
    // The wall clock may step back: a second already passed is kept apart, never merged out of order.
    this.seconds.push({ at_ms, late_ms });
    if (this.seconds.length > SECONDS_KEPT) this.seconds.shift();
    assert(this.seconds.length <= SECONDS_KEPT, "the lateness log keeps at most SECONDS_KEPT seconds");
  }

  /** Seconds with lateness of at least the floor, oldest first (a copy). */
  list(): LateSecond[] {
    return this.seconds.map((s) => ({ ...s }));
  }
}

/** The worst lateness in `seconds` from the second holding `from_ms` on (0 if none). */
export function lateMaxSince(seconds: readonly LateSecond[], from_ms: number): number {
  const from = Math.floor(from_ms / 1000) * 1000;
  return seconds.reduce((m, s) => (s.at_ms >= from ? Math.max(m, s.late_ms) : m), 0);
}
