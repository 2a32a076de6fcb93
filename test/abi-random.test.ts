/**
 * The randomness guests get through `cohort.random_fill` (src/vm/abi.ts) is
 * read from the CSPRNG a pool at a time: every byte goes to one caller, and
 * every byte a caller asked for is filled.
 */
import { describe, expect, it } from "vitest";
import { RANDOM_POOL_BYTES, randomBytesInto } from "../src/vm/abi.js";

/** Longest run of equal bytes: CSPRNG output has none near 16 in a few KiB (odds ~2^-120). */
function longestRun(bytes: Uint8Array): number {
  let best = 1;
  let run = 1;
  for (let i = 1; i < bytes.length; i++) {
    run = bytes[i] === bytes[i - 1] ? run + 1 : 1;
    best = Math.max(best, run);
  }
  return best;
}

describe("random_fill's pool", () => {
  it("hands each caller fresh bytes: small reads across several refills never repeat", () => {
    const seen = new Set<string>();
    const reads = (3 * RANDOM_POOL_BYTES) / 8 + 7;
    for (let i = 0; i < reads; i++) {
      const b = new Uint8Array(8);
      randomBytesInto(b);
      seen.add(Buffer.from(b).toString("hex"));
    }
    expect(seen.size).toBe(reads);
  });

  it("fills a read that straddles a refill, and reads larger than the pool, completely", () => {
    for (const n of [RANDOM_POOL_BYTES - 5, 1000, RANDOM_POOL_BYTES, 3 * RANDOM_POOL_BYTES + 1]) {
      const b = new Uint8Array(n);
      randomBytesInto(b);
      expect(longestRun(b)).toBeLessThan(16);
      // The last bytes are filled too (an unfilled tail would be zeros).
      expect(longestRun(b.subarray(n - 64))).toBeLessThan(16);
    }
  });
});
