/**
 * Random bytes into every loader: whatever comes off a disk, a socket or a
 * user's editor must be refused with the loader's own named error (callers
 * catch those by class or code), in bounded time and memory, never with a
 * TypeError or RangeError from deep inside or an opaque throw.
 *
 * Each loader gets two kinds of input: bytes that are random throughout, and
 * a valid encoding with random damage whose checksum is then recomputed, so
 * that the damage gets past the integrity check into the field checks.
 *
 * COHORT_FUZZ_SEED fixes fast-check's seed; a failure prints the seed and
 * path that reproduce it.
 */
import { crc32 } from "node:zlib";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { CheckpointFormatError } from "../src/checkpoint/errors.js";
import { decodeDelta, decodeImage, encodeDelta, encodeImage, type DeltaParts } from "../src/checkpoint/format.js";
import { ManifestError, parseManifest, MANIFEST_CHARS_MAX } from "../src/cluster/manifest.js";
import { InvalidModuleError, UnsupportedModuleError } from "../src/guest/errors.js";
import { instrument } from "../src/guest/instrument.js";
import { instrumentOffThread } from "../src/guest/instrument-worker.js";
import { FrameError } from "../src/transport/errors.js";
import { decodeFrame, encodeFrameBytes, FrameDecoder } from "../src/transport/frame.js";
import { PAGE_BYTES } from "../src/vm/layout.js";
import { decodeBatch, decodeHello, encodeBatch, encodeHello, MalformedPathFrameError } from "../src/vm/message-wire.js";
import {
  decodeOutputRecords,
  decodeRuntimeState,
  encodeRuntimeState,
  initialRuntimeState,
  MalformedRuntimeStateError,
  OUTPUT_LOG,
  OUTPUT_REPLY,
  type RuntimeState,
} from "../src/vm/runtime-state.js";
import { fixtureBytes, watBytes } from "./support/guests.js";

const seed = process.env.COHORT_FUZZ_SEED ? Number(process.env.COHORT_FUZZ_SEED) : undefined;
const RUNS = 400;
const params = { numRuns: RUNS, ...(seed === undefined ? {} : { seed }) };

/**
 * CPU time one input may take. Every loader here is about linear in its input
 * and inputs are ≤ 16 KiB, so a few ms is typical; the bound is loose because
 * CI machines are shared (CPU time, not wall time, for the same reason), and
 * still catches a blow-up (the manifest parser took seconds before its limits).
 */
const CALL_CPU_MS_MAX = 1000;
/** Nor keep alive more than this many bytes beyond a few times its input: a header declaring 4 GiB must not get 4 GiB. */
const EXTRA_BYTES_MAX = 8 << 20;

type ErrorClass = abstract new (...args: never[]) => Error;

/**
 * Runs `load` on one input: it returns, or throws one of `allowed`; either
 * way within CALL_CPU_MS_MAX and without holding more than EXTRA_BYTES_MAX of
 * buffers beyond a few copies of the input.
 */
function typedOnly<T>(what: string, inputBytes: number, allowed: ErrorClass[], load: () => T): T | undefined {
  const buffersBefore = process.memoryUsage().arrayBuffers;
  const started = process.cpuUsage();
  let result: T | undefined;
  try {
    result = load();
  } catch (error) {
    if (!allowed.some((cls) => error instanceof cls)) {
      const shown = error instanceof Error ? `${error.constructor.name}: ${error.message}` : `a non-Error ${typeof error}: ${String(error)}`;
      throw new Error(`${what} threw ${shown} (allowed: ${allowed.map((c) => c.name).join(", ")})`, { cause: error });
    }
  }
  const used = process.cpuUsage(started);
  const ms = (used.user + used.system) / 1000;
  expect(ms, `${what} took ${ms.toFixed(0)} ms of CPU for ${inputBytes} bytes`).toBeLessThan(CALL_CPU_MS_MAX);
  const grown = process.memoryUsage().arrayBuffers - buffersBefore;
  expect(grown, `${what} holds ${grown} more bytes of buffers for ${inputBytes} input bytes`).toBeLessThan(EXTRA_BYTES_MAX + 4 * inputBytes);
  return result;
}

/** Random damage to a valid encoding: overwrite some bytes, then maybe cut it short or append to it. */
const damage = (valid: Uint8Array) =>
  fc
    .record({
      writes: fc.array(fc.record({ at: fc.nat(), value: fc.integer({ min: 0, max: 255 }), wide: fc.boolean() }), { minLength: 1, maxLength: 6 }),
      cut: fc.option(fc.nat(), { freq: 4 }),
      tail: fc.option(fc.uint8Array({ minLength: 1, maxLength: 64 }), { freq: 6 }),
    })
    .map(({ writes, cut, tail }) => {
      let out = Uint8Array.from(valid);
      for (const w of writes) {
        const at = w.at % Math.max(1, out.length);
        // A "wide" write puts 0xff.. or a big value in a 4-byte field: lengths and counts near 2^32.
        if (w.wide && at + 4 <= out.length) new DataView(out.buffer).setUint32(at, w.value % 2 ? 0xffffffff : w.value << 24, true);
        else if (out.length) out[at] = w.value;
      }
      if (cut !== null) out = out.subarray(0, cut % (out.length + 1));
      if (tail !== null) out = Uint8Array.from([...out, ...tail]);
      return out;
    });

/** Recomputes a trailing crc32 over everything before it, as the checkpoint and frame formats store it. */
function resealed(bytes: Uint8Array): Uint8Array {
  if (bytes.length < 4) return bytes;
  const out = Uint8Array.from(bytes);
  new DataView(out.buffer).setUint32(out.length - 4, crc32(out.subarray(0, out.length - 4)), true);
  return out;
}

const randomBytes = fc.uint8Array({ maxLength: 2048 });

function sampleState(): RuntimeState {
  const state = initialRuntimeState();
  state.epoch = 7;
  state.booted = true;
  state.timers.set(3, 1234.5);
  state.output.push({ kind: OUTPUT_LOG, epoch: 6, seq: 1, session: 0, request_id: 0, bytes: new TextEncoder().encode("hello\n"), produced_ms: 10 });
  state.output.push({ kind: OUTPUT_REPLY, epoch: 7, seq: 2, session: 4, request_id: 9, bytes: new TextEncoder().encode("ok"), produced_ms: 11 });
  state.output_bytes = 8;
  state.output_seq = 3;
  state.sent_seq = [0, 2];
  state.delivered = [1, 0];
  state.sender_log = [{ to: 1, epoch: 6, seq: 2, bytes: new TextEncoder().encode("ping") }];
  state.sender_log_bytes = 36;
  state.sender_log_trimmed = [0, 1];
  return state;
}

function sampleDelta(): DeltaParts {
  const page_data = new Uint8Array(2 * PAGE_BYTES).map((_, i) => i * 7);
  return {
    epoch: 5,
    memory_pages: 18,
    page_indices: Uint32Array.from([272, 280]),
    page_data,
    globals: new Uint8Array(32).fill(9),
    runtime_state: encodeRuntimeState(sampleState()),
  };
}

describe("checkpoint decoders (deltas, images) and the runtime state inside them", () => {
  const delta = encodeDelta(sampleDelta());
  const image = encodeImage({ ...sampleDelta(), module_hash: new Uint8Array(32).fill(1) });
  const allowed = [CheckpointFormatError];

  /** A decoded blob's runtime state is the next loader: a backup decodes it on promotion. */
  const decodeAll = (bytes: Uint8Array, decode: (b: Uint8Array) => { runtime_state: Uint8Array }) => {
    const parts = typedOnly("decode", bytes.length, allowed, () => decode(bytes));
    if (parts) typedOnly("decodeRuntimeState of a decoded blob", bytes.length, allowed, () => decodeRuntimeState(parts.runtime_state));
  };

  it("random bytes", () => {
    fc.assert(
      fc.property(randomBytes, (bytes) => {
        decodeAll(bytes, decodeDelta);
        decodeAll(bytes, decodeImage);
      }),
      params,
    );
  });

  it("damaged deltas and images, checksum recomputed", () => {
    fc.assert(fc.property(damage(delta), (bytes) => decodeAll(resealed(bytes), decodeDelta)), params);
    fc.assert(fc.property(damage(image), (bytes) => decodeAll(resealed(bytes), decodeImage)), params);
  });

  it("headers declaring the largest memory, page count, state or total size are refused without allocating them", () => {
    // Offsets from the table in src/checkpoint/format.ts: memory_pages 16, page_count 20, runtime_state_bytes 28, total_bytes 32.
    for (const [offset, value] of [[16, 0], [20, 0xffffffff], [28, 0xffffffff], [32, 0xffffffff], [36, 0xffffffff]]) {
      const bytes = Uint8Array.from(delta);
      new DataView(bytes.buffer).setUint32(offset, value, true);
      expect(() => decodeDelta(resealed(bytes))).toThrow(CheckpointFormatError);
      typedOnly(`decodeDelta with u32 ${value} at ${offset}`, bytes.length, allowed, () => decodeDelta(resealed(bytes)));
    }
  });
});

describe("runtime state decoder", () => {
  const valid = encodeRuntimeState(sampleState());
  const allowed = [MalformedRuntimeStateError];

  it("decodes the sample (the damage below starts from a state that loads)", () => {
    expect(decodeRuntimeState(valid)).toEqual(sampleState());
  });

  it("random bytes, with and without the layout byte and the V8 serializer header", () => {
    const prefixed = fc.tuple(fc.constantFrom([], [0x43, 0, 0, 0, 0], [0xff, 0x0f], [0x43, 0, 0, 0, 0, 0xff, 0x0f]), randomBytes).map(([p, b]) => Uint8Array.from([...p, ...b]));
    fc.assert(
      fc.property(prefixed, (bytes) => {
        typedOnly("decodeRuntimeState", bytes.length, allowed, () => decodeRuntimeState(bytes));
        typedOnly("decodeOutputRecords", bytes.length, allowed, () => decodeOutputRecords(bytes));
      }),
      params,
    );
  });

  it("damaged encodings", () => {
    fc.assert(
      fc.property(damage(valid), (bytes) => {
        typedOnly("decodeRuntimeState", bytes.length, allowed, () => decodeRuntimeState(bytes));
        typedOnly("decodeOutputRecords", bytes.length, allowed, () => decodeOutputRecords(bytes));
      }),
      params,
    );
  });

  it("encode(decode(x)) gives x's bytes back (a promoted backup ships the primary's bytes)", () => {
    expect(Buffer.from(encodeRuntimeState(decodeRuntimeState(valid))).equals(valid)).toBe(true);
  });
});

describe("peer frame decoder", () => {
  const frame = encodeFrameBytes(7, Buffer.from("a payload of some length"));
  const allowed = [FrameError];
  const decodeBoth = (bytes: Uint8Array, cuts: number[]) => {
    typedOnly("decodeFrame", bytes.length, allowed, () => decodeFrame(bytes, { max_frame_bytes: 1 << 20 }));
    // The streaming decoder, fed the same bytes in pieces, then told the stream ended.
    const decoder = new FrameDecoder({ max_frame_bytes: 1 << 20 });
    const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
    typedOnly("FrameDecoder", bytes.length, allowed, () => {
      let prev = 0;
      for (const p of [...points, bytes.length]) {
        decoder.push(bytes.subarray(prev, p));
        prev = p;
      }
      decoder.end();
    });
  };

  it("random bytes, whole and in chunks", () => {
    fc.assert(fc.property(randomBytes, fc.array(fc.nat(), { maxLength: 5 }), decodeBoth), params);
  });

  it("damaged frames (one or several back to back), checksum recomputed", () => {
    const stream = Buffer.concat([frame, frame, frame]);
    fc.assert(fc.property(damage(frame), fc.array(fc.nat(), { maxLength: 5 }), (bytes, cuts) => decodeBoth(resealed(bytes), cuts)), params);
    fc.assert(fc.property(damage(stream), fc.array(fc.nat(), { maxLength: 5 }), (bytes, cuts) => decodeBoth(bytes, cuts)), params);
  });
});

describe("message batch and hello decoders (group message path)", () => {
  const batch = encodeBatch([
    { from: 0, to: 1, incarnation: 2, epoch: 3, seq: 4, bytes: Buffer.from("first") },
    { from: 0, to: 1, incarnation: 2, epoch: 3, seq: 5, bytes: Buffer.from("second message") },
  ]);
  const hello = encodeHello({ token: "abc123", from: 2 });
  const allowed = [MalformedPathFrameError];

  it("random bytes", () => {
    fc.assert(
      fc.property(randomBytes, (bytes) => {
        typedOnly("decodeBatch", bytes.length, allowed, () => decodeBatch(bytes));
        typedOnly("decodeHello", bytes.length, allowed, () => decodeHello(bytes));
      }),
      params,
    );
  });

  it("damaged batches and hellos, and hellos of any JSON value", () => {
    fc.assert(fc.property(damage(batch), (bytes) => void typedOnly("decodeBatch", bytes.length, allowed, () => decodeBatch(bytes))), params);
    fc.assert(fc.property(damage(hello), (bytes) => void typedOnly("decodeHello", bytes.length, allowed, () => decodeHello(bytes))), params);
    fc.assert(
      fc.property(fc.jsonValue(), (value) => {
        const bytes = Buffer.from(JSON.stringify(value) ?? "null");
        typedOnly("decodeHello", bytes.length, allowed, () => decodeHello(bytes));
      }),
      params,
    );
  });
});

describe("manifest parser", () => {
  const valid = "group: bank\nmode: group\nmodule: ../build/guests/bank.wasm\nsize: 4\nepoch: { interval_ms: 20, min_interval_ms: 2, max_interval_ms: 100 }\nlimits: { memory_mib: 256 }\n";
  const allowed = [ManifestError];
  const parse = (text: string) => typedOnly("parseManifest", text.length, allowed, () => parseManifest(text, { source: "fuzz.yaml", base_dir: "/tmp" }));

  // The YAML parser is the slowest loader here (≈ 5 ms an input): fewer runs.
  const yamlParams = { ...params, numRuns: RUNS / 4 };
  it("random text, damaged manifests and any JSON/YAML value", () => {
    fc.assert(fc.property(fc.string({ maxLength: 1024, unit: "binary" }), (text) => void parse(text)), yamlParams);
    fc.assert(fc.property(damage(Buffer.from(valid)), (bytes) => void parse(Buffer.from(bytes).toString("utf8"))), yamlParams);
    fc.assert(fc.property(fc.jsonValue({ maxDepth: 6 }), (value) => void parse(JSON.stringify(value) ?? "null")), yamlParams);
    fc.assert(
      fc.property(fc.dictionary(fc.constantFrom("group", "mode", "module", "size", "epoch", "limits", "x"), fc.jsonValue({ maxDepth: 3 })), (value) => void parse(JSON.stringify(value))),
      yamlParams,
    );
  });

  it("hostile YAML (deep nesting, anchor floods, size) is refused by name in bounded time", () => {
    // 2,000 nested `[` (2 KiB) made Node abort the whole process (fatal out of memory inside the YAML parser).
    const hostile = [
      "[".repeat(2000),
      "{a: ".repeat(2000),
      `${"- ".repeat(2000)}x`,
      `${"? ".repeat(2000)}x`,
      Array.from({ length: 120 }, (_, i) => `${" ".repeat(i)}a:`).join("\n"),
      `x: ${"&a [*a, *a] ".repeat(MANIFEST_CHARS_MAX / 12 - 1)}`,
      "[".repeat(MANIFEST_CHARS_MAX),
      `group: bank\nmodule: m.wasm\n# ${"x".repeat(MANIFEST_CHARS_MAX)}\n`,
    ];
    for (const text of hostile) {
      expect(() => parse(text)).not.toThrow();
      expect(() => parseManifest(text, { source: "m", base_dir: "/" })).toThrow(ManifestError);
    }
    expect(() => parseManifest(hostile[0], { source: "m", base_dir: "/" })).toThrow(/more than 128 flow collections/);
    expect(() => parseManifest(hostile[2], { source: "m", base_dir: "/" })).toThrow(/nested deeper than 64 levels/);
    expect(() => parseManifest(hostile[7], { source: "m", base_dir: "/" })).toThrow(/limit is 8192/);
    // Just inside the bounds, the parser itself runs (and the schema refuses the content), quickly.
    for (const text of ["[".repeat(128), `${"- ".repeat(60)}x`, `a: ${"[".repeat(100)}${"]".repeat(100)}`]) {
      expect(() => parse(text)).not.toThrow();
    }
  });

  it("a manifest of ordinary shape still loads", () => {
    const m = parseManifest(valid, { source: "ok.yaml", base_dir: "/srv" });
    expect(m).toMatchObject({ group: "bank", size: 4, epoch: { interval_ms: 20 }, module: "/build/guests/bank.wasm" });
  });
});

describe("module loader (instrumenter)", () => {
  const module = fixtureBytes("bulk");
  const allowed = [InvalidModuleError, UnsupportedModuleError];

  it("random bytes and random bytes after the wasm header", () => {
    const withHeader = randomBytes.map((b) => Uint8Array.from([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, ...b]));
    fc.assert(fc.property(fc.oneof(randomBytes, withHeader), (bytes) => void typedOnly("instrument", bytes.length, allowed, () => instrument(bytes))), {
      ...params,
      numRuns: RUNS / 2,
    });
  });

  it("through the instrumenter thread (how cohort run and hosts load a module), refusals keep their classes", async () => {
    // The error crosses a thread boundary as plain data; the caller must still be able to catch it by class.
    const garbage = instrumentOffThread(new TextEncoder().encode("not a module"));
    await expect(garbage).rejects.toBeInstanceOf(InvalidModuleError);
    await expect(garbage).rejects.toThrow(/not a valid WebAssembly module/);
    const refused = instrumentOffThread(watBytes(`(module (import "env" "foo" (func)))`));
    await expect(refused).rejects.toBeInstanceOf(UnsupportedModuleError);
    await expect(refused).rejects.toMatchObject({ feature: "import not in guest ABI v1", where: 'import "env"."foo"' });
    await expect(instrumentOffThread(module)).resolves.toMatchObject({ info: { exports: ["fill", "copy", "init", "drop", "size"] } });
  });

  it("damaged modules", () => {
    fc.assert(fc.property(damage(module), (bytes) => void typedOnly("instrument", bytes.length, allowed, () => instrument(bytes))), { ...params, numRuns: RUNS / 2 });
  });
});
