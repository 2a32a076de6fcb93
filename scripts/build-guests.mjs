#!/usr/bin/env node
// Compiles the AssemblyScript example and benchmark guests to build/guests/<name>.wasm.
//
//   node scripts/build-guests.mjs [--force] [name ...]
//
// A guest is skipped when its .wasm is newer than all of its sources (its
// entry file's directory for examples, its file for benchmarks, the SDK for
// the guests that import it, and this script, which holds the flags). Exits
// non-zero if any guest fails to compile.

import asc from "assemblyscript/asc";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const OUT_DIR = "build/guests";

// Guest ABI v1 compile flags. The incremental runtime (not stub) because kv,
// bank and hash_map allocate for as long as they run, and stub never frees.
// No --noAssert (traps must stay traps), no --importMemory / --sharedMemory /
// --exportTable: the Cohort host instruments and converts the module itself.
const FLAGS = ["--runtime", "incremental", "-O3"];

const SDK = "sdk/assemblyscript";
const example = (name) => ({ name, entry: `examples/${name}/index.ts`, sources: [`examples/${name}`, SDK] });
// A benchmark guest is one file; `extra` lists what else it imports (the SDK, for the messaging ones).
const bench = (name, extra = []) => ({ name, entry: `bench/guests/${name}.ts`, sources: [`bench/guests/${name}.ts`, ...extra] });

const GUESTS = [
  example("ticker"),
  example("kv"),
  example("bank"),
  example("allreduce"),
  example("ring"),
  example("phases"),
  bench("store_loop"),
  bench("sort"),
  bench("hash_map"),
  bench("matmul"),
  bench("pingpong", [SDK]),
];

/** Newest modification time among `paths` (files, or directories searched recursively for .ts). */
function newestMtime(paths) {
  let newest = 0;
  for (const p of paths) {
    const abs = path.join(ROOT, p);
    const stat = fs.statSync(abs);
    if (stat.isDirectory()) {
      for (const entry of fs.readdirSync(abs, { recursive: true })) {
        if (entry.endsWith(".ts")) newest = Math.max(newest, fs.statSync(path.join(abs, entry)).mtimeMs);
      }
    } else {
      newest = Math.max(newest, stat.mtimeMs);
    }
  }
  return newest;
}

async function build(guest, force) {
  const out = `${OUT_DIR}/${guest.name}.wasm`;
  const outAbs = path.join(ROOT, out);
  const sourcesMtime = newestMtime([...guest.sources, path.relative(ROOT, fileURLToPath(import.meta.url))]);
  if (!force && fs.existsSync(outAbs) && fs.statSync(outAbs).mtimeMs > sourcesMtime) {
    console.log(`up to date  ${guest.name.padEnd(10)} ${out}`);
    return true;
  }
  const started = performance.now();
  const { error } = await asc.main([guest.entry, "--baseDir", ROOT, "--outFile", out, ...FLAGS], {
    stdout: process.stdout,
    stderr: process.stderr,
  });
  if (error) {
    console.log(`FAILED      ${guest.name.padEnd(10)} ${guest.entry}: ${error.message}`);
    return false;
  }
  const kib = (fs.statSync(outAbs).size / 1024).toFixed(1);
  const secs = ((performance.now() - started) / 1000).toFixed(1);
  console.log(`compiled    ${guest.name.padEnd(10)} ${out} (${kib} KiB, ${secs} s)`);
  return true;
}

const args = process.argv.slice(2);
const force = args.includes("--force");
const names = args.filter((a) => a !== "--force");
const unknown = names.filter((n) => !GUESTS.some((g) => g.name === n));
if (unknown.length > 0) {
  console.error(`unknown guest(s): ${unknown.join(", ")}; known: ${GUESTS.map((g) => g.name).join(", ")}`);
  process.exit(2);
}

fs.mkdirSync(path.join(ROOT, OUT_DIR), { recursive: true });
let ok = true;
for (const guest of GUESTS) {
  if (names.length > 0 && !names.includes(guest.name)) continue;
  // Sequential: the compiler is CPU-bound and keeps per-run state.
  if (!(await build(guest, force))) ok = false;
}
process.exitCode = ok ? 0 : 1;
