import { once } from "node:events";
import * as net from "node:net";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  ChecksumMismatchError,
  FrameError,
  FrameTooLargeError,
  InvalidFormatVersionError,
  InvalidMagicError,
  TrailingBytesError,
  TruncatedError,
} from "../src/transport/errors.js";
import {
  decodeFrame,
  encodeFrame,
  encodeFrameBytes,
  type Frame,
  FRAME_HEADER_BYTES,
  FrameDecoder,
  MAX_FRAME_BYTES_DEFAULT,
} from "../src/transport/frame.js";
import { AssertionError } from "../src/util/assert.js";
import { Rng } from "../src/sim/rng.js";

const frameArb = fc.record({
  type: fc.integer({ min: 0, max: 255 }),
  flags: fc.integer({ min: 0, max: 0xffff }),
  payload: fc.uint8Array({ maxLength: 300 }),
});

function concat(parts: Uint8Array[]): Uint8Array {
  return Buffer.concat(parts);
}

/** Split `bytes` at the given (unsorted, possibly repeated) cut points. */
function splitAt(bytes: Uint8Array, cuts: number[]): Uint8Array[] {
  const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
  const out: Uint8Array[] = [];
  let prev = 0;
  for (const p of [...points, bytes.length]) {
    out.push(bytes.slice(prev, p)); // slice: copies, like separate socket reads
    prev = p;
  }
  return out;
}

function plain(f: Frame) {
  return { type: f.type, flags: f.flags, payload: Buffer.from(f.payload).toString("hex") };
}


describe("frame encode/decode", () => {
  it("round-trips a frame, one-shot and with a multi-part payload", () => {
    const payload = Buffer.from("hello, cohort");
    const parts = encodeFrame(7, [payload.subarray(0, 5), new Uint8Array(0), payload.subarray(5)], 0x1234);
    // header, two non-empty payload parts (not copied), trailer
    expect(parts.length).toBe(4);
    expect(parts[1].buffer).toBe(payload.buffer);
    const bytes = concat(parts);
    expect(Buffer.from(bytes.subarray(0, 4)).toString("latin1")).toBe("CHFR");
    const f = decodeFrame(bytes);
    expect(plain(f)).toEqual(plain({ type: 7, flags: 0x1234, payload }));
    expect(Buffer.compare(encodeFrameBytes(7, payload, 0x1234), bytes)).toBe(0);
    expect(decodeFrame(encodeFrameBytes(0, new Uint8Array(0))).payload.length).toBe(0);
  });

  it("rejects out-of-range type and flags as a bug", () => {
    expect(() => encodeFrame(256, new Uint8Array(0))).toThrow(AssertionError);
    expect(() => encodeFrame(-1, new Uint8Array(0))).toThrow(AssertionError);
    expect(() => encodeFrame(1, new Uint8Array(0), 0x10000)).toThrow(AssertionError);
  });

  it("property: frames re-split at random chunk boundaries decode to the same frames", () => {
    fc.assert(
      fc.property(
        fc.array(frameArb, { maxLength: 20 }),
        fc.array(fc.nat(), { maxLength: 40 }),
        (frames, cuts) => {
          const stream = concat(frames.map((f) => encodeFrameBytes(f.type, f.payload, f.flags)));
          const decoder = new FrameDecoder({ max_frame_bytes: 1000 });
          const got: Frame[] = [];
          for (const chunk of splitAt(stream, cuts)) got.push(...decoder.push(chunk));
          expect(got.map(plain)).toEqual(frames.map(plain));
          expect(decoder.buffered_bytes).toBe(0);
          decoder.end(); // nothing left over
        },
      ),
      { numRuns: 300 },
    );
  });

  it("handles a large frame arriving one small chunk at a time", () => {
    const payload = new Uint8Array(1 << 20).map((_, i) => i * 31);
    const bytes = encodeFrameBytes(3, payload);
    const decoder = new FrameDecoder({ max_frame_bytes: MAX_FRAME_BYTES_DEFAULT });
    const got: Frame[] = [];
    for (let i = 0; i < bytes.length; i += 1000) got.push(...decoder.push(bytes.subarray(i, i + 1000)));
    expect(got.length).toBe(1);
    expect(Buffer.compare(got[0].payload, payload)).toBe(0);
  });
});

describe("frame errors", () => {
  const good = () => Buffer.from(encodeFrameBytes(9, Buffer.from("payload bytes")));

  it("wrong magic → InvalidMagic", () => {
    const b = good();
    b[0] ^= 0xff;
    expect(() => decodeFrame(b)).toThrow(InvalidMagicError);
    expect(() => new FrameDecoder({ max_frame_bytes: 100 }).push(b)).toThrow(
      expect.objectContaining({ code: "InvalidMagic" }),
    );
  });

  it("future version → InvalidFormatVersion", () => {
    const b = good();
    b[4] = 2;
    expect(() => decodeFrame(b)).toThrow(InvalidFormatVersionError);
    expect(() => new FrameDecoder({ max_frame_bytes: 100 }).push(b)).toThrow(
      expect.objectContaining({ code: "InvalidFormatVersion" }),
    );
  });

  it("flipped payload byte → ChecksumMismatch", () => {
    const b = good();
    b[FRAME_HEADER_BYTES + 3] ^= 0x01;
    expect(() => decodeFrame(b)).toThrow(ChecksumMismatchError);
    expect(() => new FrameDecoder({ max_frame_bytes: 100 }).push(b)).toThrow(
      expect.objectContaining({ code: "ChecksumMismatch" }),
    );
  });

  it("oversized declared length → FrameTooLarge from the header alone", () => {
    const header = encodeFrame(1, new Uint8Array(5000))[0];
    expect(header.length).toBe(FRAME_HEADER_BYTES);
    const decoder = new FrameDecoder({ max_frame_bytes: 4096 });
    let err: unknown;
    try {
      decoder.push(header); // no payload sent at all
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(FrameTooLargeError);
    expect(err).toMatchObject({ code: "FrameTooLarge", payload_bytes: 5000, max_frame_bytes: 4096 });
  });

  it("truncated one-shot decode → Truncated", () => {
    const b = good();
    expect(() => decodeFrame(b.subarray(0, 5))).toThrow(TruncatedError);
    expect(() => decodeFrame(b.subarray(0, b.length - 1))).toThrow(expect.objectContaining({ code: "Truncated" }));
    expect(() => decodeFrame(Buffer.concat([b, Buffer.from([0])]))).toThrow(TrailingBytesError);
  });

  it("stream ending mid-frame → Truncated from end()", () => {
    const decoder = new FrameDecoder({ max_frame_bytes: 100 });
    decoder.push(good().subarray(0, 20));
    expect(() => decoder.end()).toThrow(TruncatedError);
  });

  it("a poisoned decoder rethrows the same error, even for good input", () => {
    const bad = good();
    bad[0] = 0;
    const decoder = new FrameDecoder({ max_frame_bytes: 100 });
    let first: unknown;
    try {
      decoder.push(bad);
    } catch (e) {
      first = e;
    }
    expect(first).toBeInstanceOf(FrameError);
    expect(() => decoder.push(good())).toThrow(first as Error);
    try {
      decoder.push(good());
    } catch (e) {
      expect(e).toBe(first);
    }
    expect(() => decoder.end()).toThrow(first as Error);
  });
});

describe("frames over real TCP (127.0.0.1)", () => {
  interface Conn {
    frames: Frame[];
    error: FrameError | null;
    closed: Promise<void>;
  }

  /** Server: one decoder per connection; a FrameError closes only that connection. */
  async function startServer() {
    const conns: Conn[] = [];
    const waiting: ((c: Conn) => void)[] = [];
    const server = net.createServer((socket) => {
      const decoder = new FrameDecoder({ max_frame_bytes: 1 << 20 });
      const conn: Conn = { frames: [], error: null, closed: once(socket, "close").then(() => undefined) };
      socket.on("data", (chunk: Buffer) => {
        try {
          conn.frames.push(...decoder.push(chunk));
        } catch (e) {
          conn.error = e as FrameError;
          socket.destroy();
        }
      });
      socket.on("error", () => {});
      conns.push(conn);
      waiting.shift()?.(conn);
    });
    server.listen(0, "127.0.0.1");
    await once(server, "listening");
    const port = (server.address() as net.AddressInfo).port;
    const nextConn = () => new Promise<Conn>((resolve) => waiting.push(resolve));
    return { server, port, conns, nextConn };
  }

  async function connect(port: number): Promise<net.Socket> {
    const s = net.connect(port, "127.0.0.1");
    await once(s, "connect");
    s.on("error", () => {}); // the server may reset a connection it rejects
    return s;
  }

  /** Random frames, written as the concatenated stream cut into random-size writes. */
  function randomFrames(rand: () => number, n: number) {
    const frames: Frame[] = [];
    for (let i = 0; i < n; i++) {
      // Mostly small, some up to 256 KiB (several TCP segments).
      const size = rand() < 0.05 ? Math.floor(rand() * 262144) : Math.floor(rand() * 2048);
      const payload = Buffer.allocUnsafe(size);
      for (let j = 0; j < size; j++) payload[j] = (rand() * 256) | 0;
      frames.push({ type: (rand() * 256) | 0, flags: (rand() * 65536) | 0, payload });
    }
    return frames;
  }

  async function writeChunked(socket: net.Socket, bytes: Uint8Array, rand: () => number) {
    for (let off = 0; off < bytes.length; ) {
      const k = 1 + Math.floor(rand() * 70000);
      if (!socket.write(bytes.subarray(off, off + k))) await once(socket, "drain");
      off += k;
    }
  }

  async function waitFor(pred: () => boolean, what: string) {
    const deadline = Date.now() + 20_000;
    while (!pred()) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 5));
    }
  }

  it("1,000 random frames in random write chunking arrive intact; a malformed frame closes only its connection", async () => {
    const seed = Date.now() >>> 0;
    const rng = new Rng(seed); // seeded, so a failing run is reproducible
    const rand = () => rng.next();
    const { server, port, nextConn } = await startServer();
    try {
      // Connection 1: 1,000 frames, sent partly with cork/encodeFrame parts, partly as a re-chunked stream.
      const frames = randomFrames(rand, 1000);
      const c1Promise = nextConn();
      const s1 = await connect(port);
      const c1 = await c1Promise;
      s1.cork();
      for (const f of frames.slice(0, 100)) for (const part of encodeFrame(f.type, f.payload, f.flags)) s1.write(part);
      s1.uncork();
      await writeChunked(s1, concat(frames.slice(100).map((f) => encodeFrameBytes(f.type, f.payload, f.flags))), rand);
      await waitFor(() => c1.frames.length === frames.length || c1.error !== null, "1,000 frames");
      expect(c1.error, `seed ${seed}`).toBeNull();
      expect(c1.frames.map(plain), `seed ${seed}`).toEqual(frames.map(plain));

      // Connections 2 (malformed) and 3 (healthy) at the same time.
      const c2Promise = nextConn();
      const s2 = await connect(port);
      const c2 = await c2Promise;
      const c3Promise = nextConn();
      const s3 = await connect(port);
      const c3 = await c3Promise;

      const more = randomFrames(rand, 200);
      const bad = Buffer.from(encodeFrameBytes(5, Buffer.alloc(1000, 7)));
      bad[FRAME_HEADER_BYTES + 500] ^= 0x80;
      const s2Closed = once(s2, "close");
      s2.write(encodeFrameBytes(1, Buffer.from("fine")));
      // Wait for it: frames completed in the same push as a bad one are dropped with it.
      await waitFor(() => c2.frames.length === 1, "connection 2 good frame");
      const s3Write = writeChunked(s3, concat(more.map((f) => encodeFrameBytes(f.type, f.payload, f.flags))), rand);
      s2.write(bad);
      await Promise.all([s2Closed, c2.closed, s3Write]);
      expect(c2.error).toBeInstanceOf(ChecksumMismatchError);
      expect(c2.error?.code).toBe("ChecksumMismatch");
      expect(c2.frames.length).toBe(1);

      await waitFor(() => c3.frames.length === more.length || c3.error !== null, "connection 3 frames");
      expect(c3.error).toBeNull();
      expect(c3.frames.map(plain)).toEqual(more.map(plain));
      // Connection 3 is still open and usable after connection 2 was closed.
      s3.write(encodeFrameBytes(2, Buffer.from("still here")));
      await waitFor(() => c3.frames.length === more.length + 1, "frame after close of connection 2");
      expect(Buffer.from(c3.frames.at(-1)!.payload).toString()).toBe("still here");

      s1.destroy();
      s3.destroy();
    } finally {
      server.close();
    }
  });
});
