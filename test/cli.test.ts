/**
 * The `cohort` command line as a user runs it: a real child process of the
 * built CLI (bin/cohort.js, so `npm run build` first), each bounded in time.
 */
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import binaryen from "binaryen";
import { fixtureBytes } from "./support/guests.js";
import { CLI, runCli, type CliExit } from "./support/cli.js";

const root = fileURLToPath(new URL("../", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "cohort-cli-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Runs the CLI; kills it (and fails the test) if it is still running after `limit_ms`. */
function cohort(args: string[], options: { cwd?: string; limit_ms: number }): Promise<CliExit> {
  return runCli(args, { cwd: options.cwd ?? root, env: { ...process.env, COHORT_CACHE_DIR: join(dir, "cache") }, limit_ms: options.limit_ms });
}

describe("cohort run", () => {
  it("a guest whose boot traps: exits non-zero with the trap, does not hang on the backup thread", async () => {
    const file = join(dir, "boot-trap.wasm");
    writeFileSync(file, fixtureBytes("boot-trap"));
    const exit = await cohort(["run", file, "--duration-ms", "200"], { limit_ms: 30_000 });
    expect(exit.code).toBe(1);
    expect(exit.stderr).toMatch(/^cohort: .*boot.*start: unreachable/m);
  }, 40_000);
});

describe("cohort instrument", () => {
  it("a memory that is not exported and has an unusual name: instruments it (was `cohort: undefined`)", async () => {
    const m = binaryen.parseText(`(module (memory $"my mem" 1) (func (export "f") (i32.store (i32.const 0) (i32.const 1))))`);
    const debug = binaryen.getDebugInfo();
    binaryen.setDebugInfo(true); // keep the memory's name in the binary's name section
    try {
      writeFileSync(join(dir, "odd-memory.wasm"), m.emitBinary());
    } finally {
      binaryen.setDebugInfo(debug);
      m.dispose();
    }
    const exit = await cohort(["instrument", join(dir, "odd-memory.wasm")], { limit_ms: 30_000 });
    // stderr has the timings and nothing else: Binaryen's load (cold) and the module's instrumentation.
    expect(exit.stderr).toMatch(/^instrumented \d+ → \d+ bytes in [\d.]+ ms \(Binaryen loaded in [\d.]+ ms, cold, once per process\)\n$/);
    expect(exit.code).toBe(0);
    expect(JSON.parse(exit.stdout).exports).toEqual(["f"]);
  }, 40_000);

  it("--json: one JSON object with the module's info, its sizes and the timings, nothing on stderr", async () => {
    const exit = await cohort(["instrument", "ticker", "--json"], { limit_ms: 30_000 });
    expect(exit.stderr).toBe("");
    expect(exit.code).toBe(0);
    const report = JSON.parse(exit.stdout) as { bytes: number; input_bytes: number; exports: string[]; timings: { binaryen_load_ms: number; instrument_ms: number } };
    expect(report.exports).toContain("start");
    expect(report.input_bytes).toBeGreaterThan(0);
    expect(report.bytes).toBeGreaterThan(report.input_bytes);
    expect(report.timings.binaryen_load_ms).toBeGreaterThan(0);
    expect(report.timings.instrument_ms).toBeGreaterThan(0);
  }, 40_000);

  it("a module past a limit is refused by name, with its figure", async () => {
    // One function of 5,000 nested blocks.
    const depth = 5_000;
    const body = [0x00, ...new Array<number>(depth).fill(0).flatMap(() => [0x02, 0x40]), ...new Array<number>(depth + 1).fill(0x0b)];
    const uleb = (v: number): number[] => (v < 128 ? [v] : [(v & 0x7f) | 0x80, ...uleb(v >>> 7)]);
    const code = [1, ...uleb(body.length), ...body];
    writeFileSync(join(dir, "nested.wasm"), new Uint8Array([0x00, 0x61, 0x73, 0x6d, 1, 0, 0, 0, 1, 4, 1, 0x60, 0, 0, 3, 2, 1, 0, 10, ...uleb(code.length), ...code]));
    const exit = await cohort(["instrument", join(dir, "nested.wasm"), "--json"], { limit_ms: 30_000 });
    expect(exit.code).toBe(1);
    expect(exit.stdout).toBe("");
    expect(exit.stderr).toBe(`cohort: module cannot be protected: blocks, loops, ifs or trys nested deeper than 4000 levels (nesting_max): ${depth} levels (function 0)\n`);
  }, 40_000);
});

describe("module arguments", () => {
  it("a file whose name looks like an example's (`myguest`) is used as a file; a name that is neither is refused as such", async () => {
    const cwd = join(dir, "guests");
    mkdirSync(cwd, { recursive: true });
    writeFileSync(join(cwd, "myguest"), fixtureBytes("segments"));
    const exit = await cohort(["instrument", "myguest", "--json"], { cwd, limit_ms: 30_000 });
    expect(exit.stderr).toBe("");
    expect(exit.code).toBe(0);
    expect(JSON.parse(exit.stdout).exports).toContain("init");
    const missing = await cohort(["instrument", "nosuchguest"], { cwd, limit_ms: 30_000 });
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/^cohort: "nosuchguest" is neither a file nor a built guest/);
  }, 70_000);
});

describe("stdout's reader goes away (`cohort … | head -1`)", () => {
  it("the CLI exits quietly on EPIPE, without a stack trace", async () => {
    const child = spawn(process.execPath, [CLI, "run", "ticker", "--interval-ms", "10", "--duration-ms", "20000"], {
      cwd: root,
      env: { ...process.env, COHORT_CACHE_DIR: join(dir, "cache") },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stderr = "";
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    // Like `head -1`: read the first line, then close the pipe's read end.
    child.stdout.once("data", () => child.stdout.destroy());
    const exit = await new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve, reject) => {
      const timer = setTimeout(() => {
        child.kill("SIGKILL");
        reject(new Error(`cohort run still running after its reader went away; stderr: ${stderr}`));
      }, 15_000);
      child.once("close", (code, signal) => {
        clearTimeout(timer);
        resolve({ code, signal });
      });
    });
    expect(stderr).not.toMatch(/EPIPE|Error|at /);
    expect(exit).toEqual({ code: 0, signal: null });
  }, 30_000);
});
