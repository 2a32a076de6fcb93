/**
 * Shared barriers for runs of stores through one pointer
 * (src/guest/barrier-groups.ts): the first store of a group reports the pages
 * of the whole group before it writes; anything between the stores that may
 * move the pointer or grow memory ends the group. Each case runs the fixture
 * (test/fixtures/wat/store-groups.wat) plain and instrumented and checks the
 * same result or trap, the same memory and every written page reported
 * (test/support/barrier-pair.ts).
 */
import { describe, expect, it } from "vitest";
import { instrument } from "../src/guest/instrument.js";
import { compileGuest } from "../src/guest/module-cache.js";
import { PAGE_BYTES, WASM_PAGE_BYTES } from "../src/vm/layout.js";
import { BarrierPair, pagesOf, type Arg, type RunResult } from "./support/barrier-pair.js";
import { fixtureBytes } from "./support/guests.js";
import { runDifferential } from "./support/wasm-differential.js";
import { prepareModule } from "./support/wasm-fuzz.js";

const bytes = fixtureBytes("store-groups");
const pair = new BarrierPair(bytes, { initial: 1, maximum: 4 });
const run = (name: string, args: Arg[], setup: [string, Arg[]][] = []) => pair.run(name, args, setup);
const END = WASM_PAGE_BYTES; // the end of the guest's memory before any grow

/** Every page was reported before any of the pages written had its final bytes: one barrier ran first for all. */
const reportedUpFront = (r: RunResult) => r.reports.every((x) => x.written_pages_done === 0);
/** Some page was reported after another written page was already written: per-store barriers. */
const reportedOneByOne = (r: RunResult) => r.reports.some((x) => x.written_pages_done > 0);

describe("one barrier for a run of stores through one pointer", () => {
  it("a frame written field by field across a page boundary: both pages reported before the first write", () => {
    const r = run("frame", [PAGE_BYTES - 6, 7]);
    expect(r.written).toEqual(pagesOf(PAGE_BYTES - 6, 17));
    expect(r.dirty).toEqual(r.written);
    expect(r.reports.length).toBe(2);
    expect(reportedUpFront(r)).toBe(true);
  });

  it("through a global, whatever the order of the offsets", () => {
    const r = run("frame_global", [7], [["set_sp", [2 * PAGE_BYTES - 8]]]);
    expect(r.written).toEqual(pagesOf(2 * PAGE_BYTES - 8, 16));
    expect(r.dirty).toEqual(r.written);
    expect(reportedUpFront(r)).toBe(true);
  });

  it("a tee as the first address", () => {
    const r = run("tee_first", [PAGE_BYTES - 104, 7]);
    expect(r.dirty).toEqual(pagesOf(PAGE_BYTES - 4, 12));
    expect(reportedUpFront(r)).toBe(true);
  });

  it("two interleaved objects: a group each", () => {
    const r = run("two_objects", [PAGE_BYTES - 4, 3 * PAGE_BYTES - 4, 7]);
    expect(r.dirty).toEqual([...pagesOf(PAGE_BYTES - 4, 8), ...pagesOf(3 * PAGE_BYTES - 4, 8)]);
  });

  it("a group in every iteration of a loop", () => {
    const r = run("in_loop", [PAGE_BYTES - 3, 10, PAGE_BYTES, 7]); // each group straddles a boundary
    expect(r.written.length).toBe(11);
    expect(r.dirty).toEqual(r.written);
  });

  it("the first store traps: nothing is written, the trap is the plain one", () => {
    const r = run("frame", [END - 4, 7]); // the i64 at END - 4 is out of bounds
    expect(r.outcome.trap).toBe(true);
    expect(r.written).toEqual([]);
  });

  it("a later store of the group traps: the pages before it are written and reported", () => {
    const r = run("frame", [END - 12, 7]); // fields at +0 and +8 fit, +12 is out of bounds
    expect(r.outcome.trap).toBe(true);
    expect(r.written).toEqual(pagesOf(END - 12, 12));
    expect(r.dirty).toEqual(r.written);
  });
});

describe("what ends a group", () => {
  it("offsets too far apart", () => {
    const r = run("far_apart", [PAGE_BYTES - 4, 7]);
    expect(r.dirty).toEqual([...pagesOf(PAGE_BYTES - 4, 4), ...pagesOf(PAGE_BYTES + 4996, 4)]);
    expect(reportedOneByOne(r)).toBe(true);
  });

  it("the pointer set between the stores, or in the later store's value", () => {
    const r = run("pointer_changes", [PAGE_BYTES - 8, 5 * PAGE_BYTES, 7]);
    expect(r.dirty).toEqual([...pagesOf(PAGE_BYTES - 8, 4), ...pagesOf(5 * PAGE_BYTES + 4, 4)]);
    const v = run("pointer_changes_in_value", [PAGE_BYTES - 8, 5 * PAGE_BYTES, 7]);
    expect(v.dirty).toEqual([...pagesOf(PAGE_BYTES - 8, 8), ...pagesOf(5 * PAGE_BYTES + 8, 4)]);
  });

  it("a guest call that moves a global pointer", () => {
    const r = run("call_moves_global", [3 * PAGE_BYTES, 7], [["set_sp", [PAGE_BYTES - 8]]]);
    expect(r.dirty).toEqual([...pagesOf(PAGE_BYTES - 8, 4), ...pagesOf(4 * PAGE_BYTES - 4, 4)]);
  });

  it.each(["grow_between", "grow_in_second_value", "grow_in_first_value", "grow_in_call"])(
    "%s: memory.grow before a later store, which lands past the old end",
    (name) => {
      const r = run(name, [END - 4, 7]); // +0 is the last word of the old memory, +8 the second word of the new page
      expect(r.outcome.trap).toBe(false);
      expect(r.written).toEqual([...pagesOf(END - 4, 4), ...pagesOf(END + 4, 4)]);
      expect(r.dirty).toEqual(r.written);
    },
  );

  it("a branch out between the stores: the later store may not run, nothing is missed", () => {
    const stay = run("leave_between", [PAGE_BYTES - 4, 0, 7]);
    expect(stay.dirty).toEqual(stay.written);
    const leave = run("leave_between", [PAGE_BYTES - 4, 1, 7]);
    expect(leave.written).toEqual(pagesOf(PAGE_BYTES - 4, 4));
    // The group's barrier may have reported the page the skipped store would have written: allowed, not required.
    expect(leave.dirty.length).toBeLessThanOrEqual(2);
  });
});

describe("differential runs of the group fixture (checkpoints, rollbacks, failovers)", () => {
  it("random calls agree with the plain module at every cut", async () => {
    const prepared = prepareModule(bytes);
    const guest = await compileGuest(instrument(prepared.guest));
    for (let seed = 1; seed <= 12; seed++) expect(runDifferential(prepared, guest, seed, 60).calls).toBeGreaterThan(0);
  }, 120_000);
});
