/**
 * When the next epoch ends: adaptive epochs (DESIGN.md "Clients"), shared by
 * every owner of an epoch clock (a single VM's primary, a group's leader, a
 * group member in vm/none mode).
 *
 * - Something waits to leave (output; in vm mode also peer messages): the
 *   epoch ends min_interval_ms after the previous one, so a reply waits about
 *   one commit round trip rather than half an epoch.
 * - Nothing waits: interval_ms, doubling after each idle epoch up to
 *   max_interval_ms; an epoch that had output resets it to interval_ms.
 * - A tick that could not end an epoch (too many uncommitted, no backup) is
 *   tried again min_interval_ms later, or sooner through `kick` (a commit
 *   made room).
 */
export interface EpochTiming {
  interval_ms: number;
  min_interval_ms: number;
  max_interval_ms: number;
}

export class EpochClock {
  private timer: NodeJS.Timeout | null = null;
  private dueAt = Infinity;
  private lastEndMs = 0;
  private idleMs: number;
  private waiting = false;
  private endedInTick = false;
  private stopped = false;

  constructor(
    private readonly timing: EpochTiming,
    /** Ends an epoch if it can (and then calls `ended`). */
    private readonly onTick: () => Promise<void> | void,
    /** More reasons than pending output to end epochs at the minimum interval. */
    private readonly alsoWaiting: () => boolean = () => false,
  ) {
    this.idleMs = timing.interval_ms;
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

  /** Something waits for a commit: end the epoch soon. */
  outputPending(): void {
    this.waiting = true;
    this.scheduleAt(Math.max(Date.now(), this.lastEndMs + this.timing.min_interval_ms));
  }

  /** The owner ended an epoch now. */
  ended(): void {
    this.endedInTick = true;
    this.lastEndMs = Date.now();
    this.idleMs = this.waiting ? this.timing.interval_ms : Math.min(this.timing.max_interval_ms, this.idleMs * 2);
    this.waiting = false;
  }

  /** Room for another epoch (a commit): the next boundary as soon as it is due. */
  kick(): void {
    this.scheduleNext();
  }

  private scheduleAt(at_ms: number): void {
    if (this.stopped || (this.timer && this.dueAt <= at_ms)) return;
    if (this.timer) clearTimeout(this.timer);
    this.dueAt = at_ms;
    this.timer = setTimeout(() => void this.fire(), Math.max(0, at_ms - Date.now()));
  }

  private scheduleNext(): void {
    const wait = this.waiting || this.alsoWaiting() ? this.timing.min_interval_ms : this.idleMs;
    this.scheduleAt(this.lastEndMs + Math.max(wait, this.timing.min_interval_ms));
  }

  private async fire(): Promise<void> {
    this.timer = null;
    this.dueAt = Infinity;
    this.endedInTick = false;
    try {
      await this.onTick();
    } finally {
      if (this.endedInTick) this.scheduleNext();
      else this.scheduleAt(Date.now() + this.timing.min_interval_ms);
    }
  }
}
