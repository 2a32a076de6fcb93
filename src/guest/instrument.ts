/**
 * Deploy-time instrumentation of a guest module with Binaryen.
 *
 * What it does to the module (see src/vm/layout.ts for the memory layout):
 *  - Shifts every guest address up by BASE_BYTES so the low hypervisor region
 *    (dirty map, globals save area) is out of the guest's reach: the shift is
 *    folded into load/store offset immediates (free at run time) and added to
 *    bulk-memory operands; memory.size / memory.grow report the guest's view.
 *  - Write barrier on every store and bulk write: on the first write to a 4 KiB
 *    page in an epoch it calls `cohort_hv.first_write(page)`, which records the
 *    page as dirty and saves its pre-image (undo log). Each store site keeps
 *    the last page it found dirty in a local, so a run of stores to one page
 *    costs an add, a subtract and a compare each; on a miss the dirty map byte
 *    is checked inline, and only a page's first write in the epoch calls out.
 *    The cache is sound because checkpoints are taken only between guest
 *    calls, when no function activation (and so no cached page) is live.
 *    Counted loops mark their whole range once before they run
 *    (barrier-hoist.ts); runs of stores through one pointer share one
 *    barrier (barrier-groups.ts).
 *  - Makes the memory imported (`cohort_hv.memory`) so a backup's image can be
 *    instantiated in place (zero-copy promotion), turns active data segments
 *    and the start function into an explicit `__cohort_boot` export that runs
 *    only on first boot (never on restore), and adds `__cohort_save_globals` /
 *    `__cohort_load_globals` that copy every mutable global bit-exactly to and
 *    from the globals save area.
 *  - Refuses what cannot be protected, naming the feature and where it occurs,
 *    and modules past the limits of src/guest/limits.ts (size, functions,
 *    block nesting), which are checked before Binaryen reads the module.
 */
import binaryen from "binaryen";
import { describeThrown, InstrumenterError, InvalidModuleError, UnsupportedModuleError } from "./errors.js";
import { checkModuleLimits, NESTING_MAX } from "./limits.js";
import {
  BASE_BYTES,
  GLOBALS_MAX,
  GLOBALS_OFFSET,
  GLOBAL_SLOT_BYTES,
  GUEST_WASM_PAGES_MAX,
  PAGE_BYTES,
  PAGE_SHIFT,
  RESERVED_WASM_PAGES,
  WASM_PAGE_BYTES,
} from "../vm/layout.js";
import { assert } from "../util/assert.js";
import { addMarkPages, BarrierHoist, laneBytes, mayGrowMemory } from "./barrier-hoist.js";
import { StoreGroups } from "./barrier-groups.js";

import {
  EXPORT_BOOT,
  EXPORT_LOAD_GLOBALS,
  EXPORT_SAVE_GLOBALS,
  HV_MODULE,
  INSTRUMENTER_VERSION,
  type InstrumentedModule,
  type ValueTypeName,
} from "./module-info.js";

export { INSTRUMENTER_VERSION, type InstrumentedModule, type ModuleInfo } from "./module-info.js";
export { MODULE_LIMITS, NESTING_MAX } from "./limits.js";

type Ref = number;
const b = binaryen;
const T = {
  none: b.none,
  i32: b.i32,
  i64: b.i64,
  f32: b.f32,
  f64: b.f64,
  v128: b.v128,
};

/** ABI v1 imports and their signatures ([params], result). */
const ALLOWED_IMPORTS: Record<string, [number[], number]> = {
  "cohort.log": [[T.i32, T.i32], T.i32],
  "cohort.send": [[T.i32, T.i32, T.i32], T.i32],
  "cohort.reply": [[T.i32, T.i32, T.i32, T.i32], T.i32],
  "cohort.timer_set": [[T.i32, T.f64], T.i32],
  "cohort.timer_cancel": [[T.i32], T.i32],
  "cohort.clock_ms": [[], T.f64],
  "cohort.random_fill": [[T.i32, T.i32], T.i32],
  "cohort.rank": [[], T.i32],
  "cohort.size": [[], T.i32],
  "env.abort": [[T.i32, T.i32, T.i32, T.i32], T.none],
  "env.seed": [[], T.f64],
};

/** Features V8 in Node 20 runs and the instrumenter understands. */
const OUTPUT_FEATURES =
  b.Features.MVP |
  b.Features.MutableGlobals |
  b.Features.NontrappingFPToInt |
  b.Features.SIMD128 |
  b.Features.BulkMemory |
  b.Features.BulkMemoryOpt |
  b.Features.SignExt |
  b.Features.ReferenceTypes |
  b.Features.Multivalue |
  b.Features.ExceptionHandling |
  b.Features.TailCall;

const ID_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(b)
    .filter(([k, v]) => k.endsWith("Id") && typeof v === "number")
    .map(([k, v]) => [v as number, k.slice(0, -2)]),
);

/** Child slots of each expression kind we accept: [getter, setter] pairs and operand lists. */
interface ChildSpec {
  one?: [string, string][];
  list?: [string, string, string];
}
const CHILDREN: Record<number, ChildSpec> = {
  [b.BlockId]: { list: ["getNumChildren", "getChildAt", "setChildAt"] },
  [b.IfId]: { one: [["getCondition", "setCondition"], ["getIfTrue", "setIfTrue"], ["getIfFalse", "setIfFalse"]] },
  [b.LoopId]: { one: [["getBody", "setBody"]] },
  [b.BreakId]: { one: [["getCondition", "setCondition"], ["getValue", "setValue"]] },
  [b.SwitchId]: { one: [["getCondition", "setCondition"], ["getValue", "setValue"]] },
  [b.CallId]: { list: ["getNumOperands", "getOperandAt", "setOperandAt"] },
  [b.CallIndirectId]: { one: [["getTarget", "setTarget"]], list: ["getNumOperands", "getOperandAt", "setOperandAt"] },
  [b.LocalGetId]: {},
  [b.LocalSetId]: { one: [["getValue", "setValue"]] },
  [b.GlobalGetId]: {},
  [b.GlobalSetId]: { one: [["getValue", "setValue"]] },
  [b.LoadId]: { one: [["getPtr", "setPtr"]] },
  [b.StoreId]: { one: [["getPtr", "setPtr"], ["getValue", "setValue"]] },
  [b.ConstId]: {},
  [b.UnaryId]: { one: [["getValue", "setValue"]] },
  [b.BinaryId]: { one: [["getLeft", "setLeft"], ["getRight", "setRight"]] },
  [b.SelectId]: { one: [["getIfTrue", "setIfTrue"], ["getIfFalse", "setIfFalse"], ["getCondition", "setCondition"]] },
  [b.DropId]: { one: [["getValue", "setValue"]] },
  [b.ReturnId]: { one: [["getValue", "setValue"]] },
  [b.MemorySizeId]: {},
  [b.MemoryGrowId]: { one: [["getDelta", "setDelta"]] },
  [b.NopId]: {},
  [b.UnreachableId]: {},
  [b.SIMDExtractId]: { one: [["getVec", "setVec"]] },
  [b.SIMDReplaceId]: { one: [["getVec", "setVec"], ["getValue", "setValue"]] },
  [b.SIMDShuffleId]: { one: [["getLeft", "setLeft"], ["getRight", "setRight"]] },
  [b.SIMDTernaryId]: { one: [["getA", "setA"], ["getB", "setB"], ["getC", "setC"]] },
  [b.SIMDShiftId]: { one: [["getVec", "setVec"], ["getShift", "setShift"]] },
  [b.SIMDLoadId]: { one: [["getPtr", "setPtr"]] },
  [b.SIMDLoadStoreLaneId]: { one: [["getPtr", "setPtr"], ["getVec", "setVec"]] },
  [b.MemoryInitId]: { one: [["getDest", "setDest"], ["getOffset", "setOffset"], ["getSize", "setSize"]] },
  [b.DataDropId]: {},
  [b.MemoryCopyId]: { one: [["getDest", "setDest"], ["getSource", "setSource"], ["getSize", "setSize"]] },
  [b.MemoryFillId]: { one: [["getDest", "setDest"], ["getValue", "setValue"], ["getSize", "setSize"]] },
  [b.RefNullId]: {},
  [b.RefIsNullId]: { one: [["getValue", "setValue"]] },
  [b.RefFuncId]: {},
  [b.RefEqId]: { one: [["getLeft", "setLeft"], ["getRight", "setRight"]] },
  [b.TableGetId]: { one: [["getIndex", "setIndex"]] },
  [b.TableSizeId]: {},
  [b.TryId]: { one: [["getBody", "setBody"]], list: ["getNumCatchBodies", "getCatchBodyAt", "setCatchBodyAt"] },
  [b.ThrowId]: { list: ["getNumOperands", "getOperandAt", "setOperandAt"] },
  [b.RethrowId]: {},
  [b.TupleMakeId]: { list: ["getNumOperands", "getOperandAt", "setOperandAt"] },
  [b.TupleExtractId]: { one: [["getTuple", "setTuple"]] },
  [b.PopId]: {},
};

/** Expression kinds refused with a specific reason (anything else unknown is refused generically). */
const REFUSED: Record<number, string> = {
  [b.AtomicRMWId]: "atomics (threads)",
  [b.AtomicCmpxchgId]: "atomics (threads)",
  [b.AtomicWaitId]: "atomics (threads)",
  [b.AtomicNotifyId]: "atomics (threads)",
  [b.AtomicFenceId]: "atomics (threads)",
  [b.TableSetId]: "runtime table mutation (table.set)",
  [b.TableGrowId]: "runtime table mutation (table.grow)",
  [b.CallRefId]: "typed function references (call_ref)",
};
// binaryen.js exports these ids only as functions.
const bx = b as unknown as Record<string, () => number>;
REFUSED[bx._BinaryenTableFillId()] = "runtime table mutation (table.fill)";
REFUSED[bx._BinaryenTableCopyId()] = "runtime table mutation (table.copy)";
REFUSED[bx._BinaryenTableInitId()] = "runtime table mutation (table.init)";
REFUSED[bx._BinaryenElemDropId()] = "runtime table mutation (elem.drop)";

// binaryen.js exposes per-kind accessors as static classes (binaryen.Store.getPtr, ...).
type Accessor = (expr: Ref, ...args: number[]) => number;
function kindClass(id: number): Record<string, Accessor> {
  const cls = K[ID_NAMES[id]];
  assert(cls, `binaryen class for ${ID_NAMES[id]}`);
  return cls;
}

/** binaryen.js's per-kind accessor classes, which its type declarations omit. */
const K = b as unknown as Record<string, Record<string, Accessor> & { getName: (f: Ref) => string }>;

const addVar = (fn: Ref, type: number): number =>
  (b as unknown as { _BinaryenFunctionAddVar: (f: Ref, t: number) => number })._BinaryenFunctionAddVar(fn, type);

export function instrument(input: Uint8Array): InstrumentedModule {
  const bytes = input as Uint8Array<ArrayBuffer>;
  // Size, validity (the engine's validator), functions and block nesting, before Binaryen sees the module.
  const compiled = checkModuleLimits(bytes);
  const readable = withMemoryExport(bytes, checkMemoryDeclarations(bytes, compiled));
  let m: binaryen.Module;
  try {
    m = b.readBinary(readable);
  } catch (error) {
    // Binaryen throws plain objects, not Errors, for inputs it cannot read (e.g. a malformed name section).
    throw new InvalidModuleError(`module cannot be read: ${describeThrown(error)}`);
  }
  try {
    m.setFeatures(b.Features.All);
    // Dead code after an unconditional branch is stack-polymorphic; removing it first keeps every rewritten node well-typed.
    m.runPasses(["dce"]);
    return new Instrumenter(m).run();
  } catch (error) {
    if (error instanceof RangeError && /call stack/i.test(error.message)) {
      // Binaryen's recursive parts (its binary writer) ran out of JS stack: nesting below NESTING_MAX, but too deep for them.
      throw new UnsupportedModuleError("expressions nested too deeply for Binaryen's writer", "module");
    }
    if (error instanceof Error) throw error;
    throw new InstrumenterError(`Binaryen failed while instrumenting: ${describeThrown(error)}`);
  } finally {
    m.dispose();
  }
}

/**
 * Instruments a small module built here, once, so that Binaryen compiles the
 * code a module's instrumentation runs (reading, dead-code elimination,
 * validation, writing) before the first real module: V8 compiles a wasm
 * function on its first call, and for Binaryen that is most of the cost of
 * a thread's first instrumentation. The loader (load-instrumenter.ts) counts
 * it in Binaryen's load time, so the time reported for a module is the
 * module's own.
 */
export function warmUp(): void {
  const m = new b.Module();
  let bytes: Uint8Array;
  try {
    const { i32, i64, f64, local } = m;
    const get = (i: number) => local.get(i, T.i32);
    m.setMemory(1, 2, "memory", [
      { offset: i32.const(16), data: new Uint8Array([1, 2, 3]), passive: false },
      { offset: i32.const(0), data: new Uint8Array([4, 5]), passive: true },
    ]);
    m.addGlobal("g", T.i64, true, i64.const(BigInt(0) as unknown as number)); // binaryen.js takes a bigint; its declarations say number
    m.addGlobal("h", T.f64, true, f64.const(0));
    m.addFunctionImport("rank", "cohort", "rank", T.none, T.i32);
    const ii = b.createType([T.i32, T.i32]);
    m.addFunction("s", ii, T.i32, [], m.block("out", [
      m.block("a", [m.block("b", [m.switch(["a", "b"], "b", get(0))]), m.br("out", undefined, i32.const(1))]),
      m.select(i32.gt_s(get(0), get(1)), get(0), i32.load16_u(2, 2, get(1))),
    ], T.i32));
    m.addTable("t", 1, 1);
    m.addActiveElementSegment("t", "e", ["s"], i32.const(0));
    m.addFunction(
      "f",
      ii,
      T.i32,
      [T.i32, T.f64],
      m.block(null, [
        m.loop(
          "l",
          m.block(null, [
            i32.store(0, 4, get(0), i32.add(get(1), m.call("rank", [], T.i32))),
            i64.store8(4, 1, get(0), m.global.get("g", T.i64)),
            f64.store(8, 8, get(1), f64.mul(f64.convert_s.i32(local.tee(2, i32.mul(get(2), i32.const(3)), T.i32)), m.global.get("h", T.f64))),
            m.global.set("g", i64.extend_u(i32.wrap(i64.load32_u(0, 4, get(0))))),
            local.set(2, i32.add(get(2), m.call_indirect("t", i32.const(0), [get(0), get(1)], ii, T.i32))),
            m.br("l", i32.lt_u(get(2), get(1))),
          ]),
        ),
        m.memory.fill(get(0), i32.const(0), i32.const(8)),
        m.memory.copy(get(0), get(1), i32.const(8)),
        m.memory.init("1", get(0), i32.const(0), i32.const(2)),
        m.data.drop("1"),
        m.if(i32.eqz(get(0)), m.drop(m.memory.grow(i32.const(1))), m.drop(m.memory.size())),
        m.return(i32.load(0, 4, get(1))),
        m.unreachable(),
      ], T.i32),
    );
    m.addFunctionExport("f", "f");
    m.setStart(m.addFunction("start", T.none, T.none, [], m.drop(m.call("s", [i32.const(1), i32.const(2)], T.i32))));
    m.setFeatures(OUTPUT_FEATURES);
    bytes = m.emitBinary();
  } finally {
    m.dispose();
  }
  instrument(bytes);
}

/**
 * Export the module's memory makes for itself when it has none, so Binaryen
 * names it: binaryen.js has no getter for a memory's internal name (which
 * comes from the name section and may be anything), but an export's value is
 * that name. Removed again right after reading (Instrumenter.findMemoryName).
 */
const MEMORY_PROBE_EXPORT = "__cohort_memory";

/** Section order of the binary format (custom sections, id 0, may go anywhere). */
const SECTION_ORDER: Record<number, number> = { 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 13: 6, 6: 7, 7: 8, 8: 9, 9: 10, 12: 11, 10: 12, 11: 13 };

/**
 * `bytes` with an export of memory 0 named MEMORY_PROBE_EXPORT if it defines a
 * memory and exports none; else `bytes` itself. Edits the export section of
 * the binary (or adds one): nothing is printed to text, so the cost is one
 * copy of the bytes whatever the size of the data segments.
 */
function withMemoryExport(bytes: Uint8Array, compiled: WebAssembly.Module): Uint8Array {
  const exports = WebAssembly.Module.exports(compiled);
  if (exports.some((e) => e.kind === "memory")) return bytes;
  const probe = exports.find((e) => e.name === MEMORY_PROBE_EXPORT);
  if (probe) throw new UnsupportedModuleError("reserved export name", `export "${probe.name}"`);
  const sections = readSections(bytes);
  if (!sections.some((s) => s.id === 5)) return bytes; // no memory of its own (an imported one is refused before)
  const name = new TextEncoder().encode(MEMORY_PROBE_EXPORT);
  const entry = [...uleb(name.length), ...name, 0x02 /* memory */, 0x00 /* index 0 */];
  const existing = sections.find((s) => s.id === 7);
  let before: number;
  let after: number;
  let content: Uint8Array;
  if (existing) {
    const { value: count, next } = readUleb(bytes, existing.content_start);
    content = Buffer.concat([Uint8Array.from(uleb(count + 1)), bytes.subarray(next, existing.end), Uint8Array.from(entry)]);
    [before, after] = [existing.start, existing.end];
  } else {
    // A new export section goes right after the last section that must precede it.
    const last = sections.filter((s) => s.id !== 0 && SECTION_ORDER[s.id] < SECTION_ORDER[7]).at(-1);
    assert(last, "a module with a memory section has a section before the export section");
    content = Buffer.concat([Uint8Array.from(uleb(1)), Uint8Array.from(entry)]);
    [before, after] = [last.end, last.end];
  }
  return Buffer.concat([bytes.subarray(0, before), Uint8Array.from([7, ...uleb(content.length)]), content, bytes.subarray(after)]);
}

interface Section {
  id: number;
  /** Offset of the id byte. */
  start: number;
  content_start: number;
  end: number;
}

function readSections(bytes: Uint8Array): Section[] {
  const sections: Section[] = [];
  let pos = 8; // magic + version; validity was already checked by the engine
  while (pos < bytes.length) {
    const start = pos;
    const id = bytes[pos++];
    const { value: size, next } = readUleb(bytes, pos);
    sections.push({ id, start, content_start: next, end: next + size });
    pos = next + size;
  }
  return sections;
}

function readUleb(bytes: Uint8Array, pos: number): { value: number; next: number } {
  let value = 0;
  let shift = 0;
  for (;;) {
    const byte = bytes[pos++];
    value += (byte & 0x7f) * 2 ** shift;
    if ((byte & 0x80) === 0) return { value, next: pos };
    shift += 7;
  }
}

function uleb(value: number): number[] {
  const out: number[] = [];
  do {
    let byte = value % 128;
    value = Math.floor(value / 128);
    if (value > 0) byte |= 0x80;
    out.push(byte);
  } while (value > 0);
  return out;
}


/**
 * Memory declarations are checked on the raw binary, before Binaryen: we need
 * the count (multi-memory) and flags (shared, memory64) of every memory,
 * imported or defined, and binaryen.js offers no way to enumerate memories.
 */
function checkMemoryDeclarations(bytes: Uint8Array, compiled: WebAssembly.Module): WebAssembly.Module {
  const imports = WebAssembly.Module.imports(compiled);
  for (const imp of imports) {
    const where = `import "${imp.module}"."${imp.name}"`;
    if (imp.kind === "memory") throw new UnsupportedModuleError("imported memory", where);
    if (imp.kind === "table") throw new UnsupportedModuleError("imported table", where);
    if (imp.kind === "global") throw new UnsupportedModuleError("imported global", where);
    if ((imp.kind as string) === "tag") throw new UnsupportedModuleError("imported exception tag", where);
  }
  const memories = scanMemorySection(bytes);
  if (memories.length > 1) throw new UnsupportedModuleError("multi-memory", `${memories.length} memories declared`);
  const flags = memories[0];
  if (flags !== undefined) {
    if (flags & 0x02) throw new UnsupportedModuleError("shared memory (threads)", "memory 0");
    if (flags & 0x04) throw new UnsupportedModuleError("memory64", "memory 0");
  }
  return compiled;
}

/** Returns the limits flags byte of each memory in the memory section (id 5). */
function scanMemorySection(bytes: Uint8Array): number[] {
  let pos = 8; // magic + version; validity was already checked by the engine
  const leb = (): number => {
    let result = 0;
    let shift = 0;
    for (;;) {
      const byte = bytes[pos++];
      result += (byte & 0x7f) * 2 ** shift;
      if ((byte & 0x80) === 0) return result;
      shift += 7;
    }
  };
  while (pos < bytes.length) {
    const id = bytes[pos++];
    const size = leb();
    const end = pos + size;
    if (id === 5) {
      const count = leb();
      const flags: number[] = [];
      for (let i = 0; i < count; i++) {
        const flag = leb();
        flags.push(flag);
        leb(); // initial
        if (flag & 0x01) leb(); // maximum
        // memory64 limits are encoded the same way (LEB), so the scan stays in step.
      }
      return flags;
    }
    pos = end;
  }
  return [];
}

interface FunctionContext {
  name: string;
  fn: Ref;
  cache: number; // local shared by store sites past SITE_CACHES_MAX: start of the last page known dirty
  ptr: number; // local: scratch for a store's address
  sites: number; // store sites given a cache local of their own so far
  loopDepth: number; // > 0 while visiting the body of a loop
  inits: Ref[]; // run at function entry: initial values of loop sites' cache locals
  hoist: BarrierHoist; // counted loops whose barriers are hoisted (src/guest/barrier-hoist.ts)
  groups: StoreGroups; // runs of stores through one pointer sharing a barrier (src/guest/barrier-groups.ts)
}

/** A node of the walk in Instrumenter.visit: its child slots and how many were entered. */
interface Frame {
  e: Ref;
  id: number;
  slots: Slot[];
  next: number;
}

/** Where a child sits in its parent: the setter and, for operand lists, the index. */
interface Slot {
  child: Ref;
  setter: string;
  index: number | null;
}


/**
 * Each store site inside a loop gets its own "last dirty page" local, so two
 * pointers that alternate between pages (a partition loop, a hash table's
 * buckets and entries) do not evict each other. Sites outside loops run once
 * per call and share one local (consecutive stores to one page still hit);
 * beyond this many loop sites per function they share it too, to bound the
 * number of locals.
 */
const SITE_CACHES_MAX = 8;

class Instrumenter {
  private readonly m: binaryen.Module;
  private memoryName = "";
  /** Internal names of what we add, made unique against the guest's own (its name section may use any name). */
  private readonly names: Record<"first_write" | "first_write_range" | "barrier" | "mark_pages" | "bulk_dest" | "bulk_src" | "no_start" | "boot" | "save" | "load", string>;
  private readonly dropFlags = new Map<string, string>(); // data segment -> generated "dropped" global

  constructor(m: binaryen.Module) {
    this.m = m;
    this.names = {
      first_write: this.fresh("__cohort_first_write"),
      first_write_range: this.fresh("__cohort_first_write_range"),
      barrier: this.fresh("__cohort_barrier"),
      mark_pages: this.fresh("__cohort_mark_pages"),
      bulk_dest: this.fresh("__cohort_bulk_dest"),
      bulk_src: this.fresh("__cohort_bulk_src"),
      no_start: this.fresh("__cohort_no_start"),
      boot: this.fresh(EXPORT_BOOT),
      save: this.fresh(EXPORT_SAVE_GLOBALS),
      load: this.fresh(EXPORT_LOAD_GLOBALS),
    };
  }

  private fresh(base: string): string {
    let name = base;
    for (let i = 1; this.m.getFunction(name) || this.m.getGlobal(name); i++) name = `${base}_${i}`;
    return name;
  }

  run(): InstrumentedModule {
    const m = this.m;
    const imports = this.checkImports();
    this.checkGlobalsAndTables();
    const mem = this.memoryInfo();
    const guestFunctions: Ref[] = [];
    for (let i = 0; i < m.getNumFunctions(); i++) {
      const fn = m.getFunctionByIndex(i);
      if (b.getFunctionInfo(fn).module === "") guestFunctions.push(fn);
    }
    const exports = this.checkExports();

    this.addHypervisorImports();
    this.addBarrierFunctions();
    for (const fn of guestFunctions) this.instrumentFunction(fn);
    const activeSegments = this.makeSegmentsPassive(mem);
    this.addBoot(activeSegments);
    const mutableGlobals = this.addGlobalsSaveLoad();
    const dropFlagNames = new Set(this.dropFlags.values());
    const dataDropFlags = mutableGlobals.flatMap((g, i) => (dropFlagNames.has(g.name) ? [i] : []));

    m.setFeatures(OUTPUT_FEATURES);
    if (!m.validate()) throw new InvalidModuleError("instrumented module failed validation (instrumenter bug)");
    const wasm = m.emitBinary();
    return {
      wasm,
      info: {
        abi_version: 1,
        instrumenter_version: INSTRUMENTER_VERSION,
        guest_initial_pages: mem.initial,
        guest_maximum_pages: mem.maximum,
        mutable_globals: mutableGlobals,
        data_drop_flags: dataDropFlags,
        exports,
        imports,
      },
    };
  }

  private checkImports(): string[] {
    const m = this.m;
    const names: string[] = [];
    for (let i = 0; i < m.getNumFunctions(); i++) {
      const info = b.getFunctionInfo(m.getFunctionByIndex(i));
      if (info.module === "") continue;
      const key = `${info.module}.${info.base}`;
      const sig = ALLOWED_IMPORTS[key];
      if (!sig) throw new UnsupportedModuleError("import not in guest ABI v1", `import "${info.module}"."${info.base}"`);
      const params = b.expandType(info.params);
      if (params.length !== sig[0].length || params.some((t, j) => t !== sig[0][j]) || info.results !== sig[1]) {
        throw new UnsupportedModuleError("import with the wrong signature for guest ABI v1", `import "${info.module}"."${info.base}"`);
      }
      names.push(key);
    }
    return names;
  }

  private checkGlobalsAndTables(): void {
    const m = this.m;
    for (let i = 0; i < m.getNumGlobals(); i++) {
      const g = b.getGlobalInfo(m.getGlobalByIndex(i));
      if (g.mutable && !typeName(g.type)) {
        throw new UnsupportedModuleError("mutable global of reference type", `global ${g.name}`);
      }
    }
  }

  private checkExports(): string[] {
    const m = this.m;
    const functions: string[] = [];
    const toRemove: string[] = [];
    for (let i = 0; i < m.getNumExports(); i++) {
      const e = b.getExportInfo(m.getExportByIndex(i));
      if (e.name.startsWith("__cohort_")) throw new UnsupportedModuleError("reserved export name", `export "${e.name}"`);
      if (e.kind === b.ExternalFunction) functions.push(e.name);
      // The host owns the memory object; a guest export of it is dropped (the host never reads through it).
      if (e.kind === b.ExternalMemory) toRemove.push(e.name);
    }
    for (const name of toRemove) m.removeExport(name);
    return functions;
  }

  private memoryInfo(): { initial: number; maximum: number } {
    const m = this.m;
    if (!m.hasMemory()) {
      this.memoryName = "__cohort_memory";
      m.setMemory(0, 0, null, [], false, false, this.memoryName);
      return { initial: 0, maximum: 0 };
    }
    this.memoryName = this.findMemoryName();
    const info = m.getMemoryInfo(this.memoryName);
    const maximum = Math.min(info.max ?? GUEST_WASM_PAGES_MAX, GUEST_WASM_PAGES_MAX);
    if (info.initial > GUEST_WASM_PAGES_MAX) {
      throw new UnsupportedModuleError(`initial memory above ${GUEST_WASM_PAGES_MAX} pages`, "memory 0");
    }
    return { initial: info.initial, maximum };
  }

  /** binaryen.js has no memory-name getter; a memory export names it (withMemoryExport made one if the guest has none). */
  private findMemoryName(): string {
    const m = this.m;
    for (let i = 0; i < m.getNumExports(); i++) {
      const e = b.getExportInfo(m.getExportByIndex(i));
      if (e.kind !== b.ExternalMemory) continue;
      if (e.name === MEMORY_PROBE_EXPORT) m.removeExport(e.name);
      return e.value;
    }
    throw new InstrumenterError("the module's memory has no export to name it (instrumenter bug)");
  }

  private addHypervisorImports(): void {
    this.m.addFunctionImport(this.names.first_write, HV_MODULE, "first_write", b.createType([T.i32]), T.none);
    this.m.addFunctionImport(this.names.first_write_range, HV_MODULE, "first_write_range", b.createType([T.i32, T.i32]), T.none);
  }

  /**
   * Two helpers in wasm (no JS call on the fast path):
   *  __cohort_barrier(addr, width) -> new cache: marks the pages of [addr, addr+width).
   *  __cohort_bulk_dest(guest_dest, len): bounds check (trap like the original
   *     instruction would) then marks every page the bulk write touches.
   */
  private addBarrierFunctions(): void {
    const m = this.m;
    const i32 = m.i32;
    const get = (i: number) => m.local.get(i, T.i32);
    // Marks pages first..last (locals 2, 3) whose dirty byte is 0.
    const markLoop = (first: number, last: number) =>
      m.loop(
        "mark",
        m.block(null, [
          m.if(i32.eqz(i32.load8_u(0, 1, get(first), this.memoryName)), m.call(this.names.first_write, [get(first)], T.none)),
          m.local.set(first, i32.add(get(first), i32.const(1))),
          m.br("mark", i32.le_u(get(first), get(last))),
        ]),
      );
    // params: addr(0) width(1); vars: first(2) last(3)
    m.addFunction(
      this.names.barrier,
      b.createType([T.i32, T.i32]),
      T.i32,
      [T.i32, T.i32],
      m.block(null, [
        m.local.set(2, i32.shr_u(get(0), i32.const(PAGE_SHIFT))),
        m.local.set(3, i32.shr_u(i32.sub(i32.add(get(0), get(1)), i32.const(1)), i32.const(PAGE_SHIFT))),
        // A wrapped end means the store is out of bounds and will trap: mark only the first page.
        m.if(i32.lt_u(get(3), get(2)), m.local.set(3, get(2))),
        markLoop(2, 3),
        m.return(i32.and(get(0), i32.const(~(PAGE_BYTES - 1)))),
      ], T.none),
    );
    // Traps unless [guest address (param 0), + length (param 1)) lies inside guest memory; in 64 bits, so nothing wraps.
    // (binaryen.js takes a bigint for i64.const; its type declarations still say number.)
    const i64 = (n: number) => m.i64.const(BigInt(n) as unknown as number);
    const outOfBounds = () =>
      m.if(
        m.i64.gt_u(
          m.i64.add(m.i64.extend_u(get(0)), m.i64.extend_u(get(1))),
          m.i64.sub(m.i64.mul(m.i64.extend_u(m.memory.size(this.memoryName)), i64(WASM_PAGE_BYTES)), i64(BASE_BYTES)),
        ),
        // The trap the engine gives the original instruction ("memory access out of bounds", not
        // "unreachable"): a load from (2^32 - 1) + (2^32 - 1), beyond any 32-bit memory.
        m.drop(i32.load8_u(ALWAYS_TRAPS, 1, i32.const(-1), this.memoryName)),
      );
    // params: dest(0) len(1); vars: first(2) last(3)
    m.addFunction(
      this.names.bulk_dest,
      b.createType([T.i32, T.i32]),
      T.none,
      [T.i32, T.i32],
      m.block(null, [
        outOfBounds(),
        m.if(i32.eqz(get(1)), m.return()),
        m.local.set(2, i32.shr_u(i32.add(get(0), i32.const(BASE_BYTES)), i32.const(PAGE_SHIFT))),
        m.local.set(3, i32.shr_u(i32.sub(i32.add(i32.add(get(0), i32.const(BASE_BYTES)), get(1)), i32.const(1)), i32.const(PAGE_SHIFT))),
        markLoop(2, 3),
      ]),
    );
    // params: src(0) len(1): bounds check of a copy's source, so the shifted source cannot wrap into the hypervisor region.
    m.addFunction(this.names.bulk_src, b.createType([T.i32, T.i32]), T.none, [], outOfBounds());
    addMarkPages(m, this.names.mark_pages, this.memoryName, this.names.first_write_range);
  }

  private isImport(name: string): boolean {
    return b.getFunctionInfo(this.m.getFunction(name)).module !== "";
  }

  private instrumentFunction(fn: Ref): void {
    const ctx: FunctionContext = {
      name: K.Function.getName(fn),
      fn,
      cache: addVar(fn, T.i32),
      ptr: addVar(fn, T.i32),
      sites: 0,
      loopDepth: 0,
      inits: [],
      hoist: new BarrierHoist(this.m, fn, this.names.mark_pages, (name) => this.isImport(name)),
      groups: new StoreGroups((name) => this.isImport(name), (store) => ctx.hoist.covers(store)),
    };
    const body = K.Function.getBody(fn);
    const replaced = this.visit(body, ctx);
    if (ctx.inits.length) K.Function.setBody(fn, this.m.block(null, [...ctx.inits, replaced], b.getExpressionType(replaced)));
    else if (replaced !== body) K.Function.setBody(fn, replaced);
  }

  /**
   * Visits children first, then rewrites the node; returns the node to put in
   * its place. Walks with an explicit stack, not recursion: compiled code
   * nests deeply (a large `switch` becomes thousands of nested blocks) and the
   * JS stack would overflow long before NESTING_MAX.
   */
  private visit(root: Ref, ctx: FunctionContext): Ref {
    if (root === 0) return root;
    const stack: Frame[] = [this.frame(root, ctx)];
    for (;;) {
      const top = stack[stack.length - 1];
      if (top.next < top.slots.length) {
        if (stack.length >= NESTING_MAX) {
          throw new UnsupportedModuleError(`expressions nested deeper than ${NESTING_MAX} levels`, `function ${ctx.name}`);
        }
        stack.push(this.frame(top.slots[top.next++].child, ctx));
        continue;
      }
      stack.pop();
      if (top.id === b.LoopId) ctx.loopDepth--;
      const replaced = this.rewrite(top.e, top.id, ctx);
      const parent = stack[stack.length - 1];
      if (!parent) return replaced;
      const slot = parent.slots[parent.next - 1];
      if (replaced !== slot.child) {
        const cls = kindClass(parent.id);
        if (slot.index === null) cls[slot.setter](parent.e, replaced);
        else cls[slot.setter](parent.e, slot.index, replaced);
      }
    }
  }

  /** A node about to be visited, with its child slots in visiting order (a catch body's pop already moved into a local). */
  private frame(e: Ref, ctx: FunctionContext): Frame {
    if (b.getExpressionId(e) === b.LoopId) e = ctx.hoist.loop(e); // a counted loop may become a versioned pair
    const id = b.getExpressionId(e);
    if (id === b.BlockId) ctx.groups.block(e); // before its stores are instrumented
    const spec = CHILDREN[id];
    if (!spec) {
      const reason = REFUSED[id] ?? `instruction kind ${ID_NAMES[id] ?? id} not supported`;
      throw new UnsupportedModuleError(reason, `function ${ctx.name}`);
    }
    const slots: Slot[] = [];
    if (spec.one || spec.list) {
      const cls = kindClass(id);
      for (const [getter, setter] of spec.one ?? []) {
        const child = cls[getter](e);
        if (child !== 0) slots.push({ child, setter, index: null });
      }
      if (spec.list) {
        const [count, getAt, setAt] = spec.list;
        for (let i = 0, n = cls[count](e); i < n; i++) {
          let child = cls[getAt](e, i);
          if (id === b.TryId) {
            child = this.hoistPop(child, ctx);
            cls[setAt](e, i, child);
          }
          slots.push({ child, setter: setAt, index: i });
        }
      }
    }
    if (id === b.LoopId) ctx.loopDepth++;
    return { e, id, slots, next: 0 };
  }

  /**
   * A catch body's `pop` (the caught values) must stay where Binaryen's
   * validator finds it: in the catch body's first-executed position, nested
   * in no block but the catch body itself. Rewriting its consumer (a store
   * whose address is the pop, a memory.grow of it) wraps the pop in a block,
   * which is invalid. So, as Binaryen's own passes do
   * (EHUtils::handleBlockNestedPops), the pop moves into a local first:
   *   (catch $e (block (local.set $t (pop T)) <body with the pop replaced by (local.get $t)>))
   * Reading the pop first is what the body did anyway (it is the first thing
   * a catch body evaluates) and a pop has no side effects.
   */
  private hoistPop(body: Ref, ctx: FunctionContext): Ref {
    const m = this.m;
    if (body === 0) return body;
    if (b.getExpressionId(body) === b.PopId) return body; // already where it belongs
    const site = findPop(body);
    if (!site) return body;
    const type = b.getExpressionType(site.pop);
    const local = addVar(ctx.fn, type);
    kindClass(site.parentId)[site.setter](site.parent, ...(site.index === null ? [] : [site.index]), m.local.get(local, type));
    return m.block(null, [m.local.set(local, site.pop), body], b.getExpressionType(body));
  }

  private rewrite(e: Ref, id: number, ctx: FunctionContext): Ref {
    const m = this.m;
    switch (id) {
      case b.LoadId:
        if (K.Load.isAtomic(e)) throw new UnsupportedModuleError("atomics (threads)", `function ${ctx.name}`);
        K.Load.setOffset(e, shiftedOffset(K.Load.getOffset(e)));
        return e;
      case b.SIMDLoadId:
        K.SIMDLoad.setOffset(e, shiftedOffset(K.SIMDLoad.getOffset(e)));
        return e;
      case b.StoreId: {
        if (K.Store.isAtomic(e)) throw new UnsupportedModuleError("atomics (threads)", `function ${ctx.name}`);
        const offset = shiftedOffset(K.Store.getOffset(e));
        K.Store.setOffset(e, offset);
        if (offset !== ALWAYS_TRAPS && !ctx.hoist.covers(e) && !ctx.groups.covers(e)) {
          const group = ctx.groups.leader(e); // its barrier covers the stores of its group
          return this.withBarrier(e, K.Store, group ? shiftedOffset(group.offset) : offset, group ? group.width : K.Store.getBytes(e), ctx);
        }
        return e;
      }
      case b.SIMDLoadStoreLaneId: {
        const offset = shiftedOffset(K.SIMDLoadStoreLane.getOffset(e));
        K.SIMDLoadStoreLane.setOffset(e, offset);
        if (K.SIMDLoadStoreLane.isStore(e) && offset !== ALWAYS_TRAPS && !ctx.hoist.covers(e)) {
          return this.withBarrier(e, K.SIMDLoadStoreLane, offset, laneBytes(K.SIMDLoadStoreLane.getOp(e)), ctx);
        }
        return e;
      }
      case b.MemorySizeId:
        return m.i32.sub(e, m.i32.const(RESERVED_WASM_PAGES));
      case b.MemoryGrowId: {
        const r = addVar(ctx.fn, T.i32);
        return m.block(null, [
          m.local.set(r, e),
          m.select(m.i32.eq(m.local.get(r, T.i32), m.i32.const(-1)), m.i32.const(-1), m.i32.sub(m.local.get(r, T.i32), m.i32.const(RESERVED_WASM_PAGES))),
        ], T.i32);
      }
      case b.MemoryFillId: {
        const [d, n] = [addVar(ctx.fn, T.i32), addVar(ctx.fn, T.i32)];
        K.MemoryFill.setDest(e, this.shiftedTee(d, K.MemoryFill.getDest(e)));
        K.MemoryFill.setSize(e, this.checkedSize(n, K.MemoryFill.getSize(e), [[this.names.bulk_dest, d]]));
        return e;
      }
      case b.MemoryCopyId: {
        const [d, s, n] = [addVar(ctx.fn, T.i32), addVar(ctx.fn, T.i32), addVar(ctx.fn, T.i32)];
        K.MemoryCopy.setDest(e, this.shiftedTee(d, K.MemoryCopy.getDest(e)));
        K.MemoryCopy.setSource(e, this.shiftedTee(s, K.MemoryCopy.getSource(e)));
        K.MemoryCopy.setSize(e, this.checkedSize(n, K.MemoryCopy.getSize(e), [[this.names.bulk_src, s], [this.names.bulk_dest, d]]));
        return e;
      }
      case b.MemoryInitId: {
        const [d, n] = [addVar(ctx.fn, T.i32), addVar(ctx.fn, T.i32)];
        K.MemoryInit.setDest(e, this.shiftedTee(d, K.MemoryInit.getDest(e)));
        K.MemoryInit.setSize(e, this.checkedSize(n, K.MemoryInit.getSize(e), [[this.names.bulk_dest, d]]));
        return e;
      }
      case b.DataDropId: {
        // Remember the drop in a mutable global, so a restored instance drops the segment too.
        const flag = this.dropFlag(K.DataDrop.getSegment(e) as unknown as string);
        return m.block(null, [e, m.global.set(flag, m.i32.const(1))]);
      }
      default:
        return e;
    }
  }

  /**
   * Puts the barrier into the store's address. If the stored value may grow
   * memory, the address and the value are first evaluated into locals, in
   * their order, and the barrier runs after both: run before the value, it
   * could find the page beyond the memory's end (and mark nothing) while the
   * value's memory.grow makes the store succeed there.
   */
  private withBarrier(e: Ref, cls: Record<string, Accessor>, offset: number, width: number, ctx: FunctionContext): Ref {
    const m = this.m;
    const [getValue, setValue] = cls === K.Store ? ["getValue", "setValue"] : ["getVec", "setVec"];
    const value = cls[getValue](e);
    const type = b.getExpressionType(value);
    if (type === b.unreachable || !mayGrowMemory(value, (name) => this.isImport(name))) {
      cls.setPtr(e, this.barrier(cls.getPtr(e), offset, width, ctx));
      return e;
    }
    const [address, stored] = [addVar(ctx.fn, T.i32), addVar(ctx.fn, type)];
    const ptr = cls.getPtr(e);
    cls.setPtr(e, this.barrier(m.local.get(address, T.i32), offset, width, ctx));
    cls[setValue](e, m.local.get(stored, type));
    return m.block(null, [m.local.set(address, ptr), m.local.set(stored, value), e], b.getExpressionType(e));
  }

  /**
   * The store's address expression becomes:
   *   p = <address>; if ((p + offset) - cache >=u 4097 - width) cache = barrier(p + offset, width); p
   * The barrier runs before the value operand is evaluated (unless the value may
   * grow memory: withBarrier); marking early is safe (the pre-image is still the
   * page's content at the start of the epoch).
   */
  private barrier(ptr: Ref, offset: number, width: number, ctx: FunctionContext): Ref {
    const m = this.m;
    const addr = () => m.i32.add(m.local.get(ctx.ptr, T.i32), m.i32.const(offset | 0));
    const mapSaysDirty = () =>
      m.i32.and(
        m.i32.load8_u(0, 1, m.i32.shr_u(addr(), m.i32.const(PAGE_SHIFT)), this.memoryName),
        m.i32.load8_u(0, 1, m.i32.shr_u(m.i32.add(addr(), m.i32.const(width - 1)), m.i32.const(PAGE_SHIFT)), this.memoryName),
      );
    const limit = m.i32.const(PAGE_BYTES + 1 - width);
    if (ctx.loopDepth > 0 && ctx.sites < SITE_CACHES_MAX) {
      // A loop site's cache holds (page start - offset), so the hot check needs no add:
      //   hit  <=>  (p - cache) <u 4097 - width  <=>  p + offset lies in the cached page with room for the store.
      // It starts at -offset, i.e. "page 0", which no guest address reaches (they all lie above BASE_BYTES).
      ctx.sites++;
      const cache = addVar(ctx.fn, T.i32);
      ctx.inits.push(m.local.set(cache, m.i32.const(-offset | 0)));
      const setCache = (pageStart: Ref) => m.local.set(cache, m.i32.sub(pageStart, m.i32.const(offset | 0)));
      return m.block(null, [
        m.local.set(ctx.ptr, ptr),
        m.if(
          m.i32.ge_u(m.i32.sub(m.local.get(ctx.ptr, T.i32), m.local.get(cache, T.i32)), limit),
          m.if(mapSaysDirty(), setCache(m.i32.and(addr(), m.i32.const(~(PAGE_BYTES - 1)))), setCache(m.call(this.names.barrier, [addr(), m.i32.const(width)], T.i32))),
        ),
        m.local.get(ctx.ptr, T.i32),
      ], T.i32);
    }
    const cache = ctx.cache;
    return m.block(null, [
      m.local.set(ctx.ptr, ptr),
      m.if(
        m.i32.ge_u(m.i32.sub(addr(), m.local.get(cache, T.i32)), limit),
        // Cache miss: if the page(s) are already dirty this epoch (another site wrote them), only
        // refresh the cache inline; the call is made only for a page's first write in the epoch.
        m.if(mapSaysDirty(), m.local.set(cache, m.i32.and(addr(), m.i32.const(~(PAGE_BYTES - 1)))), m.local.set(cache, m.call(this.names.barrier, [addr(), m.i32.const(width)], T.i32))),
      ),
      m.local.get(ctx.ptr, T.i32),
    ], T.i32);
  }


  private shiftedTee(local: number, value: Ref): Ref {
    return this.m.i32.add(this.m.local.tee(local, value, T.i32), this.m.i32.const(BASE_BYTES));
  }

  private checkedSize(local: number, size: Ref, checks: [string, number][]): Ref {
    const m = this.m;
    return m.block(null, [
      m.local.set(local, size),
      ...checks.map(([fn, operand]) => m.call(fn, [m.local.get(operand, T.i32), m.local.get(local, T.i32)], T.none)),
      m.local.get(local, T.i32),
    ], T.i32);
  }

  private dropFlag(segment: string): string {
    let flag = this.dropFlags.get(segment);
    if (!flag) {
      flag = this.fresh(`__cohort_dropped_${this.dropFlags.size}`);
      this.m.addGlobal(flag, T.i32, true, this.m.i32.const(0));
      this.dropFlags.set(segment, flag);
    }
    return flag;
  }

  /** Rebuilds the memory as imported, its size grown by the hypervisor region, all segments passive. */
  private makeSegmentsPassive(mem: { initial: number; maximum: number }): { name: string; offset: number; bytes: number }[] {
    const m = this.m;
    const segments: binaryen.MemorySegment[] = [];
    const active: { name: string; offset: number; bytes: number }[] = [];
    // getNumDataSegments/getDataSegmentInfo exist in binaryen.js but not in its type declarations.
    const mx = m as unknown as { getNumDataSegments(): number; getDataSegmentInfo(ref: Ref): unknown };
    for (let i = 0; i < mx.getNumDataSegments(); i++) {
      const info = mx.getDataSegmentInfo(m.getDataSegmentByIndex(i)) as {
        name: string;
        offset: number | null;
        data: ArrayBuffer;
        passive: boolean;
      };
      const data = new Uint8Array(info.data);
      if (!info.passive) active.push({ name: info.name, offset: info.offset ?? 0, bytes: data.length });
      segments.push({ name: info.name, data, passive: true, offset: 0 } as binaryen.MemorySegment);
    }
    m.setMemory(mem.initial + RESERVED_WASM_PAGES, mem.maximum + RESERVED_WASM_PAGES, null, segments, false, false, this.memoryName);
    m.addMemoryImport(this.memoryName, HV_MODULE, "memory", false);
    return active;
  }

  /**
   * __cohort_boot: what instantiation and the start function did in the
   * original module, run once on first boot and never on restore.
   */
  private addBoot(active: { name: string; offset: number; bytes: number }[]): void {
    const m = this.m;
    const body: Ref[] = [];
    for (const seg of active) {
      body.push(m.call(this.names.bulk_dest, [m.i32.const(seg.offset), m.i32.const(seg.bytes)], T.none));
      body.push(m.memory.init(seg.name, m.i32.const((seg.offset + BASE_BYTES) | 0), m.i32.const(0), m.i32.const(seg.bytes), this.memoryName));
      body.push(m.data.drop(seg.name));
      body.push(m.global.set(this.dropFlag(seg.name), m.i32.const(1)));
    }
    const start = m.getStart();
    if (start) {
      body.push(m.call(K.Function.getName(start), [], T.none));
      // Instantiation must not run the guest's start again on restore: an empty start replaces it.
      m.setStart(m.addFunction(this.names.no_start, T.none, T.none, [], m.nop()));
    }
    m.addFunction(this.names.boot, T.none, T.none, [], m.block(null, body.length ? body : [m.nop()]));
    m.addFunctionExport(this.names.boot, EXPORT_BOOT);
  }

  /** Bit-exact copies of every mutable global to/from 16-byte slots of the globals save area. */
  private addGlobalsSaveLoad(): { name: string; type: ValueTypeName }[] {
    const m = this.m;
    const globals: { name: string; type: ValueTypeName; t: number }[] = [];
    for (let i = 0; i < m.getNumGlobals(); i++) {
      const g = b.getGlobalInfo(m.getGlobalByIndex(i));
      if (!g.mutable) continue;
      const type = typeName(g.type);
      assert(type, `mutable global ${g.name} has a value type`);
      globals.push({ name: g.name, type, t: g.type });
    }
    if (globals.length > GLOBALS_MAX) throw new UnsupportedModuleError(`more than ${GLOBALS_MAX} mutable globals`, `${globals.length} globals`);
    const zero = () => m.i32.const(0);
    const save: Ref[] = [];
    const load: Ref[] = [];
    globals.forEach((g, i) => {
      const offset = GLOBALS_OFFSET + i * GLOBAL_SLOT_BYTES;
      const ops = storeLoadOps(m, g.type);
      save.push(ops.store(offset, zero(), m.global.get(g.name, g.t), this.memoryName));
      load.push(m.global.set(g.name, ops.load(offset, zero(), this.memoryName)));
    });
    for (const [segment, flag] of this.dropFlags) {
      load.push(m.if(m.global.get(flag, T.i32), m.data.drop(segment)));
    }
    m.addFunction(this.names.save, T.none, T.none, [], m.block(null, save.length ? save : [m.nop()]));
    m.addFunction(this.names.load, T.none, T.none, [], m.block(null, load.length ? load : [m.nop()]));
    m.addFunctionExport(this.names.save, EXPORT_SAVE_GLOBALS);
    m.addFunctionExport(this.names.load, EXPORT_LOAD_GLOBALS);
    return globals.map(({ name, type }) => ({ name, type }));
  }
}

/**
 * The `pop` of a catch body and the slot that holds it (parent, setter and,
 * for operand lists, the index). Nested `try`s are not entered: a pop inside
 * one belongs to that try's own catch.
 */
function findPop(body: Ref): { pop: Ref; parent: Ref; parentId: number; setter: string; index: number | null } | null {
  const stack: Ref[] = [body];
  while (stack.length) {
    const e = stack.pop()!;
    const id = b.getExpressionId(e);
    if (id === b.TryId) continue;
    const spec = CHILDREN[id];
    if (!spec) continue; // refused later, when the body is visited
    const cls = kindClass(id);
    for (const [getter, setter] of spec.one ?? []) {
      const child = cls[getter](e);
      if (child === 0) continue;
      if (b.getExpressionId(child) === b.PopId) return { pop: child, parent: e, parentId: id, setter, index: null };
      stack.push(child);
    }
    if (spec.list) {
      const [count, getAt, setAt] = spec.list;
      for (let i = 0, n = cls[count](e); i < n; i++) {
        const child = cls[getAt](e, i);
        if (b.getExpressionId(child) === b.PopId) return { pop: child, parent: e, parentId: id, setter: setAt, index: i };
        stack.push(child);
      }
    }
  }
  return null;
}

/** Offset that makes any access trap: the memory never reaches 4 GiB (MEMORY_WASM_PAGES_MAX). */
const ALWAYS_TRAPS = 0xffffffff;

function shiftedOffset(offset: number): number {
  const shifted = (offset >>> 0) + BASE_BYTES; // binaryen.js getOffset() returns the u32 immediate as a signed i32
  // The original access always trapped too: guest memory is at most 4 GiB - BASE_BYTES.
  return shifted > 0xffffffff ? ALWAYS_TRAPS : shifted;
}

function typeName(t: number): ValueTypeName | undefined {
  if (t === T.i32) return "i32";
  if (t === T.i64) return "i64";
  if (t === T.f32) return "f32";
  if (t === T.f64) return "f64";
  if (t === T.v128) return "v128";
  return undefined;
}

function storeLoadOps(m: binaryen.Module, type: ValueTypeName) {
  switch (type) {
    case "i32":
      return { store: (o: number, p: Ref, v: Ref, mem: string) => m.i32.store(o, 4, p, v, mem), load: (o: number, p: Ref, mem: string) => m.i32.load(o, 4, p, mem) };
    case "i64":
      return { store: (o: number, p: Ref, v: Ref, mem: string) => m.i64.store(o, 8, p, v, mem), load: (o: number, p: Ref, mem: string) => m.i64.load(o, 8, p, mem) };
    case "f32":
      return { store: (o: number, p: Ref, v: Ref, mem: string) => m.f32.store(o, 4, p, v, mem), load: (o: number, p: Ref, mem: string) => m.f32.load(o, 4, p, mem) };
    case "f64":
      return { store: (o: number, p: Ref, v: Ref, mem: string) => m.f64.store(o, 8, p, v, mem), load: (o: number, p: Ref, mem: string) => m.f64.load(o, 8, p, mem) };
    case "v128":
      return { store: (o: number, p: Ref, v: Ref, mem: string) => m.v128.store(o, 16, p, v, mem), load: (o: number, p: Ref, mem: string) => m.v128.load(o, 16, p, mem) };
  }
}
