/**
 * Write-barrier hoisting for counted loops (used by src/guest/instrument.ts).
 *
 * A store inside a loop normally carries a per-site barrier: a compare and a
 * branch on every iteration. For a counted loop whose store addresses are an
 * affine function of the induction variable, the pages the loop can write are
 * known before it starts, so the loop is versioned:
 *
 *   if (<the range is computable: no wrap, exact addresses, bounded>) {
 *     if (<the loop runs at least once>) __cohort_mark_pages(first, last)   ;; per group of stores
 *     <the loop, its covered stores without a barrier>
 *   } else {
 *     <a copy of the loop, every store with its usual barrier>
 *   }
 *
 * Shapes recognised (Binaryen IR after `dce`; i is an i32 local, s > 0 a constant):
 *   top test      loop $L (if (i REL n) (then ... i = i + s ... (br $L)))
 *                 loop $L (block (br_if $out (not (i REL n))) ... i = i + s ... (br $L))
 *   bottom test   loop $L (block ... i = i + s ... (br_if $L (i REL n)))
 *                 loop $L (block ... (br_if $L ((local.tee i (i + s)) REL n)))
 * with REL one of <u <s <=u <=s != (either operand order), n loop-invariant,
 * i set nowhere else in the loop. A store is covered when it sits on the
 * iteration's straight-line path (not under an `if` or a named block) and its
 * address is base + B*i + c with 0 < B <= 2^24, base a sum of loop-invariant
 * locals and globals times constants.
 *
 * Not hoisted (the per-site barriers stay): loops containing another loop,
 * memory.grow, calls to guest functions or call_indirect (either could grow
 * memory, so a range clamped to the old size could miss pages), try/throw;
 * negative steps or strides, bounds that change in the loop; stores whose
 * address is not affine in i or that run only on some iterations. Loops that
 * may leave early (a branch out, return, a `br $L` that skips the test) are
 * hoisted only when the range spans at most EARLY_EXIT_PAGES_MAX pages, so an
 * early exit cannot mark many pages the loop never wrote.
 *
 * Why it is sound: checkpoints happen only between guest calls, so marking
 * pages before the loop instead of at each store is invisible to a capture;
 * marking a page early keeps its epoch-start pre-image, since nothing wrote
 * it yet. Marking is host-side bookkeeping (the dirty map lives below
 * BASE_BYTES) and never touches guest memory, so a store that traps still
 * traps at the same iteration with the same memory. The range is clamped to
 * the memory's current size; with no memory.grow possible inside the loop a
 * store beyond that size traps, so nothing it could write goes unmarked.
 */
import binaryen from "binaryen";
import { BASE_BYTES, PAGE_SHIFT } from "../vm/layout.js";

type Ref = number;
const b = binaryen;
const T = { none: b.none, i32: b.i32, i64: b.i64 };

/** Loops that may exit early are hoisted only if their range spans at most this many 4 KiB pages. */
export const EARLY_EXIT_PAGES_MAX = 16;
/** Loops versioned per function at most: each costs a copy of the loop and its range computation. */
const HOIST_LOOPS_MAX = 32;
/** Loops larger than this many expression nodes are not considered. */
const SCAN_NODES_MAX = 20_000;
/** Largest induction step and address stride handled (keeps every range computation exact in i64). */
const COEFFICIENT_MAX = 1 << 24;

type Accessor = (expr: Ref, ...args: number[]) => number;
/** binaryen.js's per-kind accessor classes, which its type declarations omit. */
const K = b as unknown as Record<string, Record<string, Accessor> & { getName: (e: Ref) => string; setName: (e: Ref, n: string) => void }>;

/**
 * Children of the expression kinds a hoistable loop may contain; anything else
 * makes the loop not hoistable. The store-groups pass (barrier-groups.ts) uses
 * the part of it whose effects it understands.
 */
export const CHILD_GETTERS: Record<number, [string, string[]]> = {
  [b.BlockId]: ["Block", []],
  [b.IfId]: ["If", ["getCondition", "getIfTrue", "getIfFalse"]],
  [b.BreakId]: ["Break", ["getCondition", "getValue"]],
  [b.SwitchId]: ["Switch", ["getCondition", "getValue"]],
  [b.CallId]: ["Call", []],
  [b.LocalGetId]: ["LocalGet", []],
  [b.LocalSetId]: ["LocalSet", ["getValue"]],
  [b.GlobalGetId]: ["GlobalGet", []],
  [b.GlobalSetId]: ["GlobalSet", ["getValue"]],
  [b.LoadId]: ["Load", ["getPtr"]],
  [b.StoreId]: ["Store", ["getPtr", "getValue"]],
  [b.ConstId]: ["Const", []],
  [b.UnaryId]: ["Unary", ["getValue"]],
  [b.BinaryId]: ["Binary", ["getLeft", "getRight"]],
  [b.SelectId]: ["Select", ["getIfTrue", "getIfFalse", "getCondition"]],
  [b.DropId]: ["Drop", ["getValue"]],
  [b.ReturnId]: ["Return", ["getValue"]],
  [b.MemorySizeId]: ["MemorySize", []],
  [b.NopId]: ["Nop", []],
  [b.UnreachableId]: ["Unreachable", []],
  [b.SIMDExtractId]: ["SIMDExtract", ["getVec"]],
  [b.SIMDReplaceId]: ["SIMDReplace", ["getVec", "getValue"]],
  [b.SIMDShuffleId]: ["SIMDShuffle", ["getLeft", "getRight"]],
  [b.SIMDTernaryId]: ["SIMDTernary", ["getA", "getB", "getC"]],
  [b.SIMDShiftId]: ["SIMDShift", ["getVec", "getShift"]],
  [b.SIMDLoadId]: ["SIMDLoad", ["getPtr"]],
  [b.SIMDLoadStoreLaneId]: ["SIMDLoadStoreLane", ["getPtr", "getVec"]],
  [b.MemoryCopyId]: ["MemoryCopy", ["getDest", "getSource", "getSize"]],
  [b.MemoryFillId]: ["MemoryFill", ["getDest", "getValue", "getSize"]],
  [b.MemoryInitId]: ["MemoryInit", ["getDest", "getOffset", "getSize"]],
  [b.DataDropId]: ["DataDrop", []],
  [b.RefIsNullId]: ["RefIsNull", ["getValue"]],
  [b.RefNullId]: ["RefNull", []],
  [b.RefFuncId]: ["RefFunc", []],
  [b.TableSizeId]: ["TableSize", []],
  [b.TableGetId]: ["TableGet", ["getIndex"]],
};

function children(e: Ref): Ref[] | null {
  const id = b.getExpressionId(e);
  const spec = CHILD_GETTERS[id];
  if (!spec) return null;
  const cls = K[spec[0]];
  const out: Ref[] = [];
  for (const getter of spec[1]) {
    const c = cls[getter](e);
    if (c) out.push(c);
  }
  if (id === b.BlockId) for (let i = 0, n = K.Block.getNumChildren(e); i < n; i++) out.push(K.Block.getChildAt(e, i));
  if (id === b.CallId) for (let i = 0, n = K.Call.getNumOperands(e); i < n; i++) out.push(K.Call.getOperandAt(e, i));
  return out;
}

const isId = (e: Ref, id: number) => e !== 0 && b.getExpressionId(e) === id;
const blockChildren = (e: Ref): Ref[] => Array.from({ length: K.Block.getNumChildren(e) }, (_, i) => K.Block.getChildAt(e, i));
const i32Const = (e: Ref): number | null => (isId(e, b.ConstId) && b.getExpressionType(e) === T.i32 ? K.Const.getValueI32(e) : null);
const localGet = (e: Ref): number | null => (isId(e, b.LocalGetId) ? K.LocalGet.getIndex(e) : null);

/** Continue condition of the loop: i REL n. */
interface Test {
  rel: "lt" | "le" | "ne";
  signed: boolean;
  bound: Ref;
  /** The induction variable is incremented inside the test (bottom test only): (local.tee i (i + s)). */
  teeStep: number | null;
}

/** base + iv*i + c (mod 2^32); base = Σ coefficient × symbol, symbols being invariant locals ("l<index>") and globals ("g<name>"). */
interface Affine {
  c: number;
  iv: number;
  terms: Map<string, number>;
}

interface Covered {
  affine: Affine;
  /** Byte offset of the access relative to the address: the store's offset immediate plus BASE_BYTES. */
  offset: number;
  width: number;
  /** Evaluated after the increment: the address sees i + s. */
  after: boolean;
}

interface Shape {
  iv: number;
  step: number;
  test: Test;
  bottom: boolean;
  /** Statements run once per iteration, in order. */
  path: Ref[];
  /** Index in `path` of the increment statement; -1 when it sits in the test. */
  incAt: number;
  /** Label of the block holding `path` (a branch to it leaves the loop), if any. */
  pathLabel: string | null;
  /** The top test's exit branch (br_if out of the loop), if the shape has one. */
  exitBranch: Ref;
  /** The final branch (br $L, or the bottom test's br_if $L). */
  backEdge: Ref;
  /** Locals and globals the bound reads: the loop must set none of them. */
  boundReads: { locals: Set<number>; globals: Set<string> };
}

/** Per function: versions hoistable loops and remembers the stores left without a barrier. */
export class BarrierHoist {
  private readonly covered = new Set<Ref>();
  private readonly done = new Set<Ref>();
  private labels = 0;

  constructor(
    private readonly m: binaryen.Module,
    private readonly fn: Ref,
    /** Name of the helper added by addMarkPages. */
    private readonly markPages: string,
    /** True for a function the module imports (host functions never grow memory nor run guest code). */
    private readonly isImport: (name: string) => boolean,
  ) {}

  /** True if the store's pages are marked before its loop runs: it needs no barrier of its own. */
  covers(store: Ref): boolean {
    return this.covered.has(store);
  }

  /** The loop, or what replaces it (a versioned pair); each loop is considered once. */
  loop(loop: Ref): Ref {
    if (this.done.has(loop) || this.labels >= HOIST_LOOPS_MAX) return loop;
    this.done.add(loop);
    const type = b.getExpressionType(loop);
    if (type !== T.none && type !== b.unreachable) return loop; // a loop that falls out of its end with a value: not handled
    const shape = recognise(loop);
    if (!shape) return loop;
    const scan = this.scan(loop, shape);
    if (!scan) return loop;
    for (const local of shape.boundReads.locals) if (scan.setLocals.has(local)) return loop;
    for (const global of shape.boundReads.globals) if (scan.setGlobals.has(global)) return loop;
    const stores = this.coveredStores(shape, scan.setLocals, scan.setGlobals);
    if (stores.size === 0) return loop;
    return this.version(loop, shape, stores, scan.irregular);
  }

  /**
   * Walks the loop: refuses what makes hoisting unsound, collects what it sets,
   * and says whether control can leave an iteration early (irregular).
   */
  private scan(loop: Ref, shape: Shape): { setLocals: Map<number, number>; setGlobals: Set<string>; irregular: boolean } | null {
    const setLocals = new Map<number, number>();
    const setGlobals = new Set<string>();
    const inner = new Set<string>(); // labels defined inside the loop body (other than the path's block)
    const branches: { e: Ref; names: string[] }[] = [];
    let irregular = false;
    const loopName = K.Loop.getName(loop);
    const stack = [K.Loop.getBody(loop)];
    for (let seen = 0; stack.length; seen++) {
      if (seen >= SCAN_NODES_MAX) return null; // bounds the instrumenter's work on nests of large loops
      const e = stack.pop()!;
      const id = b.getExpressionId(e);
      const kids = children(e);
      if (!kids) return null; // loop, try, throw, call_indirect, memory.grow, atomics, ...
      switch (id) {
        case b.BlockId: {
          const name = K.Block.getName(e);
          if (name && name !== shape.pathLabel) inner.add(name);
          break;
        }
        case b.CallId:
          if (K.Call.isReturn(e) || !this.isImport(K.Call.getTarget(e) as unknown as string)) return null;
          break;
        case b.LocalSetId: {
          const index = K.LocalSet.getIndex(e);
          setLocals.set(index, (setLocals.get(index) ?? 0) + 1);
          break;
        }
        case b.GlobalSetId:
          setGlobals.add(K.GlobalSet.getName(e) as unknown as string);
          break;
        case b.BreakId:
          branches.push({ e, names: [K.Break.getName(e)] });
          break;
        case b.SwitchId: {
          const names = Array.from({ length: K.Switch.getNumNames(e) }, (_, i) => K.Switch.getNameAt(e, i) as unknown as string);
          names.push(K.Switch.getDefaultName(e) as unknown as string);
          branches.push({ e, names });
          break;
        }
        case b.ReturnId:
          irregular = true;
          break;
      }
      stack.push(...kids);
    }
    if (setLocals.get(shape.iv) !== 1) return null;
    for (const { e, names } of branches) {
      if (e === shape.backEdge || e === shape.exitBranch) continue;
      for (const name of names) {
        if (inner.has(name)) continue;
        // A branch out of the loop, or one to $L that skips the rest of the iteration: an early exit.
        // At the bottom test a `br $L` would also skip the test, so the range would not bound i.
        if (name === loopName && shape.bottom) return null;
        irregular = true;
      }
    }
    return { setLocals, setGlobals, irregular };
  }

  /** The stores on the iteration's straight-line path whose address is affine in i (keyed by store). */
  private coveredStores(shape: Shape, setLocals: Map<number, number>, setGlobals: Set<string>): Map<Ref, Covered> {
    const out = new Map<Ref, Covered>();
    const invariant = (sym: string) => (sym[0] === "l" ? !setLocals.has(Number(sym.slice(1))) : !setGlobals.has(sym.slice(1)));
    const consider = (store: Ref, ptr: Ref, offset: number, width: number, after: boolean) => {
      const shifted = (offset >>> 0) + BASE_BYTES;
      if (shifted > 0xffffffff) return; // always traps: the instrumenter leaves it without a barrier anyway
      const affine = affineOf(ptr, shape.iv);
      if (!affine || affine.iv <= 0 || affine.iv > COEFFICIENT_MAX) return;
      for (const sym of affine.terms.keys()) if (!invariant(sym)) return;
      out.set(store, { affine, offset: shifted, width, after });
    };
    shape.path.forEach((statement, index) => {
      if (index === shape.incAt) return;
      const after = shape.incAt >= 0 && index > shape.incAt;
      // Descend only through nodes whose children always run, in order, once.
      const stack = [statement];
      while (stack.length) {
        const e = stack.pop()!;
        const id = b.getExpressionId(e);
        if (id === b.IfId || id === b.LoopId || (id === b.BlockId && K.Block.getName(e))) continue;
        if (id === b.BreakId || id === b.SwitchId) continue; // a value or condition runs, but keep it simple
        if (id === b.StoreId && !K.Store.isAtomic(e)) consider(e, K.Store.getPtr(e), K.Store.getOffset(e), K.Store.getBytes(e), after);
        if (id === b.SIMDLoadStoreLaneId && K.SIMDLoadStoreLane.isStore(e)) {
          consider(e, K.SIMDLoadStoreLane.getPtr(e), K.SIMDLoadStoreLane.getOffset(e), laneBytes(K.SIMDLoadStoreLane.getOp(e)), after);
        }
        stack.push(...(children(e) ?? []));
      }
    });
    return out;
  }

  private addVar(type: number): number {
    return (b as unknown as { _BinaryenFunctionAddVar: (f: Ref, t: number) => number })._BinaryenFunctionAddVar(this.fn, type);
  }

  /** if (guard) { mark; loop } else { copy of loop } */
  private version(loop: Ref, shape: Shape, covered: Map<Ref, Covered>, irregular: boolean): Ref {
    const m = this.m;
    const { step, test, iv } = shape;
    const i32 = m.i32;
    const i64 = m.i64;
    const c64 = (n: number) => i64.const(BigInt(n) as unknown as number); // binaryen.js takes a bigint; its declarations say number
    const get32 = (l: number) => m.local.get(l, T.i32);
    const get64 = (l: number) => m.local.get(l, T.i64);
    const i0 = this.addVar(T.i32);
    const n = this.addVar(T.i32);
    const lo = this.addVar(T.i64);
    const hi = this.addVar(T.i64);
    const ok = this.addVar(T.i32);
    const ext = (l: number) => (test.signed ? i64.extend_s(get32(l)) : i64.extend_u(get32(l)));
    // Domain of the comparison: unsigned [0, 2^32), signed [-2^31, 2^31). DMAX - k as an i32 constant.
    const maxMinus = (k: number) => i32.const(((test.signed ? 0x7fffffff : 0xffffffff) - k) | 0);
    const le = (a: Ref, c: Ref) => (test.signed ? i32.le_s(a, c) : i32.le_u(a, c));
    const lt = (a: Ref, c: Ref) => (test.signed ? i32.lt_s(a, c) : i32.lt_u(a, c));

    // No wrap of i while the loop runs (so the values it takes are [lo, hi] exactly), and the interval [lo, hi].
    const conditions: Ref[] = [];
    let enter: Ref | null; // the body runs at least once
    if (test.rel === "ne") {
      // i != n with i stepping up from i0: stops at n only if n - i0 is a multiple of s (and i0 < n at the bottom test).
      conditions.push(shape.bottom ? i32.lt_u(get32(i0), get32(n)) : i32.le_u(get32(i0), get32(n)));
      const diff = i32.sub(get32(n), get32(i0));
      conditions.push(i32.eqz((step & (step - 1)) === 0 ? i32.and(diff, i32.const(step - 1)) : i32.rem_u(diff, i32.const(step))));
      enter = shape.bottom ? null : i32.ne(get32(i0), get32(n));
    } else {
      const slack = test.rel === "lt" ? step - 1 : step; // lt: n - 1 + s <= DMAX; le: n + s <= DMAX
      conditions.push(le(get32(n), maxMinus(slack)));
      if (shape.bottom) conditions.push(le(get32(i0), maxMinus(step))); // the first increment happens whatever n is
      enter = shape.bottom ? null : test.rel === "lt" ? lt(get32(i0), get32(n)) : le(get32(i0), get32(n));
    }
    const last = test.rel === "le" ? ext(n) : i64.sub(ext(n), c64(1));
    const setRange = [
      m.local.set(lo, test.rel === "ne" ? i64.extend_u(get32(i0)) : ext(i0)),
      m.local.set(hi, test.rel === "ne" ? i64.sub(i64.extend_u(get32(n)), c64(1)) : last),
    ];
    // At the bottom test the first iteration runs with i0 whatever the bound: hi = max(lo, hi).
    if (shape.bottom) setRange.push(m.if(i64.lt_s(get64(hi), get64(lo)), m.local.set(hi, get64(lo))));

    // Groups of stores with the same base and stride share one range.
    const groups = new Map<string, Covered[]>();
    for (const s of covered.values()) {
      const key = `${s.affine.iv}|${[...s.affine.terms].sort().map(([k, v]) => `${k}*${v}`).join("+")}`;
      const list = groups.get(key) ?? [];
      list.push(s);
      groups.set(key, list);
    }
    const checks: Ref[] = [];
    const marks: Ref[] = [];
    const prep: Ref[] = [];
    for (const list of groups.values()) {
      const { iv: stride, terms } = list[0].affine;
      // Exact address of store j at i: S + c_j + stride*i, S = (Σ terms) mod 2^32 in [0, 2^32); c_j exact (i + s folded in).
      const cOf = (s: Covered) => s.affine.c + (s.after ? stride * step : 0);
      const cMin = Math.min(...list.map(cOf));
      const cMax = Math.max(...list.map(cOf));
      const oMin = Math.min(...list.map((s) => s.offset));
      const endMax = Math.max(...list.map((s) => s.offset + s.width));
      const base = this.addVar(T.i64);
      const eMin = this.addVar(T.i64);
      const eMax = this.addVar(T.i64);
      const first = this.addVar(T.i64);
      const lastPage = this.addVar(T.i64);
      prep.push(
        m.local.set(base, i64.extend_u(sumOf(m, terms))),
        m.local.set(eMin, i64.add(i64.add(get64(base), c64(cMin)), i64.mul(c64(stride), get64(lo)))),
        m.local.set(eMax, i64.add(i64.add(get64(base), c64(cMax)), i64.mul(c64(stride), get64(hi)))),
        m.local.set(first, i64.shr_u(i64.add(get64(eMin), c64(oMin)), c64(PAGE_SHIFT))),
        m.local.set(lastPage, i64.shr_u(i64.add(get64(eMax), c64(endMax - 1)), c64(PAGE_SHIFT))),
      );
      // Every address the group computes is exact (no 32-bit wrap) iff the extremes are in [0, 2^32).
      checks.push(i64.ge_s(get64(eMin), c64(0)), i64.le_s(get64(eMax), c64(0xffffffff)));
      if (irregular) checks.push(i64.le_u(i64.sub(get64(lastPage), get64(first)), c64(EARLY_EXIT_PAGES_MAX - 1)));
      // Page numbers below 2^21 (addresses < 2^32 plus an offset < 2^32): they fit an i32.
      marks.push(m.call(this.markPages, [i32.wrap(get64(first)), i32.wrap(get64(lastPage))], T.none));
    }
    const all = (xs: Ref[]) => xs.reduce((a, x) => i32.and(a, x));
    const ranged = m.block(null, [...setRange, ...prep, m.if(all(checks), m.block(null, [...marks, m.local.set(ok, i32.const(1))]))]);
    const guard = m.block(null, [
      m.local.set(i0, m.local.get(iv, T.i32)),
      m.local.set(n, m.copyExpression(test.bound)),
      m.local.set(ok, i32.const(0)),
      m.if(all(conditions), enter ? m.if(enter, ranged, m.local.set(ok, i32.const(1))) : ranged),
    ]);
    const slow = this.renamedCopy(loop);
    for (const store of covered.keys()) this.covered.add(store);
    this.done.add(slow);
    // The loop's own type: `unreachable` when it only leaves by a branch (its body ends in br $L).
    return m.block(null, [guard, m.if(get32(ok), loop, slow)], b.getExpressionType(loop));
  }

  /** A copy of the loop with fresh label names (Binaryen IR needs them unique in a function). */
  private renamedCopy(loop: Ref): Ref {
    const copy = this.m.copyExpression(loop);
    const id = this.labels++;
    const fresh = new Map<string, string>();
    const rename = (name: string) => {
      let to = fresh.get(name);
      if (!to) fresh.set(name, (to = `${name}$cohort_unhoisted${id}`));
      return to;
    };
    const stack = [copy];
    while (stack.length) {
      const e = stack.pop()!;
      const id = b.getExpressionId(e);
      if (id === b.LoopId) {
        K.Loop.setName(e, rename(K.Loop.getName(e)));
        stack.push(K.Loop.getBody(e));
        continue;
      }
      if (id === b.BlockId && K.Block.getName(e)) K.Block.setName(e, rename(K.Block.getName(e)));
      stack.push(...(children(e) ?? []));
    }
    // Branches are renamed in a second pass: every label of the copy is known by now.
    stack.push(copy);
    while (stack.length) {
      const e = stack.pop()!;
      const id = b.getExpressionId(e);
      if (id === b.LoopId) {
        stack.push(K.Loop.getBody(e));
        continue;
      }
      if (id === b.BreakId) {
        const to = fresh.get(K.Break.getName(e));
        if (to) K.Break.setName(e, to);
      }
      if (id === b.SwitchId) {
        const sw = K.Switch as unknown as Record<string, (e: Ref, ...a: unknown[]) => unknown>;
        for (let i = 0, count = K.Switch.getNumNames(e); i < count; i++) {
          const to = fresh.get(K.Switch.getNameAt(e, i) as unknown as string);
          if (to) sw.setNameAt(e, i, to);
        }
        const to = fresh.get(K.Switch.getDefaultName(e) as unknown as string);
        if (to) sw.setDefaultName(e, to);
      }
      stack.push(...(children(e) ?? []));
    }
    return copy;
  }
}

/**
 * True unless `e` surely cannot grow memory: it contains no memory.grow, no
 * call but to imports (host functions never grow memory), no call_indirect;
 * anything not understood, or larger than GROWTH_INSPECT_MAX nodes, counts as
 * growing. A store whose value may grow memory needs its barrier after the
 * value: before it, the page may still lie beyond the memory's end, where
 * marking it does nothing, and become writable when the value grows memory.
 */
export function mayGrowMemory(e: Ref, isImport: (name: string) => boolean): boolean {
  const stack = [e];
  for (let seen = 0; stack.length; seen++) {
    const x = stack.pop()!;
    if (seen >= GROWTH_INSPECT_MAX) return true;
    const kids = children(x);
    if (!kids) return true; // memory.grow, call_indirect, loops, try, ...
    if (b.getExpressionId(x) === b.CallId && (K.Call.isReturn(x) || !isImport(K.Call.getTarget(x) as unknown as string))) return true;
    stack.push(...kids);
  }
  return false;
}
const GROWTH_INSPECT_MAX = 256;

/** Σ coefficient × symbol as an i32 expression (0 if empty). */
function sumOf(m: binaryen.Module, terms: Map<string, number>): Ref {
  let sum: Ref | null = null;
  for (const [sym, coefficient] of terms) {
    const value = sym[0] === "l" ? m.local.get(Number(sym.slice(1)), T.i32) : m.global.get(sym.slice(1), T.i32);
    const term = coefficient === 1 ? value : m.i32.mul(value, m.i32.const(coefficient));
    sum = sum === null ? term : m.i32.add(sum, term);
  }
  return sum ?? m.i32.const(0);
}

/** The address as base + iv*i + c (mod 2^32), or null if it is not of that form. */
function affineOf(e: Ref, iv: number): Affine | null {
  const id = b.getExpressionId(e);
  if (b.getExpressionType(e) !== T.i32) return null;
  const c = i32Const(e);
  if (c !== null) return { c, iv: 0, terms: new Map() };
  const local = localGet(e);
  if (local !== null) return local === iv ? { c: 0, iv: 1, terms: new Map() } : { c: 0, iv: 0, terms: new Map([[`l${local}`, 1]]) };
  if (id === b.GlobalGetId) return { c: 0, iv: 0, terms: new Map([[`g${K.GlobalGet.getName(e) as unknown as string}`, 1]]) };
  if (id !== b.BinaryId) return null;
  const op = K.Binary.getOp(e);
  const l = affineOf(K.Binary.getLeft(e), iv);
  const r = affineOf(K.Binary.getRight(e), iv);
  if (!l || !r) return null;
  const constant = (a: Affine) => (a.iv === 0 && a.terms.size === 0 ? a.c : null);
  if (op === b.AddInt32) return combine(l, r, 1);
  if (op === b.SubInt32) return combine(l, r, -1);
  if (op === b.MulInt32) {
    const k = constant(r) ?? constant(l);
    if (k === null) return null;
    return scale(constant(r) !== null ? l : r, k);
  }
  if (op === b.ShlInt32) {
    const k = constant(r);
    return k === null ? null : scale(l, (1 << (k & 31)) | 0);
  }
  return null;
}

function combine(a: Affine, x: Affine, sign: 1 | -1): Affine {
  const terms = new Map(a.terms);
  for (const [sym, k] of x.terms) {
    const sum = (terms.get(sym) ?? 0) + sign * k;
    if ((sum | 0) === 0) terms.delete(sym);
    else terms.set(sym, sum | 0);
  }
  return { c: (a.c + sign * x.c) | 0, iv: (a.iv + sign * x.iv) | 0, terms };
}

function scale(a: Affine, k: number): Affine {
  const terms = new Map<string, number>();
  for (const [sym, v] of a.terms) if (Math.imul(v, k) !== 0) terms.set(sym, Math.imul(v, k));
  return { c: Math.imul(a.c, k), iv: Math.imul(a.iv, k), terms };
}

/** s if `e` is (i + s) or (i - (-s)) with s in (0, COEFFICIENT_MAX]. */
function stepOf(e: Ref, iv: number): number | null {
  if (!isId(e, b.BinaryId)) return null;
  const op = K.Binary.getOp(e);
  const [l, r] = [K.Binary.getLeft(e), K.Binary.getRight(e)];
  let s: number | null = null;
  if (op === b.AddInt32) s = localGet(l) === iv ? i32Const(r) : localGet(r) === iv ? i32Const(l) : null;
  if (op === b.SubInt32 && localGet(l) === iv) {
    const k = i32Const(r);
    s = k === null ? null : -k;
  }
  return s !== null && s > 0 && s <= COEFFICIENT_MAX ? s : null;
}

/** (local.set i (i + s)) as a statement: [i, s]. */
function increment(e: Ref): [number, number] | null {
  if (!isId(e, b.LocalSetId) || K.LocalSet.isTee(e)) return null;
  const iv = K.LocalSet.getIndex(e);
  const s = stepOf(K.LocalSet.getValue(e), iv);
  return s === null ? null : [iv, s];
}

const RELATIONS: Record<number, { rel: Test["rel"]; signed: boolean; swapped: boolean }> = {
  [b.LtUInt32]: { rel: "lt", signed: false, swapped: false },
  [b.LtSInt32]: { rel: "lt", signed: true, swapped: false },
  [b.LeUInt32]: { rel: "le", signed: false, swapped: false },
  [b.LeSInt32]: { rel: "le", signed: true, swapped: false },
  [b.GtUInt32]: { rel: "lt", signed: false, swapped: true },
  [b.GtSInt32]: { rel: "lt", signed: true, swapped: true },
  [b.GeUInt32]: { rel: "le", signed: false, swapped: true },
  [b.GeSInt32]: { rel: "le", signed: true, swapped: true },
  [b.NeInt32]: { rel: "ne", signed: false, swapped: false },
};
/** exit condition -> continue condition: not(i >= n) is i < n, not(i == n) is i != n. */
const NEGATED: Record<number, number> = {
  [b.GeUInt32]: b.LtUInt32,
  [b.GeSInt32]: b.LtSInt32,
  [b.GtUInt32]: b.LeUInt32,
  [b.GtSInt32]: b.LeSInt32,
  [b.LtUInt32]: b.GeUInt32,
  [b.LtSInt32]: b.GeSInt32,
  [b.LeUInt32]: b.GtUInt32,
  [b.LeSInt32]: b.GtSInt32,
  [b.EqInt32]: b.NeInt32,
};

/**
 * `cond` read as "i REL n" (negated if `negate`), i a local: every reading
 * that fits (with two locals, either may be i; the caller keeps the one with
 * an increment). At the bottom test the i operand may be the increment
 * itself, (local.tee i (i + s)). The bound is checked for invariance later
 * (it must not read a local or global the loop sets).
 */
function parseTest(cond: Ref, negate: boolean): { iv: number; test: Test }[] {
  while (isId(cond, b.UnaryId) && K.Unary.getOp(cond) === b.EqZInt32) {
    cond = K.Unary.getValue(cond);
    negate = !negate;
  }
  if (!isId(cond, b.BinaryId)) return [];
  const op = K.Binary.getOp(cond);
  const [l, r] = [K.Binary.getLeft(cond), K.Binary.getRight(cond)];
  const ivOf = (e: Ref): { iv: number; tee: number | null } | null => {
    const local = localGet(e);
    if (local !== null) return { iv: local, tee: null };
    if (isId(e, b.LocalSetId) && K.LocalSet.isTee(e)) {
      const iv = K.LocalSet.getIndex(e);
      const s = stepOf(K.LocalSet.getValue(e), iv);
      if (s !== null) return { iv, tee: s };
    }
    return null;
  };
  const out: { iv: number; test: Test }[] = [];
  // i REL n as written, and n REL' i read with the operands swapped.
  for (const [i, n, relOp] of [[l, r, op], [r, l, SWAPPED[op] ?? -1]]) {
    const side = ivOf(i);
    if (!side || !invariantShape(n)) continue;
    const rel = RELATIONS[negate ? (NEGATED[relOp] ?? -1) : relOp];
    if (!rel || rel.swapped) continue; // i > n, i >= n with a growing i: not a counted loop we handle
    out.push({ iv: side.iv, test: { rel: rel.rel, signed: rel.signed, bound: n, teeStep: side.tee } });
  }
  return out;
}

const SWAPPED: Record<number, number> = {
  [b.LtUInt32]: b.GtUInt32,
  [b.LtSInt32]: b.GtSInt32,
  [b.LeUInt32]: b.GeUInt32,
  [b.LeSInt32]: b.GeSInt32,
  [b.GtUInt32]: b.LtUInt32,
  [b.GtSInt32]: b.LtSInt32,
  [b.GeUInt32]: b.LeUInt32,
  [b.GeSInt32]: b.LeSInt32,
  [b.NeInt32]: b.NeInt32,
  [b.EqInt32]: b.EqInt32,
};

/** A bound we can evaluate before the loop: constants, locals, globals and +, -, * of them (no traps, no side effects). */
function invariantShape(e: Ref): boolean {
  if (b.getExpressionType(e) !== T.i32) return false;
  const id = b.getExpressionId(e);
  if (id === b.ConstId || id === b.LocalGetId || id === b.GlobalGetId) return true;
  if (id !== b.BinaryId) return false;
  const op = K.Binary.getOp(e);
  if (op !== b.AddInt32 && op !== b.SubInt32 && op !== b.MulInt32 && op !== b.ShlInt32) return false;
  return invariantShape(K.Binary.getLeft(e)) && invariantShape(K.Binary.getRight(e));
}

/** The locals and globals an invariant-shaped expression reads. */
function readsOf(e: Ref, out: { locals: Set<number>; globals: Set<string> }): void {
  const id = b.getExpressionId(e);
  if (id === b.LocalGetId) out.locals.add(K.LocalGet.getIndex(e));
  else if (id === b.GlobalGetId) out.globals.add(K.GlobalGet.getName(e) as unknown as string);
  else if (id === b.BinaryId) {
    readsOf(K.Binary.getLeft(e), out);
    readsOf(K.Binary.getRight(e), out);
  }
}

/** The loop's shape, or null if it is not one of the counted loops handled. */
function recognise(loop: Ref): Shape | null {
  const name = K.Loop.getName(loop);
  if (!name) return null;
  let body = K.Loop.getBody(loop);
  // An unnamed block around a single if: look through it.
  while (isId(body, b.BlockId) && !K.Block.getName(body) && K.Block.getNumChildren(body) === 1) body = K.Block.getChildAt(body, 0);
  const isBack = (e: Ref) => isId(e, b.BreakId) && K.Break.getName(e) === name && !K.Break.getCondition(e) && !K.Break.getValue(e);

  type Partial = Omit<Shape, "iv" | "test" | "incAt" | "step" | "boundReads">;
  let shape: Partial | null = null;
  let tests: { iv: number; test: Test }[] = [];
  if (isId(body, b.IfId) && !K.If.getIfFalse(body)) {
    // loop $L (if C (then ... (br $L)))
    const then = K.If.getIfTrue(body);
    if (!isId(then, b.BlockId)) return null;
    const items = blockChildren(then);
    const back = items.at(-1);
    if (back === undefined || !isBack(back)) return null;
    tests = parseTest(K.If.getCondition(body), false).filter((t) => t.test.teeStep === null);
    shape = { bottom: false, path: items.slice(0, -1), pathLabel: K.Block.getName(then) || null, exitBranch: 0, backEdge: back };
  } else if (isId(body, b.BlockId)) {
    const items = blockChildren(body);
    const pathLabel = K.Block.getName(body) || null;
    const head = items[0];
    const tail = items.at(-1);
    if (items.length >= 2 && tail !== undefined && isBack(tail) && isId(head, b.BreakId) && K.Break.getCondition(head) && !K.Break.getValue(head) && K.Break.getName(head) !== name && K.Break.getName(head) !== pathLabel) {
      // loop $L (block (br_if $out X) ... (br $L)): the loop runs while not X. $out is outside (checked by scan:
      // the exit branch is the one branch allowed to leave without making the loop irregular, and a label
      // defined inside the loop cannot be its target since nothing precedes it).
      tests = parseTest(K.Break.getCondition(head), true).filter((t) => t.test.teeStep === null);
      shape = { bottom: false, path: items.slice(1, -1), pathLabel, exitBranch: head, backEdge: tail };
    } else if (tail !== undefined && isId(tail, b.BreakId) && K.Break.getName(tail) === name && K.Break.getCondition(tail) && !K.Break.getValue(tail)) {
      // loop $L (block ... (br_if $L C)): do-while.
      tests = parseTest(K.Break.getCondition(tail), false);
      shape = { bottom: true, path: items.slice(0, -1), pathLabel, exitBranch: 0, backEdge: tail };
    }
  }
  if (!shape) return null;
  for (const { iv, test } of tests) {
    // The increment of i: a statement of the path, or the tee in the bottom test (scan checks it is i's only set).
    let incAt = -1;
    let step = test.teeStep;
    if (step === null) {
      incAt = shape.path.findIndex((e) => increment(e)?.[0] === iv);
      if (incAt >= 0) step = increment(shape.path[incAt])![1];
    }
    if (step === null) continue;
    // The bound must not read i (n = i + 1 is not a counted loop); the loop must not set what it reads (scan checks sets).
    const reads = { locals: new Set<number>(), globals: new Set<string>() };
    readsOf(test.bound, reads);
    if (reads.locals.has(iv)) continue;
    return { ...shape, iv, test, incAt, step, boundReads: reads };
  }
  return null;
}

/** Bytes one SIMD lane store writes (the barrier's width). */
export function laneBytes(op: number): number {
  switch (op) {
    case b.Store8LaneVec128:
      return 1;
    case b.Store16LaneVec128:
      return 2;
    case b.Store32LaneVec128:
      return 4;
    default:
      return 8;
  }
}

/**
 * __cohort_mark_pages(first, last): reports every 4 KiB page in [first, last]
 * not yet dirty this epoch, pages beyond the memory's current size excluded.
 * The dirty map is scanned in wasm, so a range already dirty costs no call;
 * otherwise one host call, first_write_range(page, last), marks the rest.
 */
export function addMarkPages(m: binaryen.Module, name: string, memoryName: string, firstWriteRange: string): void {
  const i32 = m.i32;
  const get = (i: number) => m.local.get(i, T.i32);
  // params: first(0) last(1); var: end(2)
  m.addFunction(
    name,
    b.createType([T.i32, T.i32]),
    T.none,
    [T.i32],
    m.block(null, [
      // Last 4 KiB page of the memory: memory.size (64 KiB pages) * 16 - 1.
      m.local.set(2, i32.sub(i32.shl(m.memory.size(memoryName), i32.const(4)), i32.const(1))),
      m.if(i32.gt_u(get(1), get(2)), m.local.set(1, get(2))),
      m.block("done", [
        m.br("done", i32.gt_u(get(0), get(1))),
        m.loop(
          "scan",
          m.block(null, [
            m.if(i32.eqz(i32.load8_u(0, 1, get(0), memoryName)), m.block(null, [m.call(firstWriteRange, [get(0), get(1)], T.none), m.br("done")])),
            m.local.set(0, i32.add(get(0), i32.const(1))),
            m.br("scan", i32.le_u(get(0), get(1))),
          ]),
        ),
      ]),
    ]),
  );
}
