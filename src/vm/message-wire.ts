/**
 * The bytes of the group message data path (src/vm/message-path.ts): what one
 * VM thread sends another VM thread over TCP, inside the peer frame format of
 * src/transport/frame.ts (magic, version, type, length, crc).
 *
 * Frame types:
 * - PATH_HELLO, first frame of a connection: UTF-8 JSON {token, from, sender}.
 *   token is the receiving VM's own (it published it with its port); a wrong
 *   token (a port reused by another VM) closes the connection. from is the
 *   dialing VM's rank and sender its own token: if that is the token of the
 *   rank's current primary, the receiver sends its messages to that rank back
 *   on this connection (without sender, the connection carries one way only).
 * - PATH_MSGS: a batch of group messages. Binary, little-endian:
 *
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

/** A whole PATH_MSGS frame carrying `messages`: one buffer, encoded in place (see encodeFrameWith). */
export function encodeBatchFrame(messages: readonly GroupMessage[]): Buffer {
  return encodeFrameWith(PATH_MSGS, batchBytes(messages), (frame, offset) => writeBatch(frame, offset, messages));
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
}

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
  return v.sender === undefined ? { token: v.token, from: v.from as number } : { token: v.token, from: v.from as number, sender: v.sender };
}
