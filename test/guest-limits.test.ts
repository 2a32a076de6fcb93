/**
 * The instrumenter's limits (src/guest/limits.ts): module size, functions and
 * block nesting are checked on the raw bytes before Binaryen reads a module,
 * and a module past one is refused with a ModuleLimitError naming the limit
 * and the module's value.
 */
import { readdirSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import binaryen from "binaryen";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { ModuleLimitError, UnsupportedModuleError } from "../src/guest/errors.js";
import { instrument } from "../src/guest/instrument.js";
import { instrumentOffThread } from "../src/guest/instrument-worker.js";
import { checkModuleLimits, MODULE_LIMITS, NESTING_MAX, scanCode } from "../src/guest/limits.js";
import { builtBytes, watBytes } from "./support/guests.js";
import { TranslateToFuzz } from "./support/wasm-fuzz.js";

// ---------------------------------------------------------------------------
// Modules as bytes: Binaryen's own text parser and writer recurse per nesting level.

const uleb = (v: number): number[] => {
  const out: number[] = [];
  do {
    const low = v % 128;
    v = Math.floor(v / 128);
    out.push(v ? low | 0x80 : low);
  } while (v);
  return out;
};
const str = (s: string) => [...uleb(s.length), ...new TextEncoder().encode(s)];
const concat = (parts: (Uint8Array | number[])[]): Uint8Array => Buffer.concat(parts.map((p) => Uint8Array.from(p)));
const section = (id: number, content: Uint8Array | number[]): Uint8Array => concat([[id, ...uleb(content.length)], content]);

interface ModuleSpec {
  /** Function bodies (instructions, without the locals vector and the final `end`), all of type () -> (). */
  bodies: Uint8Array[];
  /** Imports `cohort.rank` this many times (ABI v1: () -> i32). */
  rankImports?: number;
  /** Name section entries: function index -> name. */
  names?: [number, string][];
}

/** A module with memory 1 (exported as "mem") and the given functions, the first exported as "f". */
function moduleOf({ bodies, rankImports = 0, names = [] }: ModuleSpec): Uint8Array {
  const header = Uint8Array.from([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]);
  const types = section(1, [2, 0x60, 0, 0, 0x60, 0, 1, 0x7f]);
  const imports = rankImports ? section(2, [...uleb(rankImports), ...Array.from({ length: rankImports }, () => [...str("cohort"), ...str("rank"), 0x00, 1]).flat()]) : new Uint8Array(0);
  const funcs = section(3, [...uleb(bodies.length), ...new Array<number>(bodies.length).fill(0)]);
  const memory = section(5, [1, 0, 1]);
  const exports = section(7, [2, ...str("f"), 0x00, ...uleb(rankImports), ...str("mem"), 0x02, 0]);
  const code = section(10, concat([uleb(bodies.length), ...bodies.flatMap((b) => [uleb(b.length + 2), [0x00], b, [0x0b]])]));
  const nameSection = names.length
    ? section(0, [...str("name"), ...Array.from(section(1, [...uleb(names.length), ...names.flatMap(([i, n]) => [...uleb(i), ...str(n)])]))])
    : new Uint8Array(0);
  return concat([header, types, imports, funcs, memory, exports, code, nameSection]);
}

/** `bytes` grown to exactly `total` bytes by a custom section of zeros at its end. */
function paddedTo(bytes: Uint8Array, total: number): Uint8Array {
  const name = str("padding");
  for (let sizeLength = 1; sizeLength <= 5; sizeLength++) {
    const size = total - bytes.length - 1 - sizeLength;
    if (uleb(size).length !== sizeLength) continue;
    const out = new Uint8Array(total);
    out.set(bytes);
    out.set([0, ...uleb(size), ...name], bytes.length);
    return out;
  }
  throw new Error(`cannot pad ${bytes.length} bytes to ${total}`);
}

const valid = (bytes: Uint8Array): boolean => WebAssembly.validate(bytes as Uint8Array<ArrayBuffer>);

const STORE = Uint8Array.from([0x41, 0x80, 0x20, 0x41, 0x07, 0x36, 0x02, 0x00]); // i32.store (i32.const 4096) (i32.const 7)
/** `depth` nested blocks around a store. */
const nestedBlocks = (depth: number): Uint8Array => {
  const body = new Uint8Array(depth * 3 + STORE.length);
  for (let i = 0; i < depth; i++) body.set([0x02, 0x40], i * 2);
  body.set(STORE, depth * 2);
  body.fill(0x0b, depth * 2 + STORE.length);
  return body;
};

function refusal(run: () => unknown): ModuleLimitError {
  let thrown: unknown;
  try {
    run();
  } catch (error) {
    thrown = error;
  }
  expect(thrown).toBeInstanceOf(ModuleLimitError);
  // Still an UnsupportedModuleError: every caller that tells a refused module from a bug keeps working.
  expect(thrown).toBeInstanceOf(UnsupportedModuleError);
  return thrown as ModuleLimitError;
}

afterEach(() => {
  vi.restoreAllMocks();
});

describe("the stated limits", () => {
  it("are 16 MiB, 10,000 functions and 4,000 levels of nesting", () => {
    expect(MODULE_LIMITS).toEqual({ bytes_max: 16 * 1024 * 1024, functions_max: 10_000, nesting_max: NESTING_MAX });
    expect(NESTING_MAX).toBe(4_000);
  });
});

describe("module size", () => {
  it("a module of exactly bytes_max instruments; one byte more is refused by name, with its size, before Binaryen reads it", () => {
    const small = moduleOf({ bodies: [STORE] });
    const atLimit = paddedTo(small, MODULE_LIMITS.bytes_max);
    expect(atLimit.length).toBe(MODULE_LIMITS.bytes_max);
    expect(valid(atLimit)).toBe(true);
    expect(instrument(atLimit).info.exports).toEqual(["f"]);

    const over = paddedTo(small, MODULE_LIMITS.bytes_max + 1);
    expect(valid(over)).toBe(true);
    const readBinary = vi.spyOn(binaryen, "readBinary");
    const error = refusal(() => instrument(over));
    expect(readBinary).not.toHaveBeenCalled();
    expect(error).toMatchObject({ limit: "bytes_max", value: MODULE_LIMITS.bytes_max + 1, max: MODULE_LIMITS.bytes_max, where: "module", code: "ModuleLimit" });
    expect(error.message).toBe(`module cannot be protected: module larger than ${MODULE_LIMITS.bytes_max} bytes (bytes_max): ${MODULE_LIMITS.bytes_max + 1} bytes (module)`);
  });

  it("is checked before validity: an oversized module of garbage is refused for its size", () => {
    const garbage = new Uint8Array(MODULE_LIMITS.bytes_max + 10);
    expect(refusal(() => checkModuleLimits(garbage))).toMatchObject({ limit: "bytes_max", value: MODULE_LIMITS.bytes_max + 10 });
  });
});

describe("number of functions", () => {
  const empty = new Uint8Array(0);
  it("functions_max functions pass; one more is refused by name, with the count, before Binaryen reads the module", () => {
    expect(() => checkModuleLimits(moduleOf({ bodies: new Array<Uint8Array>(MODULE_LIMITS.functions_max).fill(empty) }))).not.toThrow();
    const over = moduleOf({ bodies: new Array<Uint8Array>(MODULE_LIMITS.functions_max + 1).fill(empty) });
    expect(valid(over)).toBe(true);
    const readBinary = vi.spyOn(binaryen, "readBinary");
    const error = refusal(() => instrument(over));
    expect(readBinary).not.toHaveBeenCalled();
    expect(error).toMatchObject({ limit: "functions_max", value: MODULE_LIMITS.functions_max + 1, max: MODULE_LIMITS.functions_max, where: "module" });
    expect(error.message).toMatch(/more than 10000 functions \(functions_max\): 10001 functions/);
  });

  it("imported functions count too", () => {
    const bodies = new Array<Uint8Array>(MODULE_LIMITS.functions_max - 1).fill(empty);
    expect(() => checkModuleLimits(moduleOf({ bodies, rankImports: 1 }))).not.toThrow();
    expect(refusal(() => checkModuleLimits(moduleOf({ bodies, rankImports: 2 })))).toMatchObject({ limit: "functions_max", value: MODULE_LIMITS.functions_max + 1 });
  });
});

describe("nesting of blocks, loops, ifs and trys", () => {
  it("nesting_max levels pass the check; one more is refused by name, with the function and its depth, before Binaryen reads the module", () => {
    expect(() => checkModuleLimits(moduleOf({ bodies: [nestedBlocks(NESTING_MAX)] }))).not.toThrow();
    const over = moduleOf({ bodies: [nestedBlocks(NESTING_MAX + 1)] });
    const readBinary = vi.spyOn(binaryen, "readBinary");
    const error = refusal(() => instrument(over));
    expect(readBinary).not.toHaveBeenCalled();
    expect(error).toMatchObject({ limit: "nesting_max", value: NESTING_MAX + 1, max: NESTING_MAX, where: "function 0" });
    expect(error.message).toMatch(new RegExp(`nested deeper than ${NESTING_MAX} levels \\(nesting_max\\): ${NESTING_MAX + 1} levels`));
  });

  it("names the first function past the limit as Binaryen would: by the name section, else by its index among defined functions", () => {
    const bodies = [new Uint8Array(0), nestedBlocks(NESTING_MAX + 5), nestedBlocks(NESTING_MAX + 9)];
    expect(refusal(() => checkModuleLimits(moduleOf({ bodies, rankImports: 1 })))).toMatchObject({ value: NESTING_MAX + 5, where: "function 1" });
    // Name section indices count the imported function (index 0): the second defined function is index 2.
    expect(refusal(() => checkModuleLimits(moduleOf({ bodies, rankImports: 1, names: [[2, "deep_switch"]] })))).toMatchObject({ where: "function deep_switch" });
  });

  it("counts loops, ifs, trys (closed by end or by delegate) and try_table alike, and depth is the deepest point, not the total", () => {
    const n = NESTING_MAX + 1;
    const loops = new Uint8Array(n * 3);
    for (let i = 0; i < n; i++) loops.set([0x03, 0x40], i * 2);
    loops.fill(0x0b, n * 2);
    expect(refusal(() => checkModuleLimits(moduleOf({ bodies: [loops] })))).toMatchObject({ value: n });

    // (if (i32.const 1) (then ...)) nested: 0x41 0x01 0x04 0x40 ... 0x0b
    const ifs = new Uint8Array(n * 5);
    for (let i = 0; i < n; i++) ifs.set([0x41, 0x01, 0x04, 0x40], i * 4);
    ifs.fill(0x0b, n * 4);
    expect(refusal(() => checkModuleLimits(moduleOf({ bodies: [ifs] })))).toMatchObject({ value: n });

    // try ... delegate 0, nested: each try is closed by its delegate, not by an end.
    const trys = new Uint8Array(n * 4);
    for (let i = 0; i < n; i++) trys.set([0x06, 0x40], i * 2);
    for (let i = 0; i < n; i++) trys.set([0x18, 0x00], n * 2 + i * 2);
    expect(valid(moduleOf({ bodies: [trys] }))).toBe(true);
    expect(refusal(() => checkModuleLimits(moduleOf({ bodies: [trys] })))).toMatchObject({ value: n });
    const shallowTrys = trys.subarray(2, trys.length - 2); // one level fewer
    expect(scanCode(moduleOf({ bodies: [shallowTrys] })).functions).toEqual([{ depth: NESTING_MAX, complete: true }]);

    // Many blocks one after another: depth 1, however many.
    const sequence = new Uint8Array(3 * 3 * NESTING_MAX);
    for (let i = 0; i < 3 * NESTING_MAX; i++) sequence.set([0x02, 0x40, 0x0b], i * 3);
    expect(scanCode(moduleOf({ bodies: [sequence] })).functions).toEqual([{ depth: 1, complete: true }]);
    expect(() => checkModuleLimits(moduleOf({ bodies: [sequence] }))).not.toThrow();
  });

  it("immediates that look like block opcodes are not counted (the scan decodes instructions, it does not search bytes)", () => {
    // i32.const 2 / 3 / 4 and stores with align 2 and offset 2, thousands of times: 0x02..0x04 everywhere, no block.
    const piece = [0x41, 0x02, 0x41, 0x03, 0x36, 0x02, 0x02, 0x41, 0x04, 0x1a];
    const body = Uint8Array.from(new Array<number[]>(2 * NESTING_MAX).fill(piece).flat());
    const bytes = moduleOf({ bodies: [body] });
    expect(valid(bytes)).toBe(true);
    expect(scanCode(bytes).functions).toEqual([{ depth: 0, complete: true }]);
    expect(() => checkModuleLimits(bytes)).not.toThrow();
  });
});

describe("a hostile deeply nested module", () => {
  const hostile = moduleOf({ bodies: [nestedBlocks(1_000_000)] }); // 3 MB

  it("is refused in process, not a stack overflow", () => {
    expect(refusal(() => instrument(hostile))).toMatchObject({ limit: "nesting_max", value: 1_000_000 });
  });

  it("is refused through the instrumenter thread with its class and figures (how hosts load modules)", async () => {
    const thread = instrumentOffThread(hostile);
    await expect(thread).rejects.toBeInstanceOf(ModuleLimitError);
    await expect(thread).rejects.toMatchObject({ limit: "nesting_max", value: 1_000_000, max: NESTING_MAX, where: "function 0" });
  });

  it("a chain of 200,000 nested operators (no blocks: the binary does not nest them) is refused by name, not a crash", async () => {
    // (i32.store (i32.const 0) (0 + 1 + 1 + ... )): nested to the left in Binaryen's tree.
    const n = 200_000;
    const body = new Uint8Array(4 + n * 3 + 3);
    body.set([0x41, 0x00, 0x41, 0x00]);
    for (let i = 0; i < n; i++) body.set([0x41, 0x01, 0x6a], 4 + i * 3);
    body.set([0x36, 0x02, 0x00], 4 + n * 3);
    const bytes = moduleOf({ bodies: [body] });
    expect(valid(bytes)).toBe(true);
    expect(scanCode(bytes).functions).toEqual([{ depth: 0, complete: true }]);
    const thread = instrumentOffThread(bytes);
    await expect(thread).rejects.toBeInstanceOf(UnsupportedModuleError);
    await expect(thread).rejects.toThrow(/nested/);
  });
});

describe("the scan reads every instruction the instrumenter meets", () => {
  const root = fileURLToPath(new URL("../", import.meta.url));
  let ttf: TranslateToFuzz;
  beforeAll(async () => {
    ttf = await TranslateToFuzz.load();
  });
  afterAll(() => ttf?.close());

  /** Every function scanned to its last byte, and the module passes the check. */
  const expectReadable = (what: string, bytes: Uint8Array) => {
    const { functions } = scanCode(bytes);
    expect(functions.filter((f) => !f.complete), what).toEqual([]);
    expect(() => checkModuleLimits(bytes), what).not.toThrow();
  };

  it("the built guests and the WAT fixtures", () => {
    for (const file of readdirSync(`${root}build/guests`)) expectReadable(file, builtBytes(file.replace(/\.wasm$/, "")));
    for (const file of readdirSync(`${root}test/fixtures/wat`)) {
      expectReadable(file, watBytes(readFileSync(`${root}test/fixtures/wat/${file}`, "utf8")));
    }
  });

  it("every instruction family: control, calls, memory, bulk memory, tables, references, SIMD (lanes, shuffles, constants), atomics, exceptions", () => {
    const text = `(module
      (type $v (func))
      (memory 1 1 shared)
      (table $t 2 funcref)
      (elem $e func $f)
      (data $d "abc")
      (tag $x (param i32))
      (global $g (mut i32) (i32.const 0))
      (func $f (param $p i32) (result i32) (local $l i64) (local $r funcref) (local $s v128)
        (block $b (loop $lp (br_if $b (i32.eqz (local.get $p))) (br_table $b $lp $b (local.get $p))))
        (if (local.get $p) (then (nop)) (else (unreachable)))
        (drop (select (i32.const 1) (i32.const 2) (local.get $p)))
        (drop (select (result i64) (i64.const -1) (i64.const 300000000000) (local.get $p)))
        (call_indirect (type $v) (i32.const 0))
        (i64.store32 offset=70000 align=4 (i32.const 8) (i64.load8_s offset=3 (i32.const 1)))
        (f32.store (i32.const 0) (f32.const 1.5)) (f64.store (i32.const 0) (f64.const -2.25))
        (drop (memory.grow (memory.size)))
        (memory.init $d (i32.const 0) (i32.const 0) (i32.const 1)) (data.drop $d)
        (memory.copy (i32.const 0) (i32.const 1) (i32.const 1)) (memory.fill (i32.const 0) (i32.const 1) (i32.const 1))
        (table.init $t $e (i32.const 0) (i32.const 0) (i32.const 1)) (elem.drop $e)
        (table.copy (i32.const 0) (i32.const 1) (i32.const 1))
        (drop (table.grow $t (ref.null func) (i32.const 1))) (drop (table.size $t))
        (table.fill $t (i32.const 0) (ref.func $f) (i32.const 1))
        (table.set $t (i32.const 0) (table.get $t (i32.const 1)))
        (local.set $r (ref.null func)) (drop (ref.is_null (local.get $r)))
        (drop (i32.trunc_sat_f32_s (f32.const 1)))
        (local.set $s (v128.const i32x4 1 2 3 4))
        (local.set $s (i8x16.shuffle 0 17 2 19 4 21 6 23 8 25 10 27 12 29 14 31 (local.get $s) (local.get $s)))
        (local.set $s (i32x4.replace_lane 3 (local.get $s) (i32x4.extract_lane 2 (local.get $s))))
        (local.set $s (v128.load8_lane offset=4 7 (i32.const 0) (local.get $s)))
        (v128.store16_lane 1 (i32.const 0) (local.get $s))
        (local.set $s (v128.load32_zero (i32.const 0)))
        (v128.store (i32.const 0) (i8x16.add (local.get $s) (v128.load (i32.const 16))))
        (drop (i32.atomic.rmw.add offset=8 (i32.const 0) (i32.const 1)))
        (drop (memory.atomic.notify (i32.const 0) (i32.const 1)))
        (atomic.fence)
        (try (do (throw $x (i32.const 3))) (catch $x (global.set $g)) (catch_all))
        (try (do (try (do (nop)) (delegate 0))) (catch_all (rethrow 0)))
        (return_call $f (global.get $g)))
      (func $h (result i32) (return_call_indirect (result i32) (i32.const 0))))`;
    const m = binaryen.parseText(text);
    let bytes: Uint8Array;
    try {
      const F = binaryen.Features;
      m.setFeatures(
        F.MVP | F.MutableGlobals | F.NontrappingFPToInt | F.SIMD128 | F.BulkMemory | F.BulkMemoryOpt | F.SignExt | F.ReferenceTypes | F.Multivalue | F.ExceptionHandling | F.TailCall | F.Atomics,
      );
      bytes = m.emitBinary();
    } finally {
      m.dispose();
    }
    expect(valid(bytes)).toBe(true);
    const functions = scanCode(bytes).functions;
    expect(functions.map((f) => f.complete)).toEqual([true, true]);
    expect(functions[0].depth).toBeGreaterThanOrEqual(2);
  });

  it("60 modules from Binaryen's fuzzer (translate-to-fuzz)", async () => {
    let scanned = 0;
    for (let seed = 1000; seed < 1060; seed++) {
      const made = await ttf.generate(seed, 2000 + (seed % 7) * 500);
      if (!("wasm" in made) || !valid(made.wasm)) continue;
      expect(scanCode(made.wasm).functions.filter((f) => !f.complete), `seed ${seed}`).toEqual([]);
      scanned++;
    }
    expect(scanned).toBeGreaterThan(40);
  });
});
