// Cohort guest SDK for AssemblyScript: ergonomic wrappers over Guest ABI v1
// (docs/GUEST_ABI.md) plus the `cohort_inbox` export every guest that exports
// `message` or `request` must re-export:
//
//   export { cohort_inbox } from "../../sdk/assemblyscript/index";
//
// See ./README.md for how to write and compile a guest.

import * as abi from "./abi";

// ---------------------------------------------------------------------------
// Return codes (0 = success, negative = error), as in docs/GUEST_ABI.md.

export const OK: i32 = 0;
/** An argument is out of range (bad timer id, negative length, ...). */
export const E_INVALID: i32 = -1;
/** A single message or output record is larger than the VM's limit. */
export const E_TOO_BIG: i32 = -2;
/** No group member has that rank. */
export const E_BAD_RANK: i32 = -3;
/** A bounded queue (pending output, sender log, timers) is full. */
export const E_FULL: i32 = -4;
/** No such client session / request. */
export const E_NO_SESSION: i32 = -5;

/** Symbolic name of a return code, for log lines and error replies. */
export function errorName(code: i32): string {
  switch (code) {
    case OK: return "OK";
    case E_INVALID: return "E_INVALID";
    case E_TOO_BIG: return "E_TOO_BIG";
    case E_BAD_RANK: return "E_BAD_RANK";
    case E_FULL: return "E_FULL";
    case E_NO_SESSION: return "E_NO_SESSION";
    default: return "E_" + code.toString();
  }
}

// ---------------------------------------------------------------------------
// Group membership.

/** This VM's rank in its group (0-based). */
export function rank(): i32 {
  return abi.rank();
}

/** Number of VMs in the group. */
export function size(): i32 {
  return abi.size();
}

// ---------------------------------------------------------------------------
// Output, messages and replies. Every function returns the host's code (0 or
// an E_* constant); `log` and `reply` are external output, released by the
// host only once the epoch that produced them has committed.

/** Appends `text`, UTF-8 encoded, to this VM's output stream. No newline is added. */
export function log(text: string): i32 {
  const buf = String.UTF8.encode(text);
  return abi.log(changetype<usize>(buf), buf.byteLength);
}

/** Appends raw bytes to this VM's output stream. */
export function logBytes(bytes: Uint8Array): i32 {
  return abi.log(bytes.dataStart, bytes.byteLength);
}

/** Sends `bytes` to the group member with rank `to`. */
export function send(to: i32, bytes: Uint8Array): i32 {
  return abi.send(to, bytes.dataStart, bytes.byteLength);
}

/**
 * Answers request `requestId` of client session `session`. `data` is a
 * string (sent UTF-8 encoded), a Uint8Array or an ArrayBuffer; the type is
 * resolved at compile time, so `reply(s, id, "ok")` just works.
 */
export function reply<T>(session: i32, requestId: i32, data: T): i32 {
  if (isString<T>()) {
    const buf = String.UTF8.encode(changetype<string>(data));
    return abi.reply(session, requestId, changetype<usize>(buf), buf.byteLength);
  } else if (data instanceof Uint8Array) {
    const bytes = changetype<Uint8Array>(data);
    return abi.reply(session, requestId, bytes.dataStart, bytes.byteLength);
  } else if (data instanceof ArrayBuffer) {
    const buf = changetype<ArrayBuffer>(data);
    return abi.reply(session, requestId, changetype<usize>(buf), buf.byteLength);
  } else {
    ERROR("reply() takes a string, Uint8Array or ArrayBuffer");
    return E_INVALID;
  }
}

// ---------------------------------------------------------------------------
// Timers and clock.

/** Arms one-shot timer `id` to fire after `delayMs`; re-arms it if already armed. */
export function setTimer(id: i32, delayMs: f64): i32 {
  return abi.timer_set(id, delayMs);
}

/** Disarms timer `id` (not an error if it is not armed). */
export function cancelTimer(id: i32): i32 {
  return abi.timer_cancel(id);
}

/** Wall-clock time in milliseconds since the Unix epoch. */
export function nowMs(): f64 {
  return abi.clock_ms();
}

// ---------------------------------------------------------------------------
// Randomness (from the host: the guest may be nondeterministic, Cohort
// checkpoints rather than replays). Math.random would import env.seed and use
// a PRNG seeded once; these ask the host every time.

/** Fills `bytes` with random bytes. */
export function randomFill(bytes: Uint8Array): i32 {
  return abi.random_fill(bytes.dataStart, bytes.byteLength);
}

/** A new Uint8Array of `n` random bytes. */
export function randomBytes(n: i32): Uint8Array {
  const bytes = new Uint8Array(n);
  check(randomFill(bytes), "random_fill");
  return bytes;
}

// Static scratch word for randomU32, so it does not allocate.
const RANDOM_SCRATCH: usize = memory.data(4);

/** A uniformly random u32. */
export function randomU32(): u32 {
  check(abi.random_fill(RANDOM_SCRATCH, 4), "random_fill");
  return load<u32>(RANDOM_SCRATCH);
}

/** A uniformly random integer in [0, bound); bound must be > 0. */
export function randomBelow(bound: i32): i32 {
  if (bound <= 0) throw new RangeError("randomBelow: bound must be > 0");
  // Rejection sampling: drop the top partial range so every value is equally likely.
  const b = <u32>bound;
  const limit = u32.MAX_VALUE - (u32.MAX_VALUE % b + 1) % b;
  let x = randomU32();
  while (x > limit) x = randomU32();
  return <i32>(x % b);
}

// ---------------------------------------------------------------------------
// UTF-8 helpers. AssemblyScript strings are UTF-16 in memory; everything that
// crosses the ABI is bytes, so text is converted at the boundary.

/** `text` encoded as UTF-8 bytes (a fresh Uint8Array). */
export function encodeUtf8(text: string): Uint8Array {
  return Uint8Array.wrap(String.UTF8.encode(text));
}

/** Decodes UTF-8 bytes to a string (invalid sequences become U+FFFD). */
export function decodeUtf8(bytes: Uint8Array): string {
  return String.UTF8.decodeUnsafe(bytes.dataStart, <usize>bytes.byteLength);
}

// ---------------------------------------------------------------------------
// The inbox. Before calling `message` or `request`, the host calls
// `cohort_inbox(len)`, writes the payload into the returned buffer, then
// passes that pointer and length to the handler. One growable buffer is
// reused for every call: it is held by a global (so the GC keeps it alive),
// and a larger one replaces it only when a payload does not fit, after which
// the old one is garbage and gets collected.

let inboxBuffer = new ArrayBuffer(0);

/** ABI export: a buffer of at least `len` bytes for the next incoming payload. */
export function cohort_inbox(len: i32): usize {
  if (len < 0) throw new RangeError("cohort_inbox: negative length");
  const capacity = inboxBuffer.byteLength;
  if (len > capacity) {
    // Grow geometrically so a slowly growing payload size costs O(log n) reallocations.
    inboxBuffer = new ArrayBuffer(max(len, max(capacity << 1, 256)));
  }
  return changetype<usize>(inboxBuffer);
}

/**
 * The payload a handler received, as a Uint8Array. When `ptr` is the inbox
 * (always, under ABI v1) this is a view of the shared inbox buffer, valid only
 * until the handler returns: the next payload overwrites it. Use
 * `inboxCopy` to keep the bytes.
 */
export function inbox(ptr: usize, len: i32): Uint8Array {
  if (ptr == changetype<usize>(inboxBuffer) && <u32>len <= <u32>inboxBuffer.byteLength) {
    return Uint8Array.wrap(inboxBuffer, 0, len);
  }
  return copyFrom(ptr, len);
}

/** The payload a handler received, copied into a fresh Uint8Array it can keep. */
export function inboxCopy(ptr: usize, len: i32): Uint8Array {
  return copyFrom(ptr, len);
}

/** The payload a handler received, decoded from UTF-8. */
export function inboxText(ptr: usize, len: i32): string {
  if (len < 0) throw new RangeError("inboxText: negative length");
  return String.UTF8.decodeUnsafe(ptr, <usize>len);
}

// ---------------------------------------------------------------------------

function copyFrom(ptr: usize, len: i32): Uint8Array {
  const bytes = new Uint8Array(len);
  memory.copy(bytes.dataStart, ptr, <usize>len);
  return bytes;
}

function check(code: i32, what: string): void {
  if (code != OK) throw new Error(what + " failed: " + errorName(code));
}
