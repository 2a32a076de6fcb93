/**
 * Defaults of the group benchmarks, apart from their code so `--help` loads
 * nothing heavy. warmup_ms: a freshly deployed group runs well below its
 * steady rate for its first seconds on a 2-core machine (both modes alike;
 * V8 optimises the hot host, VM-thread and guest code on background threads
 * meanwhile), so measuring starts after 3 s: compare `--warmup-ms 500`.
 */
export const GROUP_BENCH_DEFAULTS = { measure_ms: 3000, warmup_ms: 3000, hosts: 2, repeat: 3 };

/**
 * `cohort bench idle`: an idle 8-VM kv group (mode group) on 3 hosts against
 * the same hosts with nothing deployed. settle_ms: for a while after a
 * deploy (and after a host's start) the hosts still work it off: V8
 * compiles, and shrinks the heap of every isolate (main, heartbeat and VM
 * threads) in rounds of garbage collection seconds apart. 3 to 8 s after a
 * deploy an idle group measured about 5 % of a core above the floor; 15 s
 * after it, floor and group were still 1 % above where they settle; a
 * minute after it, both had (`--settle-ms 15000` against the default).
 */
export const IDLE_BENCH_DEFAULTS = { measure_ms: 5000, settle_ms: 60000, hosts: 3, size: 8, guest: "kv", mode: "group" as const, repeat: 3 };

/**
 * `cohort bench scale`: a `kv` group per size on 4 hosts, as a new user would
 * start (`cohort up --hosts 4`), read 3 s after its deploy. 256 VMs take
 * minutes on 2 cores: `--sizes 8,64,256`.
 */
export const SCALE_BENCH_DEFAULTS = { sizes: [8, 64], hosts: 4, guest: "kv", mode: "group" as const, settle_ms: 3000, idle_ms: 3000, bank_before_kill_ms: 3000, bank_after_kill_ms: 3000 };

/** `cohort bench store`: 2 s per operation, 32 in flight (a cluster's hosts renewing and deciding at once), lists of 100 records. */
export const STORE_BENCH_DEFAULTS = { measure_ms: 2000, concurrency: 32, list_keys: 100 };
