/** Small numeric helpers shared by the benchmarks and the CLI's summaries. */

/** The value at quantile `q` (0..1, nearest rank) of `sorted` (ascending); 0 for none. */
export function percentileOfSorted(sorted: readonly number[], q: number): number {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor((sorted.length - 1) * q + 0.5))];
}

/** The value at quantile `q` of `values`, in any order. */
export function percentile(values: readonly number[], q: number): number {
  return percentileOfSorted([...values].sort((a, b) => a - b), q);
}

/** `x` with `digits` decimals, as a number (for JSON output). */
export const round = (x: number, digits = 2): number => Number(x.toFixed(digits));
