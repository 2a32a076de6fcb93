/** Defaults of the group benchmarks, apart from their code so `--help` loads nothing heavy. */
export const GROUP_BENCH_DEFAULTS = { measure_ms: 3000, warmup_ms: 1000, hosts: 2 };
