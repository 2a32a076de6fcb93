/**
 * A cap on how often one kind of line is logged: a peer that sends a flood
 * of bad frames gets each one refused and counted, but the log gets at most
 * `per_window` lines of it per window, and the next line logged says how
 * many were left out meanwhile.
 */
export class LogLimit {
  private windowStart_ms = -Infinity;
  private inWindow = 0;
  private skipped = 0;

  constructor(
    private readonly per_window = 20,
    private readonly window_ms = 1000,
  ) {}

  /** null: do not log this one; else log it, with `skipped` lines left out since the last one logged. */
  take(now_ms: number): { skipped: number } | null {
    if (now_ms - this.windowStart_ms >= this.window_ms) {
      this.windowStart_ms = now_ms;
      this.inWindow = 0;
    }
    if (this.inWindow >= this.per_window) {
      this.skipped++;
      return null;
    }
    this.inWindow++;
    const skipped = this.skipped;
    this.skipped = 0;
    return { skipped };
  }
}
