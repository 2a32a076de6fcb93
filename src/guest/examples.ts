/**
 * Where the guests compiled by the build live: `cohort run ticker` and the
 * benchmarks name a built guest instead of a path.
 */
import { existsSync, readdirSync, statSync } from "node:fs";
import { GuestNotFoundError } from "./errors.js";
import { fileURLToPath } from "node:url";

export const EXAMPLE_GUESTS = ["ticker", "kv", "bank", "allreduce", "ring", "phases"] as const;

const BUILD_DIR = fileURLToPath(new URL(import.meta.url.endsWith(".ts") ? "../../build/guests/" : "../../../build/guests/", import.meta.url));

export function guestPath(name: string): string {
  const path = `${BUILD_DIR}${name}.wasm`;
  if (existsSync(path)) return path;
  if ((EXAMPLE_GUESTS as readonly string[]).includes(name)) throw new GuestNotFoundError(`guest "${name}" is not built (${path}); run \`npm run build\``);
  throw new GuestNotFoundError(`"${name}" is neither a file nor a built guest (examples: ${EXAMPLE_GUESTS.join(", ")})`);
}

/** Names of the guests `npm run build` compiled (examples and benchmark guests), sorted; none before a build. */
export function builtGuests(): string[] {
  if (!existsSync(BUILD_DIR)) return [];
  return readdirSync(BUILD_DIR)
    .filter((f) => f.endsWith(".wasm"))
    .map((f) => f.slice(0, -".wasm".length))
    .sort();
}

/**
 * A module argument is a path to a .wasm file or a built guest's name. A path
 * that exists as a file is a file, even when it looks like a name (`myguest`
 * in the current directory).
 */
export function resolveGuest(nameOrPath: string): string {
  if (statSync(nameOrPath, { throwIfNoEntry: false })?.isFile()) return nameOrPath;
  return /^[a-z_]+$/.test(nameOrPath) ? guestPath(nameOrPath) : nameOrPath;
}
