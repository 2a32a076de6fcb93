/**
 * The bytes of the group message data path (src/vm/message-path.ts): what one
 * VM thread sends another VM thread over TCP, inside the peer frame format of
 * src/transport/frame.ts (magic, version, type, length, crc).
 *
 * A connection joins two VM threads' path endpoints and carries the messages
 * of every VM on them, both ways (src/vm/message-path.ts PathEndpoint).
 *
 * Frame types:
 * - PATH_HELLO, first frame of a connection: UTF-8 JSON {token, from, sender,
 *   address}. token is the token of a VM on the receiving thread (the first
 *   the dialer sends to; every VM publishes its token with its address): one
 *   that names no VM there (a port reused by another thread) closes the
 *   connection. from and sender are the dialing VM's rank and token, address
 *   where the dialing thread listens: the receiver sends its own messages for
 *   any VM at that address back on this connection (without address, the
 *   connection carries one way only).
 * - PATH_MSGS: a batch of group messages for one VM. Binary, little-endian:
 *
 *     u8 token_bytes, token (UTF-8): the receiving VM's token
 *     u32 count
 *     count × { u32 from, u32 to, u32 incarnation, f64 epoch, f64 seq, u32 bytes }   (32 bytes each)
 *     payloads back to back
 *
 *   epoch and seq are f64 so that any safe integer fits; the receiving VM
 *   checks the stamps (VmCore.receive), this decoder checks the layout.
 */
import type { GroupMessage } from "./machine.js";
import { encodeFrameWith } from "../transport/frame.js";

export const PATH_HELLO = 1;
export const PATH_MSGS = 2;

const ENTRY_BYTES = 32;

export class MalformedPathFrameError extends Error {
  override name = "MalformedPathFrameError";
  readonly code = "MalformedPathFrame";
}

/** The bytes encodeBatch writes for `messages`. */
function batchBytes(messages: readonly GroupMessage[]): number {
  let bytes = 4 + messages.length * ENTRY_BYTES;
  for (const m of messages) bytes += m.bytes.length;
  return bytes;
}

/** Writes the batch layout at `offset` of `out` (batchBytes(messages) bytes). */
function writeBatch(out: Buffer, offset: number, messages: readonly GroupMessage[]): void {
  out.writeUInt32LE(messages.length, offset);
  let at = offset + 4;
  let body = at + messages.length * ENTRY_BYTES;
  for (const m of messages) {
    out.writeUInt32LE(m.from, at);
    out.writeUInt32LE(m.to, at + 4);
    out.writeUInt32LE(m.incarnation, at + 8);
    out.writeDoubleLE(m.epoch, at + 12);
    out.writeDoubleLE(m.seq, at + 20);
    out.writeUInt32LE(m.bytes.length, at + 28);
    at += ENTRY_BYTES;
    out.set(m.bytes, body);
    body += m.bytes.length;
  }
}

export function encodeBatch(messages: readonly GroupMessage[]): Uint8Array {
  const out = Buffer.alloc(batchBytes(messages));
  writeBatch(out, 0, messages);
  return out;
}

/** Longest VM token a batch frame names (the tokens are UUIDs: 36 bytes). */
const TOKEN_BYTES_MAX = 255;

/** A VM token as batch frames carry it (encoded once per route, not per frame). */
export function encodeToken(token: string): Uint8Array {
  const bytes = Buffer.from(token, "utf8");
  if (bytes.length > TOKEN_BYTES_MAX) throw new RangeError(`a VM token of ${bytes.length} bytes (at most ${TOKEN_BYTES_MAX})`);
  return bytes;
}

/** A whole PATH_MSGS frame carrying `messages` to the VM whose token (encodeToken) is `token`: one buffer, encoded in place (see encodeFrameWith). */
export function encodeBatchFrame(token: Uint8Array, messages: readonly GroupMessage[]): Buffer {
  return encodeFrameWith(PATH_MSGS, 1 + token.length + batchBytes(messages), (frame, offset) => {
    frame.writeUInt8(token.length, offset);
    frame.set(token, offset + 1);
    writeBatch(frame, offset + 1 + token.length, messages);
  });
}

/** Inverse of encodeBatchFrame's payload: the receiving VM's token and the batch. */
export function decodeBatchFrame(payload: Uint8Array): { token: string; messages: GroupMessage[] } {
  if (payload.length < 1) throw new MalformedPathFrameError("message batch frame is empty");
  const n = payload[0];
  if (1 + n > payload.length) throw new MalformedPathFrameError(`message batch frame: a token of ${n} bytes does not fit ${payload.length} bytes`);
  return { token: new TextDecoder().decode(payload.subarray(1, 1 + n)), messages: decodeBatch(payload.subarray(1 + n)) };
}

/** Inverse of encodeBatch; refuses a layout that does not add up. Payloads are copies (the frame buffer is not kept). */
export function decodeBatch(payload: Uint8Array): GroupMessage[] {
  if (payload.length < 4) throw new MalformedPathFrameError(`message batch of ${payload.length} bytes has no count`);
  const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  const count = view.getUint32(0, true);
  const head = 4 + count * ENTRY_BYTES;
  if (head > payload.length) throw new MalformedPathFrameError(`message batch: ${count} entries do not fit ${payload.length} bytes`);
  // One copy of all payloads, not views of the socket chunk (which may be 64 KiB); each message's bytes are a view into it.
  const payloads = new Uint8Array(payload.subarray(head)); // a copy (Buffer.prototype.slice would be a view)
  const out: GroupMessage[] = [];
  let at = 4;
  let body = 0;
  for (let i = 0; i < count; i++) {
    const bytes = view.getUint32(at + 28, true);
    if (body + bytes > payloads.length) throw new MalformedPathFrameError("message batch: payloads overrun the frame");
    out.push({
      from: view.getUint32(at, true),
      to: view.getUint32(at + 4, true),
      incarnation: view.getUint32(at + 8, true),
      epoch: view.getFloat64(at + 12, true),
      seq: view.getFloat64(at + 20, true),
      bytes: payloads.subarray(body, body + bytes),
    });
    at += ENTRY_BYTES;
    body += bytes;
  }
  if (body !== payloads.length) throw new MalformedPathFrameError("message batch: frame longer than its payloads");
  return out;
}

export interface PathHello {
  token: string;
  from: number;
  sender?: string;
  /** Where the dialing thread's endpoint listens ("host:port"): the receiver answers VMs there on this connection. */
  address?: string;
}

/** Longest `address` a hello may give ("host:port"). */
const ADDRESS_CHARS_MAX = 300;

export function encodeHello(hello: PathHello): Uint8Array {
  return new TextEncoder().encode(JSON.stringify(hello));
}

export function decodeHello(payload: Uint8Array): PathHello {
  let value: unknown;
  try {
    value = JSON.parse(new TextDecoder().decode(payload));
  } catch {
    throw new MalformedPathFrameError("hello is not JSON");
  }
  const v = value as Partial<PathHello>;
  if (typeof v?.token !== "string" || !Number.isInteger(v.from)) throw new MalformedPathFrameError("hello lacks token or from");
  if (v.sender !== undefined && typeof v.sender !== "string") throw new MalformedPathFrameError("hello's sender is not a token");
  if (v.address !== undefined && (typeof v.address !== "string" || v.address.length > ADDRESS_CHARS_MAX)) throw new MalformedPathFrameError("hello's address is not an address");
  const hello: PathHello = { token: v.token, from: v.from as number };
  if (v.sender !== undefined) hello.sender = v.sender;
  if (v.address !== undefined) hello.address = v.address;
  return hello;
}
