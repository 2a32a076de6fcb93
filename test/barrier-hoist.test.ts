/**
 * Hoisted write barriers (src/guest/barrier-hoist.ts): a counted loop marks
 * the pages it will write with one range call before it runs, and loops that
 * cannot be bounded keep their per-store barriers. Each case runs the fixture
 * (test/fixtures/wat/loops.wat) plain and instrumented from the same state
 * and checks: same result or same trap, same memory byte for byte, every
 * written page reported (nothing missed), and how the pages were reported
 * (one first_write_range call, or one first_write per page).
 */
import { describe, expect, it } from "vitest";
import { instrument } from "../src/guest/instrument.js";
import { compileGuest } from "../src/guest/module-cache.js";
import { FIRST_GUEST_PAGE, PAGE_BYTES, WASM_PAGE_BYTES } from "../src/vm/layout.js";
import { EARLY_EXIT_PAGES_MAX } from "../src/guest/barrier-hoist.js";
import { BarrierPair, pagesOf, type Arg } from "./support/barrier-pair.js";
import { fixtureBytes } from "./support/guests.js";
import { runDifferential } from "./support/wasm-differential.js";
import { prepareModule } from "./support/wasm-fuzz.js";

const bytes = fixtureBytes("loops");
const pair = new BarrierPair(bytes, { initial: 4, maximum: 16 });
const GUEST_BYTES = 4 * WASM_PAGE_BYTES;
const run = (name: string, args: Arg[], setup: [string, Arg[]][] = []) => pair.run(name, args, setup);

/** Hoisted: one range call per group, no per-store call, and the written pages are exactly the dirty ones. */
function expectHoisted(r: ReturnType<typeof run>, ranges = 1): void {
  expect(r.counts.first_write_range).toBe(ranges);
  expect(r.counts.first_write).toBe(0);
  expect(r.dirty).toEqual(r.written);
}

/** Not hoisted: each page reported by its own first write (a store that traps reports its page first), no range. */
function expectPerStore(r: ReturnType<typeof run>): void {
  expect(r.counts.first_write_range).toBe(0);
  expect(r.counts.first_write).toBe(r.written.length + (r.outcome.trap ? 1 : 0));
  expect(r.dirty).toEqual(r.written);
}

describe("counted loops: one range before the loop instead of a barrier per store", () => {
  it("block/loop with the test at the top: N pages written, every one reported by a single range call", () => {
    const r = run("up", [100, 40 * 1024, 7]); // 160 KiB from address 100: 41 pages
    expect(r.written).toEqual(pagesOf(100, 160 * 1024));
    expectHoisted(r);
  });

  it("if/loop with a signed test, from a negative i0", () => {
    expectHoisted(run("up_signed", [-100, 3000, 1000, 5n])); // i*8 + 1000 for i in [-100, 3000)
    expectHoisted(run("up_signed", [5, 5, 1000, 5n]), 0); // no iteration: nothing to mark
    expect(run("up_signed", [-200, 10, 1000, 5n]).outcome.trap).toBe(true); // 1000 - 1600 wraps: traps as plain
  });

  it("a pointer induction variable (p += 2), two stores to one array: one range", () => {
    const r = run("pointer", [4000, 4000 + 3 * PAGE_BYTES, 9]);
    expect(r.written).toEqual(pagesOf(4000, 3 * PAGE_BYTES));
    expectHoisted(r);
  });

  it("do-while: the body runs once even when the bound is already reached", () => {
    expectHoisted(run("do_while", [PAGE_BYTES * 3, 2 * PAGE_BYTES, 1]));
    const once = run("do_while", [PAGE_BYTES * 5, 0, 1]);
    expect(once.written).toEqual(pagesOf(PAGE_BYTES * 5, 4));
    expectHoisted(once);
  });

  it("do-while with the increment in the test (i != n)", () => {
    expectHoisted(run("do_tee", [256, 10, 5000, 3])); // store16 at 256 + 2i, i in [10, 5000)
    // i0 >= n: i runs past n and wraps around; the range cannot bound it, the per-store barriers stay.
    const r = run("do_tee", [256, 7, 7, 3]);
    expect(r.outcome.trap).toBe(true);
    expectPerStore(r);
  });

  it("i <= n, one store per 4 KiB page", () => {
    const r = run("per_page", [64, 20, 1]);
    expect(r.written.length).toBe(21);
    expectHoisted(r);
  });

  it("stores after the increment see i + 1", () => {
    expectHoisted(run("after_increment", [4092, 2000, 1]));
    const r = run("after_increment", [0, 1024, 1]); // the last store, at i = 1024, is the first word of the second page
    expect(r.written).toEqual(pagesOf(0, 4100));
    expectHoisted(r);
  });

  it("several arrays and strides: one range per array", () => {
    const r = run("two_arrays", [0, 20000, 3000, 1], [["set_base", [100000]]]);
    expectHoisted(r, 3);
  });

  it("memory grown by an earlier call: the range reaches the new pages", () => {
    const r = run("up", [GUEST_BYTES - 8, 2000, 1], [["grow", [1]]]);
    expect(r.outcome.trap).toBe(false);
    expect(r.written).toEqual(pagesOf(GUEST_BYTES - 8, 8000));
    expectHoisted(r);
  });
});

describe("traps in a hoisted loop", () => {
  it("an out-of-bounds store at iteration k traps as plain; the pages written before it are dirty", () => {
    const base = GUEST_BYTES - 3 * PAGE_BYTES - 40;
    const r = run("up", [base, 5000, 1]); // runs off the end of memory after 3 pages and 10 words
    expect(r.outcome).toEqual({ trap: true, message: expect.stringMatching(/out of bounds/) });
    expect(r.written).toEqual(pagesOf(base, 3 * PAGE_BYTES + 40));
    expectHoisted(r); // the range is clamped to the memory: nothing beyond it is marked
  });

  it("a range starting beyond the memory marks nothing and traps at the first store", () => {
    const r = run("up", [GUEST_BYTES + 100, 50, 1]);
    expect(r.outcome.trap).toBe(true);
    expect(r.dirty).toEqual([]);
  });
});

describe("early exits", () => {
  it("a break after the store: a short loop is hoisted (its range is bounded), nothing written is missed", () => {
    const r = run("exit_early", [100, 1000, 600, 1]); // range of 1 page+; stops at i = 600
    expect(r.counts.first_write_range).toBe(1);
    expect(r.counts.first_write).toBe(0);
    expect(r.dirty.length).toBeLessThanOrEqual(EARLY_EXIT_PAGES_MAX);
  });

  it("a break after the store in a long loop keeps per-store barriers: only the pages written get dirty", () => {
    const r = run("exit_early", [100, 60000, 3000, 1]); // range of 59 pages; stops after 3 pages
    expect(r.written.length).toBe(3);
    expectPerStore(r);
  });

  it("a return in the middle of the iteration", () => {
    const short = run("return_early", [PAGE_BYTES - 8, 100, 50, 1]);
    expect(short.outcome).toEqual({ trap: false, value: 50 });
    expect(short.counts.first_write_range).toBe(1);
    const long = run("return_early", [PAGE_BYTES - 8, 60000, 5000, 1]);
    expect(long.outcome).toEqual({ trap: false, value: 5000 });
    expectPerStore(long);
  });
});

describe("loops that must not be hoisted stay correct", () => {
  it("memory.grow inside the loop: pages beyond the old size written after the grow are reported", () => {
    const base = GUEST_BYTES - 2 * PAGE_BYTES;
    const r = run("grow_inside", [base, 6000, 10, 1]); // 2 pages before the old end, 16 KiB after it
    expect(r.outcome.trap).toBe(false);
    expect(r.written).toEqual(pagesOf(base, 24000));
    expect(r.written.some((p) => (p - FIRST_GUEST_PAGE) * PAGE_BYTES >= GUEST_BYTES)).toBe(true);
    expectPerStore(r);
    // Without the grow the same loop traps at the old end, as plain.
    expect(run("grow_inside", [base, 6000, 1_000_000, 1]).outcome.trap).toBe(true);
  });

  it("descending addresses (a negative stride)", () => {
    expectPerStore(run("descending", [50000, 10000, 1]));
    expectPerStore(run("descending", [100, 1000, 1])); // wraps below 0 and traps
  });

  it("a negative step", () => {
    expectPerStore(run("negative_step", [1000, 9000, 1]));
  });

  it("a bound the loop changes", () => {
    const r = run("moving_bound", [0, 40000, 3, 1]); // stops near i = 10000 instead of 40000
    expect(r.written).toEqual(pagesOf(0, 40000));
    expectPerStore(r);
    const growing = run("moving_bound", [0, 100, -1, 1]); // n grows with i: runs to the end of memory
    expect(growing.outcome.trap).toBe(true);
    expect(growing.written.length).toBe(64);
    expectPerStore(growing);
  });

  it("a base the loop changes (a local, a global)", () => {
    const r = run("moving_base", [0, 5000, 1]); // 12 bytes further each iteration, not 4
    expect(r.written).toEqual(pagesOf(0, 60000));
    expectPerStore(r);
    const g = run("moving_global", [5000, 1], [["set_base", [0]]]);
    expect(g.written).toEqual(pagesOf(0, 60000));
    expectPerStore(g);
  });

  it("a call to a guest function in the loop (it may grow memory): pages past the old end are reported", () => {
    const base = GUEST_BYTES - 2 * PAGE_BYTES;
    const r = run("call_inside", [base, 6000, 10, 1]);
    expect(r.outcome.trap).toBe(false);
    expect(r.written).toEqual(pagesOf(base, 24000));
    expectPerStore(r);
  });

  it("a do-while whose `br $L` skips the test: i runs past n", () => {
    const r = run("do_continue", [0, 10, 5000, 1]);
    expect(r.written).toEqual(pagesOf(0, 20000));
    expectPerStore(r);
  });

  it("stores on some iterations only", () => {
    const r = run("conditional", [0, 60000, 4096, 1]); // every 4096th word: every 4th page
    expect(r.written.length).toBe(15);
    expectPerStore(r);
  });

  it("addresses that wrap around 2^32 inside the range fall back to per-store barriers", () => {
    // i*8 + 256 for i in [2^31 - 16, 2^31 - 1): the products wrap to addresses 128 .. 248.
    const r = run("up_signed", [0x7ffffff0, 0x7fffffff, 256, 1n]);
    expect(r.outcome.trap).toBe(false);
    expect(r.written).toEqual(pagesOf(128, 8));
    expectPerStore(r);
  });

  it("i != n with a step that skips n: runs past the bound as plain, with per-store barriers", () => {
    const r = run("step_ne", [0, 0, 10, 1]); // 0, 3, 6, 9, 12, ... until the end of memory
    expect(r.outcome.trap).toBe(true);
    expectPerStore(r);
    expectHoisted(run("step_ne", [0, 0, 30000, 1])); // 30000 is a multiple of 3
  });

  it("a bound so close to the top of i's range that i + step wraps: per-store barriers", () => {
    // i from 2^31 - 8 by 4 while i <s 2^31 - 1: after 2^31 - 4 comes -2^31, and the loop sweeps the whole memory.
    const r = run("signed_wrap", [0x7ffffff8, 0x7fffffff, 1]);
    expect(r.outcome.trap).toBe(true);
    expect(r.written.length).toBe(64);
    expectPerStore(r);
    // A bound leaving room for the step: hoisted.
    expectHoisted(run("signed_wrap", [0x7fffff9c, 0x7ffffff8, 1])); // addresses 0 .. 92
  });

  it("do-while from the top of i's range: the first increment wraps whatever the bound", () => {
    // i0 = 2^31 - 1 >= n: one iteration would be the range, but i + 4 wraps to -2^31 + 3 <s n and the loop goes on.
    const r = run("do_signed_wrap", [0x7fffffff, 100, 1]);
    expect(r.outcome.trap).toBe(true);
    expect(r.written.length).toBe(64);
    expectPerStore(r);
    expectHoisted(run("do_signed_wrap", [0x7fffff9c, 0x7ffffff8, 1]));
  });

  it("addresses beyond 2^32 at the top of an unsigned range: per-store barriers", () => {
    // do-while over base + 4i up to i = 2^32 - 2: the exact addresses pass 2^32, so no range is computed.
    const r = run("do_while", [0, -1, 1]);
    expect(r.outcome.trap).toBe(true);
    expectPerStore(r);
  });
});

describe("differential runs of the loop fixture (checkpoints, rollbacks, failovers)", () => {
  it("random calls agree with the plain module at every cut", async () => {
    const prepared = prepareModule(bytes);
    const guest = await compileGuest(instrument(prepared.guest));
    for (let seed = 1; seed <= 12; seed++) {
      const stats = runDifferential(prepared, guest, seed, 60);
      expect(stats.calls).toBeGreaterThan(0);
    }
  }, 120_000);
});
