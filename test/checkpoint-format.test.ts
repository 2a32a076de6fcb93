import { serialize } from "node:v8";
import { crc32 } from "node:zlib";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { decodeOutputRecords, decodeRuntimeState, encodeRuntimeState, initialRuntimeState, packOutput, packSenderLog, unpackSenderLog } from "../src/vm/runtime-state.js";
import {
  CheckpointFormatError,
  ChecksumMismatchError,
  InvalidFieldError,
  InvalidFormatVersionError,
  InvalidMagicError,
  TruncatedError,
} from "../src/checkpoint/errors.js";
import {
  DELTA_HEADER_BYTES,
  DELTA_MAGIC,
  FORMAT_VERSION,
  IMAGE_HEADER_BYTES,
  IMAGE_MAGIC,
  decodeDelta,
  decodeImage,
  deltaByteLength,
  encodeDelta,
  encodeImage,
  layoutDelta,
  sealDelta,
  type DeltaParts,
  type ImageParts,
} from "../src/checkpoint/format.js";
import { AssertionError } from "../src/util/assert.js";
import { Channels } from "../src/core/channel.js";
import { PAGE_BYTES } from "../src/vm/layout.js";

// Header offsets, duplicated from the layout table on purpose: the tests pin the wire format.
const OFF_VERSION = 4;
const OFF_HEADER_BYTES = 6;
const OFF_EPOCH = 8;
const OFF_MEMORY_PAGES = 16;
const OFF_PAGE_COUNT = 20;
const OFF_GLOBALS_BYTES = 24;
const OFF_RUNTIME_STATE_BYTES = 28;
const OFF_TOTAL_BYTES = 32;
const OFF_FLAGS = 40;

type ErrorClass = new (message: string) => CheckpointFormatError;

function expectFormatError(f: () => unknown, cls: ErrorClass, code: string): CheckpointFormatError {
  let caught: unknown;
  try {
    f();
  } catch (e) {
    caught = e;
  }
  expect(caught).toBeInstanceOf(cls);
  expect(caught).toBeInstanceOf(CheckpointFormatError);
  const err = caught as CheckpointFormatError;
  expect(err.code).toBe(code);
  expect(err.name).toBe(cls.name);
  return err;
}

function dv(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
}

/** Rewrites the trailing crc32 so that only the field a test tampered with is wrong. */
function reseal(buf: Uint8Array): Uint8Array {
  dv(buf).setUint32(buf.length - 4, crc32(buf.subarray(0, buf.length - 4)), true);
  return buf;
}

/** Deterministic filler so generated pages are cheap but distinct. */
function fillPages(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n * PAGE_BYTES);
  let x = seed | 1;
  for (let i = 0; i < out.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

const memPagesArb = fc.oneof(fc.integer({ min: 1, max: 4 }), fc.integer({ min: 1, max: 65535 }));

const bodyArb = memPagesArb.chain((memory_pages) =>
  fc.record({
    memory_pages: fc.constant(memory_pages),
    indices: fc.uniqueArray(fc.integer({ min: 0, max: memory_pages * 16 - 1 }), { maxLength: 5 }),
    seed: fc.integer(),
    globalSlots: fc.integer({ min: 0, max: 4 }),
    globalsSeed: fc.uint8Array({ minLength: 16, maxLength: 16 }),
    runtime_state: fc.uint8Array({ maxLength: 64 }),
  }),
);

const deltaArb: fc.Arbitrary<DeltaParts> = fc
  .record({ epoch: fc.integer({ min: 1, max: Number.MAX_SAFE_INTEGER }), body: bodyArb })
  .map(({ epoch, body }) => ({
    epoch,
    memory_pages: body.memory_pages,
    page_indices: Uint32Array.from(body.indices),
    page_data: fillPages(body.indices.length, body.seed),
    globals: globalsOf(body.globalSlots, body.globalsSeed),
    runtime_state: body.runtime_state,
  }));

const imageArb: fc.Arbitrary<ImageParts> = fc
  .record({
    epoch: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
    module_hash: fc.uint8Array({ minLength: 32, maxLength: 32 }),
    body: bodyArb,
  })
  .map(({ epoch, module_hash, body }) => ({
    epoch,
    memory_pages: body.memory_pages,
    module_hash,
    page_indices: Uint32Array.from(body.indices),
    page_data: fillPages(body.indices.length, body.seed),
    globals: globalsOf(body.globalSlots, body.globalsSeed),
    runtime_state: body.runtime_state,
  }));

function globalsOf(slots: number, pattern: Uint8Array): Uint8Array {
  const g = new Uint8Array(slots * 16);
  for (let i = 0; i < slots; i++) g.set(pattern.map((b) => b ^ i), i * 16);
  return g;
}

/** Plain-data form so views, copies and typed-array subclasses compare equal. */
function plain(p: DeltaParts | ImageParts): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(p)) out[k] = ArrayBuffer.isView(v) ? Array.from(v as Uint8Array) : v;
  return out;
}

function sampleDelta(): DeltaParts {
  return {
    epoch: 7,
    memory_pages: 2,
    page_indices: Uint32Array.of(31, 0, 17),
    page_data: fillPages(3, 42),
    globals: globalsOf(3, Uint8Array.from({ length: 16 }, (_, i) => i)),
    runtime_state: Uint8Array.of(1, 2, 3, 4, 5),
  };
}

function sampleImage(): ImageParts {
  const d = sampleDelta();
  return { ...d, epoch: 6, module_hash: Uint8Array.from({ length: 32 }, (_, i) => 0xa0 + i) };
}

describe("round trips", () => {
  it("delta: encode -> decode is the identity", () => {
    fc.assert(
      fc.property(deltaArb, (p) => {
        const buf = encodeDelta(p);
        expect(buf.length).toBe(deltaByteLength(p.page_indices.length, p.globals.length, p.runtime_state.length));
        expect(plain(decodeDelta(buf))).toEqual(plain(p));
      }),
    );
  });

  it("image: encode -> decode is the identity", () => {
    fc.assert(
      fc.property(imageArb, (p) => {
        expect(plain(decodeImage(encodeImage(p)))).toEqual(plain(p));
      }),
    );
  });

  it("layoutDelta + sealDelta produces the same bytes as encodeDelta", () => {
    fc.assert(
      fc.property(deltaArb, (p) => {
        const n = p.page_indices.length;
        const buf = new Uint8Array(deltaByteLength(n, p.globals.length, p.runtime_state.length));
        const r = layoutDelta(buf, {
          epoch: p.epoch,
          memory_pages: p.memory_pages,
          page_count: n,
          globals_bytes: p.globals.length,
          runtime_state_bytes: p.runtime_state.length,
        });
        // Fill page by page, as the VM thread does.
        for (let i = 0; i < n; i++) {
          r.page_indices[i] = p.page_indices[i];
          r.page_data.set(p.page_data.subarray(i * PAGE_BYTES, (i + 1) * PAGE_BYTES), i * PAGE_BYTES);
        }
        r.globals.set(p.globals);
        r.runtime_state.set(p.runtime_state);
        sealDelta(buf);
        expect(Buffer.from(buf).equals(Buffer.from(encodeDelta(p)))).toBe(true);
      }),
    );
  });

  it("decode returns zero-copy views into the input", () => {
    const buf = encodeDelta(sampleDelta());
    const d = decodeDelta(buf);
    expect(d.page_indices.buffer).toBe(buf.buffer);
    expect(d.page_data.buffer).toBe(buf.buffer);
    expect(d.globals.buffer).toBe(buf.buffer);
    expect(d.runtime_state.buffer).toBe(buf.buffer);
  });

  it("decodes from a buffer whose byteOffset is not 4-aligned (indices copied)", () => {
    for (const p of [sampleDelta(), sampleImage()]) {
      const isImage = "module_hash" in p;
      const blob = isImage ? encodeImage(p as ImageParts) : encodeDelta(p);
      const backing = new Uint8Array(blob.length + 1);
      backing.set(blob, 1);
      const unaligned = backing.subarray(1);
      const d = isImage ? decodeImage(unaligned) : decodeDelta(unaligned);
      expect(plain(d)).toEqual(plain(p));
      expect(d.page_data.buffer).toBe(backing.buffer);
    }
  });

  it("writes the documented header", () => {
    const p = sampleDelta();
    const buf = encodeDelta(p);
    const v = dv(buf);
    expect(Buffer.from(buf.subarray(0, 4)).toString("latin1")).toBe("CDLT");
    expect(v.getUint32(0, true)).toBe(DELTA_MAGIC);
    expect(v.getUint16(OFF_VERSION, true)).toBe(FORMAT_VERSION);
    expect(v.getUint16(OFF_HEADER_BYTES, true)).toBe(DELTA_HEADER_BYTES);
    expect(v.getBigUint64(OFF_EPOCH, true)).toBe(7n);
    expect(v.getUint32(OFF_MEMORY_PAGES, true)).toBe(2);
    expect(v.getUint32(OFF_PAGE_COUNT, true)).toBe(3);
    expect(v.getUint32(OFF_GLOBALS_BYTES, true)).toBe(48);
    expect(v.getUint32(OFF_RUNTIME_STATE_BYTES, true)).toBe(5);
    expect(v.getBigUint64(OFF_TOTAL_BYTES, true)).toBe(BigInt(buf.length));
    expect(buf.length).toBe(48 + 3 * 4100 + 48 + 5 + 4);
    expect(v.getUint32(DELTA_HEADER_BYTES, true)).toBe(31);
    const img = encodeImage(sampleImage());
    expect(Buffer.from(img.subarray(0, 4)).toString("latin1")).toBe("CIMG");
    expect(dv(img).getUint32(0, true)).toBe(IMAGE_MAGIC);
    expect(dv(img).getUint16(OFF_HEADER_BYTES, true)).toBe(IMAGE_HEADER_BYTES);
    expect(img[48]).toBe(0xa0);
  });
});

describe("bad blobs", () => {
  it("truncated: cut inside the prefix, header, indices, page data, globals, runtime state, trailer", () => {
    const buf = encodeDelta(sampleDelta());
    const H = DELTA_HEADER_BYTES;
    const cuts = [0, 3, 7, 8, 20, H - 1, H, H + 3 * 4 + 1, H + 12 + 4096, buf.length - 4 - 5 - 1, buf.length - 4 - 2, buf.length - 4, buf.length - 1];
    for (const cut of cuts) {
      expectFormatError(() => decodeDelta(buf.subarray(0, cut)), TruncatedError, "Truncated");
    }
    const img = encodeImage(sampleImage());
    for (const cut of [0, 5, 60, IMAGE_HEADER_BYTES + 3, img.length - 4, img.length - 1]) {
      expectFormatError(() => decodeImage(img.subarray(0, cut)), TruncatedError, "Truncated");
    }
  });

  it("truncated: message says what was declared and found", () => {
    const buf = encodeDelta(sampleDelta());
    const err = expectFormatError(() => decodeDelta(buf.subarray(0, 100)), TruncatedError, "Truncated");
    expect(err.message).toContain("100 bytes");
    expect(err.message).toContain(`total_bytes ${buf.length}`);
  });

  it("wrong magic", () => {
    const buf = encodeDelta(sampleDelta());
    buf[0] ^= 0xff;
    const err = expectFormatError(() => decodeDelta(buf), InvalidMagicError, "InvalidMagic");
    expect(err.message).toMatch(/expected delta magic 0x544c4443, found 0x/);
    expectFormatError(() => decodeDelta(new Uint8Array(64)), InvalidMagicError, "InvalidMagic");
  });

  it("wrong magic: a delta fed to decodeImage", () => {
    // An empty delta is shorter than an image header: still InvalidMagic, not Truncated.
    const empty = encodeDelta({ ...sampleDelta(), page_indices: new Uint32Array(0), page_data: new Uint8Array(0), globals: new Uint8Array(0), runtime_state: new Uint8Array(0) });
    expect(empty.length).toBeLessThan(IMAGE_HEADER_BYTES);
    for (const b of [encodeDelta(sampleDelta()), empty]) {
      const err = expectFormatError(() => decodeImage(b), InvalidMagicError, "InvalidMagic");
      expect(err.message).toContain("this is a Cohort delta, not an image");
    }
  });

  it("wrong magic: an image fed to decodeDelta", () => {
    const err = expectFormatError(() => decodeDelta(encodeImage(sampleImage())), InvalidMagicError, "InvalidMagic");
    expect(err.message).toContain("this is a Cohort image, not a delta");
  });

  it("future version (even with a valid checksum)", () => {
    for (const [enc, dec] of [
      [() => encodeDelta(sampleDelta()), decodeDelta],
      [() => encodeImage(sampleImage()), decodeImage],
    ] as const) {
      const buf = enc();
      dv(buf).setUint16(OFF_VERSION, FORMAT_VERSION + 1, true);
      reseal(buf);
      const err = expectFormatError(() => dec(buf), InvalidFormatVersionError, "InvalidFormatVersion");
      expect(err.message).toContain(`version ${FORMAT_VERSION + 1} was written by a newer Cohort`);
    }
  });

  it("version 0", () => {
    const buf = encodeDelta(sampleDelta());
    dv(buf).setUint16(OFF_VERSION, 0, true);
    expectFormatError(() => decodeDelta(reseal(buf)), InvalidFormatVersionError, "InvalidFormatVersion");
  });

  it("checksum mismatch: a flipped bit in page data, globals, runtime state, header, or the crc itself", () => {
    const clean = encodeDelta(sampleDelta());
    const H = DELTA_HEADER_BYTES;
    for (const pos of [OFF_EPOCH, OFF_MEMORY_PAGES + 1, H, H + 12 + 5000, clean.length - 4 - 5 - 3, clean.length - 5, clean.length - 2]) {
      const buf = clean.slice();
      buf[pos] ^= 0x10;
      const err = expectFormatError(() => decodeDelta(buf), ChecksumMismatchError, "ChecksumMismatch");
      expect(err.message).toMatch(/stored crc32 0x[0-9a-f]{8}, computed 0x[0-9a-f]{8}/);
    }
    const img = encodeImage(sampleImage());
    img[50] ^= 1; // module hash
    expectFormatError(() => decodeImage(img), ChecksumMismatchError, "ChecksumMismatch");
  });

  it("flipping any single byte anywhere makes decoding throw a CheckpointFormatError", () => {
    const blobArb = fc.oneof(
      deltaArb.map((p) => ({ buf: encodeDelta(p), dec: decodeDelta as (b: Uint8Array) => unknown })),
      imageArb.map((p) => ({ buf: encodeImage(p), dec: decodeImage as (b: Uint8Array) => unknown })),
    );
    fc.assert(
      fc.property(blobArb, fc.nat(), fc.integer({ min: 1, max: 255 }), fc.boolean(), ({ buf, dec }, at, mask, inHeader) => {
        // Half of the runs aim at the header, where each field has its own check.
        const pos = inHeader ? at % Math.min(buf.length, IMAGE_HEADER_BYTES) : at % buf.length;
        const bad = buf.slice();
        bad[pos] ^= mask;
        expect(() => dec(bad)).toThrow(CheckpointFormatError);
      }),
      { numRuns: 300 },
    );
  });

  it("inconsistent lengths: page_count does not add up to total_bytes", () => {
    const buf = encodeDelta(sampleDelta());
    dv(buf).setUint32(OFF_PAGE_COUNT, 4, true);
    const err = expectFormatError(() => decodeDelta(reseal(buf)), InvalidFieldError, "InvalidField");
    expect(err.message).toMatch(/page_count 4.*need \d+ bytes, but total_bytes is \d+/);
  });

  it("inconsistent lengths: globals_bytes not a multiple of 16", () => {
    const buf = encodeDelta(sampleDelta());
    const v = dv(buf);
    // Move 8 bytes from globals to runtime state: the total still adds up.
    v.setUint32(OFF_GLOBALS_BYTES, 40, true);
    v.setUint32(OFF_RUNTIME_STATE_BYTES, 13, true);
    expectFormatError(() => decodeDelta(reseal(buf)), InvalidFieldError, "InvalidField");
  });

  it("inconsistent lengths: blob longer than total_bytes", () => {
    const buf = encodeDelta(sampleDelta());
    const longer = new Uint8Array(buf.length + 4);
    longer.set(buf);
    const err = expectFormatError(() => decodeDelta(longer), InvalidFieldError, "InvalidField");
    expect(err.message).toContain("trailing bytes");
  });

  it("inconsistent lengths: page_count larger than memory", () => {
    // 17 distinct pages cannot fit in 1 wasm page (16 x 4 KiB), whatever the indices.
    const buf = encodeDelta({ ...sampleDelta(), page_indices: Uint32Array.from({ length: 17 }, (_, i) => i), page_data: new Uint8Array(17 * PAGE_BYTES) });
    dv(buf).setUint32(OFF_MEMORY_PAGES, 1, true);
    const err = expectFormatError(() => decodeDelta(reseal(buf)), InvalidFieldError, "InvalidField");
    expect(err.message).toContain("page_count 17 exceeds the 16 pages of memory");
  });

  it("invalid header fields: header_bytes, flags, delta epoch 0, unsafe epoch", () => {
    const tamper = (f: (v: DataView) => void) => {
      const buf = encodeDelta(sampleDelta());
      f(dv(buf));
      return reseal(buf);
    };
    for (const buf of [
      tamper((v) => v.setUint16(OFF_HEADER_BYTES, 56, true)),
      tamper((v) => v.setUint32(OFF_FLAGS, 1, true)),
      tamper((v) => v.setBigUint64(OFF_EPOCH, 0n, true)),
      tamper((v) => v.setBigUint64(OFF_EPOCH, 1n << 53n, true)),
    ]) {
      expectFormatError(() => decodeDelta(buf), InvalidFieldError, "InvalidField");
    }
  });

  it("page index out of range for memory_pages", () => {
    for (const [enc, dec] of [
      [() => encodeDelta(sampleDelta()), decodeDelta],
      [() => encodeImage(sampleImage()), decodeImage],
    ] as const) {
      const buf = enc();
      const H = dv(buf).getUint16(OFF_HEADER_BYTES, true);
      dv(buf).setUint32(H + 4, 32, true); // memory_pages 2 = 4 KiB pages 0..31
      const err = expectFormatError(() => dec(reseal(buf)), InvalidFieldError, "InvalidField");
      expect(err.message).toContain("page index 32 at position 1 is out of range");
    }
  });

  it("duplicate page index", () => {
    for (const [enc, dec] of [
      [() => encodeDelta(sampleDelta()), decodeDelta],
      [() => encodeImage(sampleImage()), decodeImage],
    ] as const) {
      const buf = enc();
      const H = dv(buf).getUint16(OFF_HEADER_BYTES, true);
      dv(buf).setUint32(H + 8, 31, true); // indices 31, 0, 31
      const err = expectFormatError(() => dec(reseal(buf)), InvalidFieldError, "InvalidField");
      expect(err.message).toContain("duplicate page index 31");
    }
  });

  it("duplicate page index among many (hash set path)", () => {
    const n = 5000;
    const indices = Uint32Array.from({ length: n }, (_, i) => (i * 7919) % 65536);
    const buf = encodeDelta({ epoch: 1, memory_pages: 4096, page_indices: indices, page_data: new Uint8Array(n * PAGE_BYTES), globals: new Uint8Array(0), runtime_state: new Uint8Array(0) });
    expect(decodeDelta(buf).page_indices.length).toBe(n);
    dv(buf).setUint32(DELTA_HEADER_BYTES + 4 * 4321, indices[1234], true);
    expectFormatError(() => decodeDelta(reseal(buf)), InvalidFieldError, "InvalidField");
  });
});

describe("encoder invariants are assertions, not format errors", () => {
  it("rejects bad parts with AssertionError", () => {
    const p = sampleDelta();
    expect(() => encodeDelta({ ...p, page_indices: Uint32Array.of(1, 2, 1) })).toThrow(AssertionError);
    expect(() => encodeDelta({ ...p, epoch: 0 })).toThrow(AssertionError);
    expect(() => encodeDelta({ ...p, page_data: new Uint8Array(10) })).toThrow(AssertionError);
    expect(() => encodeDelta({ ...p, globals: new Uint8Array(8) })).toThrow(AssertionError);
    expect(() => encodeImage({ ...sampleImage(), module_hash: new Uint8Array(31) })).toThrow(AssertionError);
    expect(() => layoutDelta(new Uint8Array(10), { epoch: 1, memory_pages: 1, page_count: 0, globals_bytes: 0, runtime_state_bytes: 0 })).toThrow(AssertionError);
  });
});

describe("runtime state encoding", () => {
  const arbLog = fc.array(
    fc.record({
      to: fc.nat(255),
      epoch: fc.integer({ min: 1, max: Number.MAX_SAFE_INTEGER }),
      seq: fc.integer({ min: 1, max: Number.MAX_SAFE_INTEGER }),
      bytes: fc.uint8Array({ maxLength: 200 }),
    }),
    { maxLength: 50 },
  );

  const arbOutput = fc.array(
    fc.record({
      kind: fc.constantFrom(0, 1),
      epoch: fc.integer({ min: 1, max: 1e12 }),
      seq: fc.integer({ min: 1, max: 1e12 }),
      session: fc.integer({ min: -(2 ** 31), max: 2 ** 31 - 1 }), // a guest chooses it
      request_id: fc.nat(1e9),
      bytes: fc.uint8Array({ maxLength: 120 }),
      produced_ms: fc.double({ min: 0, max: 2e12, noNaN: true }),
    }),
    { maxLength: 20 },
  );

  it("a state with any sender log and output decodes to the same state; its output reads on its own", () => {
    fc.assert(
      fc.property(arbLog, arbOutput, (sender_log, output) => {
        const state = { ...initialRuntimeState(), epoch: 7, output, sender_log, sender_log_bytes: 1, sent_seq: [3], timers: new Map([[1, 2.5]]) };
        const bytes = encodeRuntimeState(state);
        expect(decodeRuntimeState(bytes)).toEqual(state);
        expect(decodeOutputRecords(bytes)).toEqual(output);
        expect(unpackSenderLog(packSenderLog(sender_log))).toEqual(sender_log);
      }),
    );
  });

  it("refuses an unknown layout or an output section that overruns the state", () => {
    const bytes = encodeRuntimeState(initialRuntimeState());
    const unknown = bytes.slice();
    unknown[0] = 0x00;
    expect(() => decodeRuntimeState(unknown)).toThrow(/unknown layout/);
    const overrun = bytes.slice();
    new DataView(overrun.buffer).setUint32(1, 1e6, true);
    expect(() => decodeOutputRecords(overrun)).toThrow(/overruns/);
  });

  it("is written without V8's serializer (first byte 0x44); every field round-trips, timers in arming order", () => {
    const state = {
      ...initialRuntimeState(),
      epoch: 9,
      booted: true,
      incarnation: 4,
      output_bytes: 3,
      output_seq: 12,
      sent_seq: [0, 5, 2],
      delivered: [1, 0, 7],
      sender_log_trimmed: [0, 3, 1],
      sender_log_bytes: 40,
      timers: new Map([
        [7, 1.5],
        [2, 99],
      ]),
    };
    const bytes = encodeRuntimeState(state);
    expect(bytes[0]).toBe(0x44);
    const back = decodeRuntimeState(bytes);
    expect(back).toEqual(state);
    expect([...back.timers.keys()]).toEqual([7, 2]);
    expect(encodeRuntimeState(back)).toEqual(bytes); // a promoted backup re-encodes to the same bytes
  });

  it("refuses a packed state whose numbers or lengths are off, by name", () => {
    const bytes = encodeRuntimeState({ ...initialRuntimeState(), sent_seq: [1, 2], timers: new Map([[1, 5]]) });
    const section = new DataView(bytes.buffer).getUint32(1, true);
    const counters = 5 + section; // epoch, output_bytes, output_seq, booted, incarnation, sender_log_bytes
    const at = (i: number) => counters + 8 * i;
    const variant = (i: number, v: number) => {
      const b = bytes.slice();
      new DataView(b.buffer).setFloat64(at(i), v, true);
      return b;
    };
    expect(() => decodeRuntimeState(variant(3, 2))).toThrow(/counters/); // booted neither 0 nor 1
    expect(() => decodeRuntimeState(variant(0, -1))).toThrow(/counters/); // epoch
    expect(() => decodeRuntimeState(variant(6, 1e9))).toThrow(/group channels/); // sent_seq longer than the state
    expect(() => decodeRuntimeState(variant(7, 0.5))).toThrow(/group channels/); // a sequence number that is no integer
    expect(() => decodeRuntimeState(variant(6 + 3 + 2, 3))).toThrow(/timers/); // three timers, room for one
    expect(() => decodeRuntimeState(bytes.slice(0, counters + 20))).toThrow(/overruns/);
    const longer = new Uint8Array(bytes.length + 3);
    longer.set(bytes);
    expect(() => decodeRuntimeState(longer)).toThrow(/packed sender log/);
  });

  it("states of the layout before (output section, then V8 bytes; first byte 0x43) still decode", () => {
    const sender_log = [{ to: 1, epoch: 2, seq: 3, bytes: new Uint8Array([1, 2, 3]) }];
    const output = [{ kind: 1, epoch: 2, seq: 1, session: 3, request_id: 4, bytes: new Uint8Array([104, 105]), produced_ms: 5 }];
    const state = { ...initialRuntimeState(), epoch: 3, sender_log, output, sent_seq: [0, 1], timers: new Map([[1, 2]]) };
    const rest: Record<string, unknown> = { ...state, sender_log_packed: packSenderLog(sender_log) };
    delete rest.sender_log;
    delete rest.output;
    const section = packOutput(output);
    const tail = serialize(rest);
    const old = new Uint8Array(5 + section.length + tail.length);
    old[0] = 0x43;
    new DataView(old.buffer).setUint32(1, section.length, true);
    old.set(section, 5);
    old.set(tail, 5 + section.length);
    expect(decodeRuntimeState(old)).toEqual(state);
    expect(decodeOutputRecords(old)).toEqual(output);
  });

  it("states written as V8 bytes only, with an unpacked sender log, still decode", () => {
    const sender_log = [{ to: 1, epoch: 2, seq: 3, bytes: new Uint8Array([1, 2, 3]) }];
    const output = [{ kind: 0, epoch: 1, seq: 1, session: 0, request_id: 0, bytes: new Uint8Array([104, 105]), produced_ms: 5 }];
    const state = { ...initialRuntimeState(), sender_log, output };
    expect(decodeRuntimeState(serialize(state)).sender_log).toEqual(sender_log);
    expect(decodeOutputRecords(serialize(state))).toEqual(output);
  });

  it("the group channels are the state's own fields: what Channels did round-trips, and a state from before channels restores as all zeros", () => {
    const cfg = { rank: 0, size: 3, limits: { message_bytes_max: 64, outbox_max: 64, sender_log_bytes_max: 1 << 20, pending_messages_max: 64, pending_bytes_max: 1 << 20 } };
    const state = initialRuntimeState();
    const ch = new Channels(cfg, state);
    for (const to of [1, 2, 1, 1]) ch.send(to, new Uint8Array([to]), 1);
    ch.receive({ from: 2, to: 0, incarnation: 0, epoch: 1, seq: 1, bytes: new Uint8Array(1) }, 1);
    ch.trim([0, 1, 0]);
    const restored = new Channels(cfg, decodeRuntimeState(encodeRuntimeState(state)));
    expect(restored.snapshot()).toEqual(ch.snapshot());
    expect(restored.resendFor(1, 1).map((m) => m.seq)).toEqual([2, 3]);
    // Written before group messaging: V8 bytes only, no channel fields.
    const { epoch, timers, output, output_bytes, output_seq, booted } = initialRuntimeState();
    const legacy = new Channels(cfg, decodeRuntimeState(serialize({ epoch, timers, output, output_bytes, output_seq, booted })));
    expect([legacy.incarnation, legacy.sentVector(), legacy.deliveredVector(), legacy.senderLogLength]).toEqual([0, [0, 0, 0], [0, 0, 0], 0]);
  });

  it("refuses a packed log whose lengths do not add up", () => {
    const packed = packSenderLog([{ to: 1, epoch: 2, seq: 3, bytes: new Uint8Array([1, 2, 3]) }]);
    expect(() => unpackSenderLog(packed.slice(0, packed.length - 1))).toThrow(/packed sender log/);
    const longer = new Uint8Array(packed.length + 1);
    longer.set(packed);
    expect(() => unpackSenderLog(longer)).toThrow(/packed sender log/);
    const lying = packed.slice();
    new DataView(lying.buffer).setFloat64(0, 1e6, true);
    expect(() => unpackSenderLog(lying)).toThrow(/packed sender log/);
    const bad = serialize({ ...initialRuntimeState(), sender_log: undefined, sender_log_packed: "no" }); // legacy layout
    expect(() => decodeRuntimeState(bad)).toThrow(/packed sender log/);
  });
});

describe("decoding a delta whose checksum the caller verified", () => {
  it("skips only the crc: a flipped byte is the caller's to catch, a broken header is still refused", () => {
    const buf = encodeDelta(sampleDelta());
    const flipped = buf.slice();
    flipped[buf.length - 5] ^= 0xff; // last byte of the runtime state, opaque to the decoder
    expectFormatError(() => decodeDelta(flipped), ChecksumMismatchError, "ChecksumMismatch");
    expect(() => decodeDelta(flipped, { checksum_verified: true })).not.toThrow();
    expect(plain(decodeDelta(buf, { checksum_verified: true }))).toEqual(plain(decodeDelta(buf)));
    const badMagic = buf.slice();
    badMagic[0] ^= 0xff;
    expectFormatError(() => decodeDelta(badMagic, { checksum_verified: true }), InvalidMagicError, "InvalidMagic");
  });
});
