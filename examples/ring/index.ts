// Ring: one token circulates rank 0 -> 1 -> ... -> size-1 -> 0. Every rank
// that receives it increments its counter and passes it on; each time it
// comes back to rank 0 a lap is complete and rank 0 logs
//
//   lap <n> token <t>        with t == n * size
//
// Laps are contiguous (1, 2, 3, ...) and the token never duplicates or gets
// lost, across failovers too: group messages are delivered exactly once.
// A client request "status" gets "lap <n> token <t>" (rank 0) or "token <t>".
//
// Token message, 12 bytes, little-endian: 0 u32 lap (the lap in progress), 4 u64 token.

import { errorName, inbox, inboxText, log, rank, reply, setTimer, size } from "../../sdk/assemblyscript/index";
import { flushSends, queuedSends, sendOrQueue } from "../../sdk/assemblyscript/collectives";

export { cohort_inbox } from "../../sdk/assemblyscript/index";

const MSG_BYTES: i32 = 12;
const TIMER_FLUSH: i32 = 1;
const FLUSH_MS: f64 = 1;

let laps: u32 = 0; // rank 0: laps completed
let lastToken: u64 = 0; // the token as this rank last saw it
const outgoing = new Uint8Array(MSG_BYTES);

export function start(): void {
  if (rank() == 0) pass(1, 0);
}

export function message(fromRank: i32, ptr: usize, len: i32): void {
  const bytes = inbox(ptr, len);
  const me = rank();
  const n = size();
  const expectedFrom = (me + n - 1) % n;
  if (len != MSG_BYTES || fromRank != expectedFrom) {
    throw new Error("ring: unexpected message of " + len.toString() + " bytes from rank " + fromRank.toString());
  }
  const lap = load<u32>(bytes.dataStart, 0);
  const token = load<u64>(bytes.dataStart, 4) + 1;
  if (token <= lastToken) throw new Error("ring: token went backwards: " + token.toString() + " after " + lastToken.toString());
  lastToken = token;
  if (me == 0) {
    if (lap != laps + 1) throw new Error("ring: lap " + lap.toString() + " after lap " + laps.toString());
    laps = lap;
    log("lap " + laps.toString() + " token " + token.toString() + "\n");
    pass(laps + 1, token);
  } else {
    pass(lap, token);
  }
}

export function timer(id: i32): void {
  if (id == TIMER_FLUSH) flushSends();
  armFlush();
}

export function request(session: i32, requestId: i32, ptr: usize, len: i32): void {
  let text = inboxText(ptr, len);
  if (text.endsWith("\n")) text = text.substring(0, text.length - 1);
  if (text != "status") {
    reply(session, requestId, "error: unknown request (expected status)");
  } else if (rank() == 0) {
    reply(session, requestId, "lap " + laps.toString() + " token " + lastToken.toString());
  } else {
    reply(session, requestId, "token " + lastToken.toString());
  }
}

function pass(lap: u32, token: u64): void {
  store<u32>(outgoing.dataStart, lap, 0);
  store<u64>(outgoing.dataStart, token, 4);
  sendOrQueue((rank() + 1) % size(), outgoing);
  armFlush();
}

function armFlush(): void {
  if (queuedSends() > 0) {
    const rc = setTimer(TIMER_FLUSH, FLUSH_MS);
    if (rc != 0) throw new Error("ring: timer_set failed: " + errorName(rc));
  }
}
