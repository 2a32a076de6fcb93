/**
 * Random valid WebAssembly modules for differential fuzzing, from Binaryen's
 * translate-to-fuzz (`wasm-opt -ttf`): random bytes in, a valid module out.
 *
 * The `binaryen` npm package ships wasm-opt as an Emscripten program. Spawning
 * it costs ≈ 0.8 s a module (it compiles 11 MB of wasm each time), so the
 * script is evaluated once in this process with `noInitialRun` and its main()
 * is called once per module (≈ 20 ms). wasm-opt keeps no state between runs
 * that changes its output: the same bytes give the same module.
 *
 * The generated module imports Binaryen's own `fuzzing-support` functions.
 * prepareModule() replaces them with definitions (logging becomes a digest in
 * a mutable global, so what the module logs is compared like any other state)
 * and adds an export that reads every mutable global, so a plain instance and
 * an instrumented one can be compared from the guest's point of view.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import binaryen from "binaryen";
import { Rng } from "../../src/sim/rng.js";

const b = binaryen;

/**
 * What the generator may use. Everything V8 in Node 20 runs and the
 * instrumenter accepts, except:
 *  - reference types: Binaryen then writes bottom heap types (noexternref)
 *    that Node 20's V8 rejects without --experimental-wasm-gc;
 *  - exception handling: this Binaryen's fuzzer asserts reference types
 *    whenever exception handling is on (makeConst, fuzzing.cpp), and aborts.
 */
export const FUZZ_FEATURE_FLAGS = [
  "--mvp-features",
  "--enable-mutable-globals",
  "--enable-nontrapping-float-to-int",
  "--enable-simd",
  "--enable-bulk-memory",
  "--enable-bulk-memory-opt",
  "--enable-sign-ext",
  "--enable-multivalue",
  "--enable-tail-call",
];
const FEATURES =
  b.Features.MVP |
  b.Features.MutableGlobals |
  b.Features.NontrappingFPToInt |
  b.Features.SIMD128 |
  b.Features.BulkMemory |
  b.Features.BulkMemoryOpt |
  b.Features.SignExt |
  b.Features.Multivalue |
  b.Features.TailCall;

/** Deterministic 32-bit integers from one seed, on every machine (the simulator's generator). */
export function prng(seed: number): () => number {
  const rng = new Rng(seed);
  return () => Math.floor(rng.next() * 4294967296);
}

type CallMain = (args: string[]) => number;

/** wasm-opt -ttf, in process. One instance per test file; call close() when done. */
export class TranslateToFuzz {
  private callMain: CallMain;
  private readonly dir = mkdtempSync(join(tmpdir(), "cohort-ttf-"));

  private constructor(callMain: CallMain) {
    this.callMain = callMain;
  }

  static async load(): Promise<TranslateToFuzz> {
    return new TranslateToFuzz(await loadWasmOpt());
  }

  /**
   * The module wasm-opt makes of `size` random bytes drawn from `seed`, or the
   * reason it made none (an internal assertion of the generator aborts it;
   * the runtime is then loaded afresh, since an abort leaves it unusable).
   */
  async generate(seed: number, size: number): Promise<{ wasm: Uint8Array } | { error: string }> {
    const next = prng(seed);
    const input = new Uint8Array(size);
    for (let i = 0; i < size; i++) input[i] = next() & 0xff;
    const inPath = join(this.dir, "in.bin");
    const outPath = join(this.dir, "out.wasm");
    writeFileSync(inPath, input);
    rmSync(outPath, { force: true });
    const exitCode = process.exitCode;
    try {
      const status = this.callMain([inPath, "-ttf", "--quiet", ...FUZZ_FEATURE_FLAGS, "-o", outPath]);
      if (status !== 0) return { error: `wasm-opt exited with ${status}` };
      return { wasm: new Uint8Array(readFileSync(outPath)) };
    } catch (error) {
      this.callMain = await loadWasmOpt();
      return { error: `wasm-opt aborted: ${String((error as Error).message ?? error).slice(0, 200)}` };
    } finally {
      // Emscripten's exit() sets process.exitCode; the test process's own status is not wasm-opt's.
      process.exitCode = exitCode;
    }
  }

  close(): void {
    rmSync(this.dir, { recursive: true, force: true });
  }
}

async function loadWasmOpt(): Promise<CallMain> {
  const require = createRequire(import.meta.url);
  const path = join(dirname(require.resolve("binaryen")), "bin", "wasm-opt");
  const source = readFileSync(path, "utf8").replace(/^#!.*\n/, "");
  const Module: Record<string, unknown> = { noInitialRun: true, print: () => {}, printErr: () => {} };
  const ready = new Promise<void>((resolve, reject) => {
    Module.onRuntimeInitialized = resolve;
    Module.onAbort = (what: unknown) => reject(new Error(`wasm-opt failed to load: ${String(what)}`));
  });
  // The script is a CommonJS program whose main() is a local function: evaluate it with the
  // CommonJS bindings it expects and hand its callMain back out.
  const factory = new Function("require", "__dirname", "__filename", "module", "Module", `${source}\n;return (args) => callMain(args);`) as (
    ...args: unknown[]
  ) => CallMain;
  const callMain = factory(require, dirname(path), path, undefined, Module);
  await ready;
  return (args) => callMain([...args]);
}

export type ValueType = "i32" | "i64" | "f32" | "f64";

/** A function export the harness can call from JS (no v128 or reference types in its signature). */
export interface CallableExport {
  name: string;
  params: ValueType[];
}

export interface PreparedModule {
  /** What the instrumenter gets: the generated module with its imports defined and the globals reader added. */
  guest: Uint8Array;
  /** The same module with its memory exported as PLAIN_MEMORY_EXPORT (if it has a memory), for the plain instance. */
  plain: Uint8Array;
  callable: CallableExport[];
  /** Export skipped because JS cannot call it (v128 in its signature). */
  skipped: string[];
  /** Arguments of GLOBALS_EXPORT that exist: 0 .. global_reads - 1. */
  global_reads: number;
  /** `fuzzing-support.<name>` imports replaced by definitions. */
  mapped_imports: string[];
}

/** `(i32) -> i64`: the bits of mutable global slot i (a v128 global takes two slots, low and high lane). */
export const GLOBALS_EXPORT = "__fuzz_global";
export const PLAIN_MEMORY_EXPORT = "__fuzz_memory";
const LOG_DIGEST = "__fuzz_log_digest";

/**
 * Defines the generator's `fuzzing-support` imports and adds the globals
 * reader. Imports of any other module are left alone: the instrumenter
 * refuses them by name, and the fuzzer counts that.
 */
export function prepareModule(wasm: Uint8Array): PreparedModule {
  const m = b.readBinary(wasm);
  try {
    m.setFeatures(FEATURES);
    const mapped = defineFuzzingImports(m);
    const globalReads = addGlobalsReader(m);
    const { callable, skipped } = callableExports(m);
    if (!m.validate()) throw new Error("prepared module does not validate");
    const guest = m.emitBinary();
    let plain = guest;
    if (m.hasMemory() && !hasMemoryExport(m)) {
      // Binaryen names the one memory of a module without a name section "0".
      m.addMemoryExport("0", PLAIN_MEMORY_EXPORT);
      plain = m.emitBinary();
    }
    return { guest, plain, callable, skipped, global_reads: globalReads, mapped_imports: mapped };
  } finally {
    m.dispose();
  }
}

function hasMemoryExport(m: binaryen.Module): boolean {
  for (let i = 0; i < m.getNumExports(); i++) if (b.getExportInfo(m.getExportByIndex(i)).kind === b.ExternalMemory) return true;
  return false;
}

/** Name of the memory export of a prepared plain module. */
export function plainMemoryExport(module: WebAssembly.Module): string | undefined {
  return WebAssembly.Module.exports(module).find((e) => e.kind === "memory")?.name;
}

function defineFuzzingImports(m: binaryen.Module): string[] {
  const imports: binaryen.FunctionInfo[] = [];
  for (let i = 0; i < m.getNumFunctions(); i++) {
    const info = b.getFunctionInfo(m.getFunctionByIndex(i));
    if (info.module === "fuzzing-support") imports.push(info);
  }
  if (imports.length) m.addGlobal(LOG_DIGEST, b.i64, true, m.i64.const(0n));
  const mapped: string[] = [];
  for (const info of imports) {
    const params = b.expandType(info.params);
    const body = importBody(m, info.base ?? "", params, info.results);
    m.removeFunction(info.name);
    m.addFunction(info.name, info.params, info.results, [], body);
    mapped.push(info.base ?? "");
  }
  return mapped;
}

/**
 * log-*: fold the value's bits into the digest global (FNV-style), so logging
 * is observable state. call-export, call-export-catch and sleep re-enter the
 * JS harness in Binaryen's own runner; here they do nothing and return 0 (the
 * harness calls every export itself).
 */
function importBody(m: binaryen.Module, base: string, params: number[], results: number): number {
  const bits = (): number | null => {
    const v = (t: number) => m.local.get(0, t);
    switch (base) {
      case "log-i32":
        return m.i64.extend_u(v(b.i32));
      case "log-i64":
        return v(b.i64);
      case "log-f32":
        return m.i64.extend_u(m.i32.reinterpret(v(b.f32)));
      case "log-f64":
        return m.i64.reinterpret(v(b.f64));
      case "log-v128":
        return m.i64.xor(m.i64x2.extract_lane(v(b.v128), 0), m.i64.rotl(m.i64x2.extract_lane(v(b.v128), 1), m.i64.const(32n)));
      default:
        return null;
    }
  };
  const value = params.length === 1 ? bits() : null;
  if (value !== null && results === b.none) {
    const digest = m.i64.mul(m.i64.xor(m.global.get(LOG_DIGEST, b.i64), value), m.i64.const(0x100000001b3n));
    return m.global.set(LOG_DIGEST, digest);
  }
  if (results === b.none) return m.nop();
  return zero(m, results);
}

function zero(m: binaryen.Module, t: number): number {
  if (t === b.i32) return m.i32.const(0);
  if (t === b.i64) return m.i64.const(0n);
  if (t === b.f32) return m.f32.const(0);
  if (t === b.f64) return m.f64.const(0);
  if (t === b.v128) return m.v128.const([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
  return m.unreachable();
}

/** Adds GLOBALS_EXPORT(i) -> i64: the bit pattern of mutable global slot i (NaN payloads included). */
function addGlobalsReader(m: binaryen.Module): number {
  const reads: number[] = [];
  for (let i = 0; i < m.getNumGlobals(); i++) {
    const g = b.getGlobalInfo(m.getGlobalByIndex(i));
    if (!g.mutable) continue;
    const get = () => m.global.get(g.name, g.type);
    if (g.type === b.i32) reads.push(m.i64.extend_u(get()));
    else if (g.type === b.i64) reads.push(get());
    else if (g.type === b.f32) reads.push(m.i64.extend_u(m.i32.reinterpret(get())));
    else if (g.type === b.f64) reads.push(m.i64.reinterpret(get()));
    else if (g.type === b.v128) reads.push(m.i64x2.extract_lane(get(), 0), m.i64x2.extract_lane(get(), 1));
  }
  const body = m.block(null, [...reads.map((read, i) => m.if(m.i32.eq(m.local.get(0, b.i32), m.i32.const(i)), m.return(read))), m.unreachable()], b.unreachable);
  m.addFunction(GLOBALS_EXPORT, b.i32, b.i64, [], body);
  m.addFunctionExport(GLOBALS_EXPORT, GLOBALS_EXPORT);
  return reads.length;
}

function callableExports(m: binaryen.Module): { callable: CallableExport[]; skipped: string[] } {
  const names: Record<number, ValueType> = { [b.i32]: "i32", [b.i64]: "i64", [b.f32]: "f32", [b.f64]: "f64" };
  const callable: CallableExport[] = [];
  const skipped: string[] = [];
  for (let i = 0; i < m.getNumExports(); i++) {
    const e = b.getExportInfo(m.getExportByIndex(i));
    if (e.kind !== b.ExternalFunction || e.name === GLOBALS_EXPORT) continue;
    const fn = b.getFunctionInfo(m.getFunction(e.value));
    const params = b.expandType(fn.params).map((t) => names[t]);
    const results = b.expandType(fn.results);
    if (params.some((t) => t === undefined) || results.some((t) => names[t] === undefined)) skipped.push(e.name);
    else callable.push({ name: e.name, params });
  }
  return { callable, skipped };
}

