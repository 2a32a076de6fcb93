// Allreduce: rounds of a group-wide sum, run back to back. In round k every
// rank contributes (rank + 1) * k; the SDK's Allreduce reduces at rank 0 (in
// rank order) and broadcasts the result, so when round k completes every rank
// logs
//
//   round <k> sum <s>        with s == k * size * (size + 1) / 2
//
// and contributes to round k + 1 at once. Rounds on a rank are contiguous
// (1, 2, 3, ...) across failovers: the round counter lives in guest memory,
// group messages are delivered exactly once and in order per sender.
// A client request "status" gets "round <k> sum <s>" of the last completed round.

import { errorName, inbox, inboxText, log, rank, reply, setTimer, size } from "../../sdk/assemblyscript/index";
import { Allreduce, COMPLETED, flushSends, NOT_MINE, queuedSends } from "../../sdk/assemblyscript/collectives";

export { cohort_inbox } from "../../sdk/assemblyscript/index";

const TIMER_NEXT: i32 = 1; // a group of one: next round from a timer, not a loop
const NEXT_MS: f64 = 1; // > 0: a timer re-armed at delay 0 would be due again at once
const TIMER_FLUSH: i32 = 2; // sends queued under back-pressure
const FLUSH_MS: f64 = 1;

const allreduce = new Allreduce(0, 0);

export function start(): void {
  next();
}

export function message(fromRank: i32, ptr: usize, len: i32): void {
  const rc = allreduce.handle(fromRank, inbox(ptr, len));
  if (rc == NOT_MINE) throw new Error("allreduce: unexpected message from rank " + fromRank.toString());
  if (rc == COMPLETED) {
    completed();
    next();
  }
  armFlush();
}

export function timer(id: i32): void {
  if (id == TIMER_NEXT) next();
  else if (id == TIMER_FLUSH) flushSends();
  armFlush();
}

export function request(session: i32, requestId: i32, ptr: usize, len: i32): void {
  let text = inboxText(ptr, len);
  if (text.endsWith("\n")) text = text.substring(0, text.length - 1);
  reply(session, requestId, text == "status" ? line() : "error: unknown request (expected status)");
}

/** Contributes to the next round; a round that completes at once (rank 0 last) is logged and followed by the next. */
function next(): void {
  for (;;) {
    const k = allreduce.round + 1;
    if (allreduce.contribute(<f64>(rank() + 1) * <f64>k) != COMPLETED) return;
    completed();
    if (size() == 1) {
      check(setTimer(TIMER_NEXT, NEXT_MS), "timer_set");
      return;
    }
  }
}

function completed(): void {
  log(line() + "\n");
}

function line(): string {
  return "round " + allreduce.round.toString() + " sum " + (<i64>allreduce.result).toString();
}

function armFlush(): void {
  if (queuedSends() > 0) check(setTimer(TIMER_FLUSH, FLUSH_MS), "timer_set");
}

function check(rc: i32, what: string): void {
  if (rc != 0) throw new Error("allreduce: " + what + " failed: " + errorName(rc));
}
