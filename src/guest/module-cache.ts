/**
 * Instrumented modules are cached by content hash: instrumenting a large
 * module takes Binaryen a while, and every host that runs or backs up a VM of
 * the same guest needs the same instrumented bytes.
 *
 * Cache layout: <dir>/<sha256 of input>-v<INSTRUMENTER_VERSION>.wasm + .json (ModuleInfo).
 */
import { createHash } from "node:crypto";
import { mkdir, readFile, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { INSTRUMENTER_VERSION, type InstrumentedModule, type ModuleInfo } from "./module-info.js";
import { instrumentOffThread } from "./instrument-worker.js";
import type { GuestModule } from "../vm/machine.js";

export function sha256(bytes: Uint8Array): Uint8Array {
  return new Uint8Array(createHash("sha256").update(bytes).digest());
}

/** Instruments `wasm`, reusing a cached result in `cache_dir` when there is one. */
export async function instrumentCached(wasm: Uint8Array, cache_dir: string | null): Promise<InstrumentedModule> {
  if (!cache_dir) return instrumentOffThread(wasm);
  const key = `${Buffer.from(sha256(wasm)).toString("hex")}-v${INSTRUMENTER_VERSION}`;
  const wasmPath = join(cache_dir, `${key}.wasm`);
  const infoPath = join(cache_dir, `${key}.json`);
  try {
    const [bytes, info] = await Promise.all([readFile(wasmPath), readFile(infoPath, "utf8")]);
    return { wasm: new Uint8Array(bytes), info: JSON.parse(info) as ModuleInfo };
  } catch {
    // Not cached yet (or a partial entry): instrument and write it.
  }
  const result = await instrumentOffThread(wasm);
  await mkdir(cache_dir, { recursive: true });
  // Write-then-rename so a concurrent reader never sees half a file.
  const tmp = `.${process.pid}-${Date.now()}`;
  await writeFile(wasmPath + tmp, result.wasm);
  await writeFile(infoPath + tmp, JSON.stringify(result.info));
  await rename(wasmPath + tmp, wasmPath);
  await rename(infoPath + tmp, infoPath);
  return result;
}

/** Compiles an instrumented module for this thread. */
export async function compileGuest(instrumented: InstrumentedModule): Promise<GuestModule> {
  const module = await WebAssembly.compile(instrumented.wasm as Uint8Array<ArrayBuffer>);
  return { module, info: instrumented.info, hash: sha256(instrumented.wasm) };
}
