/**
 * Messages between hosts (and from the CLI to a host), carried in peer frames
 * (src/transport/frame.ts). A frame's payload is a small JSON header followed
 * by an optional binary body (a delta, an image, a module): bulk bytes never
 * go through JSON.
 *
 *   payload = u32 header_bytes | header (UTF-8 JSON) | body
 *
 * Every header but a GROUP frame's carries `v`, the control frame version
 * (CONTROL_VERSION, stamped by Connection.send); GROUP frames carry their own
 * (src/core/frames.ts). `checkControl` checks a control header's version and
 * shape on arrival: a frame of a newer version, or one that does not parse,
 * closes its connection with the reason, and nothing else.
 *
 * What a REQUEST asks and what its REPLY holds is the host API table,
 * src/host/api.ts.
 */
import { z } from "zod";
import type { ReleasedRecord } from "../core/frames.js";
import { assert } from "../util/assert.js";

export const MSG = {
  /** First frame on a connection: who is calling. */
  HELLO: 1,
  // 2 carried heartbeats before they moved to datagrams of the heartbeat thread (src/host/beat-wire.ts): not reused.
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

/** Version of the control frames (every type but GROUP); a frame of a newer one is refused by name. */
export const CONTROL_VERSION = 1;

/** A frame type's name, for refusals and logs. */
export function msgName(type: number): string {
  for (const [name, t] of Object.entries(MSG)) if (t === type) return name;
  return `type ${type}`;
}

export interface Hello {
  from: string; // host id, or "cli"
}

export interface Request {
  id: number;
  /** An op of the host API (src/host/api.ts); its `args` are checked against the op's schema. */
  op: string;
  args: unknown;
}

export interface Reply {
  id: number;
  ok: boolean;
  value?: unknown;
  error?: { code: string; message: string };
}

/** Host → log follower (after a `logs` request with `follow`): records released since. */
export interface LogPush {
  vm: string;
  records: ReleasedRecord[];
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

// ---- control frame checks ------------------------------------------------------------------

const count = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);
const name = z.string().min(1).max(256);
const version = z.number().int().min(1);
const logRecord = z.strictObject({
  seq: count,
  epoch: count,
  kind: count,
  text: z.string(),
  produced_ms: z.number(),
  released_ms: z.number(),
  request_id: count.optional(),
});
const logPushSchema: z.ZodType<LogPush> = z.strictObject({ v: version, vm: name, records: z.array(logRecord) });
const replySchema: z.ZodType<Reply> = z.strictObject({
  v: version,
  id: count,
  ok: z.boolean(),
  value: z.unknown().optional(),
  error: z.strictObject({ code: z.string(), message: z.string() }).optional(),
});

const controlSchemas: Record<number, z.ZodType> = {
  [MSG.HELLO]: z.strictObject({ v: version, from: name }),
  [MSG.REQUEST]: z.strictObject({ v: version, id: count, op: z.string().max(64), args: z.unknown().optional() }),
  [MSG.REPLY]: replySchema,
  [MSG.LOG]: logPushSchema,
};

export class ControlFrameError extends Error {
  override name = "ControlFrameError";
  constructor(
    readonly code: "FrameVersion" | "FrameMalformed",
    message: string,
  ) {
    super(message);
  }
}

/**
 * Checks the header of a control frame (any type but GROUP) as it arrived:
 * its version first, so a newer peer is told apart from a broken one, then
 * its shape (ControlFrameError otherwise). Types without a schema here pass:
 * their receiver refuses them.
 */
export function checkControl(type: number, header: Record<string, unknown>): void {
  const schema = controlSchemas[type];
  if (schema) checked(type, schema, header);
  else checkVersion(type, header);
}

/** A LOG header, checked as `checkControl` does. */
export function parseLogPush(header: Record<string, unknown>): LogPush {
  return checked(MSG.LOG, logPushSchema, header);
}

/** A REPLY header, checked as `checkControl` does. */
export function parseReply(header: Record<string, unknown>): Reply {
  return checked(MSG.REPLY, replySchema, header);
}

function checkVersion(type: number, header: Record<string, unknown>): void {
  const v = header.v;
  if (typeof v === "number" && v > CONTROL_VERSION) {
    throw new ControlFrameError("FrameVersion", `${msgName(type)} frame version ${v} is newer than this host's ${CONTROL_VERSION}`);
  }
}

function checked<T>(type: number, schema: z.ZodType<T>, header: Record<string, unknown>): T {
  checkVersion(type, header);
  const parsed = schema.safeParse(header);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new ControlFrameError("FrameMalformed", `malformed ${msgName(type)} frame: ${issue.path.join(".") || "(header)"}: ${issue.message}`);
  }
  return parsed.data;
}
