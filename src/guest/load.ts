/**
 * One way to turn a module argument into a guest every thread can run:
 * resolve (example name or path) → read → instrument (cached) → compile.
 */
import { readFile } from "node:fs/promises";
import { homedir } from "node:os";
import { join } from "node:path";
import { compileGuest, instrumentCached } from "./module-cache.js";
import { resolveGuest } from "./examples.js";
import type { GuestBundle } from "../vm/protocol.js";

/** Instrumented modules are cached here unless COHORT_CACHE_DIR says otherwise. */
export function defaultCacheDir(): string {
  return process.env.COHORT_CACHE_DIR ?? join(homedir(), ".cache", "cohort", "modules");
}

export async function loadGuest(nameOrPath: string, cache_dir: string | null = defaultCacheDir()): Promise<GuestBundle> {
  const path = resolveGuest(nameOrPath);
  const bytes = new Uint8Array(await readFile(path));
  return compileGuest(await instrumentCached(bytes, cache_dir));
}
