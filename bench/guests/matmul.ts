// Benchmark: C = A x B for 256x256 f64 matrices in linear memory,
// n * PRODUCTS_PER_RUN times (one product takes ~12 ms). Compute-bound, the
// opposite of store_loop: B is kept transposed so each element of C is a
// contiguous dot product accumulated in a local, i.e. one store per 256
// multiply-adds.

const DIM: i32 = 256;
const PRODUCTS_PER_RUN: i32 = 16;
const BYTES: usize = <usize>DIM * DIM * 8;

const A: usize = heap.alloc(BYTES);
const BT: usize = heap.alloc(BYTES); // B transposed: BT[j][k] = B[k][j]
const C: usize = heap.alloc(BYTES);

// @ts-ignore: decorator
@inline function cell(m: usize, row: i32, col: i32): usize {
  return m + ((<usize>row * DIM + col) << 3);
}

// Deterministic small integers, so every sum is exact and the checksum stable.
for (let i = 0; i < DIM; i++) {
  for (let j = 0; j < DIM; j++) {
    store<f64>(cell(A, i, j), <f64>((i * 3 + j) % 7) - 2);
    store<f64>(cell(BT, j, i), <f64>((i + j * 5) % 11) - 4); // B[i][j]
  }
}

/** Multiplies n * PRODUCTS_PER_RUN times; returns the sum of C's elements (as i32). */
export function run(n: i32): i32 {
  let sum: f64 = 0;
  const products = n * PRODUCTS_PER_RUN;
  for (let iter = 0; iter < products; iter++) {
    for (let i = 0; i < DIM; i++) {
      const arow = cell(A, i, 0);
      for (let j = 0; j < DIM; j++) {
        const bcol = cell(BT, j, 0);
        let acc: f64 = 0;
        for (let k: usize = 0; k < <usize>DIM << 3; k += 8) {
          acc += load<f64>(arow + k) * load<f64>(bcol + k);
        }
        store<f64>(cell(C, i, j), acc);
      }
    }
    sum = 0;
    for (let p: usize = 0; p < BYTES; p += 8) sum += load<f64>(C + p);
  }
  return <i32>sum;
}
