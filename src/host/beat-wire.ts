/**
 * A heartbeat datagram (UDP, to the port number of the peer's host port):
 *
 *   u32 magic "CBT1" | u8 version | u8 from_len | from (UTF-8) | f64 sent_ms | tag (16 bytes, or none)
 *
 * `tag` is HMAC-SHA256 (first 16 bytes) of everything before it, under the
 * key of the sender → receiver pair: both ends export it from the TLS
 * session of the sender's connection to the receiver (RFC 5705 keying
 * material, label BEAT_KEY_LABEL), so only the host the receiver's CA
 * certified can make a beat it accepts. Hosts on plain TCP (`--insecure`)
 * send and accept beats without a tag, as they accept any peer frame.
 *
 * A replayed beat is refused once it is older than the detection timeout
 * (the receiver compares sent_ms with its clock), so a replay cannot keep a
 * dead host alive longer than a live one would be.
 */
import { createHmac, timingSafeEqual } from "node:crypto";

export const BEAT_MAGIC = 0x31544243; // "CBT1" little-endian
export const BEAT_VERSION = 1;
export const BEAT_TAG_BYTES = 16;
export const BEAT_FROM_MAX = 255;
export const BEAT_KEY_LABEL = "cohort heartbeat";
export const BEAT_KEY_BYTES = 32;

export interface Beat {
  from: string;
  sent_ms: number;
}

export function encodeBeat(beat: Beat, key: Uint8Array | null): Buffer {
  const from = Buffer.from(beat.from, "utf8");
  if (from.length === 0 || from.length > BEAT_FROM_MAX) throw new RangeError(`heartbeat sender id of ${from.length} bytes (1..${BEAT_FROM_MAX})`);
  const body = Buffer.alloc(4 + 1 + 1 + from.length + 8);
  body.writeUInt32LE(BEAT_MAGIC, 0);
  body.writeUInt8(BEAT_VERSION, 4);
  body.writeUInt8(from.length, 5);
  from.copy(body, 6);
  body.writeDoubleLE(beat.sent_ms, 6 + from.length);
  return key ? Buffer.concat([body, tagOf(key, body)]) : body;
}

/**
 * The beat in `datagram`, or why it is refused. `keysOf(from)` gives the
 * keys a beat from that sender may carry (the newest first); null means the
 * cluster runs without TLS and beats carry no tag.
 */
export function decodeBeat(datagram: Uint8Array, keysOf: (from: string) => readonly Uint8Array[] | null): Beat | { refused: string; keyless?: true } {
  const d = Buffer.from(datagram.buffer, datagram.byteOffset, datagram.byteLength);
  if (d.length < 6) return { refused: `${d.length} bytes, shorter than a heartbeat` };
  if (d.readUInt32LE(0) !== BEAT_MAGIC) return { refused: "not a heartbeat (magic)" };
  if (d.readUInt8(4) !== BEAT_VERSION) return { refused: `heartbeat version ${d.readUInt8(4)} (this host speaks ${BEAT_VERSION})` };
  const fromLen = d.readUInt8(5);
  const bodyLen = 6 + fromLen + 8;
  if (fromLen === 0 || d.length < bodyLen) return { refused: "heartbeat truncated" };
  const from = d.toString("utf8", 6, 6 + fromLen);
  const sent_ms = d.readDoubleLE(6 + fromLen);
  if (!Number.isFinite(sent_ms)) return { refused: "heartbeat time is not a number" };
  const keys = keysOf(from);
  if (keys === null) return d.length === bodyLen ? { from, sent_ms } : { refused: "heartbeat with a tag on a cluster without TLS" };
  if (d.length !== bodyLen + BEAT_TAG_BYTES) return { refused: `heartbeat from ${from} without a tag` };
  const body = d.subarray(0, bodyLen);
  const tag = d.subarray(bodyLen);
  // No key yet: the sender's connection to this host is still opening (or it has none).
  if (keys.length === 0) return { refused: `heartbeat from ${from}, which has no connection to this host`, keyless: true };
  for (const key of keys) if (timingSafeEqual(tagOf(key, body), tag)) return { from, sent_ms };
  return { refused: `heartbeat from ${from} with a wrong tag` };
}

function tagOf(key: Uint8Array, body: Uint8Array): Buffer {
  return createHmac("sha256", key).update(body).digest().subarray(0, BEAT_TAG_BYTES);
}
