/**
 * The bytes of the group message data path (src/vm/message-path.ts): what one
 * VM thread sends another VM thread over TCP, inside the peer frame format of
 * src/transport/frame.ts (magic, version, type, length, crc).
 *
 * Frame types:
 * - PATH_HELLO, first frame of a connection: UTF-8 JSON {token, from}. The
 *   token is the receiving VM's own (it published it with its port); a wrong
 *   token (a port reused by another VM) closes the connection.
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

export const PATH_HELLO = 1;
export const PATH_MSGS = 2;

const ENTRY_BYTES = 32;

export class MalformedPathFrameError extends Error {
  override name = "MalformedPathFrameError";
  readonly code = "MalformedPathFrame";
}

export function encodeBatch(messages: readonly GroupMessage[]): Uint8Array {
  let payload = 0;
  for (const m of messages) payload += m.bytes.length;
  const head = 4 + messages.length * ENTRY_BYTES;
  const out = new Uint8Array(head + payload);
  const view = new DataView(out.buffer);
  view.setUint32(0, messages.length, true);
  let at = 4;
  let body = head;
  for (const m of messages) {
    view.setUint32(at, m.from, true);
    view.setUint32(at + 4, m.to, true);
    view.setUint32(at + 8, m.incarnation, true);
    view.setFloat64(at + 12, m.epoch, true);
    view.setFloat64(at + 20, m.seq, true);
    view.setUint32(at + 28, m.bytes.length, true);
    at += ENTRY_BYTES;
    out.set(m.bytes, body);
    body += m.bytes.length;
  }
  return out;
}

/** Inverse of encodeBatch; refuses a layout that does not add up. Payloads are copies (the frame buffer is not kept). */
export function decodeBatch(payload: Uint8Array): GroupMessage[] {
  if (payload.length < 4) throw new MalformedPathFrameError(`message batch of ${payload.length} bytes has no count`);
  const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  const count = view.getUint32(0, true);
  const head = 4 + count * ENTRY_BYTES;
  if (head > payload.length) throw new MalformedPathFrameError(`message batch: ${count} entries do not fit ${payload.length} bytes`);
  const out: GroupMessage[] = [];
  let at = 4;
  let body = head;
  for (let i = 0; i < count; i++) {
    const bytes = view.getUint32(at + 28, true);
    if (body + bytes > payload.length) throw new MalformedPathFrameError("message batch: payloads overrun the frame");
    out.push({
      from: view.getUint32(at, true),
      to: view.getUint32(at + 4, true),
      incarnation: view.getUint32(at + 8, true),
      epoch: view.getFloat64(at + 12, true),
      seq: view.getFloat64(at + 20, true),
      bytes: new Uint8Array(payload.subarray(body, body + bytes)), // a plain copy, not a view of the socket chunk
    });
    at += ENTRY_BYTES;
    body += bytes;
  }
  if (body !== payload.length) throw new MalformedPathFrameError("message batch: frame longer than its payloads");
  return out;
}

export interface PathHello {
  token: string;
  from: number;
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
  return { token: v.token, from: v.from as number };
}
