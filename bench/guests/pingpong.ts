// Benchmark: group-message round-trip latency. Rank 0 sends a MSG_BYTES
// message to rank 1, rank 1 echoes every message back unchanged, and rank 0,
// on each echo, records the round trip in a histogram, counts it and sends
// the next one: one message in flight at a time. Ranks >= 2 stay idle.
//
// A round trip is timed with nowMs() (f64 ms; the host may give it
// sub-millisecond resolution) from the moment the host accepted the ping
// (send returned 0) to the echo's arrival. Latencies go into a log-linear
// histogram: 32 linear buckets per power of two of microseconds, from 1 µs to
// 2^20 µs (~1 s), plus an underflow and an overflow bucket. A percentile is
// the midpoint of its bucket (nearest rank), clamped to the exact min and max
// seen: at most 1/64 (~1.6 %) off inside the range.
//
// Client requests (one trailing newline ignored):
//   "reset"  clears the counters and the histogram and restarts the clock
//            (elapsed_ms); a ping in flight at the reset is not counted. -> "ok"
//   "stats"  -> {"round_trips":N,"elapsed_ms":T,"latency_us_p50":X,"latency_us_p99":Y}
//            N round trips counted since the last reset (or the start), T ms
//            since then by the guest's clock, X and Y in µs (0 while N == 0);
//            the numbers have at most 3 decimals. Ranks other than 0 report N = 0.
//   anything else -> "error: ..."
//
// Message, 64 bytes: 0 u64 sequence number (1, 2, ...), then filler. An echo
// that is not the ping in flight traps ("pingpong: unexpected ...").
//
// Back-pressure: a ping refused with E_FULL is retried from TIMER_PING (the
// clock starts when it is accepted); rank 1 echoes through the collectives'
// sendOrQueue and flushes its queue from TIMER_FLUSH.

import {
  E_FULL, errorName, inbox, inboxText, nowMs, OK, rank, reply, send, setTimer, size,
} from "../../sdk/assemblyscript/index";
import { flushSends, queuedSends, sendOrQueue } from "../../sdk/assemblyscript/collectives";

export { cohort_inbox } from "../../sdk/assemblyscript/index";

const MSG_BYTES: i32 = 64;
const TIMER_PING: i32 = 1; // rank 0: a ping refused with E_FULL
const TIMER_FLUSH: i32 = 2; // rank 1: echoes queued under back-pressure
const RETRY_MS: f64 = 1;

// Histogram: bucket 0 < 1 µs; then 32 buckets per octave [2^e, 2^(e+1)) µs, e = 0..19; last: >= 2^20 µs.
const SUB_BITS: i32 = 5;
const SUB: i32 = 1 << SUB_BITS;
const OCTAVES: i32 = 20;
const BUCKETS: i32 = 2 + OCTAVES * SUB;

const histogram = new StaticArray<u64>(BUCKETS);
const outgoing = new Uint8Array(MSG_BYTES);
for (let i = 8; i < MSG_BYTES; i++) outgoing[i] = <u8>i;

let roundTrips: u64 = 0;
let minUs: f64 = Infinity;
let maxUs: f64 = 0;
let clockStart: f64 = 0;
/** Rank 0: the sequence number of the ping in flight (0: none). */
let inFlight: u64 = 0;
/** Rank 0: when the host accepted it. */
let sentAt: f64 = 0;
/** Rank 0: the last ping sent or to be sent. */
let seq: u64 = 0;
/** Rank 0: pings below this number were sent before the last reset and are not counted. */
let countFrom: u64 = 1;

export function start(): void {
  clockStart = nowMs();
  if (rank() == 0 && size() >= 2) ping();
}

export function message(fromRank: i32, ptr: usize, len: i32): void {
  const me = rank();
  if (me == 1) {
    sendOrQueue(fromRank, inbox(ptr, len));
    armFlush();
    return;
  }
  const now = nowMs();
  if (me != 0 || fromRank != 1 || len != MSG_BYTES || inFlight == 0 || load<u64>(ptr, 0) != inFlight) {
    throw new Error("pingpong: unexpected message of " + len.toString() + " bytes from rank " + fromRank.toString() + " on rank " + me.toString());
  }
  if (inFlight >= countFrom) {
    record((now - sentAt) * 1000);
    roundTrips++;
  }
  inFlight = 0;
  ping();
}

export function timer(id: i32): void {
  if (id == TIMER_PING && rank() == 0 && inFlight == 0 && seq > 0) trySend();
  else if (id == TIMER_FLUSH) {
    flushSends();
    armFlush();
  }
}

export function request(session: i32, requestId: i32, ptr: usize, len: i32): void {
  let text = inboxText(ptr, len);
  if (text.endsWith("\n")) text = text.substring(0, text.length - 1);
  if (text == "reset") {
    reset();
    reply(session, requestId, "ok");
  } else if (text == "stats") {
    reply(session, requestId, stats());
  } else {
    reply(session, requestId, "error: unknown request (expected stats or reset)");
  }
}

// ---------------------------------------------------------------------------

/** Rank 0: the next ping. */
function ping(): void {
  seq++;
  store<u64>(outgoing.dataStart, seq, 0);
  trySend();
}

function trySend(): void {
  const rc = send(1, outgoing);
  if (rc == OK) {
    sentAt = nowMs();
    inFlight = seq;
  } else if (rc == E_FULL) {
    check(setTimer(TIMER_PING, RETRY_MS), "timer_set");
  } else {
    throw new Error("pingpong: send failed: " + errorName(rc));
  }
}

function armFlush(): void {
  if (queuedSends() > 0) check(setTimer(TIMER_FLUSH, RETRY_MS), "timer_set");
}

function reset(): void {
  for (let i = 0; i < BUCKETS; i++) histogram[i] = 0;
  roundTrips = 0;
  minUs = Infinity;
  maxUs = 0;
  clockStart = nowMs();
  countFrom = seq + 1; // the ping in flight (if any) was sent before the reset
}

// ---------------------------------------------------------------------------
// Histogram

function bucketOf(us: f64): i32 {
  if (!(us >= 1)) return 0; // also NaN
  const bits = reinterpret<u64>(us);
  const e = <i32>((bits >> 52) & 0x7ff) - 1023; // us = 2^e * 1.m, e >= 0
  if (e >= OCTAVES) return BUCKETS - 1;
  const sub = <i32>((bits >> (52 - SUB_BITS)) & <u64>(SUB - 1)); // the top SUB_BITS bits of the mantissa
  return 1 + e * SUB + sub;
}

/** The midpoint of bucket `b` in µs. */
function bucketMid(b: i32): f64 {
  if (b == 0) return 0.5;
  if (b == BUCKETS - 1) return <f64>(1 << OCTAVES);
  const e = (b - 1) >> SUB_BITS;
  const sub = (b - 1) & (SUB - 1);
  const octave = <f64>(1 << e);
  return octave * (1 + (<f64>sub + 0.5) / <f64>SUB);
}

function record(us: f64): void {
  if (us < 0) us = 0; // a clock step backwards
  histogram[bucketOf(us)]++;
  if (us < minUs) minUs = us;
  if (us > maxUs) maxUs = us;
}

/** The nearest-rank percentile `p` (0 < p <= 100) in µs; 0 with no samples. */
function percentile(p: f64): f64 {
  if (roundTrips == 0) return 0;
  let rankWanted = <u64>Math.ceil(p / 100 * <f64>roundTrips);
  if (rankWanted < 1) rankWanted = 1;
  let seen: u64 = 0;
  for (let b = 0; b < BUCKETS; b++) {
    seen += histogram[b];
    if (seen >= rankWanted) return min(max(bucketMid(b), minUs), maxUs);
  }
  return maxUs;
}

function stats(): string {
  return "{\"round_trips\":" + roundTrips.toString() +
    ",\"elapsed_ms\":" + fixed3(nowMs() - clockStart) +
    ",\"latency_us_p50\":" + fixed3(percentile(50)) +
    ",\"latency_us_p99\":" + fixed3(percentile(99)) + "}";
}

/** `x` (finite, >= 0 expected) as a JSON number with at most 3 decimals. */
function fixed3(x: f64): string {
  if (!isFinite(x)) return "0";
  const negative = x < 0;
  const thousandths = <i64>Math.round(Math.abs(x) * 1000);
  const whole = thousandths / 1000;
  const frac = <i32>(thousandths % 1000);
  let text = whole.toString();
  if (frac != 0) {
    let digits = frac.toString();
    while (digits.length < 3) digits = "0" + digits;
    while (digits.endsWith("0")) digits = digits.substring(0, digits.length - 1);
    text += "." + digits;
  }
  return negative && thousandths != 0 ? "-" + text : text;
}

function check(rc: i32, what: string): void {
  if (rc != 0) throw new Error("pingpong: " + what + " failed: " + errorName(rc));
}
