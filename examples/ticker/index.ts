// Ticker: logs "1\n", "2\n", "3\n", ... one line per timer tick.
//
// Each line is external output, so after any failover the released sequence
// must still be 1, 2, 3, ... with no gap and no repeat. The counter lives in a
// mutable global, which the host checkpoints together with linear memory.

import { E_FULL, errorName, log, setTimer } from "../../sdk/assemblyscript/index";

const TIMER_ID: i32 = 1;
const PERIOD_MS: f64 = 10;

/** Last count successfully logged. */
let count: u32 = 0;

export function start(): void {
  arm();
}

export function timer(id: i32): void {
  if (id != TIMER_ID) return;
  const next = count + 1;
  const rc = log(next.toString() + "\n");
  // Advance only once the line was accepted, so back-pressure (E_FULL) delays
  // a number rather than skipping it; it is retried on the next tick.
  if (rc == 0) count = next;
  else if (rc != E_FULL) throw new Error("ticker: log failed: " + errorName(rc));
  arm();
}

function arm(): void {
  const rc = setTimer(TIMER_ID, PERIOD_MS);
  // Without the timer the ticker would silently stop; crash visibly instead.
  if (rc != 0) throw new Error("ticker: timer_set failed: " + errorName(rc));
}
