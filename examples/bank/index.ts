// Bank: every rank holds ACCOUNTS accounts starting at INITIAL_BALANCE and,
// on each timer tick, moves a random amount from one of its accounts to a
// random account of a random other rank. Money is debited only once the
// transfer message was accepted by the host, and credited when it arrives, so
// at any consistent global cut:
//
//   sum(balance) + sum(sent) - sum(recv) == size() * ACCOUNTS * INITIAL_BALANCE
//
// (the difference sent - recv is exactly the money in flight), and once the
// group is quiescent sum(transfers_out) == sum(transfers_in). Each tick logs
//
//   bank rank=<r> balance=<b> sent=<s> recv=<v> transfers_out=<o> transfers_in=<i>
//
// and a client request "audit" gets the same line (without the newline).
//
// Transfer message, 20 bytes, little-endian:
//   0  u64 transfer_id = (from_rank << 40) | local_seq   (local_seq = 1, 2, ...)
//   8  i32 from_rank
//   12 i32 to_account
//   16 i32 amount

import {
  E_FULL, errorName, inboxText, log, randomBelow, rank, reply, send, setTimer, size,
} from "../../sdk/assemblyscript/index";

export { cohort_inbox } from "../../sdk/assemblyscript/index";

const ACCOUNTS: i32 = 8;
const INITIAL_BALANCE: i64 = 1000;
const MAX_AMOUNT: i64 = 100;
const TIMER_ID: i32 = 1;
const PERIOD_MS: f64 = 5;
const MSG_BYTES: i32 = 20;

// All state below is linear memory or mutable globals, i.e. checkpointed.
// Top-level code runs once, in the wasm start function (first boot only).
const balances = new StaticArray<i64>(ACCOUNTS);
for (let i = 0; i < ACCOUNTS; i++) balances[i] = INITIAL_BALANCE;
const outgoing = new Uint8Array(MSG_BYTES); // reused for every transfer

let sentTotal: i64 = 0;
let recvTotal: i64 = 0;
let transfersOut: i64 = 0; // also the last local_seq used
let transfersIn: i64 = 0;

export function start(): void {
  arm();
}

export function timer(id: i32): void {
  if (id != TIMER_ID) return;
  if (size() > 1) transfer();
  const rc = log(auditLine() + "\n");
  // A dropped snapshot line under back-pressure is harmless; anything else is a bug.
  if (rc != 0 && rc != E_FULL) throw new Error("bank: log failed: " + errorName(rc));
  arm();
}

export function message(fromRank: i32, ptr: usize, len: i32): void {
  if (len != MSG_BYTES) throw new Error("bank: transfer of " + len.toString() + " bytes");
  const transferId = load<u64>(ptr, 0);
  const sender = load<i32>(ptr, 8);
  const toAccount = load<i32>(ptr, 12);
  const amount = <i64>load<i32>(ptr, 16);
  if (sender != fromRank || <i32>(transferId >> 40) != fromRank || <u32>toAccount >= <u32>ACCOUNTS || amount <= 0) {
    throw new Error("bank: malformed transfer from rank " + fromRank.toString());
  }
  balances[toAccount] += amount;
  recvTotal += amount;
  transfersIn++;
}

export function request(session: i32, requestId: i32, ptr: usize, len: i32): void {
  let text = inboxText(ptr, len);
  if (text.endsWith("\n")) text = text.substring(0, text.length - 1);
  reply(session, requestId, text == "audit" ? auditLine() : "error: unknown request (expected audit)");
}

function transfer(): void {
  // A random account with money: start at a random index, take the first non-empty one.
  const first = randomBelow(ACCOUNTS);
  let from = -1;
  for (let k = 0; k < ACCOUNTS; k++) {
    const a = (first + k) % ACCOUNTS;
    if (balances[a] > 0) { from = a; break; }
  }
  if (from < 0) return;

  const me = rank();
  let to = randomBelow(size() - 1); // a random rank other than me
  if (to >= me) to++;
  const balance = balances[from];
  const amount = 1 + <i64>randomBelow(<i32>min(balance, MAX_AMOUNT));
  const seq = transfersOut + 1;

  const p = outgoing.dataStart;
  store<u64>(p, (<u64>me << 40) | <u64>seq, 0);
  store<i32>(p, me, 8);
  store<i32>(p, randomBelow(ACCOUNTS), 12);
  store<i32>(p, <i32>amount, 16);
  const rc = send(to, outgoing);
  if (rc != 0) return; // not sent (e.g. E_FULL): nothing moved, try again next tick

  balances[from] = balance - amount;
  sentTotal += amount;
  transfersOut = seq;
}

function auditLine(): string {
  let total: i64 = 0;
  for (let i = 0; i < ACCOUNTS; i++) total += balances[i];
  return "bank rank=" + rank().toString() +
    " balance=" + total.toString() +
    " sent=" + sentTotal.toString() +
    " recv=" + recvTotal.toString() +
    " transfers_out=" + transfersOut.toString() +
    " transfers_in=" + transfersIn.toString();
}

function arm(): void {
  const rc = setTimer(TIMER_ID, PERIOD_MS);
  if (rc != 0) throw new Error("bank: timer_set failed: " + errorName(rc));
}
