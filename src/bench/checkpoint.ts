/**
 * `cohort bench checkpoint`: what protection costs a running VM.
 *
 *  - barrier_overhead: per AssemblyScript workload, time of run(1) on the
 *    instrumented guest ÷ time on the plain guest, both in this process, runs
 *    interleaved (so machine noise hits both alike), median of the samples.
 *    The instrumented guest is checkpointed between runs, as it would be in
 *    production, so every run pays the first-write cost of each page it dirties.
 *  - results: checkpoint pause (capture: copy dirty pages + globals + runtime
 *    state, then resume) for memory sizes × dirty page counts.
 */
import { readFile } from "node:fs/promises";
import { instrument } from "../guest/instrument.js";
import { compileGuest } from "../guest/module-cache.js";
import { DEFAULT_LIMITS, VmCore, type GuestModule, type VmOptions } from "../vm/machine.js";
import { GUEST_WASM_PAGES_MAX, PAGE_BYTES } from "../vm/layout.js";
import { guestPath } from "../guest/examples.js";

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
}

export interface CheckpointBenchReport {
  bench: "checkpoint";
  barrier_overhead: Record<(typeof BARRIER_WORKLOADS)[number] | "geomean", number>;
  barrier_detail: Record<string, BarrierResult>;
  results: PauseResult[];
}

export interface CheckpointBenchOptions {
  memory_mib: number[];
  dirty_pages: number[];
  samples: number;
  barrier_runs: number;
  progress: (line: string) => void;
}


function vmOptions(memory_pages_max: number): VmOptions {
  return { rank: 0, size: 1, limits: { ...DEFAULT_LIMITS, memory_pages_max }, now: Date.now };
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((sorted.length - 1) * p + 0.5))];
}

const round = (x: number, digits = 2) => Number(x.toFixed(digits));

/** The same guest, plain (instantiated as it is) and instrumented (a Cohort VM). */
async function barrierWorkload(name: string, runs: number): Promise<BarrierResult> {
  const bytes = new Uint8Array(await readFile(guestPath(name)));
  const plainModule = await WebAssembly.compile(bytes);
  const plain = new WebAssembly.Instance(plainModule, {
    env: { abort: () => { throw new Error("abort"); }, seed: () => 1 },
  }).exports as { run: (n: number) => number };
  const guest = await compileGuest(instrument(bytes));
  const vm = VmCore.boot(guest, vmOptions(GUEST_WASM_PAGES_MAX));
  vm.commit(vm.capture().epoch);
  const timePlain = () => time(() => plain.run(1));
  const timeVm = () => {
    const ms = time(() => vm.invoke("run", [1]));
    vm.commit(vm.capture().epoch);
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

function time(body: () => unknown): number {
  const started = process.hrtime.bigint();
  body();
  return Number(process.hrtime.bigint() - started) / 1e6;
}

function median(xs: number[]): number {
  const sorted = [...xs].sort((a, b) => a - b);
  return percentile(sorted, 0.5);
}

/** A guest whose memory size is set at boot and whose pages are dirtied on request. */
const PAUSE_GUEST_WAT = (pages: number) => `(module
  (memory ${pages})
  (func (export "touch") (param $addr i32) (param $value i32)
    (i32.store (local.get $addr) (local.get $value))))`;

async function pauseGuest(memory_mib: number): Promise<GuestModule> {
  const binaryen = (await import("binaryen")).default;
  const m = binaryen.parseText(PAUSE_GUEST_WAT(memory_mib * 16));
  try {
    return await compileGuest(instrument(m.emitBinary()));
  } finally {
    m.dispose();
  }
}

async function pauseCase(guest: GuestModule, memory_mib: number, dirty: number, samples: number): Promise<PauseResult> {
  const vm = VmCore.boot(guest, vmOptions(GUEST_WASM_PAGES_MAX));
  vm.commit(vm.capture().epoch);
  const guestPages = (memory_mib * 1024 * 1024) / PAGE_BYTES;
  const count = Math.min(dirty, guestPages);
  const pauses: number[] = [];
  let deltaBytes = 0;
  let value = 1;
  for (let s = 0; s < samples + 2; s++) {
    for (const page of randomPages(guestPages, count)) vm.invoke("touch", [page * PAGE_BYTES + ((value * 4) % PAGE_BYTES), value++]);
    const captured = vm.capture();
    vm.commit(captured.epoch);
    if (s >= 2) pauses.push(captured.pause_us); // the first captures warm up the copy path
    deltaBytes = captured.delta.length;
    if (captured.dirty_pages !== count) throw new Error(`expected ${count} dirty pages, captured ${captured.dirty_pages}`);
  }
  pauses.sort((a, b) => a - b);
  return {
    memory_mib,
    dirty_pages: count,
    dirty_pages_requested: dirty,
    samples,
    pause_us_p50: round(percentile(pauses, 0.5), 1),
    pause_us_p99: round(percentile(pauses, 0.99), 1),
    delta_bytes: deltaBytes,
  };
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
  lines.push("", "Checkpoint pause (capture until the VM resumes)", "");
  lines.push("  memory MiB  dirty pages  p50 µs    p99 µs    delta bytes");
  for (const r of report.results) {
    lines.push(
      `  ${String(r.memory_mib).padStart(10)}  ${String(r.dirty_pages).padStart(11)}  ${r.pause_us_p50.toFixed(1).padStart(8)}  ${r.pause_us_p99.toFixed(1).padStart(8)}  ${String(r.delta_bytes).padStart(11)}`,
    );
  }
  return lines.join("\n");
}
