/**
 * A WAT fixture run plain and instrumented side by side, for tests of how the
 * write barrier reports pages (test/barrier-hoist.test.ts,
 * test/barrier-groups.test.ts). The instrumented module runs in a bare
 * instance whose `cohort_hv` imports count their calls in front of a real
 * DirtyTracker, so a test sees which pages were reported and how.
 *
 * The fixture must export its memory as "memory", start with zeroed memory
 * (no data segments) and store only non-zero values, so that the pages it
 * writes are the pages whose bytes change.
 */
import { expect } from "vitest";
import { instrument } from "../../src/guest/instrument.js";
import { DirtyTracker } from "../../src/vm/dirty-tracker.js";
import { BASE_BYTES, FIRST_GUEST_PAGE, PAGE_BYTES, RESERVED_WASM_PAGES } from "../../src/vm/layout.js";

export type Arg = number | bigint;
export type Outcome = { trap: false; value: unknown } | { trap: true; message: string };

function outcomeOf(f: () => unknown): Outcome {
  try {
    return { trap: false, value: f() };
  } catch (error) {
    expect(error).toBeInstanceOf(WebAssembly.RuntimeError);
    return { trap: true, message: (error as Error).message };
  }
}

export interface RunResult {
  outcome: Outcome;
  /** Whole-memory numbers of the pages the plain module changed. */
  written: number[];
  /** Pages the instrumented module reported, sorted. */
  dirty: number[];
  counts: { first_write: number; first_write_range: number };
  /** Per first_write call: the page, and whether the plain module's final bytes of the pages written were already there. */
  reports: { page: number; written_pages_done: number }[];
}

/** Pages (whole-memory numbering) of guest bytes [addr, addr + len). */
export function pagesOf(addr: number, len: number): number[] {
  const first = Math.floor((BASE_BYTES + addr) / PAGE_BYTES);
  const last = Math.floor((BASE_BYTES + addr + len - 1) / PAGE_BYTES);
  return Array.from({ length: last - first + 1 }, (_, k) => first + k);
}

export class BarrierPair {
  private readonly guestModule: WebAssembly.Module;
  private readonly plainModule: WebAssembly.Module;

  constructor(
    bytes: Uint8Array,
    private readonly pages: { initial: number; maximum: number },
  ) {
    this.guestModule = new WebAssembly.Module(instrument(bytes).wasm as Uint8Array<ArrayBuffer>);
    this.plainModule = new WebAssembly.Module(bytes as Uint8Array<ArrayBuffer>);
  }

  /**
   * Runs `setup` calls, then `name(args)`, on both sides from a fresh
   * instance; only the last call's epoch is observed. Checks what must always
   * hold: the same result or trap, the same memory byte for byte, every page
   * written reported, nothing reported outside the guest's memory.
   */
  run(name: string, args: Arg[], setup: [string, Arg[]][] = []): RunResult {
    const plain = new WebAssembly.Instance(this.plainModule, {}).exports as Record<string, (...a: Arg[]) => unknown> & { memory: WebAssembly.Memory };
    const plainMemory = () => new Uint8Array(plain.memory.buffer);
    const memory = new WebAssembly.Memory({ initial: RESERVED_WASM_PAGES + this.pages.initial, maximum: RESERVED_WASM_PAGES + this.pages.maximum });
    const tracker = new DirtyTracker(memory);
    const counts = { first_write: 0, first_write_range: 0 };
    const reports: RunResult["reports"] = [];
    let expectedPages: { page: number; bytes: Uint8Array }[] = [];
    const guestMemory = () => new Uint8Array(memory.buffer).subarray(BASE_BYTES);
    /** How many of the pages the plain run wrote already hold their final bytes (at a report: were they written before it). */
    const done = () => expectedPages.filter(({ page, bytes }) => Buffer.compare(guestMemory().subarray((page - FIRST_GUEST_PAGE) * PAGE_BYTES).subarray(0, bytes.length), bytes) === 0).length;
    const instance = new WebAssembly.Instance(this.guestModule, {
      cohort_hv: {
        memory,
        first_write: (page: number) => {
          counts.first_write++;
          reports.push({ page, written_pages_done: done() });
          tracker.firstWrite(page);
        },
        first_write_range: (first: number, last: number) => {
          counts.first_write_range++;
          tracker.firstWriteRange(first, last);
        },
      },
    });
    const vm = instance.exports as Record<string, (...a: Arg[]) => unknown>;
    vm.__cohort_boot();
    for (const [n, a] of setup) expect(outcomeOf(() => vm[n](...a))).toEqual(outcomeOf(() => plain[n](...a)));
    tracker.endEpoch();
    counts.first_write = 0;
    counts.first_write_range = 0;
    reports.length = 0;

    const before = plainMemory().slice();
    const theirs = outcomeOf(() => plain[name](...args));
    const written = changedPages(before, plainMemory());
    expectedPages = written.map((page) => {
      const at = (page - FIRST_GUEST_PAGE) * PAGE_BYTES;
      return { page, bytes: plainMemory().slice(at, at + PAGE_BYTES) };
    });
    const mine = outcomeOf(() => vm[name](...args));
    expect(mine, `${name}(${args.join(", ")}): same result or trap`).toEqual(theirs);
    expect(Buffer.compare(guestMemory(), plainMemory()), "same guest memory").toBe(0);
    const dirty = [...tracker.dirtyPages()].sort((a, b) => a - b);
    expect(
      written.filter((p) => !dirty.includes(p)),
      "every page written is reported",
    ).toEqual([]);
    expect(dirty.every((p) => p >= FIRST_GUEST_PAGE && (p - FIRST_GUEST_PAGE) * PAGE_BYTES < guestMemory().length), "only guest pages inside memory").toBe(true);
    return { outcome: mine, written, dirty, counts, reports };
  }
}

/** Whole-memory page numbers of the guest pages whose bytes differ between `before` and `after`. */
function changedPages(before: Uint8Array, after: Uint8Array): number[] {
  const pages: number[] = [];
  for (let at = 0; at < after.length; at += PAGE_BYTES) {
    const a = after.subarray(at, at + PAGE_BYTES);
    const b = at < before.length ? before.subarray(at, at + PAGE_BYTES) : new Uint8Array(a.length);
    if (Buffer.compare(a, b) !== 0) pages.push(FIRST_GUEST_PAGE + at / PAGE_BYTES);
  }
  return pages;
}
