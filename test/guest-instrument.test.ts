/**
 * Deploy-time instrumentation (src/guest/instrument.ts): what it refuses, the
 * write barrier's exactness, containment of a misbehaving guest, and a
 * differential test against the uninstrumented module.
 */
import { readFileSync } from "node:fs";
import binaryen from "binaryen";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { decodeDelta, sealDelta } from "../src/checkpoint/format.js";
import { describeThrown, InstrumenterError, InvalidModuleError, UnsupportedModuleError } from "../src/guest/errors.js";
import { instrument, NESTING_MAX } from "../src/guest/instrument.js";
import { BASE_BYTES, FIRST_GUEST_PAGE, PAGE_BYTES, PAGE_SHIFT, WASM_PAGE_BYTES } from "../src/vm/layout.js";
import { VmCore, VmCrashedError } from "../src/vm/machine.js";
import { guestOf, options } from "./support/guests.js";

// ---------------------------------------------------------------------------
// Helpers

const F = binaryen.Features;
/** What V8 11.x in Node 20 runs without flags (binaryen's "All" would emit GC encodings such as `nofunc`). */
const NODE20 =
  F.MVP |
  F.MutableGlobals |
  F.NontrappingFPToInt |
  F.SIMD128 |
  F.BulkMemory |
  F.BulkMemoryOpt |
  F.SignExt |
  F.ReferenceTypes |
  F.Multivalue |
  F.ExceptionHandling |
  F.TailCall |
  F.Atomics;

/** WAT -> wasm, with a name section so that `where` can name functions and globals. */
function wasm(text: string, features: number = NODE20): Uint8Array {
  const m = binaryen.parseText(text);
  const debug = binaryen.getDebugInfo();
  try {
    m.setFeatures(features);
    binaryen.setDebugInfo(true);
    return m.emitBinary();
  } finally {
    binaryen.setDebugInfo(debug);
    m.dispose();
  }
}

function wasmNoNames(text: string, features: number = NODE20): Uint8Array {
  const m = binaryen.parseText(text);
  try {
    m.setFeatures(features);
    return m.emitBinary();
  } finally {
    m.dispose();
  }
}

const validInNode = (bytes: Uint8Array): boolean => WebAssembly.validate(bytes as Uint8Array<ArrayBuffer>);

function caught(f: () => unknown): unknown {
  try {
    f();
  } catch (error) {
    return error;
  }
  return undefined;
}

function refusal(bytes: Uint8Array): UnsupportedModuleError {
  const error = caught(() => instrument(bytes));
  expect(error).toBeInstanceOf(UnsupportedModuleError);
  return error as UnsupportedModuleError;
}

function invalid(bytes: Uint8Array): InvalidModuleError {
  const error = caught(() => instrument(bytes));
  expect(error).toBeInstanceOf(InvalidModuleError);
  return error as InvalidModuleError;
}

function expectRefused(bytes: Uint8Array, feature: RegExp, where: string): void {
  const error = refusal(bytes);
  expect(error.feature).toMatch(feature);
  expect(error.where).toBe(where);
  expect(error.message).toContain(error.feature);
  expect(error.message).toContain(error.where);
}

/** Pages (4 KiB, whole-memory numbering) touched by guest bytes [addr, addr + len). */
function pagesOf(addr: number, len: number): number[] {
  if (len === 0) return [];
  const first = (BASE_BYTES + addr) >>> PAGE_SHIFT;
  const last = Math.floor((BASE_BYTES + addr + len - 1) / PAGE_BYTES);
  const pages: number[] = [];
  for (let p = first; p <= last; p++) pages.push(p);
  return pages;
}

const sorted = (pages: Iterable<number>): number[] => [...new Set(pages)].sort((a, b) => a - b);

async function bootVm(bytes: Uint8Array): Promise<VmCore> {
  const vm = VmCore.boot(await guestOf(bytes), options());
  expect(vm.crashed).toBeNull();
  const first = vm.capture();
  vm.commit(first.epoch);
  return vm;
}

/** Captures and commits the current epoch; returns the delta's page indices and data. */
function captureDelta(vm: VmCore): { pages: number[]; data: Uint8Array; memory_pages: number } {
  const dirtyBefore = vm.dirtyPages;
  const captured = vm.capture();
  sealDelta(captured.delta);
  const d = decodeDelta(captured.delta);
  vm.commit(captured.epoch);
  expect(captured.dirty_pages).toBe(dirtyBefore);
  expect(d.page_indices.length).toBe(dirtyBefore);
  return { pages: [...d.page_indices], data: d.page_data.slice(), memory_pages: d.memory_pages };
}

const capturePages = (vm: VmCore): number[] => sorted(captureDelta(vm).pages);

function plainInstance(bytes: Uint8Array): { exports: Record<string, (...a: (number | bigint)[]) => unknown>; memory: () => Uint8Array } {
  const instance = new WebAssembly.Instance(new WebAssembly.Module(bytes as Uint8Array<ArrayBuffer>), {});
  const exports = instance.exports as unknown as Record<string, (...a: (number | bigint)[]) => unknown> & { mem: WebAssembly.Memory };
  return { exports, memory: () => new Uint8Array(exports.mem.buffer) };
}

type Outcome = { trapped: false; value: unknown } | { trapped: true };

function runPlain(p: ReturnType<typeof plainInstance>, name: string, args: (number | bigint)[]): Outcome {
  try {
    return { trapped: false, value: p.exports[name](...args) };
  } catch (error) {
    expect(error).toBeInstanceOf(WebAssembly.RuntimeError);
    return { trapped: true };
  }
}

function runVm(vm: VmCore, name: string, args: (number | bigint)[]): Outcome {
  try {
    return { trapped: false, value: vm.invoke(name, args) };
  } catch (error) {
    expect(error).toBeInstanceOf(VmCrashedError);
    expect(vm.crashed).not.toBeNull();
    return { trapped: true };
  }
}

/** The guest's view of the VM's memory: [BASE_BYTES, size). */
const guestView = (vm: VmCore): Uint8Array => vm.bytes().subarray(BASE_BYTES);

function expectSameBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  expect(actual.length, `${what}: length`).toBe(expected.length);
  if (Buffer.compare(actual, expected) !== 0) {
    let i = 0;
    while (actual[i] === expected[i]) i++;
    expect.fail(`${what}: first difference at byte ${i} (0x${i.toString(16)}): ${actual[i]} != ${expected[i]}`);
  }
}

// ---------------------------------------------------------------------------
// The barrier fixture: stores of every width, loads, bulk operations

interface StoreKind {
  name: string;
  width: number;
  code: (addr: string, value: string, offset: number) => string;
}

const off = (o: number) => (o ? ` offset=${o}` : "");
const STORES: StoreKind[] = [
  { name: "i32.store8", width: 1, code: (a, v, o) => `(i32.store8${off(o)} ${a} (i32.wrap_i64 ${v}))` },
  { name: "i32.store16", width: 2, code: (a, v, o) => `(i32.store16${off(o)} align=1 ${a} (i32.wrap_i64 ${v}))` },
  { name: "i32.store", width: 4, code: (a, v, o) => `(i32.store${off(o)} align=1 ${a} (i32.wrap_i64 ${v}))` },
  { name: "i64.store", width: 8, code: (a, v, o) => `(i64.store${off(o)} align=1 ${a} ${v})` },
  { name: "f32.store", width: 4, code: (a, v, o) => `(f32.store${off(o)} align=1 ${a} (f32.convert_i64_s ${v}))` },
  { name: "f64.store", width: 8, code: (a, v, o) => `(f64.store${off(o)} align=1 ${a} (f64.convert_i64_s ${v}))` },
  { name: "v128.store", width: 16, code: (a, v, o) => `(v128.store${off(o)} align=1 ${a} (i64x2.replace_lane 1 (i64x2.splat ${v}) (i64.const 0x0102030405060708)))` },
  { name: "i64.store32", width: 4, code: (a, v, o) => `(i64.store32${off(o)} align=1 ${a} ${v})` },
  { name: "i64.store16", width: 2, code: (a, v, o) => `(i64.store16${off(o)} align=1 ${a} ${v})` },
  { name: "i64.store8", width: 1, code: (a, v, o) => `(i64.store8${off(o)} ${a} ${v})` },
  { name: "v128.store64_lane", width: 8, code: (a, v, o) => `(v128.store64_lane${off(o)} align=1 1 ${a} (i64x2.splat ${v}))` },
  { name: "v128.store32_lane", width: 4, code: (a, v, o) => `(v128.store32_lane${off(o)} align=1 2 ${a} (i64x2.splat ${v}))` },
  { name: "v128.store16_lane", width: 2, code: (a, v, o) => `(v128.store16_lane${off(o)} align=1 5 ${a} (i64x2.splat ${v}))` },
  { name: "v128.store8_lane", width: 1, code: (a, v, o) => `(v128.store8_lane${off(o)} 9 ${a} (i64x2.splat ${v}))` },
];

/** Loads of every width, each folded into an i64. */
const LOADS: { name: string; width: number; code: (addr: string, offset: number) => string }[] = [
  { name: "i32.load8_u", width: 1, code: (a, o) => `(i64.extend_i32_u (i32.load8_u${off(o)} ${a}))` },
  { name: "i32.load16_s", width: 2, code: (a, o) => `(i64.extend_i32_s (i32.load16_s${off(o)} align=1 ${a}))` },
  { name: "i32.load", width: 4, code: (a, o) => `(i64.extend_i32_u (i32.load${off(o)} align=1 ${a}))` },
  { name: "i64.load", width: 8, code: (a, o) => `(i64.load${off(o)} align=1 ${a})` },
  { name: "i64.load32_u", width: 4, code: (a, o) => `(i64.load32_u${off(o)} align=1 ${a})` },
  { name: "f32.load", width: 4, code: (a, o) => `(i64.extend_i32_u (i32.reinterpret_f32 (f32.load${off(o)} align=1 ${a})))` },
  { name: "f64.load", width: 8, code: (a, o) => `(i64.reinterpret_f64 (f64.load${off(o)} align=1 ${a}))` },
  { name: "v128.load", width: 16, code: (a, o) => `(i64.xor (i64x2.extract_lane 0 (v128.load${off(o)} align=1 ${a})) (i64.rotl (i64x2.extract_lane 1 (v128.load${off(o)} align=1 ${a})) (i64.const 7)))` },
  { name: "v128.load64_lane", width: 8, code: (a, o) => `(i64x2.extract_lane 1 (v128.load64_lane${off(o)} align=1 1 ${a} (v128.const i64x2 0 0)))` },
  { name: "v128.load32_zero", width: 4, code: (a, o) => `(i64x2.extract_lane 0 (v128.load32_zero${off(o)} align=1 ${a}))` },
  { name: "v128.load8_splat", width: 1, code: (a, o) => `(i64x2.extract_lane 1 (v128.load8_splat${off(o)} ${a}))` },
  { name: "v128.load8x8_s", width: 8, code: (a, o) => `(i64x2.extract_lane 1 (v128.load8x8_s${off(o)} align=1 ${a}))` },
];

let labels = 0;
/** Inline br_table dispatch over `cases`; a kind out of range does nothing. */
function dispatch(kind: string, cases: string[]): string {
  const id = labels++;
  let s = `(br_table ${cases.map((_, i) => `$k${id}_${i}`).join(" ")} $done${id} ${kind})`;
  cases.forEach((code, i) => {
    s = `(block $k${id}_${i} ${s}) ${code} (br $done${id})`;
  });
  return `(block $done${id} ${s})`;
}
const storeDispatch = (addr: string, kind: string, value: string, offset = 0) =>
  dispatch(kind, STORES.map((k) => k.code(addr, value, offset)));

/** Huge offset immediates: OFFSET_TRAPS makes the shifted offset overflow u32, OFFSET_WRAPS does not (the sum wraps at run time). */
const OFFSET_TRAPS = 0xfffffff0;
const OFFSET_WRAPS = 0xffee0000;
const MULTI = 6;
const INIT_SEGMENT_BYTES = 3 * PAGE_BYTES + 123;
const segmentText = Array.from({ length: INIT_SEGMENT_BYTES }, (_, i) => `\\${((i * 7 + 3) & 0xff).toString(16).padStart(2, "0")}`).join("");
const ACTIVE_SEGMENT_AT = 2 * PAGE_BYTES - 5; // straddles a 4 KiB boundary

const BARRIER_WAT = `
(module
  (memory $m 2 8)
  (export "mem" (memory $m))
  (global $calls (mut i32) (i32.const 0))
  (data $seg "${segmentText}")
  (data (i32.const ${ACTIVE_SEGMENT_AT}) "active segment")
  (func (export "store") (param $addr i32) (param $kind i32) (param $value i64)
    ${storeDispatch("(local.get $addr)", "(local.get $kind)", "(local.get $value)")})
  (func (export "store_off") (param $addr i32) (param $kind i32) (param $value i64)
    ${storeDispatch("(local.get $addr)", "(local.get $kind)", "(local.get $value)", 4093)})
  (func (export "store_traps") (param $addr i32) (param $kind i32) (param $value i64)
    ${storeDispatch("(local.get $addr)", "(local.get $kind)", "(local.get $value)", OFFSET_TRAPS)})
  (func (export "store_wraps") (param $addr i32) (param $kind i32) (param $value i64)
    ${storeDispatch("(local.get $addr)", "(local.get $kind)", "(local.get $value)", OFFSET_WRAPS)})
  (func (export "multi") ${Array.from({ length: MULTI }, (_, i) => `(param $a${i} i32) (param $k${i} i32)`).join(" ")} (param $value i64)
    ${Array.from({ length: MULTI }, (_, i) => storeDispatch(`(local.get $a${i})`, `(local.get $k${i})`, "(local.get $value)")).join("\n    ")})
  (func (export "sweep") (param $addr i32) (param $stride i32) (param $count i32) (param $kind i32) (param $value i64)
    (block $out (loop $next
      (br_if $out (i32.eqz (local.get $count)))
      ${storeDispatch("(local.get $addr)", "(local.get $kind)", "(local.get $value)")}
      (local.set $addr (i32.add (local.get $addr) (local.get $stride)))
      (local.set $value (i64.add (local.get $value) (i64.const 0x0101010101010101)))
      (local.set $count (i32.sub (local.get $count) (i32.const 1)))
      (br $next))))
  (func (export "load") (param $addr i32) (param $kind i32) (result i64)
    ${dispatch("(local.get $kind)", LOADS.map((l) => `(return ${l.code("(local.get $addr)", 0)})`))}
    (i64.const -1))
  (func (export "load_off") (param $addr i32) (param $kind i32) (result i64)
    ${dispatch("(local.get $kind)", LOADS.map((l) => `(return ${l.code("(local.get $addr)", 4093)})`))}
    (i64.const -1))
  (func (export "load_wraps") (param $addr i32) (result i64) (i64.load offset=${OFFSET_WRAPS} (local.get $addr)))
  (func (export "fill") (param $d i32) (param $v i32) (param $n i32) (memory.fill (local.get $d) (local.get $v) (local.get $n)))
  (func (export "copy") (param $d i32) (param $s i32) (param $n i32) (memory.copy (local.get $d) (local.get $s) (local.get $n)))
  (func (export "init") (param $d i32) (param $o i32) (param $n i32) (memory.init $seg (local.get $d) (local.get $o) (local.get $n)))
  (func (export "drop") (data.drop $seg))
  (func (export "size") (result i32) (global.set $calls (i32.add (global.get $calls) (i32.const 1))) (memory.size))
  (func (export "grow") (param $n i32) (result i32) (memory.grow (local.get $n)))
)`;

const barrierBytes = wasm(BARRIER_WAT);
const GUEST_PAGES0 = 2;

// ---------------------------------------------------------------------------
// 1. Refusals

describe("instrument() refuses what it cannot protect", () => {
  it("accepts a module that uses only supported features (control)", () => {
    const bytes = wasm(`(module
      (import "cohort" "log" (func $log (param i32 i32) (result i32)))
      (import "env" "abort" (func $abort (param i32 i32 i32 i32)))
      (memory 1 2)
      (table $t 2 funcref)
      (elem (table $t) (i32.const 0) func $a)
      (global $r externref (ref.null extern))
      (global $g (mut i32) (i32.const 0))
      (tag $e (param i32))
      (func $a (export "a") (result i32)
        (drop (table.get $t (i32.const 0)))
        (drop (table.size $t))
        (try (do (throw $e (i32.const 1))) (catch $e (drop)))
        (call_indirect $t (result i32) (i32.const 0)))
      (func (export "b") (result i32) (call $log (i32.const 0) (i32.const 0))))`);
    expect(validInNode(bytes)).toBe(true);
    const out = instrument(bytes);
    expect(validInNode(out.wasm)).toBe(true);
    expect(out.info.imports).toEqual(["cohort.log", "env.abort"]);
    expect(out.info.mutable_globals).toEqual([{ name: "g", type: "i32" }]);
  });

  it("shared memory", () => {
    expectRefused(wasm(`(module (memory 1 2 shared) (func (export "f")))`), /shared memory/, "memory 0");
  });

  it("memory64", () => {
    const bytes = wasm(`(module (memory i64 1) (func (export "f")))`, NODE20 | F.Memory64);
    if (validInNode(bytes)) {
      expectRefused(bytes, /memory64/, "memory 0");
    } else {
      // V8 11.x (Node 20) does not know memory64 without a flag: the engine's
      // validator rejects the module before the instrumenter's own check runs.
      expect(invalid(bytes).message).toMatch(/memory64/);
    }
  });

  it("two memories (multi-memory)", () => {
    const bytes = wasm(`(module (memory $a 1) (memory $b 1) (func (export "f") (i32.store $b (i32.const 0) (i32.const 1))))`, NODE20 | F.MultiMemory);
    if (validInNode(bytes)) {
      const error = refusal(bytes);
      expect(error.feature).toBe("multi-memory");
      expect(error.where).toMatch(/2 memories/);
    } else {
      // Node 20: "memory count of 2 exceeds internal limit of 1", from the engine's validator.
      expect(invalid(bytes).message).toMatch(/memory count|memories/);
    }
  });

  it("an atomic rmw on shared memory (the shared memory is named first)", () => {
    const error = refusal(wasm(`(module (memory 1 1 shared) (func $bump (export "f") (result i32) (i32.atomic.rmw.add (i32.const 0) (i32.const 1))))`));
    expect(error.feature).toMatch(/threads/);
  });

  it.each([
    ["i32.atomic.rmw.add", `(func $f (export "f") (result i32) (i32.atomic.rmw.add (i32.const 0) (i32.const 1)))`],
    ["atomic.fence", `(func $f (export "f") (atomic.fence))`],
    ["i32.atomic.load", `(func $f (export "f") (result i32) (i32.atomic.load (i32.const 0)))`],
    ["i64.atomic.store", `(func $f (export "f") (i64.atomic.store (i32.const 0) (i64.const 0)))`],
    ["i32.atomic.rmw.cmpxchg", `(func $f (export "f") (result i32) (i32.atomic.rmw.cmpxchg (i32.const 0) (i32.const 0) (i32.const 1)))`],
    ["memory.atomic.notify", `(func $f (export "f") (result i32) (memory.atomic.notify (i32.const 0) (i32.const 1)))`],
    ["memory.atomic.wait32", `(func $f (export "f") (result i32) (memory.atomic.wait32 (i32.const 0) (i32.const 0) (i64.const 0)))`],
  ])("atomic instruction %s on unshared memory, named by function", (_, func) => {
    // Atomics on unshared memory validate in Node 20; the instruction itself is what is refused.
    const bytes = wasm(`(module (memory 1 1) (func $other (nop)) ${func.replace("$f", "$atomic_user")})`);
    expect(validInNode(bytes)).toBe(true);
    expectRefused(bytes, /atomics/, "function atomic_user");
  });

  it("an atomic nested deep inside control flow is still found", () => {
    const bytes = wasm(`(module (memory 1 1)
      (func $deep (export "f") (param i32)
        (block (loop (if (local.get 0) (then (drop (i32.atomic.rmw8.xchg_u (i32.const 0) (i32.const 1)))))))))`);
    expectRefused(bytes, /atomics/, "function deep");
  });

  const TABLE = `(table $t 2 funcref) (elem $e func $other) (func $other)`;
  it.each([
    ["table.set", `(table.set $t (i32.const 0) (ref.null func))`],
    ["table.grow", `(drop (table.grow $t (ref.null func) (i32.const 1)))`],
  ])("%s", (name, code) => {
    expectRefused(wasm(`(module ${TABLE} (func $mutator (export "f") ${code}))`), new RegExp(`table mutation.*${name.replace(".", "\\.")}`), "function mutator");
  });

  const UNNAMED = [
    ["table.fill", `(table.fill $t (i32.const 0) (ref.null func) (i32.const 1))`],
    ["table.copy", `(table.copy $t $t (i32.const 0) (i32.const 1) (i32.const 1))`],
    ["table.init", `(table.init $t $e (i32.const 0) (i32.const 0) (i32.const 1))`],
    ["elem.drop", `(elem.drop $e)`],
  ] as const;
  it.each(UNNAMED)("%s is refused, naming the function", (_, code) => {
    const bytes = wasm(`(module ${TABLE} (func $mutator (export "f") ${code}))`);
    expect(validInNode(bytes)).toBe(true);
    expect(refusal(bytes).where).toBe("function mutator");
  });
  // Regression: table.fill/copy/init and elem.drop are refused with an error naming the instruction.
  it.each(UNNAMED)("%s: the feature names the instruction", (name, code) => {
    const error = refusal(wasm(`(module ${TABLE} (func $mutator (export "f") ${code}))`));
    expect(error.feature).toContain(name);
  });

  it("GC struct types / instructions", () => {
    const bytes = wasm(
      `(module (type $s (struct (field (mut i32)))) (func $mk (export "f") (result i32) (struct.get $s 0 (struct.new $s (i32.const 1)))))`,
      NODE20 | F.GC,
    );
    if (validInNode(bytes)) {
      const error = refusal(bytes);
      expect(error.feature).toMatch(/struct|GC|heap/i);
    } else {
      // Node 20 (V8 11.3) needs --experimental-wasm-gc: rejected by the engine's validator, still a typed error.
      expect(invalid(bytes).message).toMatch(/gc/i);
    }
  });

  it.each([
    ["memory", `(import "env" "memory" (memory 1))`, "imported memory", `import "env"."memory"`],
    ["global", `(import "env" "g" (global i32))`, "imported global", `import "env"."g"`],
    ["mutable global", `(import "cohort" "rank" (global (mut i32)))`, "imported global", `import "cohort"."rank"`],
    ["table", `(import "env" "tab" (table 1 funcref))`, "imported table", `import "env"."tab"`],
  ])("imported %s", (_, imp, feature, where) => {
    expectRefused(wasm(`(module ${imp} (func (export "f")))`), new RegExp(`^${feature}$`), where);
  });

  it('an import outside the ABI ("env"."foo"), and a cohort_hv import', () => {
    expectRefused(wasm(`(module (import "env" "foo" (func $foo)) (func (export "f") (call $foo)))`), /not in guest ABI/, `import "env"."foo"`);
    expectRefused(wasm(`(module (import "cohort_hv" "first_write" (func (param i32))))`), /not in guest ABI/, `import "cohort_hv"."first_write"`);
    expectRefused(wasm(`(module (import "cohort" "abort" (func (param i32 i32 i32 i32))))`), /not in guest ABI/, `import "cohort"."abort"`);
  });

  it.each([
    ["cohort", "log", "(param i32) (result i32)"],
    ["cohort", "log", "(param i32 i32)"],
    ["cohort", "log", "(param i32 i32) (result i64)"],
    ["cohort", "timer_set", "(param i32 f32) (result i32)"],
    ["cohort", "clock_ms", "(result i32)"],
    ["cohort", "rank", "(param i32) (result i32)"],
    ["env", "abort", "(param i32 i32 i32 i32) (result i32)"],
    ["env", "seed", "(result f32)"],
  ])('an ABI import with a wrong signature: "%s"."%s" %s', (mod, name, sig) => {
    expectRefused(wasm(`(module (import "${mod}" "${name}" (func ${sig})))`), /wrong signature/, `import "${mod}"."${name}"`);
  });

  it.each([
    ["function", `(func (export "__cohort_x"))`],
    ["function named like an instrumenter export", `(func (export "__cohort_boot"))`],
    ["global", `(global (export "__cohort_g") i32 (i32.const 0))`],
    ["memory", `(memory (export "__cohort_mem") 1)`],
  ])("an export with a reserved name (%s)", (_, decl) => {
    const name = /export "([^"]+)"/.exec(decl)![1];
    expectRefused(wasm(`(module ${decl})`), /reserved export name/, `export "${name}"`);
  });

  it.each([
    ["externref", "(ref.null extern)"],
    ["funcref", "(ref.null func)"],
  ])("a mutable global of reference type (%s)", (type, init) => {
    const bytes = wasm(`(module (global $r (mut ${type}) ${init}) (func (export "f")))`);
    expect(validInNode(bytes)).toBe(true);
    expectRefused(bytes, /mutable global of reference type/, "global r");
  });

  it("garbage, empty and truncated bytes are InvalidModuleError", () => {
    expect(invalid(new Uint8Array(0)).message).toMatch(/not a valid WebAssembly module/);
    invalid(new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8]));
    invalid(new Uint8Array([0x00, 0x61, 0x73, 0x6d])); // magic only
    invalid(new Uint8Array([0x00, 0x61, 0x73, 0x6d, 2, 0, 0, 0])); // wrong version
    invalid(barrierBytes.subarray(0, barrierBytes.length - 1));
    invalid(barrierBytes.subarray(0, 20));
  });

  it("random truncations and byte flips give a result or a typed error, never anything else", () => {
    // Without a name section: a malformed name section has its own test (below).
    const small = wasmNoNames(`(module (import "cohort" "log" (func $log (param i32 i32) (result i32)))
      (memory 1 4) (global $g (mut i64) (i64.const 5))
      (data (i32.const 10) "hi") (data $p "passive")
      (func $w (export "w") (param i32) (result i32)
        (i32.store offset=3 (local.get 0) (i32.const 7))
        (memory.fill (local.get 0) (i32.const 1) (i32.const 9))
        (memory.init $p (local.get 0) (i32.const 0) (i32.const 2))
        (global.set $g (i64.extend_i32_u (memory.grow (i32.const 1))))
        (call $log (local.get 0) (i32.const 4))))`);
    fc.assert(
      fc.property(
        fc.oneof(
          fc.nat({ max: small.length - 1 }).map((n) => small.slice(0, n)),
          fc.tuple(fc.nat({ max: small.length - 1 }), fc.integer({ min: 1, max: 255 })).map(([i, x]) => {
            const b = small.slice();
            b[i] ^= x;
            return b;
          }),
        ),
        (bytes) => {
          const error = caught(() => instrument(bytes));
          if (error === undefined) return;
          expect(error instanceof InvalidModuleError || error instanceof UnsupportedModuleError, `untyped error: ${String(error)}`).toBe(true);
        },
      ),
      { numRuns: 300 },
    );
  });

  // Regression: a malformed name section (which V8 tolerates) gives a result or an InvalidModuleError,
  // never Binaryen's raw exception object. Found by the byte-flip fuzz above (name subsection id 1 -> 0).
  it("a module with a malformed name section gets a result or a typed error", () => {
    const bytes = wasm(`(module (func $w (export "w")))`);
    // custom section "name" -> first subsection: id 1 (function names) becomes id 0 (module name) of the wrong shape
    const at = Buffer.from(bytes).indexOf(Buffer.from("\x04name", "latin1")) + 5;
    expect(bytes[at]).toBe(1);
    const bad = bytes.slice();
    bad[at] = 0;
    expect(validInNode(bad)).toBe(true);
    const error = caught(() => instrument(bad));
    if (error !== undefined) expect(error).toBeInstanceOf(InvalidModuleError);
  });

  // Regression: valid stack-polymorphic dead code (`unreachable i32.const 7 i32.store`) is accepted:
  // dead code is removed before rewriting, so no rewritten node is left ill-typed.
  it.each([
    ["unreachable i32.const 7 i32.store", [0x00, 0x41, 7, 0x36, 2, 0]],
    ["unreachable memory.grow drop", [0x00, 0x40, 0, 0x1a]],
  ])("valid dead code after unreachable is accepted: %s", (_, code) => {
    // Hand-assembled: binaryen's own writer would drop the dead code. (type () -> ()), one function "f", memory 1.
    const body = [0x00, ...code, 0x0b];
    const bytes = new Uint8Array([
      ...[0x00, 0x61, 0x73, 0x6d, 1, 0, 0, 0],
      ...[1, 4, 1, 0x60, 0, 0],
      ...[3, 2, 1, 0],
      ...[5, 3, 1, 0, 1],
      ...[7, 5, 1, 1, 0x66, 0, 0],
      ...[10, body.length + 2, 1, body.length, ...body],
    ]);
    expect(validInNode(bytes)).toBe(true);
    expect(validInNode(instrument(bytes).wasm)).toBe(true);
  });

  // Regression: a guest whose name section uses the instrumenter's internal names (__cohort_barrier,
  // __cohort_boot, __cohort_dropped_N, ...) is still instrumented: internal names are made unique.
  it("internal names used by a guest's name section do not break instrumentation", () => {
    for (const decl of [
      `(func $__cohort_barrier (export "f") (i32.store (i32.const 0) (i32.const 1)))`,
      `(func $__cohort_bulk_dest (export "f") (memory.fill (i32.const 0) (i32.const 0) (i32.const 1)))`,
      `(func $__cohort_boot (export "f"))`,
      `(global $__cohort_dropped_0 (mut i32) (i32.const 0)) (data $d "x") (func (export "f") (data.drop $d))`,
    ]) {
      const error = caught(() => instrument(wasm(`(module (memory 1) ${decl})`)));
      if (error !== undefined) expect(error, decl).toBeInstanceOf(UnsupportedModuleError);
    }
  });
});

// ---------------------------------------------------------------------------
// 2. Barrier correctness

describe("write barrier marks exactly the pages written", () => {
  it("boot marks the pages of active data segments (one straddles a 4 KiB boundary)", async () => {
    const vm = VmCore.boot(await guestOf(barrierBytes), options());
    expect(capturePages(vm)).toEqual(pagesOf(ACTIVE_SEGMENT_AT, "active segment".length));
    expect(pagesOf(ACTIVE_SEGMENT_AT, "active segment".length)).toHaveLength(2);
  });

  it("each store width: inside one page marks that page; straddling a boundary marks both", async () => {
    const vm = await bootVm(barrierBytes);
    for (const [kind, store] of STORES.entries()) {
      for (const boundary of [PAGE_BYTES, 7 * PAGE_BYTES, 31 * PAGE_BYTES]) {
        const inside = boundary - store.width; // last bytes of the page before the boundary
        vm.invoke("store", [inside, kind, 0x1122334455667788n]);
        expect(capturePages(vm), `${store.name} at ${inside}`).toEqual(pagesOf(inside, store.width));
        expect(pagesOf(inside, store.width)).toHaveLength(1);
        vm.invoke("store", [boundary, kind, 0x1122334455667788n]);
        expect(capturePages(vm), `${store.name} at ${boundary}`).toEqual(pagesOf(boundary, store.width));
        if (store.width > 1) {
          const straddle = boundary - 1;
          vm.invoke("store", [straddle, kind, 0x1122334455667788n]);
          const pages = capturePages(vm);
          expect(pages, `${store.name} at ${straddle}`).toEqual(pagesOf(straddle, store.width));
          expect(pages).toHaveLength(2);
        }
        // offset immediate folded into the address
        vm.invoke("store_off", [boundary - 4093 - 1, kind, 1n]);
        expect(capturePages(vm), `${store.name} offset=4093`).toEqual(pagesOf(boundary - 1, store.width));
      }
    }
  });

  it("a straddling store marks the page not yet dirty, whichever of the two it is", async () => {
    const vm = await bootVm(barrierBytes);
    for (const [kind, store] of STORES.entries()) {
      if (store.width === 1) continue;
      const boundary = 12 * PAGE_BYTES;
      for (const [dirtyFirst, fn] of [[boundary - 64, "store"], [boundary + 64, "store"], [boundary - 64, "multi"], [boundary + 64, "multi"]] as const) {
        if (fn === "store") {
          vm.invoke("store", [dirtyFirst, 0, 1n]); // another call: the page is dirty, no cache knows it
          vm.invoke("store", [boundary - 1, kind, 2n]);
        } else {
          vm.invoke("multi", [dirtyFirst, 0, boundary - 1, kind, 0, -1, 0, -1, 0, -1, 0, -1, 3n]); // another site, same activation
        }
        expect(capturePages(vm), `${store.name} across ${boundary} after writing ${dirtyFirst} (${fn})`).toEqual(pagesOf(boundary - 1, store.width));
      }
    }
  });

  it("loads mark nothing", async () => {
    const vm = await bootVm(barrierBytes);
    for (const [kind] of LOADS.entries()) {
      for (const addr of [0, PAGE_BYTES - 3, 5 * PAGE_BYTES + 100, GUEST_PAGES0 * WASM_PAGE_BYTES - 16]) {
        vm.invoke("load", [addr, kind]);
        vm.invoke("load_off", [addr > 4093 ? addr - 4093 : addr, kind]);
      }
    }
    expect(vm.dirtyPages).toBe(0);
    expect(capturePages(vm)).toEqual([]);
  });

  it("memory.fill / memory.copy / memory.init mark exactly the destination pages", async () => {
    const vm = await bootVm(barrierBytes);
    const cases: [string, number[], number, number][] = [
      // [fn, args, dest, len]
      ["fill", [PAGE_BYTES - 1, 0xab, 2], PAGE_BYTES - 1, 2],
      ["fill", [3 * PAGE_BYTES, 0xab, PAGE_BYTES], 3 * PAGE_BYTES, PAGE_BYTES],
      ["fill", [3 * PAGE_BYTES + 1, 0xab, PAGE_BYTES], 3 * PAGE_BYTES + 1, PAGE_BYTES],
      ["fill", [100, 1, 5 * PAGE_BYTES + 7], 100, 5 * PAGE_BYTES + 7],
      ["fill", [17, 1, 0], 17, 0],
      ["fill", [GUEST_PAGES0 * WASM_PAGE_BYTES, 1, 0], 0, 0], // zero bytes at the very end: no trap, no page
      ["copy", [9 * PAGE_BYTES - 10, 20 * PAGE_BYTES, 3 * PAGE_BYTES], 9 * PAGE_BYTES - 10, 3 * PAGE_BYTES],
      ["copy", [20 * PAGE_BYTES + 5, 20 * PAGE_BYTES, 2 * PAGE_BYTES], 20 * PAGE_BYTES + 5, 2 * PAGE_BYTES], // overlapping
      ["copy", [5, 6, 0], 5, 0],
      ["init", [2 * PAGE_BYTES - 1, 0, INIT_SEGMENT_BYTES], 2 * PAGE_BYTES - 1, INIT_SEGMENT_BYTES],
      ["init", [30 * PAGE_BYTES + 4000, 10, 200], 30 * PAGE_BYTES + 4000, 200],
      ["init", [77, 0, 0], 77, 0],
    ];
    for (const [fn, args, dest, len] of cases) {
      vm.invoke(fn, args);
      expect(capturePages(vm), `${fn}(${args.join(", ")})`).toEqual(pagesOf(dest, len));
    }
  });

  it("a store whose value grows memory marks its page, which lay beyond the memory when its address was computed", async () => {
    const bytes = wasm(`(module (memory 1 8)
      (func $grow (drop (memory.grow (i32.const 1))))
      (func (export "direct") (param $a i32) (i32.store (local.get $a) (block (result i32) (drop (memory.grow (i32.const 1))) (i32.const 7))))
      (func (export "via_call") (param $a i32) (i64.store align=1 (local.get $a) (block (result i64) (call $grow) (i64.const 7))))
      (func (export "lane") (param $a i32) (v128.store32_lane 1 (local.get $a) (block (result v128) (drop (memory.grow (i32.const 1))) (i32x4.splat (i32.const 7))))))`);
    for (const [fn, addr, width] of [["direct", WASM_PAGE_BYTES, 4], ["via_call", WASM_PAGE_BYTES - 4, 8], ["lane", WASM_PAGE_BYTES + 5 * PAGE_BYTES, 4]] as const) {
      const vm = await bootVm(bytes);
      vm.invoke(fn, [addr]);
      expect(capturePages(vm), `${fn}(${addr})`).toEqual(pagesOf(addr, width));
    }
  });

  const storeArb = (guestBytes: number) =>
    fc.integer({ min: 0, max: STORES.length - 1 }).chain((kind) =>
      fc
        .oneof(
          fc.integer({ min: 0, max: guestBytes - STORES[kind].width }),
          // near a 4 KiB boundary, anywhere or among few pages (so that stores meet pages already dirty)
          fc.tuple(fc.integer({ min: 1, max: guestBytes / PAGE_BYTES - 1 }), fc.integer({ min: -16, max: 15 })).map(([p, d]) => p * PAGE_BYTES + d),
          fc.tuple(fc.integer({ min: 1, max: 3 }), fc.integer({ min: -16, max: 15 })).map(([p, d]) => p * PAGE_BYTES + d),
        )
        .map((addr) => ({ kind, addr })),
    );

  it("property: random stores (one call each, and several in one activation) dirty exactly their pages", async () => {
    const vm = await bootVm(barrierBytes);
    const guestBytes = GUEST_PAGES0 * WASM_PAGE_BYTES;
    fc.assert(
      fc.property(fc.array(storeArb(guestBytes), { minLength: 1, maxLength: MULTI }), fc.boolean(), (stores, oneActivation) => {
        if (oneActivation) {
          const args: number[] = [];
          for (let i = 0; i < MULTI; i++) args.push(stores[i]?.addr ?? 0, stores[i]?.kind ?? -1);
          vm.invoke("multi", [...args, 0x0807060504030201n]);
        } else {
          for (const s of stores) vm.invoke("store", [s.addr, s.kind, 0x0807060504030201n]);
        }
        const expected = sorted(stores.flatMap((s) => pagesOf(s.addr, STORES[s.kind].width)));
        expect(capturePages(vm)).toEqual(expected);
      }),
      { numRuns: 300 },
    );
  });

  it("property: a loop of strided stores in one activation dirties exactly their pages", async () => {
    const vm = await bootVm(barrierBytes);
    const guestBytes = GUEST_PAGES0 * WASM_PAGE_BYTES;
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: STORES.length - 1 }),
        fc.integer({ min: 0, max: guestBytes - 1 }),
        fc.oneof(fc.integer({ min: -5000, max: 5000 }), fc.constantFrom(PAGE_BYTES, -PAGE_BYTES, PAGE_BYTES - 1, PAGE_BYTES + 1, 1, -1, 0)),
        fc.integer({ min: 0, max: 64 }),
        (kind, start, stride, count) => {
          const width = STORES[kind].width;
          const addrs: number[] = [];
          for (let i = 0; i < count; i++) addrs.push(start + i * stride);
          const n = addrs.findIndex((a) => a < 0 || a + width > guestBytes);
          const inBounds = n === -1 ? addrs : addrs.slice(0, n);
          if (inBounds.length !== addrs.length) return; // would trap; containment is tested elsewhere
          vm.invoke("sweep", [start, stride, count, kind, 1n]);
          expect(capturePages(vm)).toEqual(sorted(addrs.flatMap((a) => pagesOf(a, width))));
        },
      ),
      { numRuns: 300 },
    );
  });

  it("property: random bulk writes dirty exactly the destination pages", async () => {
    const vm = await bootVm(barrierBytes);
    const guestBytes = GUEST_PAGES0 * WASM_PAGE_BYTES;
    const range = fc.integer({ min: 0, max: guestBytes }).chain((dest) => fc.tuple(fc.constant(dest), fc.integer({ min: 0, max: Math.min(guestBytes - dest, 6 * PAGE_BYTES) })));
    fc.assert(
      fc.property(
        fc.oneof(
          range.map(([d, n]) => ({ fn: "fill", args: [d, 0x5a, n], d, n })),
          fc.tuple(range, fc.integer({ min: 0, max: guestBytes })).map(([[d, n], s]) => {
            const len = Math.min(n, guestBytes - s);
            return { fn: "copy", args: [d, s, len], d, n: len };
          }),
          range.map(([d, n]) => {
            const len = Math.min(n, INIT_SEGMENT_BYTES);
            return { fn: "init", args: [d, 0, len], d, n: len };
          }),
        ),
        ({ fn, args, d, n }) => {
          vm.invoke(fn, args);
          expect(capturePages(vm)).toEqual(pagesOf(d, n));
        },
      ),
      { numRuns: 300 },
    );
  });
});

// ---------------------------------------------------------------------------
// 3. Containment

describe("a misbehaving guest harms nothing", () => {
  /**
   * Runs `fn(args)`, which must trap. Checks that the hypervisor region is unchanged (except for
   * dirty-map entries of existing guest pages, which the barrier may set before a store traps), that
   * the guest memory is unchanged (a trapping access writes nothing), and that a rollback restores
   * everything exactly.
   */
  function expectContainedTrap(vm: VmCore, fn: string, args: (number | bigint)[]): void {
    const hvBefore = vm.bytes().slice(0, BASE_BYTES);
    const guestBefore = guestView(vm).slice();
    const pagesNow = vm.bytes().length / PAGE_BYTES;
    const outcome = runVm(vm, fn, args);
    expect(outcome.trapped, `${fn}(${args.join(", ")}) must trap`).toBe(true);
    expect(vm.crashed).toMatch(new RegExp(`^${fn}: `));
    expect(() => vm.invoke("size", [])).toThrow(VmCrashedError);
    const hvAfter = vm.bytes().subarray(0, BASE_BYTES);
    for (let i = 0; i < BASE_BYTES; i++) {
      if (hvAfter[i] === hvBefore[i]) continue;
      const legitMark = i >= FIRST_GUEST_PAGE && i < pagesNow && hvBefore[i] === 0 && hvAfter[i] === 1;
      expect(legitMark, `${fn}(${args.join(", ")}) changed hypervisor byte 0x${i.toString(16)}: ${hvBefore[i]} -> ${hvAfter[i]}`).toBe(true);
    }
    expectSameBytes(guestView(vm), guestBefore, `${fn}(${args.join(", ")}): guest memory after the trap`);
    vm.rollback(vm.committedEpoch);
    expect(vm.crashed).toBeNull();
    expectSameBytes(vm.bytes().subarray(0, BASE_BYTES), hvBefore, "hypervisor region after rollback");
    expectSameBytes(guestView(vm), guestBefore, "guest memory after rollback");
  }

  const guestEnd = GUEST_PAGES0 * WASM_PAGE_BYTES;

  it("stores whose address + offset would wrap around 2^32 trap and touch nothing", async () => {
    const vm = await bootVm(barrierBytes);
    vm.invoke("fill", [0, 0x77, guestEnd]); // make guest memory non-zero so writes of zero would show
    captureDelta(vm);
    for (const [kind] of STORES.entries()) {
      expectContainedTrap(vm, "store_traps", [0x100, kind, -1n]); // offset=0xFFFFFFF0: shifted offset overflows u32
      expectContainedTrap(vm, "store_traps", [0, kind, -1n]);
      expectContainedTrap(vm, "store_wraps", [0x20000, kind, -1n]); // offset + BASE fits, address + offset wraps
      expectContainedTrap(vm, "store_wraps", [0x120000 - 1, kind, -1n]);
      for (const addr of [0xffffffff, 0xfffffff8, 0xffff0000, 0xffef0000, -BASE_BYTES, -BASE_BYTES + 8, -1]) {
        expectContainedTrap(vm, "store", [addr | 0, kind, -1n]);
      }
    }
  });

  it("loads whose address would wrap into the hypervisor region trap", async () => {
    const vm = await bootVm(barrierBytes);
    for (const [kind] of LOADS.entries()) {
      for (const addr of [0xffffffff, 0xffef0000, 0xfff00000, -BASE_BYTES + 4096]) expectContainedTrap(vm, "load", [addr | 0, kind]);
    }
    expectContainedTrap(vm, "load_wraps", [0x20000]);
  });

  it("memory.fill / copy / init with wrapping operands trap and touch nothing", async () => {
    const vm = await bootVm(barrierBytes);
    vm.invoke("fill", [0, 0x33, guestEnd]);
    captureDelta(vm);
    const wrap = -BASE_BYTES; // dest + BASE_BYTES == 0 (mod 2^32): the dirty map
    const cases: [string, number[]][] = [
      ["fill", [wrap, 0xee, 16]],
      ["fill", [wrap + PAGE_BYTES, 0xee, 4 * PAGE_BYTES]],
      ["fill", [-16, 0xee, 32]],
      ["fill", [-1, 0xee, 1]],
      ["fill", [0, 0xee, -1]], // huge length
      ["fill", [wrap, 0xee, 0]], // zero length, out of bounds: traps like the original
      ["copy", [wrap, 0, 64]],
      ["copy", [-16, 0, 32]],
      ["copy", [0, wrap, 64]], // source in the dirty map: would leak it into the guest
      ["copy", [0, wrap + 0x100000, 64]], // source in the globals save area
      ["copy", [0, -8, 16]],
      ["copy", [100, 0, -1]],
      ["init", [wrap, 0, 16]],
      ["init", [-8, 0, 16]],
      ["init", [wrap + 0x100000, 0, 16]], // dest in the globals save area
    ];
    for (const [fn, args] of cases) expectContainedTrap(vm, fn, args);
  });

  // Regression: an out-of-bounds store at guest address >= 2 GiB (page >= 0x80000) once recorded a
  // phantom dirty page through a signed shift, and the next rollback threw.
  it("an out-of-bounds store at 2 GiB and above traps without corrupting dirty tracking", async () => {
    const vm = await bootVm(barrierBytes);
    expectContainedTrap(vm, "store", [0x80000000 | 0, 2, 1n]);
  });

  it("out-of-bounds accesses just past the guest's end trap exactly as uninstrumented", async () => {
    const vm = await bootVm(barrierBytes);
    const plain = plainInstance(barrierBytes);
    for (const pages of [0, 1]) {
      if (pages) {
        expect(runVm(vm, "grow", [pages])).toEqual(runPlain(plain, "grow", [pages]));
        captureDelta(vm);
      }
      const end = (GUEST_PAGES0 + pages) * WASM_PAGE_BYTES;
      const check = (fn: string, args: (number | bigint)[]) => {
        const a = runVm(vm, fn, args);
        const b = runPlain(plain, fn, args);
        expect(a, `${fn}(${args.join(", ")})`).toEqual(b);
        if (a.trapped) vm.rollback(vm.committedEpoch);
        else captureDelta(vm);
      };
      for (let addr = end - 20; addr <= end + 4; addr++) {
        for (const [kind] of STORES.entries()) {
          check("store", [addr, kind, 5n]);
          check("store_off", [addr - 4093, kind, 5n]);
        }
        for (const [kind] of LOADS.entries()) {
          check("load", [addr, kind]);
          check("load_off", [addr - 4093, kind]);
        }
        for (const len of [0, 1, 2, 20]) {
          check("fill", [addr, 9, len]);
          check("copy", [addr, 0, len]);
          check("copy", [0, addr, len]);
          check("init", [addr, 0, len]);
        }
      }
      expectSameBytes(guestView(vm), plain.memory(), "memory after the sweep");
    }
  });

  it("memory.size / memory.grow report the guest's view, same as uninstrumented", async () => {
    const vm = await bootVm(barrierBytes);
    const plain = plainInstance(barrierBytes);
    for (const delta of [0, 1, 0, 2, 3, 1, 0, 5, 1, -1, 0x10000, 0]) {
      const size = runVm(vm, "size", []);
      expect(size).toEqual(runPlain(plain, "size", []));
      const grown = runVm(vm, "grow", [delta]);
      expect(grown, `grow(${delta})`).toEqual(runPlain(plain, "grow", [delta]));
      captureDelta(vm);
    }
    expect(vm.invoke("size", [])).toBe(8); // the declared maximum
    expect(vm.memoryBytes).toBe(BASE_BYTES + 8 * WASM_PAGE_BYTES);
  });

  it("a module with zero initial pages and no memory", async () => {
    const bytes = wasm(`(module (memory $m 0 2) (export "mem" (memory $m))
      (func (export "size") (result i32) (memory.size))
      (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0)))
      (func (export "poke") (param i32) (i32.store8 (local.get 0) (i32.const 1))))`);
    const vm = await bootVm(bytes);
    const plain = plainInstance(bytes);
    for (const [fn, args] of [["size", []], ["poke", [0]], ["grow", [1]], ["size", []], ["poke", [65535]], ["poke", [65536]], ["grow", [2]], ["grow", [1]]] as [string, number[]][]) {
      const a = runVm(vm, fn, args);
      expect(a, `${fn}(${args.join(", ")})`).toEqual(runPlain(plain, fn, args));
      if (a.trapped) vm.rollback(vm.committedEpoch);
      else captureDelta(vm);
    }
    expectSameBytes(guestView(vm), plain.memory(), "memory");
    const none = instrument(wasm(`(module (func (export "f")))`));
    expect(none.info.guest_initial_pages).toBe(0);
    expect(none.info.guest_maximum_pages).toBe(0);
  });
});

// ---------------------------------------------------------------------------
// 4. Differential: instrumented VM vs the plain module

describe("differential: instrumented VM vs uninstrumented module", () => {
  const MAX_GUEST = 8 * WASM_PAGE_BYTES;
  /**
   * Addresses that matter: anywhere, near page and memory ends, and wild ones (any u32).
   */
  const addr = fc.oneof(
    { weight: 4, arbitrary: fc.integer({ min: 0, max: 3 * WASM_PAGE_BYTES }) },
    { weight: 3, arbitrary: fc.tuple(fc.integer({ min: 0, max: MAX_GUEST / PAGE_BYTES }), fc.integer({ min: -20, max: 20 })).map(([p, d]) => p * PAGE_BYTES + d) },
    { weight: 2, arbitrary: fc.tuple(fc.integer({ min: 1, max: 3 }), fc.integer({ min: -20, max: 20 })).map(([p, d]) => p * PAGE_BYTES + d) },
    { weight: 2, arbitrary: fc.integer({ min: 0, max: 0xffffffff }).map((x) => x | 0) },
  );
  const len = fc.oneof(fc.integer({ min: 0, max: 64 }), fc.integer({ min: 0, max: 5 * PAGE_BYTES }), fc.constant(-1));
  const value = fc.bigInt({ min: -(1n << 63n), max: (1n << 63n) - 1n });
  const op = fc.oneof(
    { weight: 25, arbitrary: fc.tuple(fc.constantFrom("store", "store_off"), addr, fc.nat(STORES.length - 1), value).map(([fn, a, k, v]) => ({ fn, args: [a, k, v] as (number | bigint)[] })) },
    { weight: 5, arbitrary: fc.tuple(fc.constantFrom("store_traps", "store_wraps"), fc.integer({ min: 0x10000, max: 0x200000 }), fc.nat(STORES.length - 1)).map(([fn, a, k]) => ({ fn, args: [a, k, 1n] as (number | bigint)[] })) },
    { weight: 10, arbitrary: fc.tuple(fc.constantFrom("load", "load_off"), addr, fc.nat(LOADS.length - 1)).map(([fn, a, k]) => ({ fn, args: [a, k] as (number | bigint)[] })) },
    { weight: 10, arbitrary: fc.tuple(addr, fc.integer({ min: 0, max: 255 }), len).map(([d, v, n]) => ({ fn: "fill", args: [d, v, n] as (number | bigint)[] })) },
    { weight: 10, arbitrary: fc.tuple(addr, addr, len).map(([d, s, n]) => ({ fn: "copy", args: [d, s, n] as (number | bigint)[] })) },
    { weight: 5, arbitrary: fc.tuple(addr, fc.integer({ min: 0, max: INIT_SEGMENT_BYTES + 5 }), len).map(([d, o, n]) => ({ fn: "init", args: [d, o, n] as (number | bigint)[] })) },
    {
      weight: 5,
      arbitrary: fc
        .tuple(addr, fc.integer({ min: -5000, max: 5000 }), fc.integer({ min: 0, max: 40 }), fc.nat(STORES.length - 1), value)
        .map(([a, s, c, k, v]) => ({ fn: "sweep", args: [a, s, c, k, v] as (number | bigint)[] })),
    },
    { weight: 5, arbitrary: fc.integer({ min: 0, max: 3 }).map((n) => ({ fn: "grow", args: [n] as (number | bigint)[] })) },
    { weight: 5, arbitrary: fc.constant({ fn: "size", args: [] as (number | bigint)[] }) },
    { weight: 1, arbitrary: fc.constant({ fn: "drop", args: [] as (number | bigint)[] }) },
  );

  it("property: same results, same traps, same memory; deltas replay to the same memory", async () => {
    const guest = await guestOf(barrierBytes);
    await fc.assert(
      fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 25 }), async (ops) => {
        const vm = VmCore.boot(guest, options());
        const plain = plainInstance(barrierBytes);
        // A replica of the VM's memory kept only from captured deltas: proves no write escapes the barrier.
        const first = captureDelta(vm);
        let replica = new Uint8Array(first.memory_pages * WASM_PAGE_BYTES);
        const apply = (d: { pages: number[]; data: Uint8Array; memory_pages: number }) => {
          if (d.memory_pages * WASM_PAGE_BYTES !== replica.length) {
            const bigger = new Uint8Array(d.memory_pages * WASM_PAGE_BYTES);
            bigger.set(replica.subarray(0, bigger.length));
            replica = bigger;
          }
          d.pages.forEach((p, i) => replica.set(d.data.subarray(i * PAGE_BYTES, (i + 1) * PAGE_BYTES), p * PAGE_BYTES));
        };
        apply(first);
        expectSameBytes(guestView(vm), plain.memory(), "after boot");
        for (const [i, { fn, args }] of ops.entries()) {
          const what = `op ${i}: ${fn}(${args.join(", ")})`;
          const plainBefore = plain.memory().slice();
          const a = runVm(vm, fn, args);
          const b = runPlain(plain, fn, args);
          expect(a, what).toEqual(b);
          expectSameBytes(guestView(vm), plain.memory(), what);
          if (a.trapped) {
            // A trapping sweep may have written some stores first (identically on both sides); the
            // VM rolls back to the last cut, the plain module gets its memory from before the call.
            plain.memory().set(plainBefore);
            vm.rollback(vm.committedEpoch);
            expectSameBytes(guestView(vm), plain.memory(), `${what}, after rollback`);
          } else {
            const d = captureDelta(vm);
            for (const p of d.pages) expect(p, what).toBeGreaterThanOrEqual(FIRST_GUEST_PAGE);
            apply(d);
            expectSameBytes(replica.subarray(BASE_BYTES), plain.memory(), `${what}: replica from deltas`);
          }
        }
      }),
      { numRuns: 150 },
    );
  });
});

// ---------------------------------------------------------------------------
// 5. Valid modules that are easy to break

describe("exception handlers whose caught value feeds a rewritten instruction", () => {
  const catchPop = wasm(readFileSync(new URL("./fixtures/wat/catch-pop.wat", import.meta.url), "utf8"));

  it("instrument into a valid module that behaves as the plain one", async () => {
    expect(validInNode(catchPop)).toBe(true);
    const out = instrument(catchPop);
    expect(validInNode(out.wasm)).toBe(true);
    const vm = await bootVm(catchPop);
    const plain = plainInstance(catchPop);
    const calls: [string, (number | bigint)[]][] = [
      ["store", [100]],
      ["store", [4094]], // straddles a 4 KiB page boundary
      ["grow", [1]],
      ["grow_dropped", [1]],
      ["fill", [5000]],
      ["lane", [9000]],
      ["pair", [12000, 5]],
      ["nested", [20000]],
      ["store", [0x7fffffff]], // out of bounds: both trap
    ];
    for (const [name, args] of calls) {
      const what = `${name}(${args.join(", ")})`;
      expect(runVm(vm, name, args), what).toEqual(runPlain(plain, name, args));
      expectSameBytes(guestView(vm), plain.memory(), what);
      if (vm.crashed) vm.rollback(vm.committedEpoch);
      else vm.commit(vm.capture().epoch);
    }
    // The writes went through the barrier: a capture after one handler's store carries its page.
    vm.invoke("store", [3 * PAGE_BYTES + 8]);
    expect(capturePages(vm)).toEqual([(BASE_BYTES >> PAGE_SHIFT) + 3]);
  });
});

describe("a memory that is not exported, whatever its name", () => {
  const cases: [string, string][] = [
    ["a name with a space", `(module (memory $"my mem" 1 2) (func (export "poke") (param i32 i32) (i32.store (local.get 0) (local.get 1))) (func (export "peek") (param i32) (result i32) (i32.load (local.get 0))))`],
    [
      "an import whose name looks like a memory declaration in text",
      `(module (import "cohort" "rank" (func $"x (memory $y" (result i32))) (memory $m 1 2)
        (func (export "poke") (param i32 i32) (i32.store (local.get 0) (i32.add (local.get 1) (call $"x (memory $y"))))
        (func (export "peek") (param i32) (result i32) (i32.load (local.get 0))))`,
    ],
    ["a name like Binaryen's own", `(module (memory $0 1 2) (export "0" (func $p)) (func $p (export "poke") (param i32 i32) (i32.store (local.get 0) (local.get 1))) (func (export "peek") (param i32) (result i32) (i32.load (local.get 0))))`],
  ];
  it.each(cases)("%s: instruments, and stores reach the memory through the barrier", async (_, text) => {
    const bytes = wasm(text);
    const out = instrument(bytes);
    expect(validInNode(out.wasm)).toBe(true);
    expect(out.info.exports).not.toContain("__cohort_memory"); // the export that names the memory is gone again
    const vm = await bootVm(bytes);
    vm.invoke("poke", [5000, 42]);
    expect(vm.invoke("peek", [5000])).toBe(42);
    expect(capturePages(vm)).toEqual([(BASE_BYTES + 5000) >> PAGE_SHIFT]);
  });

  it("with an export section of other exports, without one, and with a data segment: the same module as when exported", () => {
    const body = `(data (i32.const 16) "hello") (func $f (i32.store (i32.const 0) (i32.const 1)))`;
    const hidden = instrument(wasm(`(module (memory $"m m" 1 2) ${body})`));
    const shown = instrument(wasm(`(module (memory $"m m" 1 2) (export "mem" (memory $"m m")) ${body})`));
    expect(validInNode(hidden.wasm)).toBe(true);
    expect(Buffer.from(hidden.wasm).equals(Buffer.from(shown.wasm))).toBe(true);
  });

  it("a guest export named like the probe is refused by name", () => {
    expectRefused(wasm(`(module (memory 1) (func (export "__cohort_memory")))`), /reserved export name/, `export "__cohort_memory"`);
  });
});

describe("errors are typed, with a message", () => {
  it("describeThrown gives a message for what Binaryen and wasm throw (bare objects, exceptions without one)", () => {
    class SA {
      gC = 5600776;
    }
    expect(describeThrown(new SA())).toBe("SA thrown (no message)");
    expect(describeThrown({ message: "bad name" })).toBe("bad name");
    expect(describeThrown(new RangeError("x"))).toBe("x");
    expect(describeThrown(7)).toBe("7");
    // Node 20 has WebAssembly.Tag and Exception; TypeScript's DOM-less lib does not declare them.
    const wa = WebAssembly as unknown as { Tag: new (t: { parameters: string[] }) => object; Exception: new (tag: object, values: unknown[]) => object };
    expect(describeThrown(new wa.Exception(new wa.Tag({ parameters: [] }), []))).toMatch(/uncaught wasm exception/);
  });

  it("InstrumenterError carries a stable code", () => {
    const error = new InstrumenterError("Binaryen failed");
    expect(error).toBeInstanceOf(Error);
    expect(error.code).toBe("InstrumenterFailed");
    expect(error.name).toBe("InstrumenterError");
  });
});

describe("deep nesting", () => {
  // Built as bytes: Binaryen's own text parser and writer recurse per level and would overflow first.
  const uleb = (v: number): number[] => {
    const out: number[] = [];
    do {
      const low = v & 0x7f;
      v >>>= 7;
      out.push(v ? low | 0x80 : low);
    } while (v);
    return out;
  };
  const section = (id: number, content: number[]) => [id, ...uleb(content.length), ...content];
  const STORE_7_AT_4096 = [0x41, 0x80, 0x20, 0x41, 0x07, 0x36, 0x02, 0x00]; // i32.store (i32.const 4096) (i32.const 7)
  /** One function "f" () -> () with `body`, memory 1 exported as "mem". */
  const moduleOf = (body: number[]) => {
    const code = [0x00, ...body, 0x0b];
    return new Uint8Array([
      ...[0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00],
      ...section(1, [1, 0x60, 0, 0]),
      ...section(3, [1, 0]),
      ...section(5, [1, 0, 1]),
      ...section(7, [2, 1, 0x66, 0x00, 0, 3, 0x6d, 0x65, 0x6d, 0x02, 0]),
      ...section(10, [1, ...uleb(code.length), ...code]),
    ]);
  };
  /** `depth` nested blocks (a compiled switch looks like this) around a store. */
  const nestedBlocks = (depth: number) => moduleOf([...Array(depth).fill([0x02, 0x40]).flat(), ...STORE_7_AT_4096, ...Array(depth).fill(0x0b)]);

  it("2,000 nested blocks instrument (no recursion in the walk) and run as the plain module", async () => {
    const bytes = nestedBlocks(2000);
    expect(validInNode(bytes)).toBe(true);
    expect(validInNode(instrument(bytes).wasm)).toBe(true);
    const vm = await bootVm(bytes);
    const plain = plainInstance(bytes);
    expect(runVm(vm, "f", [])).toEqual(runPlain(plain, "f", []));
    expectSameBytes(guestView(vm), plain.memory(), "after f");
    expect(plain.memory()[4096]).toBe(7);
    expect(capturePages(vm)).toEqual([(BASE_BYTES + 4096) >> PAGE_SHIFT]);
  });

  it(`past NESTING_MAX (${NESTING_MAX} levels) the function is refused by name, quickly`, () => {
    const started = performance.now();
    expectRefused(nestedBlocks(NESTING_MAX + 10), new RegExp(`nested deeper than ${NESTING_MAX} levels`), "function 0");
    expectRefused(nestedBlocks(20_000), new RegExp(`nested deeper than ${NESTING_MAX} levels`), "function 0");
    expect(performance.now() - started).toBeLessThan(10_000);
  });

  it("nesting Binaryen's writer cannot take below the limit (binary operators) instruments or is refused, never a stack overflow", () => {
    const depth = NESTING_MAX - 100;
    const sum = [0x41, 0x00, ...Array(depth).fill([0x41, 0x01]).flat(), ...Array(depth).fill(0x6a)]; // 0 + 1 + 1 + ... nested to the left
    const bytes = moduleOf([0x41, 0x00, ...sum, 0x36, 0x02, 0x00]);
    expect(validInNode(bytes)).toBe(true);
    const error = caught(() => instrument(bytes));
    if (error !== undefined) {
      expect(error).toBeInstanceOf(UnsupportedModuleError);
      expect((error as Error).message).toMatch(/nested/);
    }
  });
});

describe("crash messages say what the plain module says", () => {
  const bulk = wasm(`(module
    (memory (export "mem") 1 2)
    (data $seg "0123456789")
    (tag $e (param i32))
    (func (export "fill") (param i32 i32) (memory.fill (local.get 0) (i32.const 1) (local.get 1)))
    (func (export "copy") (param i32 i32 i32) (memory.copy (local.get 0) (local.get 1) (local.get 2)))
    (func (export "init") (param i32 i32 i32) (memory.init $seg (local.get 0) (local.get 1) (local.get 2)))
    (func (export "throws") (throw $e (i32.const 3))))`);

  const plainMessage = (name: string, args: number[]): string => {
    const error = caught(() => plainInstance(bulk).exports[name](...args));
    expect(error).toBeInstanceOf(WebAssembly.RuntimeError);
    return (error as Error).message;
  };

  it.each([
    ["fill", [65530, 100]], // destination past the end
    ["fill", [-1, 2]], // wrapping destination
    ["copy", [65530, 0, 100]], // destination past the end
    ["copy", [0, 65530, 100]], // source past the end
    ["init", [65533, 0, 5]], // destination past the end
    ["init", [0, 8, 5]], // past the end of the segment
  ] as [string, number[]][])("out-of-bounds %s(%s) crashes with the engine's bounds message, not \"unreachable\"", async (name, args) => {
    const expected = plainMessage(name, args);
    expect(expected).toMatch(/out of bounds/);
    const vm = VmCore.boot(await guestOf(bulk), options());
    const error = caught(() => vm.invoke(name, args));
    expect(error).toBeInstanceOf(VmCrashedError);
    expect((error as Error).message).toBe(`${name}: ${expected}`);
    expect(vm.crashed).toBe(`${name}: ${expected}`);
  });

  it("an exception escaping a guest call is named as such (not \"undefined\")", async () => {
    const vm = VmCore.boot(await guestOf(bulk), options());
    const error = caught(() => vm.invoke("throws", []));
    expect(error).toBeInstanceOf(VmCrashedError);
    expect((error as Error).message).toBe("throws: uncaught wasm exception (thrown by the guest, caught by no handler)");
  });
});
