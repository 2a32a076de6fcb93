// Phases: the SDK's Barrier and Broadcast together. Phase k: every rank
// arrives at a barrier; once rank 0 released everyone it broadcasts a random
// value for the phase; every rank logs
//
//   phase <k> value <v>
//
// when it has the value, then arrives at the barrier of phase k + 1. Every
// rank logs the same value for the same phase, and phases are contiguous
// (1, 2, 3, ...), across failovers too.

import { errorName, inbox, log, randomU32, rank, setTimer, size } from "../../sdk/assemblyscript/index";
import { Barrier, Broadcast, COMPLETED, flushSends, NOT_MINE, queuedSends } from "../../sdk/assemblyscript/collectives";

export { cohort_inbox } from "../../sdk/assemblyscript/index";

const TIMER_NEXT: i32 = 1; // a group of one: next phase from a timer, not a loop
const TIMER_FLUSH: i32 = 2;

const barrier = new Barrier(0, 0);
const value = new Broadcast(1, 0);
const scratch = new Uint8Array(4);

export function start(): void {
  arrive();
}

export function message(fromRank: i32, ptr: usize, len: i32): void {
  const bytes = inbox(ptr, len);
  let rc = barrier.handle(fromRank, bytes);
  if (rc == COMPLETED) released();
  else if (rc == NOT_MINE) {
    rc = value.handle(fromRank, bytes);
    if (rc == NOT_MINE) throw new Error("phases: unexpected message from rank " + fromRank.toString());
    if (rc == COMPLETED) {
      logPhase();
      arrive();
    }
  }
  armFlush();
}

export function timer(id: i32): void {
  if (id == TIMER_NEXT) arrive();
  else if (id == TIMER_FLUSH) flushSends();
  armFlush();
}

function arrive(): void {
  if (barrier.arrive() == COMPLETED) released();
}

/** The barrier of this phase completed here: rank 0 broadcasts the phase's value; the others wait for it. */
function released(): void {
  if (rank() != 0) return;
  store<u32>(scratch.dataStart, randomU32());
  value.send(scratch);
  logPhase();
  if (size() == 1) check(setTimer(TIMER_NEXT, 1), "timer_set");
  else arrive();
}

function logPhase(): void {
  log("phase " + value.round.toString() + " value " + load<u32>(value.data.dataStart).toString() + "\n");
}

function armFlush(): void {
  if (queuedSends() > 0) check(setTimer(TIMER_FLUSH, 1), "timer_set");
}

function check(rc: i32, what: string): void {
  if (rc != 0) throw new Error("phases: " + what + " failed: " + errorName(rc));
}
