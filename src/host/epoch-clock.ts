/**
 * A timer around the core's adaptive epoch arithmetic (src/core/epoch-timer.ts)
 * for the single-VM primary (src/host/primary.ts), which is not driven by the
 * group core yet. The rules (output waiting: min_interval_ms; idle: doubling
 * up to max_interval_ms; a boundary that could not end an epoch retried
 * min_interval_ms later or at `kick`) are the core's, not repeated here.
 */
import { EpochTimer } from "../core/epoch-timer.js";
import type { EpochTiming } from "../core/types.js";

export type { EpochTiming };

export class EpochClock {
  private timer: NodeJS.Timeout | null = null;
  private dueAt = Infinity;
  private readonly epochs: EpochTimer;
  private endedInTick = false;
  private stopped = false;

  constructor(
    timing: EpochTiming,
    /** Ends an epoch if it can (and then calls `ended`). */
    private readonly onTick: () => Promise<void> | void,
    /** More reasons than pending output to end epochs at the minimum interval. */
    private readonly alsoWaiting: () => boolean = () => false,
  ) {
    this.epochs = new EpochTimer(timing, performance.now());
  }

  start(): void {
    this.epochs.ended(performance.now());
    this.scheduleNext();
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  /** Something waits for a commit: end the epoch soon. */
  outputPending(): void {
    this.epochs.outputPending();
    this.scheduleNext();
  }

  /** The owner ended an epoch now. */
  ended(): void {
    this.endedInTick = true;
    this.epochs.ended(performance.now());
  }

  /** Room for another epoch (a commit): the next boundary as soon as it is due. */
  kick(): void {
    this.epochs.unblocked();
    this.scheduleNext();
  }

  private scheduleNext(): void {
    const at_ms = this.epochs.due(this.alsoWaiting());
    if (this.stopped || (this.timer && this.dueAt <= at_ms)) return;
    if (this.timer) clearTimeout(this.timer);
    this.dueAt = at_ms;
    this.timer = setTimeout(() => void this.fire(), Math.max(0, at_ms - performance.now()));
  }

  private async fire(): Promise<void> {
    this.timer = null;
    this.dueAt = Infinity;
    this.endedInTick = false;
    try {
      await this.onTick();
    } finally {
      if (!this.endedInTick) this.epochs.blocked(performance.now());
      this.scheduleNext();
    }
  }
}
