// Benchmark: build a Map<i32, i32> of 200,000 pseudo-random keys, n * MAPS_PER_RUN
// times (one map takes ~10 ms). Allocation-heavy: exercises the runtime's
// allocator and GC (each map becomes garbage when the next one is built).

const KEYS: i32 = 200_000;
const MAPS_PER_RUN: i32 = 16;

/** Returns a checksum of the maps' sizes and a sample of lookups. */
export function run(n: i32): i32 {
  let check: i32 = 0;
  const maps = n * MAPS_PER_RUN;
  for (let iter = 0; iter < maps; iter++) {
    const map = new Map<i32, i32>();
    let x: u32 = 0x9E3779B9 + <u32>iter;
    for (let i = 0; i < KEYS; i++) {
      x ^= x << 13; x ^= x >> 17; x ^= x << 5; // xorshift32
      map.set(<i32>x, i);
    }
    // Replay the key sequence partially and sum what the map returns.
    x = 0x9E3779B9 + <u32>iter;
    let sum: i32 = 0;
    for (let i = 0; i < KEYS; i += 7) {
      x ^= x << 13; x ^= x >> 17; x ^= x << 5;
      if (map.has(<i32>x)) sum += map.get(<i32>x);
      for (let k = 0; k < 6; k++) { x ^= x << 13; x ^= x >> 17; x ^= x << 5; }
    }
    check = check * 31 + map.size + sum;
  }
  return check;
}
