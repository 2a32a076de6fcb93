/**
 * Messages between hosts (and from the CLI to a host), carried in peer frames
 * (src/transport/frame.ts). A frame's payload is a small JSON header followed
 * by an optional binary body (a delta, an image, a module): bulk bytes never
 * go through JSON.
 *
 *   payload = u32 header_bytes | header (UTF-8 JSON) | body
 */
import { assert } from "../util/assert.js";

export const MSG = {
  /** First frame on a connection: who is calling. */
  HELLO: 1,
  HEARTBEAT: 2,
  /** CLI or host asks a host to do something; answered by REPLY with the same id. */
  REQUEST: 3,
  REPLY: 4,
  // 5..8 carried the single-VM replication stream before every VM became a group: not reused.
  /** Host → log follower: released output records. */
  LOG: 9,
  /** Traffic of a protected group (src/core/frames.ts): epochs, deltas, commits, recovery. */
  GROUP: 10,
} as const;

export type MsgType = (typeof MSG)[keyof typeof MSG];

export interface Hello {
  from: string; // host id, or "cli"
}

export interface Heartbeat {
  from: string;
  sent_ms: number;
}

export interface Request {
  id: number;
  op: string;
  args: Record<string, unknown>;
}

export interface Reply {
  id: number;
  ok: boolean;
  value?: unknown;
  error?: { code: string; message: string };
}

const HEADER_LIMIT_BYTES = 1 << 20;

export function encodePayload(header: unknown, body?: Uint8Array): Uint8Array[] {
  const json = Buffer.from(JSON.stringify(header));
  assert(json.length <= HEADER_LIMIT_BYTES, "message header under 1 MiB");
  const len = Buffer.alloc(4);
  len.writeUInt32LE(json.length, 0);
  return body && body.length ? [len, json, body] : [len, json];
}

export class MalformedMessageError extends Error {
  override name = "MalformedMessageError";
  readonly code = "MalformedMessage";
}

export function decodePayload<T>(payload: Uint8Array): { header: T; body: Uint8Array } {
  if (payload.length < 4) throw new MalformedMessageError("payload shorter than its header length");
  const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  const n = view.getUint32(0, true);
  if (n > HEADER_LIMIT_BYTES || 4 + n > payload.length) throw new MalformedMessageError(`header length ${n} does not fit the payload`);
  let header: T;
  try {
    header = JSON.parse(Buffer.from(payload.subarray(4, 4 + n)).toString("utf8")) as T;
  } catch (error) {
    throw new MalformedMessageError(`header is not JSON: ${(error as Error).message}`);
  }
  if (header === null || typeof header !== "object") throw new MalformedMessageError("header is not an object");
  return { header, body: payload.subarray(4 + n) };
}
