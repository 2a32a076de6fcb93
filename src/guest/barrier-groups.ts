/**
 * Shared barriers for runs of stores through one pointer (used by
 * src/guest/instrument.ts).
 *
 * Compiled code writes a frame or an object field by field, each store
 * through the same pointer plus a constant offset, e.g. AssemblyScript's
 * shadow stack:
 *
 *   (i64.store (global.get $sp) ...) (i32.store offset=8 (global.get $sp) ...) ... (i32.store offset=4 (global.get $sp) ...)
 *
 * Among the statements of one block, a store whose address is exactly
 * (local.get $x), (local.tee $x ...) or (global.get $g) starts a group; later
 * statement-level stores through the same root join it while their offsets
 * stay within GROUP_SPAN_MAX bytes of each other. The first store's barrier
 * covers the span of the whole group ([root + lowest offset, root + highest
 * offset + width)); the others get none.
 *
 * Sound because a later store of the group runs only after the first one
 * (they are statements of one block, in order; a branch can only leave the
 * block or restart an enclosing loop, which runs the first store again) with
 * the same root value, and nothing in between can make a page the first
 * barrier skipped writable. A group ends at anything that may set the root
 * (local.set/tee of $x, global.set of $g), call guest code or grow memory
 * (memory.grow, a call to a guest function, call_indirect), or is too large
 * to inspect; calls to imports are fine (host functions neither grow memory
 * nor set guest globals). The first barrier ignores only pages beyond the
 * memory's current size, and with no memory.grow before the later stores, a
 * later store to such a page traps. The values of the group's stores count
 * as "in between" (a value runs before its store writes), so a store whose
 * value may set the root or grow memory neither leads nor joins a group.
 */
import binaryen from "binaryen";
import { CHILD_GETTERS } from "./barrier-hoist.js";

type Ref = number;
const b = binaryen;

type Accessor = (expr: Ref, ...args: number[]) => number;
const K = b as unknown as Record<string, Record<string, Accessor>>;

/** Largest span (lowest offset to highest offset + width) one barrier covers. */
const GROUP_SPAN_MAX = 256;
/** Statements between two stores of a group are inspected up to this many nodes; larger ones end every group. */
const INSPECT_NODES_MAX = 64;

export interface GroupRange {
  /** The lowest offset immediate in the group (unshifted, as in the guest's code). */
  offset: number;
  /** Bytes from `offset` to the end of the group's highest store. */
  width: number;
}

/** The locals and globals an expression sets (calls to imports set neither: host functions only return values). */
interface Effects {
  locals: Set<number>;
  globals: Set<string>;
}

interface Open {
  leader: Ref;
  low: number;
  high: number; // offset + width, exclusive
  members: Ref[];
}

/** Per function: which stores lead a group (and its range) and which are covered by their leader. */
export class StoreGroups {
  private readonly leaders = new Map<Ref, GroupRange>();
  private readonly covered = new Set<Ref>();

  constructor(
    /** True for a function the module imports (host functions never grow memory nor change guest globals). */
    private readonly isImport: (name: string) => boolean,
    /** Stores that already have no barrier (hoisted out of their loop): left out of groups. */
    private readonly skip: (store: Ref) => boolean,
  ) {}

  /** The range the store's barrier must cover, if it leads a group of more than one store. */
  leader(store: Ref): GroupRange | undefined {
    return this.leaders.get(store);
  }

  covers(store: Ref): boolean {
    return this.covered.has(store);
  }

  /** Groups the statement-level stores of a block; call before its children are instrumented. */
  block(block: Ref): void {
    const open = new Map<string, Open>();
    const close = (key: string) => {
      const g = open.get(key);
      open.delete(key);
      if (!g || g.members.length === 0) return;
      this.leaders.set(g.leader, { offset: g.low, width: g.high - g.low });
      for (const s of g.members) this.covered.add(s);
    };
    const closeAll = () => {
      for (const key of [...open.keys()]) close(key);
    };
    /** May `fx` (null: anything) change the root of group `key`? */
    const breaks = (fx: Effects | null, key: string) =>
      fx === null || (key[0] === "l" ? fx.locals.has(Number(key.slice(1))) : fx.globals.has(key.slice(1)));
    /** Ends the groups that `e` (run between their stores) may break. */
    const effects = (e: Ref) => {
      const fx = this.effectsOf(e);
      for (const key of [...open.keys()]) if (breaks(fx, key)) close(key);
    };
    for (let i = 0, n = K.Block.getNumChildren(block); i < n; i++) {
      const child = K.Block.getChildAt(block, i);
      const store = this.storeOf(child);
      if (!store) {
        effects(child);
        continue;
      }
      const { key, offset, width, ptr, value } = store;
      const g = open.get(key);
      // The store's value runs after its address (and after a leader's barrier) but before it writes.
      const valueFx = this.effectsOf(value);
      if (g && !isTee(ptr) && Math.max(g.high, offset + width) - Math.min(g.low, offset) <= GROUP_SPAN_MAX && !breaks(valueFx, key)) {
        g.low = Math.min(g.low, offset);
        g.high = Math.max(g.high, offset + width);
        g.members.push(child);
        effects(value);
        continue;
      }
      close(key);
      if (isTee(ptr)) effects(K.LocalSet.getValue(ptr)); // runs before the barrier: matters to the other groups only
      effects(value);
      if (!breaks(valueFx, key)) open.set(key, { leader: child, low: offset, high: offset + width, members: [] });
    }
    closeAll();
  }

  /** A store statement through a plain root: its group key, offset, width, address and value. */
  private storeOf(e: Ref): { key: string; offset: number; width: number; ptr: Ref; value: Ref } | null {
    if (!isId(e, b.StoreId) || K.Store.isAtomic(e) || this.skip(e)) return null;
    const ptr = K.Store.getPtr(e);
    let key: string | null = null;
    if (isId(ptr, b.LocalGetId)) key = `l${K.LocalGet.getIndex(ptr)}`;
    else if (isTee(ptr)) key = `l${K.LocalSet.getIndex(ptr)}`;
    else if (isId(ptr, b.GlobalGetId)) key = `g${K.GlobalGet.getName(ptr) as unknown as string}`;
    if (key === null) return null;
    const offset = K.Store.getOffset(e) >>> 0;
    if (offset > GROUP_OFFSET_MAX) return null;
    return { key, offset, width: K.Store.getBytes(e), ptr, value: K.Store.getValue(e) };
  }

  /**
   * What `e` may do to a group: the locals and globals it sets; null if it
   * may grow memory, run guest code, or is too large to inspect.
   */
  private effectsOf(e: Ref): Effects | null {
    const fx: Effects = { locals: new Set<number>(), globals: new Set<string>() };
    const stack = [e];
    let seen = 0;
    while (stack.length) {
      const x = stack.pop()!;
      if (++seen > INSPECT_NODES_MAX) return null;
      const id = b.getExpressionId(x);
      const spec = LEAF_SAFE[id];
      if (spec === undefined) return null; // calls to guest code, memory.grow, control flow we do not look into, ...
      if (id === b.LocalSetId) fx.locals.add(K.LocalSet.getIndex(x));
      if (id === b.GlobalSetId) fx.globals.add(K.GlobalSet.getName(x) as unknown as string);
      if (id === b.CallId) {
        if (K.Call.isReturn(x) || !this.isImport(K.Call.getTarget(x) as unknown as string)) return null;
        for (let i = 0, n = K.Call.getNumOperands(x); i < n; i++) stack.push(K.Call.getOperandAt(x, i));
        continue;
      }
      if (id === b.BlockId) {
        for (let i = 0, n = K.Block.getNumChildren(x); i < n; i++) stack.push(K.Block.getChildAt(x, i));
        continue;
      }
      const cls = K[spec[0]];
      for (const getter of spec[1]) {
        const c = cls[getter](x);
        if (c) stack.push(c);
      }
    }
    return fx;
  }
}

/** Offsets above this are left to the single-store barrier (which handles offsets that overflow when shifted). */
const GROUP_OFFSET_MAX = 1 << 30;

const isId = (e: Ref, id: number) => e !== 0 && b.getExpressionId(e) === id;
const isTee = (e: Ref) => isId(e, b.LocalSetId) && Boolean(K.LocalSet.isTee(e));

/** Expression kinds whose effects effectsOf understands, and their children (blocks and calls handled apart). */
const LEAF_SAFE: Record<number, [string, string[]]> = Object.fromEntries(
  [
    b.BlockId, b.IfId, b.BreakId, b.CallId, b.LocalGetId, b.LocalSetId, b.GlobalGetId, b.GlobalSetId, b.LoadId, b.StoreId,
    b.ConstId, b.UnaryId, b.BinaryId, b.SelectId, b.DropId, b.ReturnId, b.MemorySizeId, b.NopId, b.UnreachableId,
  ].map((id) => [id, CHILD_GETTERS[id]]),
);
