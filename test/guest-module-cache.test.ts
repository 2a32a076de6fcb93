/** Instrumented modules are cached by the content hash of the input module. */
import { afterEach, describe, expect, it } from "vitest";
import { mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { instrumentCached } from "../src/guest/module-cache.js";
import { INSTRUMENTER_VERSION } from "../src/guest/module-info.js";
import { fixtureBytes } from "./support/guests.js";

const dirs: string[] = [];
afterEach(async () => {
  for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
});

describe("module cache", () => {
  it("stores an instrumented module under its input's hash and reuses it", async () => {
    const dir = await mkdtemp(join(tmpdir(), "cohort-cache-"));
    dirs.push(dir);
    const wasm = fixtureBytes("globals");
    const first = await instrumentCached(wasm, dir);
    const files = (await readdir(dir)).sort();
    expect(files).toHaveLength(2);
    expect(files[0]).toMatch(new RegExp(`^[0-9a-f]{64}-v${INSTRUMENTER_VERSION}\\.json$`));
    // A second call must come from the cache: poison the cached bytes and see them returned.
    const wasmFile = join(dir, files[1]);
    await writeFile(wasmFile, new Uint8Array([1, 2, 3]));
    const second = await instrumentCached(wasm, dir);
    expect([...second.wasm]).toEqual([1, 2, 3]);
    expect(second.info).toEqual(first.info);
    // A different module gets its own entry.
    await instrumentCached(fixtureBytes("bulk"), dir);
    expect(await readdir(dir)).toHaveLength(4);
  });
});
