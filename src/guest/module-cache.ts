/**
 * Instrumented modules are cached by content hash: instrumenting a large
 * module takes Binaryen a while, and every host that runs or backs up a VM of
 * the same guest needs the same instrumented bytes. On one host a module is
 * instrumented once: later requests read the cache, and requests made while
 * it is being instrumented wait for that one instrumentation (in this
 * process, whatever the cache directory).
 *
 * Cache layout: <dir>/<sha256 of input>-v<INSTRUMENTER_VERSION>.wasm + .json (ModuleInfo).
 */
import { createHash } from "node:crypto";
import { mkdir, readFile, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { INSTRUMENTER_VERSION, type InstrumentedModule, type ModuleInfo } from "./module-info.js";
import { instrumentOffThread, type InstrumentTimings, type TimedInstrumentedModule } from "./instrument-worker.js";
import { checkModuleSize } from "./limits.js";
import type { GuestModule } from "../vm/machine.js";

export function sha256(bytes: Uint8Array): Uint8Array {
  return new Uint8Array(createHash("sha256").update(bytes).digest());
}

/** An instrumented module and how this request got it. */
export interface CachedModule extends InstrumentedModule {
  /** "instrumented": Binaryen ran for it (or for a concurrent request it waited on); "cache": read from the cache directory. */
  source: "instrumented" | "cache";
  /** The instrumentation's timings (zero when read from the cache). */
  timings: InstrumentTimings;
}

/** Cache entries being read or made, by directory and key: concurrent requests for one entry share it. */
const entries = new Map<string, Promise<CachedModule>>();
/**
 * Instrumentations by key: one per module in this process, whatever the
 * cache directory. Kept until every request for the module in flight has
 * settled (`requests`): a request still reading its own directory's cache
 * when another's instrumentation finished takes that result instead of
 * instrumenting again.
 */
const running = new Map<string, Promise<TimedInstrumentedModule>>();
const requests = new Map<string, number>();
let tmpCounter = 0;

/** Instruments `wasm`, reusing a cached result in `cache_dir` when there is one. */
export async function instrumentCached(wasm: Uint8Array, cache_dir: string | null): Promise<CachedModule> {
  // Before hashing or copying anything (the other limits are checked on the instrumenter thread).
  checkModuleSize(wasm);
  const key = `${Buffer.from(sha256(wasm)).toString("hex")}-v${INSTRUMENTER_VERSION}`;
  const id = `${cache_dir ?? ""}\0${key}`;
  let entry = entries.get(id);
  if (!entry) {
    requests.set(key, (requests.get(key) ?? 0) + 1);
    entry = readOrInstrument(wasm, key, cache_dir).finally(() => {
      entries.delete(id);
      const left = requests.get(key)! - 1;
      if (left > 0) return void requests.set(key, left);
      requests.delete(key);
      running.delete(key);
    });
    entries.set(id, entry);
  }
  return await entry;
}

async function readOrInstrument(wasm: Uint8Array, key: string, cache_dir: string | null): Promise<CachedModule> {
  if (!cache_dir) return { ...(await instrumentOnce(wasm, key)), source: "instrumented" };
  const wasmPath = join(cache_dir, `${key}.wasm`);
  const infoPath = join(cache_dir, `${key}.json`);
  try {
    const [bytes, info] = await Promise.all([readFile(wasmPath), readFile(infoPath, "utf8")]);
    return { wasm: new Uint8Array(bytes), info: JSON.parse(info) as ModuleInfo, source: "cache", timings: { binaryen_load_ms: 0, instrument_ms: 0 } };
  } catch {
    // Not cached yet (or a partial entry): instrument and write it.
  }
  const result = await instrumentOnce(wasm, key);
  await mkdir(cache_dir, { recursive: true });
  // Write-then-rename so a concurrent reader (another host process on the same directory) never sees half a file.
  const tmp = `.${process.pid}-${++tmpCounter}`;
  await writeFile(wasmPath + tmp, result.wasm);
  await writeFile(infoPath + tmp, JSON.stringify(result.info));
  await rename(wasmPath + tmp, wasmPath);
  await rename(infoPath + tmp, infoPath);
  return { ...result, source: "instrumented" };
}

function instrumentOnce(wasm: Uint8Array, key: string): Promise<TimedInstrumentedModule> {
  let run = running.get(key);
  if (!run) {
    run = instrumentOffThread(wasm);
    running.set(key, run); // forgotten once no request for the module is in flight (instrumentCached)
  }
  return run;
}

/** Compiles an instrumented module for this thread. */
export async function compileGuest(instrumented: InstrumentedModule): Promise<GuestModule> {
  const module = await WebAssembly.compile(instrumented.wasm as Uint8Array<ArrayBuffer>);
  return { module, info: instrumented.info, hash: sha256(instrumented.wasm) };
}
