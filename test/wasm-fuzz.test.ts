/**
 * Differential fuzzing on generated modules: Binaryen's translate-to-fuzz
 * makes random valid modules; each runs plain and instrumented (VmCore) on the
 * same calls, with checkpoints, rollbacks, promotions and restores in between
 * (test/support/wasm-differential.ts). Any difference fails with the seed that
 * reproduces it.
 *
 * CI runs DEFAULT_MODULES modules from DEFAULT_SEED. Longer or other runs:
 *   COHORT_FUZZ_MODULES=5000 COHORT_FUZZ_SEED=12345 npx vitest run test/wasm-fuzz.test.ts
 * (COHORT_FUZZ_STEPS sets the operations per module, default DEFAULT_STEPS.)
 * Module i of a run uses seed COHORT_FUZZ_SEED + i; to re-run one failure,
 * COHORT_FUZZ_SEED=<its seed> COHORT_FUZZ_MODULES=1.
 */
import { writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import binaryen from "binaryen";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { InvalidModuleError, UnsupportedModuleError } from "../src/guest/errors.js";
import { instrument } from "../src/guest/instrument.js";
import { compileGuest } from "../src/guest/module-cache.js";
import { DivergenceError, runDifferential, type DifferentialStats } from "./support/wasm-differential.js";
import { prepareModule, prng, TranslateToFuzz } from "./support/wasm-fuzz.js";
import { watBytes } from "./support/guests.js";

const DEFAULT_MODULES = 100;
const DEFAULT_SEED = 1;
/** Operations per module (calls, captures, commits, rollbacks, failovers). */
const DEFAULT_STEPS = 30;

function envInt(name: string, fallback: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === "") return fallback;
  const n = Number(raw);
  if (!Number.isSafeInteger(n) || n < 0) throw new Error(`${name}=${raw} is not a non-negative integer`);
  return n;
}

const MODULES = envInt("COHORT_FUZZ_MODULES", DEFAULT_MODULES);
const SEED = envInt("COHORT_FUZZ_SEED", DEFAULT_SEED);
const STEPS = envInt("COHORT_FUZZ_STEPS", DEFAULT_STEPS);

/** The command that re-runs the module of `seed` alone, with this run's settings. */
function reproduce(seed: number): string {
  const extra = STEPS !== DEFAULT_STEPS ? ` COHORT_FUZZ_STEPS=${STEPS}` : "";
  return `COHORT_FUZZ_SEED=${seed} COHORT_FUZZ_MODULES=1${extra} npx vitest run test/wasm-fuzz.test.ts -t "generated modules"`;
}

/** The reason a refusal gives, with numbers and names folded so that equal reasons count together. */
function reasonOf(error: Error): string {
  return `${error.name}: ${error.message}`.replace(/\d+/g, "N").replace(/\$[\w$.]+/g, "$name");
}

function wat(wasm: Uint8Array): string {
  const m = binaryen.readBinary(wasm);
  try {
    m.setFeatures(binaryen.Features.All);
    return m.emitText();
  } finally {
    m.dispose();
  }
}

let ttf: TranslateToFuzz;
beforeAll(async () => {
  ttf = await TranslateToFuzz.load();
});
afterAll(() => ttf?.close());

describe(`differential fuzzing of generated modules (${MODULES} modules from seed ${SEED}, ${STEPS} steps each)`, () => {
  // A long run (COHORT_FUZZ_MODULES) gets time in proportion; the CI run stays within the default.
  const timeout = Math.max(60_000, MODULES * STEPS * 40);
  it("plain and instrumented agree on results, traps, memory and globals across checkpoints, rollbacks and failovers", { timeout }, async () => {
    const started = performance.now();
    let generated = 0;
    let accepted = 0;
    let bootTraps = 0;
    let noCallable = 0;
    const generatorFailed = new Map<string, number>();
    const refused = new Map<string, number>();
    const mappedImports = new Set<string>();
    const totals: DifferentialStats = { calls: 0, traps: 0, captures: 0, commits: 0, rollbacks: 0, replayed: 0, promotions: 0, restores: 0 };
    const failures: string[] = [];
    const count = (map: Map<string, number>, key: string) => map.set(key, (map.get(key) ?? 0) + 1);

    for (let i = 0; i < MODULES; i++) {
      const seed = SEED + i;
      const size = 256 + (prng(seed)() % 3840);
      const made = await ttf.generate(seed, size);
      if ("error" in made) {
        count(generatorFailed, made.error.replace(/\d+/g, "N"));
        continue;
      }
      generated++;
      const prepared = prepareModule(made.wasm);
      prepared.mapped_imports.forEach((name) => mappedImports.add(name));
      let instrumented;
      try {
        instrumented = instrument(prepared.guest);
      } catch (error) {
        // A refusal must name its reason; anything else escaping the instrumenter is a bug of its own.
        if (!(error instanceof UnsupportedModuleError || error instanceof InvalidModuleError)) {
          failures.push(`seed ${seed}: instrumenter threw ${(error as Error)?.name}: ${(error as Error)?.message ?? String(error)}`);
          continue;
        }
        count(refused, reasonOf(error));
        continue;
      }
      accepted++;
      if (prepared.callable.length === 0) noCallable++;
      const guest = await compileGuest(instrumented);
      try {
        const stats = runDifferential(prepared, guest, seed, STEPS);
        if (stats.boot_trapped) bootTraps++;
        for (const k of Object.keys(totals) as (keyof DifferentialStats)[]) totals[k] += stats[k];
      } catch (error) {
        if (!(error instanceof DivergenceError)) throw error;
        const path = join(tmpdir(), `cohort-fuzz-${seed}.wat`);
        writeFileSync(path, wat(prepared.guest));
        failures.push(`seed ${seed}: ${error.message}\n  module: ${path}\n  reproduce: ${reproduce(seed)}`);
      }
    }

    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    console.log(
      [
        `wasm fuzz: seeds ${SEED}..${SEED + MODULES - 1}, ${seconds} s`,
        `  generated ${generated}, accepted ${accepted} (${((100 * accepted) / Math.max(1, generated)).toFixed(1)}%), refused ${generated - accepted}`,
        ...[...refused].map(([reason, n]) => `    refused ${n}: ${reason}`),
        ...[...generatorFailed].map(([reason, n]) => `  generator gave no module ${n}: ${reason}`),
        `  generator imports defined by the harness: ${[...mappedImports].sort().join(", ") || "none"}`,
        `  boot trapped (both sides) ${bootTraps}; no JS-callable export ${noCallable}`,
        `  ${Object.entries(totals).map(([k, v]) => `${k} ${v}`).join(", ")}`,
      ].join("\n"),
    );

    expect(failures, failures.join("\n")).toEqual([]);
    if (MODULES >= 50) {
      // The generator's imports are mapped, so nearly everything it makes must reach the runner.
      expect(accepted / generated).toBeGreaterThanOrEqual(0.9);
      // The run exercised every path it claims to (a harness that silently stopped rolling back would pass otherwise).
      for (const k of Object.keys(totals) as (keyof DifferentialStats)[]) expect(totals[k], k).toBeGreaterThan(0);
    }
  });
});

describe("the generator", () => {
  it("gives the same module for the same seed, whatever it generated before (a failure's seed reproduces it)", async () => {
    const first = await ttf.generate(42, 2000);
    for (let seed = 1; seed <= 5; seed++) await ttf.generate(seed, 3000);
    const again = await ttf.generate(42, 2000);
    expect("wasm" in first && "wasm" in again).toBe(true);
    if ("wasm" in first && "wasm" in again) expect(Buffer.from(again.wasm).equals(first.wasm)).toBe(true);
  });
});

describe("the differential runner reports what differs", () => {
  // A module runs plain while a different one runs instrumented: each kind of
  // difference the fuzzer claims to catch must fail the run, or a runner that
  // silently stopped comparing would pass every generated module.
  const cases: [string, string, string, RegExp][] = [
    ["a result", "(func (export \"f\") (result i32) (i32.const 1))", "(func (export \"f\") (result i32) (i32.const 2))", /returns 2 instrumented, 1 plain/],
    ["trap versus no trap", "(func (export \"f\") (unreachable))", "(func (export \"f\"))", /returns instrumented but traps plain/],
    ["guest memory", "(memory 1) (func (export \"f\") (i32.store (i32.const 100) (i32.const 1)))", "(memory 1) (func (export \"f\") (i32.store (i32.const 100) (i32.const 2)))", /guest memory differs first at address 100/],
    ["a mutable global", "(global $g (mut i64) (i64.const 0)) (func (export \"f\") (global.set $g (i64.const 1)))", "(global $g (mut i64) (i64.const 0)) (func (export \"f\") (global.set $g (i64.const 2)))", /mutable global slot 0 is 2 instrumented, 1 plain/],
  ];
  it.each(cases)("%s", async (_what, plainBody, guestBody, message) => {
    const plain = prepareModule(watBytes(`(module ${plainBody})`));
    const guest = await compileGuest(instrument(prepareModule(watBytes(`(module ${guestBody})`)).guest));
    expect(() => runDifferential(plain, guest, 7, 20)).toThrow(DivergenceError);
    expect(() => runDifferential(plain, guest, 7, 20)).toThrow(message);
  });

  it("the same module on both sides passes", async () => {
    const prepared = prepareModule(watBytes(`(module ${cases[2][1]})`));
    const stats = runDifferential(prepared, await compileGuest(instrument(prepared.guest)), 7, 20);
    expect(stats.calls).toBeGreaterThan(0);
  });
});
