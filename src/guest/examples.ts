/**
 * Where the guests compiled by the build live: `cohort run ticker` and the
 * benchmarks name a built guest instead of a path.
 */
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";

export const EXAMPLE_GUESTS = ["ticker", "kv", "bank", "allreduce", "ring", "phases"] as const;

const BUILD_DIR = fileURLToPath(new URL(import.meta.url.endsWith(".ts") ? "../../build/guests/" : "../../../build/guests/", import.meta.url));

export function guestPath(name: string): string {
  const path = `${BUILD_DIR}${name}.wasm`;
  if (!existsSync(path)) throw new Error(`guest "${name}" is not built (${path}); run \`npm run build\``);
  return path;
}

/** A module argument is a built guest's name or a path to a .wasm file. */
export function resolveGuest(nameOrPath: string): string {
  return /^[a-z_]+$/.test(nameOrPath) ? guestPath(nameOrPath) : nameOrPath;
}
