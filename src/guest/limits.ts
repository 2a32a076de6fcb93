/**
 * What the instrumenter takes: the size of a module, how many functions it
 * has and how deeply its blocks nest are bounded, and checked on the raw
 * bytes before Binaryen reads the module (Binaryen's time and memory grow
 * with all three, and parts of it recurse per nesting level). A module past a
 * limit is refused with a ModuleLimitError naming the limit and the module's
 * value. Nothing here loads Binaryen.
 */
import { InvalidModuleError, ModuleLimitError } from "./errors.js";

/**
 * Deepest expression nesting instrumented (levels below a function's body).
 * A large compiled `switch` nests one block per case, so a few thousand
 * levels occur in real code. Binaryen's binary writer recurses per level on
 * the JS stack: on a main thread's default stack it manages about 8,000
 * nested blocks but only about 2,500 nested binary operators. Blocks, loops,
 * ifs and trys nested deeper than this are refused before Binaryen reads the
 * module (checkModuleLimits); deeper expressions of other kinds (long chains
 * of operators, which the binary encodes without nesting) are refused by the
 * instrumenter's walk, and below the limit a stack overflow inside Binaryen
 * is still refused by name (instrument()).
 */
export const NESTING_MAX = 4_000;

/** The limits, by the names a ModuleLimitError gives. */
export const MODULE_LIMITS = {
  /** Bytes of the module's binary. */
  bytes_max: 16 * 1024 * 1024,
  /** Functions, imported and defined (the function index space). */
  functions_max: 10_000,
  /** Blocks, loops, ifs and trys nested in one function. */
  nesting_max: NESTING_MAX,
} as const;

export type ModuleLimit = keyof typeof MODULE_LIMITS;

/** Cheap enough to run before hashing or copying a module anywhere. */
export function checkModuleSize(bytes: Uint8Array): void {
  if (bytes.length > MODULE_LIMITS.bytes_max) throw new ModuleLimitError("bytes_max", bytes.length, MODULE_LIMITS.bytes_max, "module");
}

/**
 * Checks every limit and the module's validity (the engine's validator),
 * in that order of cost: size first, then validity, then functions and
 * nesting from one pass over the code section. Returns the compiled module,
 * which the instrumenter reads imports and exports from.
 */
export function checkModuleLimits(input: Uint8Array): WebAssembly.Module {
  checkModuleSize(input);
  const bytes = input as Uint8Array<ArrayBuffer>;
  let compiled: WebAssembly.Module;
  try {
    compiled = new WebAssembly.Module(bytes);
  } catch (error) {
    // Node's own validator gives the precise reason; Binaryen would abort the process on some inputs.
    throw new InvalidModuleError(`not a valid WebAssembly module: ${(error as Error).message}`);
  }
  const imported = WebAssembly.Module.imports(compiled).filter((i) => i.kind === "function").length;
  const scan = scanCode(bytes);
  const functions = imported + scan.functions.length;
  if (functions > MODULE_LIMITS.functions_max) throw new ModuleLimitError("functions_max", functions, MODULE_LIMITS.functions_max, "module");
  // A scan that did not finish (an instruction it does not know) refuses nothing: the instrumenter's walk still bounds it.
  const index = scan.functions.findIndex((f) => f.complete && f.depth > MODULE_LIMITS.nesting_max);
  if (index >= 0) {
    // Binaryen names a function the name section does not name by its index among the defined functions.
    const name = functionNames(compiled).get(imported + index) ?? String(index);
    throw new ModuleLimitError("nesting_max", scan.functions[index].depth, MODULE_LIMITS.nesting_max, `function ${name}`);
  }
  return compiled;
}

/** One function body of the code section as the scan saw it. */
export interface ScannedFunction {
  /** Deepest nesting of blocks, loops, ifs and trys (0: none). */
  depth: number;
  /**
   * The scan read every instruction and the body's last `end` closed its
   * last block. False if it met an instruction it does not know (one the
   * engine accepts only behind a flag): then `depth` is what it saw before.
   */
  complete: boolean;
}

/**
 * Reads the code section of a module the engine validated: per function
 * body, the deepest block nesting. Iterative and linear in the size of the
 * code, whatever the nesting.
 */
export function scanCode(bytes: Uint8Array): { functions: ScannedFunction[] } {
  const functions: ScannedFunction[] = [];
  const r = new Reader(bytes, 8); // magic + version
  while (r.pos < bytes.length) {
    const id = r.byte();
    const size = r.u32();
    const end = r.pos + size;
    if (id === 10) {
      const count = r.u32();
      for (let i = 0; i < count; i++) {
        const bodySize = r.u32();
        const bodyEnd = r.pos + bodySize;
        functions.push(scanBody(new Reader(bytes.subarray(0, bodyEnd), r.pos)));
        r.pos = bodyEnd;
      }
    }
    r.pos = end;
  }
  return { functions };
}

/** Opcodes that open a block closed by `end` (block, loop, if, try, try_table). */
const OPENS = new Set([0x02, 0x03, 0x04, 0x06, 0x1f]);

function scanBody(r: Reader): ScannedFunction {
  // Locals: a vector of (count, type).
  for (let n = r.u32(); n > 0; n--) {
    r.u32();
    r.valueType();
  }
  let depth = 0;
  let deepest = 0;
  try {
    while (r.pos < r.end) {
      const op = r.byte();
      if (OPENS.has(op)) {
        r.blockType();
        if (op === 0x1f) {
          // try_table: catch clauses (kind, [tag], label).
          for (let n = r.u32(); n > 0; n--) {
            const kind = r.byte();
            if (kind === 0x00 || kind === 0x01) r.u32();
            r.u32();
          }
        }
        if (++depth > deepest) deepest = depth;
        continue;
      }
      if (op === 0x0b || op === 0x18) {
        // end, or delegate (which closes its try): the body's own `end` is the last byte.
        if (op === 0x18) r.u32();
        if (--depth < 0) return { depth: deepest, complete: r.pos === r.end };
        continue;
      }
      if (!skipImmediates(op, r)) return { depth: deepest, complete: false };
    }
  } catch (error) {
    if (error instanceof ScanOverrun) return { depth: deepest, complete: false };
    throw error;
  }
  return { depth: deepest, complete: false };
}

/**
 * Skips the immediates of `op` (not a block opener or closer). False for an
 * opcode this scan does not know.
 */
function skipImmediates(op: number, r: Reader): boolean {
  if (op >= 0x45 && op <= 0xc4) return true; // numeric
  if (op >= 0x28 && op <= 0x3e) return r.memarg(); // loads and stores
  if (op >= 0x20 && op <= 0x26) return r.skipLeb(); // local/global get/set/tee, table.get/set
  switch (op) {
    case 0x00: // unreachable
    case 0x01: // nop
    case 0x05: // else
    case 0x0a: // throw_ref
    case 0x0f: // return
    case 0x19: // catch_all
    case 0x1a: // drop
    case 0x1b: // select
    case 0xd1: // ref.is_null
    case 0xd3: // ref.eq
    case 0xd4: // ref.as_non_null
      return true;
    case 0x07: // catch tag
    case 0x08: // throw tag
    case 0x09: // rethrow label
    case 0x0c: // br
    case 0x0d: // br_if
    case 0x10: // call
    case 0x12: // return_call
    case 0x14: // call_ref type
    case 0x15: // return_call_ref type
    case 0x3f: // memory.size
    case 0x40: // memory.grow
    case 0x41: // i32.const
    case 0x42: // i64.const
    case 0xd0: // ref.null heap type
    case 0xd2: // ref.func
    case 0xd5: // br_on_null
    case 0xd6: // br_on_non_null
      return r.skipLeb();
    case 0x11: // call_indirect type table
    case 0x13: // return_call_indirect type table
      return r.skipLeb() && r.skipLeb();
    case 0x0e: // br_table
      for (let n = r.u32(); n >= 0; n--) r.skipLeb(); // the targets and the default
      return true;
    case 0x1c: // select with types
      for (let n = r.u32(); n > 0; n--) r.valueType();
      return true;
    case 0x43: // f32.const
      return r.skip(4);
    case 0x44: // f64.const
      return r.skip(8);
    case 0xfc:
      return skipMisc(r.u32(), r);
    case 0xfd:
      return skipSimd(r.u32(), r);
    case 0xfe:
      return skipAtomic(r.u32(), r);
    default:
      return false;
  }
}

/** 0xfc prefix: saturating truncations, bulk memory, table operations. */
function skipMisc(sub: number, r: Reader): boolean {
  if (sub <= 7) return true; // trunc_sat
  switch (sub) {
    case 8: // memory.init data memory
    case 10: // memory.copy memory memory
    case 12: // table.init elem table
    case 14: // table.copy table table
      return r.skipLeb() && r.skipLeb();
    case 9: // data.drop
    case 11: // memory.fill
    case 13: // elem.drop
    case 15: // table.grow
    case 16: // table.size
    case 17: // table.fill
      return r.skipLeb();
    default:
      return false;
  }
}

/** 0xfd prefix: SIMD (and relaxed SIMD, which has no immediates). */
function skipSimd(sub: number, r: Reader): boolean {
  if (sub <= 11 || sub === 92 || sub === 93) return r.memarg(); // loads, store, load_zero
  if (sub === 12 || sub === 13) return r.skip(16); // v128.const, i8x16.shuffle
  if (sub >= 21 && sub <= 34) return r.skip(1); // extract/replace lane
  if (sub >= 84 && sub <= 91) return r.memarg() && r.skip(1); // load/store lane
  return sub <= 0xff || (sub >= 0x100 && sub <= 0x113);
}

/** 0xfe prefix: atomics (refused later, by name, but read here). */
function skipAtomic(sub: number, r: Reader): boolean {
  if (sub === 0x03) return r.skip(1); // atomic.fence
  if (sub <= 0x02 || (sub >= 0x10 && sub <= 0x4e)) return r.memarg();
  return false;
}

class ScanOverrun extends Error {}

/** Reads LEB128 and bytes within [pos, end) of a validated module; reading past `end` throws ScanOverrun. */
class Reader {
  readonly end: number;
  constructor(
    private readonly bytes: Uint8Array,
    public pos: number,
  ) {
    this.end = bytes.length;
  }

  byte(): number {
    if (this.pos >= this.end) throw new ScanOverrun();
    return this.bytes[this.pos++];
  }

  u32(): number {
    let value = 0;
    let shift = 0;
    for (;;) {
      const b = this.byte();
      value += (b & 0x7f) * 2 ** shift;
      if ((b & 0x80) === 0) return value;
      shift += 7;
    }
  }

  skipLeb(): true {
    while (this.byte() & 0x80);
    return true;
  }

  skip(n: number): true {
    if (this.pos + n > this.end) throw new ScanOverrun();
    this.pos += n;
    return true;
  }

  /** align (bit 6: a memory index follows), [memory], offset. */
  memarg(): true {
    const align = this.u32();
    if (align & 0x40) this.skipLeb();
    return this.skipLeb();
  }

  /** A value type: one byte, or (ref null? ht) with a heap type. */
  valueType(): void {
    const b = this.byte();
    if (b === 0x63 || b === 0x64) this.skipLeb();
  }

  /** A block type: empty (0x40), a value type, or a type index (s33). */
  blockType(): void {
    const b = this.bytes[this.pos];
    if (b === 0x63 || b === 0x64) {
      this.pos++;
      this.skipLeb();
    } else {
      this.skipLeb();
    }
  }
}

/** Function names of the name section (by index in the function index space), if it has them. */
function functionNames(compiled: WebAssembly.Module): Map<number, string> {
  const names = new Map<number, string>();
  const [section] = WebAssembly.Module.customSections(compiled, "name");
  if (!section) return names;
  try {
    const r = new Reader(new Uint8Array(section), 0);
    while (r.pos < r.end) {
      const id = r.byte();
      const size = r.u32();
      const end = r.pos + size;
      if (id === 1) {
        const decoder = new TextDecoder();
        for (let n = r.u32(); n > 0; n--) {
          const index = r.u32();
          const length = r.u32();
          const start = r.pos;
          r.skip(length);
          names.set(index, decoder.decode(new Uint8Array(section, start, length)));
        }
        return names;
      }
      r.pos = end;
    }
  } catch (error) {
    // A damaged name section names nothing (the engine does not validate custom sections).
    if (!(error instanceof ScanOverrun)) throw error;
  }
  return names;
}
