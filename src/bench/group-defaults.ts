/**
 * Defaults of the group benchmarks, apart from their code so `--help` loads
 * nothing heavy. warmup_ms: a freshly deployed group runs at a third to a
 * half of its steady rate for its first ~2 s on these machines (both modes
 * alike, measured every 250 ms: V8 optimises the hot host, VM-thread and
 * guest code on background threads meanwhile), so measuring starts after 3 s.
 */
export const GROUP_BENCH_DEFAULTS = { measure_ms: 3000, warmup_ms: 3000, hosts: 2, repeat: 3 };
