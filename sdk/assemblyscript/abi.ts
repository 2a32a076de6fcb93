// Raw Cohort Guest ABI v1 imports (docs/GUEST_ABI.md), module "cohort".
//
// These are the exact wasm signatures; most guests should use the wrappers in
// ./index.ts instead. AssemblyScript only emits an import for a declared
// function that is actually called, so a guest imports just what it uses.
// Pointers are addresses in the guest's own linear memory; usize is i32 on wasm32.

// @ts-ignore: decorator
@external("cohort", "log")
export declare function log(ptr: usize, len: i32): i32;

// @ts-ignore: decorator
@external("cohort", "send")
export declare function send(rank: i32, ptr: usize, len: i32): i32;

// @ts-ignore: decorator
@external("cohort", "reply")
export declare function reply(session: i32, requestId: i32, ptr: usize, len: i32): i32;

// @ts-ignore: decorator
@external("cohort", "timer_set")
export declare function timer_set(timerId: i32, delayMs: f64): i32;

// @ts-ignore: decorator
@external("cohort", "timer_cancel")
export declare function timer_cancel(timerId: i32): i32;

// @ts-ignore: decorator
@external("cohort", "clock_ms")
export declare function clock_ms(): f64;

// @ts-ignore: decorator
@external("cohort", "random_fill")
export declare function random_fill(ptr: usize, len: i32): i32;

// @ts-ignore: decorator
@external("cohort", "rank")
export declare function rank(): i32;

// @ts-ignore: decorator
@external("cohort", "size")
export declare function size(): i32;
