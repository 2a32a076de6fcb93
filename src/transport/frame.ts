/**
 * Peer frame protocol: how host daemons cut a TCP byte stream into messages.
 *
 * Wire layout of one frame (all integers little-endian):
 *
 *   offset  size  field
 *   0       4     magic          0x52464843, i.e. the bytes "CHFR"
 *   4       1     version        FRAME_FORMAT_VERSION (1)
 *   5       1     type           caller-defined frame type, 0..255 (opaque here)
 *   6       2     flags          caller-defined, 0..65535 (opaque here)
 *   8       4     payload_bytes  length of the payload that follows
 *   12      n     payload
 *   12+n    4     crc32          zlib crc32 over header + payload
 *
 * The crc covers the header too, so a damaged length or type is caught as
 * well as a damaged payload (a damaged length usually surfaces as a checksum
 * mismatch on whatever bytes end up where the trailer is expected).
 */
import { crc32 } from "node:zlib";
import { assert } from "../util/assert.js";
import {
  ChecksumMismatchError,
  FrameError,
  FrameTooLargeError,
  InvalidFormatVersionError,
  InvalidMagicError,
  TrailingBytesError,
  TruncatedError,
} from "./errors.js";

/** "CHFR" read as a little-endian u32, so a hexdump of the stream shows CHFR. */
export const FRAME_MAGIC = 0x52464843;
export const FRAME_FORMAT_VERSION = 1;
export const FRAME_HEADER_BYTES = 12;
export const FRAME_TRAILER_BYTES = 4;
/** Default receive limit on a frame's payload: 64 MiB (a large checkpoint delta). */
export const MAX_FRAME_BYTES_DEFAULT = 64 * 1024 * 1024;
/** payload_bytes is a u32. */
const PAYLOAD_BYTES_LIMIT = 0xffff_ffff;

export interface Frame {
  type: number;
  flags: number;
  payload: Uint8Array;
}

interface FrameHeader {
  type: number;
  flags: number;
  payload_bytes: number;
}

/**
 * Encode one frame as a list of buffers: header, the payload parts (never
 * copied), trailer. Write them between `socket.cork()` and `socket.uncork()`
 * so they go out as one segment without concatenating a large payload.
 */
export function encodeFrame(type: number, payload: Uint8Array | Uint8Array[], flags = 0): Uint8Array[] {
  const parts = (Array.isArray(payload) ? payload : [payload]).filter((p) => p.byteLength > 0);
  let payload_bytes = 0;
  for (const p of parts) payload_bytes += p.byteLength;
  const header = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
  writeHeader(header, type, flags, payload_bytes);
  // Incremental crc: each call continues from the previous value.
  let crc = crc32(header);
  for (const p of parts) crc = crc32(p, crc);
  const trailer = Buffer.allocUnsafe(FRAME_TRAILER_BYTES);
  trailer.writeUInt32LE(crc, 0);
  return [header, ...parts, trailer];
}

/**
 * Encode one frame into a single new buffer whose payload `fill` writes in
 * place at `offset` (exactly `payload_bytes` of them). For the small frames
 * of the message path: one allocation (from Node's buffer pool when small),
 * no copy of the payload and one crc call, where encodeFrame plus a concat
 * make four buffers per message.
 */
export function encodeFrameWith(type: number, payload_bytes: number, fill: (frame: Buffer, offset: number) => void, flags = 0): Buffer {
  const frame = Buffer.allocUnsafe(FRAME_HEADER_BYTES + payload_bytes + FRAME_TRAILER_BYTES);
  writeHeader(frame, type, flags, payload_bytes);
  fill(frame, FRAME_HEADER_BYTES);
  const body_end = FRAME_HEADER_BYTES + payload_bytes;
  frame.writeUInt32LE(crc32(frame.subarray(0, body_end)), body_end);
  return frame;
}

function writeHeader(header: Buffer, type: number, flags: number, payload_bytes: number): void {
  // One test first: the messages are built only on failure (this runs once per group message).
  const valid = Number.isInteger(type) && type >= 0 && type <= 0xff && Number.isInteger(flags) && flags >= 0 && flags <= 0xffff && Number.isInteger(payload_bytes) && payload_bytes >= 0 && payload_bytes <= PAYLOAD_BYTES_LIMIT;
  if (!valid) {
    assert(Number.isInteger(type) && type >= 0 && type <= 0xff, `frame type ${type} is not a u8`);
    assert(Number.isInteger(flags) && flags >= 0 && flags <= 0xffff, `frame flags ${flags} are not a u16`);
    assert(false, `frame payload of ${payload_bytes} bytes does not fit a u32`);
  }
  header.writeUInt32LE(FRAME_MAGIC, 0);
  header.writeUInt8(FRAME_FORMAT_VERSION, 4);
  header.writeUInt8(type, 5);
  header.writeUInt16LE(flags, 6);
  header.writeUInt32LE(payload_bytes, 8);
}

/** `encodeFrame` joined into one buffer; for small frames and tests. */
export function encodeFrameBytes(type: number, payload: Uint8Array | Uint8Array[], flags = 0): Uint8Array {
  return Buffer.concat(encodeFrame(type, payload, flags));
}

/**
 * Decode exactly one frame held in `bytes`. Throws `TruncatedError` if the
 * frame is incomplete and `TrailingBytesError` if bytes follow it. The
 * returned payload is a view into `bytes`, not a copy.
 */
export function decodeFrame(bytes: Uint8Array, opts: { max_frame_bytes?: number } = {}): Frame {
  const max_frame_bytes = opts.max_frame_bytes ?? MAX_FRAME_BYTES_DEFAULT;
  if (bytes.byteLength < FRAME_HEADER_BYTES) {
    throw new TruncatedError(`${bytes.byteLength} bytes is shorter than a frame header (${FRAME_HEADER_BYTES})`);
  }
  const header = parseHeader(bytes, max_frame_bytes);
  const frame_bytes = FRAME_HEADER_BYTES + header.payload_bytes + FRAME_TRAILER_BYTES;
  if (bytes.byteLength < frame_bytes) {
    throw new TruncatedError(`frame needs ${frame_bytes} bytes, got ${bytes.byteLength}`);
  }
  if (bytes.byteLength > frame_bytes) {
    throw new TrailingBytesError(`${bytes.byteLength - frame_bytes} bytes follow a ${frame_bytes}-byte frame`);
  }
  return checkFrame(bytes, header);
}

/**
 * Incremental decoder for one TCP connection. Feed it every chunk the socket
 * yields; it returns the frames completed so far, in order.
 *
 * Cost is linear in the bytes received: chunks are kept in a list and only
 * joined once a whole frame is buffered (a frame inside one chunk is not
 * copied at all: its payload is a view into that chunk, so callers must not
 * reuse a chunk's memory after pushing it; Node socket chunks are fresh).
 *
 * After a `FrameError` the decoder is poisoned: every later `push` rethrows
 * the same error, since the stream can no longer be resynchronized and the
 * connection must be closed. Frames that completed earlier in the failing
 * `push` are dropped with it; peers recover from a lost connection by
 * resending (sender logs, client sessions), so nothing relies on them.
 */
export class FrameDecoder {
  readonly max_frame_bytes: number;
  private chunks: Uint8Array[] = [];
  /** Read offset into chunks[0]. */
  private head = 0;
  /** Unread bytes across all chunks. */
  private buffered = 0;
  /** Header of the frame being buffered, parsed once so a large frame arriving in many chunks costs O(1) per push. */
  private pending: FrameHeader | null = null;
  private error: FrameError | null = null;

  constructor(opts: { max_frame_bytes: number }) {
    const m = opts.max_frame_bytes;
    assert(Number.isInteger(m) && m >= 0 && m <= PAYLOAD_BYTES_LIMIT, `max_frame_bytes ${m} is not a u32`);
    this.max_frame_bytes = m;
  }

  /** Bytes received but not yet returned as frames. */
  get buffered_bytes(): number {
    return this.buffered;
  }

  push(chunk: Uint8Array): Frame[] {
    if (this.error) throw this.error;
    // Nothing buffered and the chunk holds whole frames (the usual case for
    // small frames): parse them in place, without the chunk list.
    if (this.buffered === 0 && this.pending === null && chunk.byteLength >= FRAME_HEADER_BYTES) {
      try {
        const header = parseHeader(chunk, this.max_frame_bytes);
        const frame_bytes = FRAME_HEADER_BYTES + header.payload_bytes + FRAME_TRAILER_BYTES;
        if (chunk.byteLength === frame_bytes) return [checkFrame(chunk, header)];
      } catch (e) {
        if (e instanceof FrameError) this.poison(e);
        throw e;
      }
    }
    if (chunk.byteLength > 0) {
      this.chunks.push(chunk);
      this.buffered += chunk.byteLength;
    }
    const frames: Frame[] = [];
    try {
      for (;;) {
        if (this.pending === null) {
          if (this.buffered < FRAME_HEADER_BYTES) break;
          // Validated (magic, version, size limit) before the payload is buffered.
          this.pending = parseHeader(this.peek(FRAME_HEADER_BYTES), this.max_frame_bytes);
        }
        const frame_bytes = FRAME_HEADER_BYTES + this.pending.payload_bytes + FRAME_TRAILER_BYTES;
        if (this.buffered < frame_bytes) break;
        frames.push(checkFrame(this.take(frame_bytes), this.pending));
        this.pending = null;
      }
    } catch (e) {
      if (e instanceof FrameError) this.poison(e);
      throw e;
    }
    return frames;
  }

  /**
   * Call when the stream ends: throws `TruncatedError` if it stopped inside a
   * frame (the peer crashed or closed mid-write), or the poisoning error.
   */
  end(): void {
    if (this.error) throw this.error;
    if (this.buffered > 0) {
      this.poison(new TruncatedError(`stream ended inside a frame (${this.buffered} bytes buffered)`));
      throw this.error;
    }
  }

  private poison(e: FrameError): void {
    this.error = e;
    this.chunks = [];
    this.buffered = 0;
    this.head = 0;
    this.pending = null;
  }

  /** The next n buffered bytes without consuming them (n is small: a header). */
  private peek(n: number): Uint8Array {
    const first = this.chunks[0];
    if (first.byteLength - this.head >= n) return first.subarray(this.head, this.head + n);
    const out = new Uint8Array(n);
    let filled = 0;
    let offset = this.head;
    for (let i = 0; filled < n; i++) {
      const c = this.chunks[i];
      const k = Math.min(c.byteLength - offset, n - filled);
      out.set(c.subarray(offset, offset + k), filled);
      filled += k;
      offset = 0;
    }
    return out;
  }

  /** Consume the next n buffered bytes: a view if they lie in one chunk, else one copy. */
  private take(n: number): Uint8Array {
    this.buffered -= n;
    const first = this.chunks[0];
    if (first.byteLength - this.head >= n) {
      const view = first.subarray(this.head, this.head + n);
      this.head += n;
      if (this.head === first.byteLength) {
        this.chunks.shift();
        this.head = 0;
      }
      return view;
    }
    const out = new Uint8Array(n);
    let filled = 0;
    let used = 0; // chunks fully consumed; removed with one splice, not shift() per chunk
    while (filled < n) {
      const c = this.chunks[used];
      const k = Math.min(c.byteLength - this.head, n - filled);
      out.set(c.subarray(this.head, this.head + k), filled);
      filled += k;
      if (this.head + k === c.byteLength) {
        used++;
        this.head = 0;
      } else {
        this.head += k;
      }
    }
    this.chunks.splice(0, used);
    return out;
  }
}

/** Little-endian u32 at `at`: read by hand, since a DataView per header costs more than the read (the message path parses one per message). */
function u32(bytes: Uint8Array, at: number): number {
  return (bytes[at] | (bytes[at + 1] << 8) | (bytes[at + 2] << 16) | (bytes[at + 3] << 24)) >>> 0;
}

function parseHeader(bytes: Uint8Array, max_frame_bytes: number): FrameHeader {
  const magic = u32(bytes, 0);
  if (magic !== FRAME_MAGIC) {
    throw new InvalidMagicError(`bad frame magic 0x${magic.toString(16).padStart(8, "0")} (not a Cohort peer?)`);
  }
  const version = bytes[4];
  if (version !== FRAME_FORMAT_VERSION) {
    throw new InvalidFormatVersionError(`frame format version ${version}, this build reads ${FRAME_FORMAT_VERSION}`);
  }
  const payload_bytes = u32(bytes, 8);
  if (payload_bytes > max_frame_bytes) throw new FrameTooLargeError(payload_bytes, max_frame_bytes);
  return { type: bytes[5], flags: bytes[6] | (bytes[7] << 8), payload_bytes };
}

/** `bytes` is exactly one frame whose header parsed as `header`; verify the crc. */
function checkFrame(bytes: Uint8Array, header: FrameHeader): Frame {
  const body_end = FRAME_HEADER_BYTES + header.payload_bytes;
  const expected = u32(bytes, body_end);
  const actual = crc32(bytes.subarray(0, body_end));
  if (actual !== expected) {
    throw new ChecksumMismatchError(
      `frame (type ${header.type}, ${header.payload_bytes} payload bytes) crc32 0x${actual.toString(16)}, trailer says 0x${expected.toString(16)}`,
    );
  }
  return { type: header.type, flags: header.flags, payload: bytes.subarray(FRAME_HEADER_BYTES, body_end) };
}
