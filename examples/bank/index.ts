// Bank: bulk-synchronous rounds of transfers, with a group-wide audit per
// round. Every rank holds ACCOUNTS accounts starting at INITIAL_BALANCE.
//
// Round k (k = 1, 2, ...) on a rank:
//   1. It applies the round-k transfers it received early (see below), then
//      sends exactly one round-k transfer to every other rank: a random
//      amount in 0..MAX_AMOUNT (at most the source account's balance; 0 is
//      allowed) from a random account of its own to a random account of the
//      receiver. The amount is debited when the transfer is sent (or queued
//      under back-pressure).
//   2. It credits the size-1 round-k transfers it receives, one per sender.
//   3. Once it has sent its round-k transfers and credited all size-1
//      round-k transfers it contributes its balance (the sum of its accounts)
//      to round k of an SDK Allreduce (OP_SUM, root 0).
//   4. When that allreduce completes, it logs
//
//        bank round=<k> rank=<r> balance=<b> recv=<n> dup=<d> total=<t>
//
//      b: its balance it contributed; n: transfers credited since boot;
//      d: duplicate transfers seen (and ignored) since boot; t: the
//      allreduce's result, the group's total money at the end of round k.
//   5. Round k + 1 starts PERIOD_MS later, from a timer.
//
// A peer can be one round ahead: it may finish round k (its allreduce
// completed) and send its round-(k+1) transfer before this rank has seen the
// allreduce result. Such a transfer is kept in guest memory, one slot per
// sender (a sender cannot get two rounds ahead: its round k+2 needs this
// rank's contribution to round k+1), and applied when this rank enters round
// k + 1. So every contribution to round k is exactly the balance after round
// k, and with exactly-once delivery every logged line satisfies
//
//   total == size() * ACCOUNTS * INITIAL_BALANCE   and   recv == (size() - 1) * round
//
// and dup == 0; the balances of round k summed over the ranks' lines also
// equal the total. A transfer whose (from, round) was already credited (or is
// already kept for the next round) is a duplicate: counted in dup, not
// credited. A group of one just logs rounds with total = its balance.
//
// A client request "audit" gets the last logged line without the newline
// (before round 1 completes: the initial state, "bank round=0 rank=<r>
// balance=8000 recv=0 dup=0 total=<size * 8000>"); anything else gets
// "error: ...".
//
// Transfer message, 20 bytes, little-endian (the first byte is never the
// collectives' 0xC7, so the two cannot be confused):
//   0  u8  MAGIC 0xB4
//   1  u8  KIND_TRANSFER 1
//   2  u16 0
//   4  u32 round (1, 2, ...)
//   8  i32 from_rank (== the sender)
//   12 i32 to_account (0..ACCOUNTS-1)
//   16 i32 amount (0..MAX_AMOUNT)
// Any other message that is not the Allreduce's traps ("bank: malformed
// transfer ..."), as does a transfer more than one round ahead or one that
// skips a round ("bank: transfer ... out of order").
//
// Back-pressure: transfers and the Allreduce's messages go through the
// collectives' sendOrQueue; queued sends are flushed from timer TIMER_FLUSH.
// A log line refused with E_FULL is retried from the round timer, and the
// next round starts only once it is out, so every round is logged once, in
// order.

import {
  E_FULL, errorName, inbox, inboxText, log, randomBelow, rank, reply, setTimer, size,
} from "../../sdk/assemblyscript/index";
import {
  Allreduce, COMPLETED, flushSends, NOT_MINE, OP_SUM, queuedSends, sendOrQueue,
} from "../../sdk/assemblyscript/collectives";

export { cohort_inbox } from "../../sdk/assemblyscript/index";

const ACCOUNTS: i32 = 8;
const INITIAL_BALANCE: i64 = 1000;
const MAX_AMOUNT: i64 = 100;
const PERIOD_MS: f64 = 5; // pause between two rounds
const TIMER_ROUND: i32 = 1; // the next round, or a log line retried
const TIMER_FLUSH: i32 = 2; // sends queued under back-pressure
const FLUSH_MS: f64 = 1;

const MAGIC: u8 = 0xb4;
const KIND_TRANSFER: u8 = 1;
const MSG_BYTES: i32 = 20;

// All state below is linear memory or mutable globals, i.e. checkpointed.
// Top-level code runs once, in the wasm start function (first boot only);
// size() is not available there, so the per-sender arrays are sized in init().
const balances = new StaticArray<i64>(ACCOUNTS);
for (let i = 0; i < ACCOUNTS; i++) balances[i] = INITIAL_BALANCE;
const outgoing = new Uint8Array(MSG_BYTES); // reused for every transfer (sendOrQueue copies when it queues)
const allreduce = new Allreduce(0, 0, OP_SUM);

let initialised = false;
/** The round this rank is in: it sent its transfers of this round (0: not started). */
let round: u32 = 0;
/** This rank contributed to round `round`'s allreduce. */
let contributed = false;
/** Round `round`'s allreduce completed; waiting for TIMER_ROUND. */
let roundDone = false;
/** Per sender: the last round whose transfer was credited. */
let lastApplied = new StaticArray<u32>(0);
/** Per sender: a transfer of round `round + 1` kept until this rank enters that round (0: none). */
let earlyRound = new StaticArray<u32>(0);
let earlyAccount = new StaticArray<i32>(0);
let earlyAmount = new StaticArray<i64>(0);
let recvTotal: i64 = 0;
let dupTotal: i64 = 0;
/** The balance contributed to the current round's allreduce. */
let contributedBalance: i64 = 0;
/** The line of the last completed round (no newline); "" before round 1. */
let lastLine = "";
/** That line was refused by the host (E_FULL) and still has to be logged. */
let linePending = false;

export function start(): void {
  init();
  startRound();
  armFlush();
}

export function timer(id: i32): void {
  init();
  if (id == TIMER_ROUND) {
    if (roundDone && (!linePending || tryLog())) startRound();
    else if (roundDone) armRound(); // the line is still refused: try again later
  } else if (id == TIMER_FLUSH) {
    flushSends();
  }
  armFlush();
}

export function message(fromRank: i32, ptr: usize, len: i32): void {
  init();
  const bytes = inbox(ptr, len);
  const rc = allreduce.handle(fromRank, bytes);
  if (rc == COMPLETED) completed();
  else if (rc == NOT_MINE) {
    transfer(fromRank, bytes);
    maybeContribute();
  }
  armFlush();
}

export function request(session: i32, requestId: i32, ptr: usize, len: i32): void {
  let text = inboxText(ptr, len);
  if (text.endsWith("\n")) text = text.substring(0, text.length - 1);
  reply(session, requestId, text == "audit" ? auditLine() : "error: unknown request (expected audit)");
}

// ---------------------------------------------------------------------------

function init(): void {
  if (initialised) return;
  initialised = true;
  const n = size();
  lastApplied = new StaticArray<u32>(n);
  earlyRound = new StaticArray<u32>(n);
  earlyAccount = new StaticArray<i32>(n);
  earlyAmount = new StaticArray<i64>(n);
}

/** Enters round `round + 1`: credits the transfers kept for it, sends this rank's, contributes if nothing is missing. */
function startRound(): void {
  round++;
  contributed = false;
  roundDone = false;
  const me = rank();
  const n = size();
  for (let p = 0; p < n; p++) {
    if (earlyRound[p] == 0) continue;
    if (earlyRound[p] != round) throw new Error("bank: kept a transfer of round " + earlyRound[p].toString() + " from rank " + p.toString() + " entering round " + round.toString());
    credit(p, earlyRound[p], earlyAccount[p], earlyAmount[p]);
    earlyRound[p] = 0;
  }
  for (let to = 0; to < n; to++) if (to != me) sendTransfer(to);
  maybeContribute();
}

/** One round-`round` transfer to rank `to`, debited now (sent or queued). */
function sendTransfer(to: i32): void {
  const from = randomBelow(ACCOUNTS);
  const balance = balances[from];
  const amount = <i64>randomBelow(<i32>min(balance, MAX_AMOUNT) + 1);
  const p = outgoing.dataStart;
  store<u8>(p, MAGIC, 0);
  store<u8>(p, KIND_TRANSFER, 1);
  store<u16>(p, 0, 2);
  store<u32>(p, round, 4);
  store<i32>(p, rank(), 8);
  store<i32>(p, randomBelow(ACCOUNTS), 12);
  store<i32>(p, <i32>amount, 16);
  sendOrQueue(to, outgoing);
  balances[from] = balance - amount;
}

/** A message that is not the Allreduce's: a transfer, checked, then credited, kept or counted as a duplicate. */
function transfer(from: i32, bytes: Uint8Array): void {
  const len = bytes.length;
  if (len != MSG_BYTES) throw new Error("bank: malformed transfer from rank " + from.toString() + ": " + len.toString() + " bytes, expected " + MSG_BYTES.toString());
  const p = bytes.dataStart;
  const r = load<u32>(p, 4);
  const sender = load<i32>(p, 8);
  const account = load<i32>(p, 12);
  const amount = <i64>load<i32>(p, 16);
  if (load<u8>(p, 0) != MAGIC || load<u8>(p, 1) != KIND_TRANSFER || load<u16>(p, 2) != 0 ||
      sender != from || from == rank() || <u32>from >= <u32>size() || r == 0 ||
      <u32>account >= <u32>ACCOUNTS || amount < 0 || amount > MAX_AMOUNT) {
    throw new Error("bank: malformed transfer from rank " + from.toString());
  }
  if (r <= lastApplied[from] || r == earlyRound[from]) {
    dupTotal++; // a duplicate: already credited, or already kept for the next round
    return;
  }
  if (r != lastApplied[from] + 1 || r > round + 1) {
    throw new Error("bank: transfer of round " + r.toString() + " from rank " + from.toString() + " out of order: last credited round " +
      lastApplied[from].toString() + ", this rank in round " + round.toString());
  }
  if (r <= round) {
    credit(from, r, account, amount);
  } else {
    // r == round + 1, and nothing is kept for `from` (it would be r, or older and credited by now).
    earlyRound[from] = r;
    earlyAccount[from] = account;
    earlyAmount[from] = amount;
  }
}

function credit(from: i32, r: u32, account: i32, amount: i64): void {
  balances[account] += amount;
  lastApplied[from] = r;
  recvTotal++;
}

/** Contributes to round `round`'s allreduce once every other rank's transfer of this round is credited. */
function maybeContribute(): void {
  if (round == 0 || contributed) return;
  const me = rank();
  const n = size();
  for (let p = 0; p < n; p++) if (p != me && lastApplied[p] < round) return;
  if (allreduce.round + 1 != round) throw new Error("bank: allreduce in round " + (allreduce.round + 1).toString() + ", bank in round " + round.toString());
  contributed = true;
  contributedBalance = balanceSum();
  if (allreduce.contribute(<f64>contributedBalance) == COMPLETED) completed();
}

/** Round `round`'s allreduce completed on this rank: log its line, start the next round after PERIOD_MS. */
function completed(): void {
  if (!contributed || allreduce.round != round) throw new Error("bank: allreduce round " + allreduce.round.toString() + " completed in round " + round.toString());
  roundDone = true;
  lastLine = line(round, contributedBalance, <i64>allreduce.result);
  linePending = true;
  tryLog();
  armRound();
}

/** Logs the pending line; false if the host refused it (E_FULL). */
function tryLog(): bool {
  const rc = log(lastLine + "\n");
  if (rc == E_FULL) return false;
  if (rc != 0) throw new Error("bank: log failed: " + errorName(rc));
  linePending = false;
  return true;
}

function auditLine(): string {
  if (lastLine.length > 0) return lastLine;
  const perRank = <i64>ACCOUNTS * INITIAL_BALANCE;
  return line(0, perRank, perRank * <i64>size());
}

function line(r: u32, balance: i64, total: i64): string {
  return "bank round=" + r.toString() +
    " rank=" + rank().toString() +
    " balance=" + balance.toString() +
    " recv=" + recvTotal.toString() +
    " dup=" + dupTotal.toString() +
    " total=" + total.toString();
}

function balanceSum(): i64 {
  let sum: i64 = 0;
  for (let i = 0; i < ACCOUNTS; i++) sum += balances[i];
  return sum;
}

function armRound(): void {
  check(setTimer(TIMER_ROUND, PERIOD_MS), "timer_set");
}

function armFlush(): void {
  if (queuedSends() > 0) check(setTimer(TIMER_FLUSH, FLUSH_MS), "timer_set");
}

function check(rc: i32, what: string): void {
  if (rc != 0) throw new Error("bank: " + what + " failed: " + errorName(rc));
}
