// Benchmark: fill 1,000,000 i32 from an LCG, then sort them in place
// (quicksort with median-of-three and insertion sort for short runs).

const N: i32 = 1_000_000;
const data: usize = heap.alloc(<usize>N << 2);

// @ts-ignore: decorator
@inline function at(i: i32): i32 { return load<i32>(data + (<usize>i << 2)); }
// @ts-ignore: decorator
@inline function put(i: i32, v: i32): void { store<i32>(data + (<usize>i << 2), v); }

/** Sorts `n` times (each time from the same deterministic input); returns a checksum. */
export function run(n: i32): i32 {
  let check: i32 = 0;
  for (let iter = 0; iter < n; iter++) {
    let x: u32 = 0x2545F491;
    for (let i = 0; i < N; i++) {
      x = x * 1664525 + 1013904223; // Numerical Recipes LCG
      put(i, <i32>x);
    }
    quicksort(0, N - 1);
    for (let i = 1; i < N; i++) {
      if (at(i - 1) > at(i)) throw new Error("sort: output not sorted");
    }
    check ^= at(0) ^ at(N >> 2) ^ at(N >> 1) ^ at(N - 1);
  }
  return check;
}

function quicksort(lo: i32, hi: i32): void {
  // Recurse into the smaller side and loop on the larger: stack depth O(log n).
  while (hi - lo > 16) {
    const mid = lo + ((hi - lo) >> 1);
    // Median of three into `mid`, then use it as the pivot.
    if (at(mid) < at(lo)) swap(mid, lo);
    if (at(hi) < at(lo)) swap(hi, lo);
    if (at(hi) < at(mid)) swap(hi, mid);
    const pivot = at(mid);
    let i = lo;
    let j = hi;
    while (i <= j) {
      while (at(i) < pivot) i++;
      while (at(j) > pivot) j--;
      if (i <= j) { swap(i, j); i++; j--; }
    }
    if (j - lo < hi - i) { quicksort(lo, j); lo = i; }
    else { quicksort(i, hi); hi = j; }
  }
  // Insertion sort for the short remainder.
  for (let i = lo + 1; i <= hi; i++) {
    const v = at(i);
    let j = i - 1;
    while (j >= lo && at(j) > v) { put(j + 1, at(j)); j--; }
    put(j + 1, v);
  }
}

// @ts-ignore: decorator
@inline function swap(a: i32, b: i32): void {
  const t = at(a);
  put(a, at(b));
  put(b, t);
}
