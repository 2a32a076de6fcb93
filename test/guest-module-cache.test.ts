/** Instrumented modules are cached by the content hash of the input module, and instrumented once per module. */
import { afterEach, describe, expect, it, vi } from "vitest";
import { mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { InstrumenterError, ModuleLimitError } from "../src/guest/errors.js";
import { InstrumenterThread } from "../src/guest/instrument-worker.js";
import { MODULE_LIMITS } from "../src/guest/limits.js";
import { instrumentCached } from "../src/guest/module-cache.js";
import { INSTRUMENTER_VERSION } from "../src/guest/module-info.js";
import { Host } from "../src/host/host.js";
import { MemoryStore } from "../src/store/memory.js";
import { fixtureBytes, watBytes } from "./support/guests.js";

const dirs: string[] = [];
afterEach(async () => {
  for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
});
async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "cohort-cache-"));
  dirs.push(dir);
  return dir;
}

/** Modules handed to the process's instrumenter thread so far. */
const instrumentations = () => InstrumenterThread.shared.stats.modules;

describe("module cache", () => {
  it("stores an instrumented module under its input's hash and reuses it", async () => {
    const dir = await tempDir();
    const wasm = fixtureBytes("globals");
    const first = await instrumentCached(wasm, dir);
    expect(first.source).toBe("instrumented");
    const files = (await readdir(dir)).sort();
    expect(files).toHaveLength(2);
    expect(files[0]).toMatch(new RegExp(`^[0-9a-f]{64}-v${INSTRUMENTER_VERSION}\\.json$`));
    // A second call must come from the cache: poison the cached bytes and see them returned.
    const wasmFile = join(dir, files[1]);
    await writeFile(wasmFile, new Uint8Array([1, 2, 3]));
    const second = await instrumentCached(wasm, dir);
    expect([...second.wasm]).toEqual([1, 2, 3]);
    expect(second.info).toEqual(first.info);
    expect(second).toMatchObject({ source: "cache", timings: { binaryen_load_ms: 0, instrument_ms: 0 } });
    // A different module gets its own entry.
    await instrumentCached(fixtureBytes("bulk"), dir);
    expect(await readdir(dir)).toHaveLength(4);
  });

  it("concurrent requests for one module share one instrumentation, across cache directories and without one", async () => {
    const [a, b] = [await tempDir(), await tempDir()];
    // A module no other test instruments, so nothing is cached or running for it yet.
    const wasm = watBytes(`(module (memory 1) (func (export "f") (i32.store (i32.const 8) (i32.const ${Date.now() % 1_000_000}))))`);
    const before = instrumentations();
    const results = await Promise.all([
      ...Array.from({ length: 4 }, () => instrumentCached(wasm, a)),
      ...Array.from({ length: 3 }, () => instrumentCached(wasm, b)),
      instrumentCached(wasm, null),
    ]);
    expect(instrumentations() - before).toBe(1);
    for (const r of results) expect(Buffer.from(r.wasm).equals(Buffer.from(results[0].wasm))).toBe(true);
    // Each directory got its entry; later requests read it.
    expect(await readdir(a)).toHaveLength(2);
    expect(await readdir(b)).toHaveLength(2);
    expect((await instrumentCached(wasm, a)).source).toBe("cache");
    expect((await instrumentCached(wasm, b)).source).toBe("cache");
    expect(instrumentations() - before).toBe(1);
    // Without a cache, a request after the first finished instruments again (nothing kept it).
    await instrumentCached(wasm, null);
    expect(instrumentations() - before).toBe(2);
  });

  it("reports the instrumentation's timings; the thread loads Binaryen once", async () => {
    const thread = new InstrumenterThread(60_000);
    try {
      const first = await thread.instrument(fixtureBytes("segments"));
      const second = await thread.instrument(fixtureBytes("grow"));
      expect(first.timings.binaryen_load_ms).toBeGreaterThan(0);
      expect(first.timings.instrument_ms).toBeGreaterThan(0);
      expect(second.timings.binaryen_load_ms).toBe(0);
      expect(second.timings.instrument_ms).toBeGreaterThan(0);
      expect(thread.stats).toEqual({ threads_started: 1, modules: 2 });
    } finally {
      await thread.close();
    }
  });

  it("closing the thread fails the module it was on and those waiting; the next module starts a new thread", async () => {
    const thread = new InstrumenterThread(60_000);
    try {
      const outcomes = Promise.allSettled([thread.instrument(fixtureBytes("bulk")), thread.instrument(fixtureBytes("grow"))]);
      await thread.close();
      const [running, waiting] = await outcomes;
      expect(running.status === "rejected" && running.reason).toBeInstanceOf(InstrumenterError);
      expect(waiting.status === "rejected" && (waiting.reason as Error).message).toMatch(/closed before answering/);
      const after = await thread.instrument(fixtureBytes("grow"));
      expect(after.info.exports.length).toBeGreaterThan(0);
      expect(after.timings.binaryen_load_ms).toBeGreaterThan(0); // a new thread loads Binaryen again
      expect(thread.stats).toEqual({ threads_started: 2, modules: 2 });
    } finally {
      await thread.close();
    }
  });

  it("a module over the size limit is refused before it is hashed, copied or sent to a thread", async () => {
    const before = instrumentations();
    const error = await instrumentCached(new Uint8Array(MODULE_LIMITS.bytes_max + 1), await tempDir()).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ModuleLimitError);
    expect(error).toMatchObject({ limit: "bytes_max", value: MODULE_LIMITS.bytes_max + 1 });
    expect(instrumentations()).toBe(before);
  });

  it("a refused module does not load Binaryen on a new thread; the thread then instruments a good one", async () => {
    const thread = new InstrumenterThread(60_000);
    try {
      const nested = new Uint8Array([
        ...[0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00],
        ...[1, 4, 1, 0x60, 0, 0],
        ...[3, 2, 1, 0],
      ]);
      // One function of 5,000 nested blocks.
      const depth = 5_000;
      const body = [0x00, ...new Array<number>(depth).fill(0).flatMap(() => [0x02, 0x40]), ...new Array<number>(depth + 1).fill(0x0b)];
      const uleb = (v: number): number[] => (v < 128 ? [v] : [(v & 0x7f) | 0x80, ...uleb(v >>> 7)]);
      const code = [1, ...uleb(body.length), ...body];
      const bytes = new Uint8Array([...nested, 10, ...uleb(code.length), ...code]);
      await expect(thread.instrument(bytes)).rejects.toMatchObject({ name: "ModuleLimitError", limit: "nesting_max", value: depth });
      const good = await thread.instrument(fixtureBytes("straddle"));
      // Binaryen was loaded for the good module, not for the refused one.
      expect(good.timings.binaryen_load_ms).toBeGreaterThan(0);
      expect(thread.stats).toEqual({ threads_started: 1, modules: 2 });
    } finally {
      await thread.close();
    }
  });

  it("a host instruments and compiles a module once for all its VMs, however many ask at once, and logs the instrument time", async () => {
    const state_dir = await tempDir();
    const host = new Host({ id: "h1", listen_host: "127.0.0.1", port: 0, state_dir, heartbeat_ms: 50, detect_ms: 300, tls: null }, new MemoryStore());
    const info = vi.spyOn(host.log, "info").mockImplementation(() => undefined);
    const wasm = watBytes(`(module (memory 1) (func (export "g") (i32.store (i32.const 16) (i32.const ${(Date.now() + 7) % 1_000_000}))))`);
    const before = instrumentations();
    const guests = await Promise.all(Array.from({ length: 5 }, () => host.groupApi.guestFor(wasm)));
    expect(new Set(guests).size).toBe(1); // one compiled module for every VM, backup and promotion
    expect(instrumentations() - before).toBe(1);
    expect(await readdir(join(state_dir, "cache"))).toHaveLength(2);
    expect(await host.groupApi.guestFor(wasm)).toBe(guests[0]);
    expect(info).toHaveBeenCalledTimes(1);
    expect(info.mock.calls[0][0]).toMatchObject({ bytes: wasm.length, source: "instrumented", instrument_ms: expect.any(Number), binaryen_load_ms: expect.any(Number) });
    expect(info.mock.calls[0][1]).toBe("module instrumented");
  });
});
