/**
 * `cohort bench checkpoint`: what protection costs a running VM.
 *
 *  - barrier_overhead: per AssemblyScript workload, time of run(1) on the
 *    instrumented guest ÷ time on the plain guest, both in this process, runs
 *    interleaved (so machine noise hits both alike), median of the samples.
 *    The instrumented guest is checkpointed between runs, as it would be in
 *    production, so every run pays the first-write cost of each page it dirties.
 *  - results: checkpoint pause (capture: copy dirty pages + globals + runtime
 *    state, then resume) for memory sizes × dirty page counts, each delta
 *    given back to the VM's pool as its consumer would, next to the page-copy
 *    floor: the same number of 4 KiB pages copied with a plain TypedArray.set
 *    into a preallocated buffer, in the same process, between the captures.
 *  - rollback: in-place rollback to a cut (undo log written back, globals and
 *    runtime state restored) after the guest wrote N pages, timed inside the
 *    VM thread by the worker's `rollback` op (its rollback_us).
 */
import { readFile } from "node:fs/promises";
import { instrument } from "../guest/instrument.js";
import { compileGuest } from "../guest/module-cache.js";
import { DEFAULT_LIMITS, VmCore, type CapturedDelta, type GuestModule, type VmOptions } from "../vm/machine.js";
import { BASE_BYTES, GUEST_WASM_PAGES_MAX, PAGE_BYTES } from "../vm/layout.js";
import { guestPath } from "../guest/examples.js";
import { VmWorker } from "../vm/vm.js";
import { percentileOfSorted, round } from "../util/stats.js";

export const BARRIER_WORKLOADS = ["store_loop", "sort", "hash_map", "matmul"] as const;

export interface BarrierResult {
  plain_ms: number;
  instrumented_ms: number;
  ratio: number;
}

export interface PauseResult {
  memory_mib: number;
  /** Pages dirtied per checkpoint: the requested count, capped at the guest's memory (1 MiB has only 256). */
  dirty_pages: number;
  dirty_pages_requested: number;
  samples: number;
  pause_us_p50: number;
  pause_us_p99: number;
  delta_bytes: number;
  /** Captures before the measured ones (after every page of memory was touched once). */
  warmup_samples: number;
  /** Copying `dirty_pages` random resident pages with TypedArray.set into a preallocated buffer, one copy per sample. */
  copy_floor_us_p50: number;
  copy_floor_us_p99: number;
  /** pause_us_p50 ÷ copy_floor_us_p50. */
  pause_over_floor: number;
  /** pause_us_p99 ÷ pause_us_p50. */
  p99_over_p50: number;
  /**
   * Samples during which the OS switched this process out (involuntary
   * context switches of any of its threads): on a busy machine these, not
   * the capture, make the tail.
   */
  preempted_samples: number;
  /** The p99 of the other samples: the capture's own tail, on a machine busy with other work (null: every sample was preempted). */
  pause_us_p99_not_preempted: number | null;
}

export interface RollbackResult {
  memory_mib: number;
  /** Distinct 4 KiB pages the guest wrote between the cut and the rollback. */
  written_pages: number;
  /** What the rollback reported moving back (= written_pages). */
  pages_restored: number;
  samples: number;
  /** The worker's `rollback` op, timed on the VM's thread (no message passing included). */
  rollback_us_p50: number;
  rollback_us_p99: number;
}

export interface CheckpointBenchReport {
  bench: "checkpoint";
  barrier_overhead: Record<(typeof BARRIER_WORKLOADS)[number] | "geomean", number>;
  barrier_detail: Record<string, BarrierResult>;
  results: PauseResult[];
  rollback: RollbackResult[];
}

export interface CheckpointBenchOptions {
  memory_mib: number[];
  dirty_pages: number[];
  samples: number;
  barrier_runs: number;
  /** Pages written before each rollback (default ROLLBACK_BENCH_DEFAULTS.written_pages). */
  rollback_pages?: number[];
  /** Rollbacks measured per case (default ROLLBACK_BENCH_DEFAULTS.samples). */
  rollback_samples?: number;
  progress: (line: string) => void;
}

/** Rollback in place: a 64 MiB guest (16,384 pages, a power of two: see `scatter`). */
export const ROLLBACK_BENCH_DEFAULTS = { memory_mib: 64, written_pages: [100, 1000], samples: 30 };

/**
 * Captures before a pause case measures: enough for the capture path to be
 * compiled by the optimizing tier and the VM's delta and undo pools to hold
 * what a capture needs (the pause settles after some 40-60 of them).
 */
export const PAUSE_WARMUP_CAPTURES = 64;


function vmOptions(memory_pages_max: number): VmOptions {
  return { rank: 0, size: 1, limits: { ...DEFAULT_LIMITS, memory_pages_max }, now: Date.now };
}


/** The same guest, plain (instantiated as it is) and instrumented (a Cohort VM). */
async function barrierWorkload(name: string, runs: number): Promise<BarrierResult> {
  const bytes = new Uint8Array(await readFile(guestPath(name)));
  const plainModule = await WebAssembly.compile(bytes);
  const plain = new WebAssembly.Instance(plainModule, {
    env: { abort: () => { throw new Error("abort"); }, seed: () => 1 },
  }).exports as { run: (n: number) => number };
  const guest = await compileGuest(instrument(bytes));
  const vm = VmCore.boot(guest, vmOptions(GUEST_WASM_PAGES_MAX));
  checkpoint(vm);
  const timePlain = () => time(() => plain.run(1));
  const timeVm = () => {
    const ms = time(() => vm.invoke("run", [1]));
    checkpoint(vm);
    return ms;
  };
  // Warm-up: tier-up of both compiled modules and first touch of their memory.
  timePlain();
  timeVm();
  const plainMs: number[] = [];
  const vmMs: number[] = [];
  for (let i = 0; i < runs; i++) {
    plainMs.push(timePlain());
    vmMs.push(timeVm());
  }
  const p = median(plainMs);
  const v = median(vmMs);
  return { plain_ms: round(p), instrumented_ms: round(v), ratio: round(v / p, 3) };
}

/** Capture and commit; the delta goes back to the VM's pool, as a backup's host gives it back once sent. */
function checkpoint(vm: VmCore): CapturedDelta {
  const captured = vm.capture();
  vm.commit(captured.epoch);
  vm.recycle(captured.delta);
  return captured;
}

function time(body: () => unknown): number {
  const started = process.hrtime.bigint();
  body();
  return Number(process.hrtime.bigint() - started) / 1e6;
}

function median(xs: number[]): number {
  const sorted = [...xs].sort((a, b) => a - b);
  return percentileOfSorted(sorted, 0.5);
}

/**
 * A guest whose memory size is set at boot and whose pages are dirtied on request:
 * `touch` writes one word; `scatter` writes one word in each of `count` pages
 * (first + i·stride) mod total, in one call — distinct pages when `total` is a
 * power of two and `stride` is odd.
 */
const PAUSE_GUEST_WAT = (pages: number) => `(module
  (memory ${pages})
  (func (export "touch") (param $addr i32) (param $value i32)
    (i32.store (local.get $addr) (local.get $value)))
  (func (export "scatter") (param $first i32) (param $stride i32) (param $count i32) (param $total i32) (param $value i32)
    (local $i i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $count)))
        (i32.store
          (i32.mul
            (i32.rem_u (i32.add (local.get $first) (i32.mul (local.get $i) (local.get $stride))) (local.get $total))
            (i32.const ${PAGE_BYTES}))
          (i32.add (local.get $value) (local.get $i)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))))`;

export async function pauseGuest(memory_mib: number): Promise<GuestModule> {
  const binaryen = (await import("binaryen")).default;
  const m = binaryen.parseText(PAUSE_GUEST_WAT(memory_mib * 16));
  try {
    return await compileGuest(instrument(m.emitBinary()));
  } finally {
    m.dispose();
  }
}

export async function pauseCase(guest: GuestModule, memory_mib: number, dirty: number, samples: number): Promise<PauseResult> {
  const vm = VmCore.boot(guest, vmOptions(GUEST_WASM_PAGES_MAX));
  checkpoint(vm);
  const guestPages = (memory_mib * 1024 * 1024) / PAGE_BYTES;
  const count = Math.min(dirty, guestPages);
  // Every page resident, as in a VM that has run a while: each gets written once with the byte it
  // holds (the guest sees no change, nothing is dirtied). A page never written reads as the kernel's
  // shared zero page, which would flatter the floor's copies.
  const memory = vm.bytes();
  for (let at = BASE_BYTES; at < memory.length; at += PAGE_BYTES) memory[at] |= 0;
  const floorBuffer = new Uint8Array(count * PAGE_BYTES);
  floorBuffer.fill(1);
  const pauses: number[] = [];
  const floors: number[] = [];
  const unpreempted: number[] = [];
  let preempted = 0;
  let deltaBytes = 0;
  let value = 1;
  for (let s = 0; s < PAUSE_WARMUP_CAPTURES + samples; s++) {
    const floor = copyFloor(memory, randomPages(guestPages, count), floorBuffer);
    for (const page of randomPages(guestPages, count)) vm.invoke("touch", [page * PAGE_BYTES + ((value * 4) % PAGE_BYTES), value++]);
    const switches = process.resourceUsage().involuntaryContextSwitches;
    const captured = vm.capture();
    const switched = process.resourceUsage().involuntaryContextSwitches !== switches;
    vm.commit(captured.epoch);
    deltaBytes = captured.delta.length;
    vm.recycle(captured.delta);
    if (captured.dirty_pages !== count) throw new Error(`expected ${count} dirty pages, captured ${captured.dirty_pages}`);
    if (s < PAUSE_WARMUP_CAPTURES) continue;
    pauses.push(captured.pause_us);
    floors.push(floor);
    if (switched) preempted++;
    else unpreempted.push(captured.pause_us);
  }
  pauses.sort((a, b) => a - b);
  floors.sort((a, b) => a - b);
  unpreempted.sort((a, b) => a - b);
  const p50 = percentileOfSorted(pauses, 0.5);
  const p99 = percentileOfSorted(pauses, 0.99);
  const floor50 = percentileOfSorted(floors, 0.5);
  return {
    memory_mib,
    dirty_pages: count,
    dirty_pages_requested: dirty,
    samples,
    pause_us_p50: round(p50, 1),
    pause_us_p99: round(p99, 1),
    delta_bytes: deltaBytes,
    warmup_samples: PAUSE_WARMUP_CAPTURES,
    copy_floor_us_p50: round(floor50, 1),
    copy_floor_us_p99: round(percentileOfSorted(floors, 0.99), 1),
    pause_over_floor: round(p50 / floor50, 2),
    p99_over_p50: round(p99 / p50, 2),
    preempted_samples: preempted,
    pause_us_p99_not_preempted: unpreempted.length ? round(percentileOfSorted(unpreempted, 0.99), 1) : null,
  };
}

/**
 * The page-copy floor of one sample, in µs: `pages` (guest page numbers) of
 * `memory` copied one by one with TypedArray.set into `into`, each page's
 * first word read just before, as the guest's touch wrote one word of each
 * page the capture copies.
 */
function copyFloor(memory: Uint8Array, pages: number[], into: Uint8Array): number {
  let sum = 0;
  for (const page of pages) sum += memory[BASE_BYTES + page * PAGE_BYTES];
  const started = process.hrtime.bigint();
  for (let i = 0; i < pages.length; i++) {
    const from = BASE_BYTES + pages[i] * PAGE_BYTES;
    into.set(memory.subarray(from, from + PAGE_BYTES), i * PAGE_BYTES);
  }
  const us = Number(process.hrtime.bigint() - started) / 1000;
  return sum === -1 ? 0 : us; // `sum` is read so that the reads stay
}

/**
 * Rollback in place on a VM thread: capture and commit a cut, then per sample
 * the guest writes `written` distinct random pages and the VM rolls back to
 * that cut (the same cut every time: a rollback leaves the VM at its start).
 */
async function rollbackCase(guest: GuestModule, memory_mib: number, written: number, samples: number): Promise<RollbackResult> {
  const guestPages = (memory_mib * 1024 * 1024) / PAGE_BYTES;
  if ((guestPages & (guestPages - 1)) !== 0) throw new Error(`rollback bench needs a power-of-two page count, got ${guestPages}`);
  if (written > guestPages) throw new Error(`cannot write ${written} distinct pages of a ${guestPages}-page guest`);
  const vm = await VmWorker.boot(
    { module: guest.module, info: guest.info, hash: guest.hash },
    { rank: 0, size: 1, limits: { ...DEFAULT_LIMITS, memory_pages_max: GUEST_WASM_PAGES_MAX }, timers: "manual" },
  );
  try {
    const cut = await vm.capture();
    await vm.request("commit", { epoch: cut.epoch });
    VmWorker.recycle(cut.delta);
    const times: number[] = [];
    let value = 1;
    for (let s = 0; s < samples + 2; s++) {
      const first = Math.floor(Math.random() * guestPages);
      const stride = 2 * Math.floor(Math.random() * (guestPages / 2)) + 1;
      await vm.request("invoke", { name: "scatter", args: [first, stride, written, guestPages, value] });
      value += written;
      const result = await vm.request("rollback", { epoch: cut.epoch });
      if (result.pages_restored !== written) throw new Error(`wrote ${written} pages, rollback restored ${result.pages_restored}`);
      if (s >= 2) times.push(result.rollback_us); // the first rollbacks warm up the restore path
    }
    times.sort((a, b) => a - b);
    return {
      memory_mib,
      written_pages: written,
      pages_restored: written,
      samples,
      rollback_us_p50: round(percentileOfSorted(times, 0.5), 1),
      rollback_us_p99: round(percentileOfSorted(times, 0.99), 1),
    };
  } finally {
    await vm.terminate();
  }
}

/** `count` distinct page indices out of `total`, in random order (partial Fisher–Yates over a sparse map). */
function randomPages(total: number, count: number): number[] {
  const swapped = new Map<number, number>();
  const out: number[] = [];
  for (let i = 0; i < count; i++) {
    const j = i + Math.floor(Math.random() * (total - i));
    const vj = swapped.get(j) ?? j;
    swapped.set(j, swapped.get(i) ?? i);
    out.push(vj);
  }
  return out;
}

export async function runCheckpointBench(options: CheckpointBenchOptions): Promise<CheckpointBenchReport> {
  const detail: Record<string, BarrierResult> = {};
  for (const name of BARRIER_WORKLOADS) {
    options.progress(`barrier overhead: ${name} ...`);
    detail[name] = await barrierWorkload(name, options.barrier_runs);
  }
  const ratios = BARRIER_WORKLOADS.map((n) => detail[n].ratio);
  const geomean = Math.exp(ratios.reduce((s, r) => s + Math.log(r), 0) / ratios.length);
  const results: PauseResult[] = [];
  for (const mib of options.memory_mib) {
    const guest = await pauseGuest(mib);
    for (const dirty of options.dirty_pages) {
      options.progress(`checkpoint pause: ${mib} MiB, ${dirty} dirty pages ...`);
      results.push(await pauseCase(guest, mib, dirty, options.samples));
    }
  }
  const rollback: RollbackResult[] = [];
  const rollbackGuest = await pauseGuest(ROLLBACK_BENCH_DEFAULTS.memory_mib);
  for (const written of options.rollback_pages ?? ROLLBACK_BENCH_DEFAULTS.written_pages) {
    options.progress(`rollback in place: ${ROLLBACK_BENCH_DEFAULTS.memory_mib} MiB, ${written} written pages ...`);
    rollback.push(await rollbackCase(rollbackGuest, ROLLBACK_BENCH_DEFAULTS.memory_mib, written, options.rollback_samples ?? ROLLBACK_BENCH_DEFAULTS.samples));
  }
  return {
    bench: "checkpoint",
    barrier_overhead: {
      store_loop: detail.store_loop.ratio,
      sort: detail.sort.ratio,
      hash_map: detail.hash_map.ratio,
      matmul: detail.matmul.ratio,
      geomean: round(geomean, 3),
    },
    barrier_detail: detail,
    results,
    rollback,
  };
}

export function formatCheckpointReport(report: CheckpointBenchReport): string {
  const lines = ["Write-barrier overhead (instrumented ÷ plain, median of interleaved runs)", ""];
  lines.push("  workload     plain ms  cohort ms  ratio");
  for (const name of BARRIER_WORKLOADS) {
    const d = report.barrier_detail[name];
    lines.push(`  ${name.padEnd(11)} ${d.plain_ms.toFixed(1).padStart(9)} ${d.instrumented_ms.toFixed(1).padStart(10)} ${d.ratio.toFixed(3).padStart(6)}`);
  }
  lines.push(`  ${"geomean".padEnd(11)} ${"".padStart(9)} ${"".padStart(10)} ${report.barrier_overhead.geomean.toFixed(3).padStart(6)}`);
  lines.push("", "Checkpoint pause (capture until the VM resumes), against the page-copy floor (TypedArray.set of as many pages)", "");
  lines.push("  memory MiB  dirty pages  p50 µs    p99 µs    p99/p50  floor µs  p50/floor  preempted  p99 µs not preempted  delta bytes");
  for (const r of report.results) {
    lines.push(
      `  ${String(r.memory_mib).padStart(10)}  ${String(r.dirty_pages).padStart(11)}  ${r.pause_us_p50.toFixed(1).padStart(8)}  ${r.pause_us_p99.toFixed(1).padStart(8)}  ${r.p99_over_p50.toFixed(2).padStart(7)}  ${r.copy_floor_us_p50.toFixed(1).padStart(8)}  ${r.pause_over_floor.toFixed(2).padStart(9)}  ${`${r.preempted_samples}/${r.samples}`.padStart(9)}  ${(r.pause_us_p99_not_preempted?.toFixed(1) ?? "-").padStart(20)}  ${String(r.delta_bytes).padStart(11)}`,
    );
  }
  lines.push("", "Rollback in place (to a cut after the guest wrote N pages; timed on the VM thread)", "");
  lines.push("  memory MiB  written pages  p50 µs    p99 µs");
  for (const r of report.rollback) {
    lines.push(
      `  ${String(r.memory_mib).padStart(10)}  ${String(r.written_pages).padStart(13)}  ${r.rollback_us_p50.toFixed(1).padStart(8)}  ${r.rollback_us_p99.toFixed(1).padStart(8)}`,
    );
  }
  return lines.join("\n");
}
