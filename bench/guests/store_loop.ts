// Benchmark: the pure store loop, the write barrier's worst case. Each pass
// writes every i32 of a 16 MiB buffer in order, so every 4 KiB page is
// dirtied once per pass and nearly every instruction is a store.
//
// run(n) makes n * PASSES_PER_RUN passes: one pass takes only ~2 ms, so a
// run(1) of ~100+ ms needs a few dozen of them.

const BYTES: usize = 16 << 20;
const PASSES_PER_RUN: i32 = 64;

// Allocated once, by top-level code (the wasm start function).
const buffer: usize = heap.alloc(BYTES);

/** n * PASSES_PER_RUN passes over the buffer; returns a checksum of a few words. */
export function run(n: i32): i32 {
  const end = buffer + BYTES;
  const passes = n * PASSES_PER_RUN;
  for (let pass = 0; pass < passes; pass++) {
    // The stored value depends on the address and the pass, so the loop can't
    // be folded into a memory.fill or hoisted out of the pass loop.
    let v = <u32>pass * 0x9E3779B9;
    for (let p = buffer; p < end; p += 4) {
      store<u32>(p, v);
      v += 0x01000193;
    }
  }
  let sum: u32 = 0;
  for (let p = buffer; p < end; p += 1 << 20) sum ^= load<u32>(p);
  return <i32>(sum ^ load<u32>(end - 4));
}
