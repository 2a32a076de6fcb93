/** Test helpers: guest modules from WAT fixtures or from the build, instrumented and compiled. */
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import binaryen from "binaryen";
import { instrument } from "../../src/guest/instrument.js";
import { compileGuest } from "../../src/guest/module-cache.js";
import { DEFAULT_LIMITS, type GuestModule, type VmOptions } from "../../src/vm/machine.js";

const root = fileURLToPath(new URL("../../", import.meta.url));

export function watBytes(text: string): Uint8Array {
  const m = binaryen.parseText(text);
  try {
    // What V8 in Node 20 runs: Features.All would also turn on encodings it cannot read (compact imports).
    const f = binaryen.Features;
    m.setFeatures(f.MVP | f.MutableGlobals | f.NontrappingFPToInt | f.SIMD128 | f.BulkMemory | f.BulkMemoryOpt | f.SignExt | f.ReferenceTypes | f.Multivalue | f.TailCall);
    return m.emitBinary();
  } finally {
    m.dispose();
  }
}

export function fixtureBytes(name: string): Uint8Array {
  return watBytes(readFileSync(`${root}test/fixtures/wat/${name}.wat`, "utf8"));
}

/** A guest compiled by `npm run build` (build/guests/<name>.wasm). */
export function builtBytes(name: string): Uint8Array {
  return new Uint8Array(readFileSync(`${root}build/guests/${name}.wasm`));
}

export async function guestOf(bytes: Uint8Array): Promise<GuestModule> {
  return compileGuest(instrument(bytes));
}

export function options(overrides: Partial<VmOptions> = {}): VmOptions {
  return { rank: 0, size: 1, limits: { ...DEFAULT_LIMITS }, now: () => 0, ...overrides };
}
