/**
 * The `cohort` command line. Each subcommand lives in its own module; this
 * file only parses arguments (commander) and prints.
 */
import { Command, InvalidArgumentError, Option } from "commander";
import { describeThrown } from "../guest/errors.js";
import { registerClusterCommands } from "./cluster-commands.js";
import { registerCaCommands } from "./ca-commands.js";
import { GROUP_BENCH_DEFAULTS, IDLE_BENCH_DEFAULTS, SCALE_BENCH_DEFAULTS, STORE_BENCH_DEFAULTS } from "../bench/group-defaults.js";

// `cohort logs vm --follow | head -1`: once stdout's reader has gone away, every write fails with
// EPIPE. Nobody is left to read anything we could say, and the reader chose to stop: exit quietly
// (status 0) instead of dying of an unhandled 'error' event with a stack trace.
process.stdout.on("error", (error: NodeJS.ErrnoException) => {
  if (error.code === "EPIPE") process.exit(0);
  throw error;
});

// Commands import their heavy modules (Binaryen above all, seconds to load) when they run,
// so that `cohort host` and the cluster commands start fast.
const INSTRUMENT_BENCH_DEFAULTS = { runs: 5 };
const CHECKPOINT_BENCH_DEFAULTS = { memory_mib: [1, 64, 1024], dirty_pages: [16, 256, 4096], samples: 200, barrier_runs: 5 };

const int = (name: string) => (value: string) => {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError(`${name} must be a non-negative integer`);
  return n;
};
const intList = (name: string) => (value: string) => value.split(",").map((v) => int(name)(v.trim()));

const program = new Command()
  .name("cohort")
  .description("Group VM fault tolerance for WebAssembly virtual machines")
  .version("0.1.0");

program
  .command("run")
  .description("run a guest protected by a backup in this process (a group of one on three in-process hosts): output released at commit")
  .argument("<guest>", "a built example (ticker, kv, bank) or a path to a .wasm module")
  .option("--interval-ms <ms>", "epoch length", int("--interval-ms"), 20)
  .option("--duration-ms <ms>", "how long to run", int("--duration-ms"), 2000)
  .option("--failover-at-ms <ms>", "kill the primary's host at this time: the backup takes over, the spare becomes the new backup", int("--failover-at-ms"))
  .option("--json", "print one JSON summary instead of the released output")
  .option("--quiet", "print only the summary")
  .action(async (guest: string, opts: { intervalMs: number; durationMs: number; failoverAtMs?: number; json?: boolean; quiet?: boolean }) => {
    const { runGuest } = await import("./run.js");
    const summary = await runGuest(
      guest,
      { interval_ms: opts.intervalMs, duration_ms: opts.durationMs, failover_at_ms: opts.failoverAtMs ?? null, json: !!opts.json, quiet: !!opts.quiet },
      (line) => console.log(line),
    );
    if (opts.json) console.log(JSON.stringify(summary));
    else {
      console.log(
        `-- ${summary.epochs} epochs, ${summary.released} output records released (contiguous: ${summary.output_contiguous}), ` +
          `pause p50 ${summary.pause_us_p50} µs, release latency p50 ${summary.release_latency_ms_p50} ms`,
      );
    }
    if (!summary.output_contiguous) process.exitCode = 1;
  });

program
  .command("instrument")
  .description(
    "instrument a module for Cohort (write barrier, address shift) or say why it cannot be protected (limits: 16 MiB, 10,000 functions, " +
      "blocks nested 4,000 deep); prints the module's info as JSON, and on stderr the time Binaryen took to load (cold, once per process) and to instrument it",
  )
  .argument("<module>", "path to a .wasm module, or a built example name")
  .option("-o, --output <file>", "write the instrumented module here")
  .option("--json", "print one JSON object: the module's info, its sizes in and out and the timings (nothing on stderr)")
  .action(async (module: string, opts: { output?: string; json?: boolean }) => {
    const { instrumentCommand, formatTimings } = await import("./instrument.js");
    const result = await instrumentCommand(module, opts.output ?? null);
    const { bytes, input_bytes, info, timings } = result;
    if (opts.json) {
      console.log(JSON.stringify({ bytes, input_bytes, ...info, timings }));
      return;
    }
    console.log(JSON.stringify({ bytes, ...info }, null, 2));
    process.stderr.write(`${formatTimings(result)}\n`);
  });

registerClusterCommands(program);
registerCaCommands(program);

program
  .command("sim")
  .description(
    "deterministic simulation of the group protocol core (src/core) on simulated hosts, network, store and VMs: many runs with crashes, " +
      "pauses and second failures at every recovery step, every step checked against the invariants of docs/PROTOCOL.md",
  )
  .option("--seed <n>", "seed of the campaign (the same seed runs the same runs)", int("--seed"), 1)
  .option("--steps <n>", "run until this many events were handled by the simulated hosts' cores", int("--steps"), 1_000_000)
  .option("--hosts <n>", "hosts per run (default: 3..6, at random per run)", int("--hosts"))
  .option("--size <n>", "members per group (default: 2..6, at random per run)", int("--size"))
  .option("--mutation <name>", "run a deliberately broken variant (release_at_capture, skip_resend, image_all, ignore_cut_rule): a checker must catch it")
  .option("--replay <schedule>", "run one schedule, as a violation prints it (JSON), and print its timeline")
  .option("--replay-recording <dir>", "replay the recordings real hosts wrote (cohort host --record-core-events <dir>) through the core: same actions, invariants 1, 5, 6")
  .option("--json", "print one JSON object")
  .action(async (opts: { seed: number; steps: number; hosts?: number; size?: number; mutation?: string; replay?: string; replayRecording?: string; json?: boolean }) => {
    const { runSimCommand, replaySchedule, replayRecordingCommand, isMutation } = await import("./sim.js");
    const print = (line: string) => console.log(line);
    if (opts.replay !== undefined) {
      process.exitCode = replaySchedule(opts.replay, print);
      return;
    }
    if (opts.replayRecording !== undefined) {
      process.exitCode = replayRecordingCommand(opts.replayRecording, !!opts.json, print);
      return;
    }
    if (opts.mutation !== undefined && !isMutation(opts.mutation)) throw new InvalidArgumentError(`unknown mutation ${opts.mutation}`);
    if (opts.hosts !== undefined && opts.hosts < 2) throw new InvalidArgumentError("--hosts must be at least 2");
    if (opts.size !== undefined && (opts.size < 1 || opts.size > 64)) throw new InvalidArgumentError("--size must be 1..64");
    process.exitCode = runSimCommand({ seed: opts.seed, steps: opts.steps, hosts: opts.hosts, size: opts.size, mutation: opts.mutation, json: !!opts.json }, print);
  });

const bench = program.command("bench").description("benchmarks (print JSON with --json)");
bench
  .command("checkpoint")
  .description("write-barrier overhead per workload and checkpoint pause by memory size and dirty pages")
  .option("--json", "print one JSON object")
  .option("--memory-mib <list>", "memory sizes", intList("--memory-mib"), CHECKPOINT_BENCH_DEFAULTS.memory_mib)
  .option("--dirty-pages <list>", "dirty 4 KiB pages per checkpoint", intList("--dirty-pages"), CHECKPOINT_BENCH_DEFAULTS.dirty_pages)
  .option("--samples <n>", "checkpoints measured per case", int("--samples"), CHECKPOINT_BENCH_DEFAULTS.samples)
  .addOption(new Option("--barrier-runs <n>", "interleaved runs per barrier workload").argParser(int("--barrier-runs")).default(CHECKPOINT_BENCH_DEFAULTS.barrier_runs))
  .action(async (opts: { json?: boolean; memoryMib: number[]; dirtyPages: number[]; samples: number; barrierRuns: number }) => {
    const { runCheckpointBench, formatCheckpointReport } = await import("../bench/checkpoint.js");
    const report = await runCheckpointBench({
      memory_mib: opts.memoryMib,
      dirty_pages: opts.dirtyPages,
      samples: opts.samples,
      barrier_runs: opts.barrierRuns,
      progress: benchProgress,
    });
    console.log(opts.json ? JSON.stringify(report) : formatCheckpointReport(report));
  });

bench
  .command("instrument")
  .description("instrumenting each built guest on a fresh instrumenter thread: Binaryen's cold load, the first instrumentation, p50 and max of more, bytes in and out")
  .option("--json", "print one JSON object")
  .option("--guests <list>", "built guests to instrument (default: every guest in build/guests)", (v: string) => v.split(",").map((g) => g.trim()))
  .option("--runs <n>", "instrumentations per guest after the first", int("--runs"), INSTRUMENT_BENCH_DEFAULTS.runs)
  .action(async (opts: { json?: boolean; guests?: string[]; runs: number }) => {
    const { runInstrumentBench, formatInstrumentReport } = await import("../bench/instrument.js");
    const report = await runInstrumentBench({ guests: opts.guests, runs: opts.runs, progress: benchProgress });
    console.log(opts.json ? JSON.stringify(report) : formatInstrumentReport(report));
  });

/** A benchmark's progress lines go to stderr, so its report alone is on stdout (pipes). */
const benchProgress = (line: string): void => void process.stderr.write(`${line}\n`);

/** A benchmark's report: one JSON line with --json, indented JSON otherwise. */
function printReport(report: unknown, json: boolean | undefined): void {
  console.log(json ? JSON.stringify(report) : JSON.stringify(report, null, 2));
}

const groupBenchOptions = (command: Command) =>
  command
    .option("--json", "print one JSON object")
    .option("--measure-ms <ms>", "measured time per mode", int("--measure-ms"), GROUP_BENCH_DEFAULTS.measure_ms)
    .option("--warmup-ms <ms>", "time per mode before measuring (allreduce: at least this, then until the rate settles, at most 20 s)", int("--warmup-ms"), GROUP_BENCH_DEFAULTS.warmup_ms)
    .option("--hosts <n>", "host processes per cluster", int("--hosts"), GROUP_BENCH_DEFAULTS.hosts)
    .option("--repeat <n>", "measurements per mode, modes interleaved; the median is reported", int("--repeat"), GROUP_BENCH_DEFAULTS.repeat);

groupBenchOptions(bench.command("pingpong").description("two VMs on two hosts bouncing 64 bytes, per mode (none, vm, group; none and group also without TLS) and over raw TCP and TLS")).action(
  async (opts: { json?: boolean; measureMs: number; warmupMs: number; hosts: number; repeat: number }) => {
    const { runPingpongBench } = await import("../bench/group.js");
    const report = await runPingpongBench({ measure_ms: opts.measureMs, warmup_ms: opts.warmupMs, hosts: opts.hosts, repeat: opts.repeat, progress: benchProgress });
    printReport(report, opts.json);
  },
);

groupBenchOptions(bench.command("allreduce").description("rounds of a group-wide sum over 4 and 8 VMs, per mode (none, vm, group)"))
  .option("--sizes <list>", "group sizes", intList("--sizes"), [4, 8])
  .action(async (opts: { json?: boolean; measureMs: number; warmupMs: number; hosts: number; repeat: number; sizes: number[] }) => {
    const { runAllreduceBench } = await import("../bench/group.js");
    const report = await runAllreduceBench({
      measure_ms: opts.measureMs,
      warmup_ms: opts.warmupMs,
      hosts: opts.hosts,
      repeat: opts.repeat,
      sizes: opts.sizes,
      progress: benchProgress,
    });
    printReport(report, opts.json);
  });

/** What a cluster benchmark deploys: on how many hosts, which example guest, in which mode. */
const benchGroupOptions = (command: Command, defaults: { hosts: number; guest: string; mode: "group" | "vm" | "none" }) =>
  command
    .option("--json", "print one JSON object")
    .option("--hosts <n>", "host processes per cluster", int("--hosts"), defaults.hosts)
    .option("--guest <name>", "example guest the group runs", defaults.guest)
    .addOption(new Option("--mode <mode>", "protection mode of the group").choices(["group", "vm", "none"]).default(defaults.mode));

benchGroupOptions(
  bench
    .command("idle")
    .description("host CPU of an idle group (8 kv VMs, mode group unless --mode, on 3 hosts) against the same hosts with nothing deployed, with epochs, deltas and delta bytes per second, and against as many processes that only run a host's heartbeat thread"),
  IDLE_BENCH_DEFAULTS,
)
  .option("--measure-ms <ms>", "measured window per case", int("--measure-ms"), IDLE_BENCH_DEFAULTS.measure_ms)
  .option("--settle-ms <ms>", "wait after deploy before measuring", int("--settle-ms"), IDLE_BENCH_DEFAULTS.settle_ms)
  .option("--size <n>", "VMs in the group", int("--size"), IDLE_BENCH_DEFAULTS.size)
  .option("--repeat <n>", "measurements per case, cases interleaved; the median is reported", int("--repeat"), IDLE_BENCH_DEFAULTS.repeat)
  .action(async (opts: { json?: boolean; measureMs: number; settleMs: number; hosts: number; size: number; guest: string; mode: "group" | "vm" | "none"; repeat: number }) => {
    const { runIdleBench } = await import("../bench/idle.js");
    const report = await runIdleBench({
      measure_ms: opts.measureMs,
      settle_ms: opts.settleMs,
      hosts: opts.hosts,
      size: opts.size,
      guest: opts.guest,
      mode: opts.mode,
      repeat: opts.repeat,
      progress: benchProgress,
    });
    printReport(report, opts.json);
  });

benchGroupOptions(
  bench
    .command("scale")
    .description("per group size, on fresh clusters of 4 hosts: deploy time (module cache cold, then cached), host memory and threads per VM, main-loop stalls and false failovers, the hosts' CPU with the group idle and the TCP connections between them (a kv group, mode group); then the bank scenario at that size: rounds/s, failover after a kill -9, and its checks"),
  SCALE_BENCH_DEFAULTS,
)
  .option("--sizes <list>", "group sizes", intList("--sizes"), SCALE_BENCH_DEFAULTS.sizes)
  .option("--settle-ms <ms>", "how long the group runs after its deploy before the hosts are read", int("--settle-ms"), SCALE_BENCH_DEFAULTS.settle_ms)
  .option("--idle-ms <ms>", "window over which the hosts' CPU is measured, the group deployed and idle", int("--idle-ms"), SCALE_BENCH_DEFAULTS.idle_ms)
  .option("--bank-ms <ms>", "how long the bank group runs before the kill (once every rank released a line) and at least after it (then until every rank released a line of the resumed group; each wait at most 60 s)", int("--bank-ms"), SCALE_BENCH_DEFAULTS.bank_before_kill_ms)
  .action(async (opts: { json?: boolean; sizes: number[]; hosts: number; guest: string; mode: "group" | "vm" | "none"; settleMs: number; idleMs: number; bankMs: number }) => {
    const { runScaleBench } = await import("../bench/scale.js");
    const report = await runScaleBench({
      sizes: opts.sizes,
      hosts: opts.hosts,
      guest: opts.guest,
      mode: opts.mode,
      settle_ms: opts.settleMs,
      idle_ms: opts.idleMs,
      bank_before_kill_ms: opts.bankMs,
      bank_after_kill_ms: opts.bankMs,
      progress: benchProgress,
    });
    printReport(report, opts.json);
  });

bench
  .command("store")
  .description("what a coordination store sustains for sizing a cluster: puts, get+compare-and-swap, lease renewals and lists, per second and their latency, with many in flight; writes only under bench/ and removes it")
  .option("--json", "print one JSON object")
  .option("--store <store>", "embedded (a new temporary directory) or etcd://host:port[,host:port...][/prefix]", "embedded")
  .option("--measure-ms <ms>", "measured time per operation", int("--measure-ms"), STORE_BENCH_DEFAULTS.measure_ms)
  .option("--concurrency <n>", "operations in flight", int("--concurrency"), STORE_BENCH_DEFAULTS.concurrency)
  .option("--list-keys <n>", "records under the listed prefix", int("--list-keys"), STORE_BENCH_DEFAULTS.list_keys)
  .addHelpText("after", "\nExample:\n  cohort bench store --store etcd://127.0.0.1:2379 --json")
  .action(async (opts: { json?: boolean; store: string; measureMs: number; concurrency: number; listKeys: number }) => {
    const { runStoreBench } = await import("../bench/store.js");
    const { openStore, parseStoreSpec } = await import("../store/open.js");
    const spec = parseStoreSpec(opts.store);
    const { mkdtemp, rm } = await import("node:fs/promises");
    const { tmpdir } = await import("node:os");
    const { join } = await import("node:path");
    const dir = spec.kind === "embedded" ? await mkdtemp(join(tmpdir(), "cohort-bench-store-")) : null;
    const store = openStore(spec, dir ?? "");
    try {
      const report = await runStoreBench({ store, store_name: opts.store, measure_ms: opts.measureMs, concurrency: opts.concurrency, list_keys: opts.listKeys, progress: benchProgress });
      printReport(report, opts.json);
    } finally {
      await store.close();
      if (dir) await rm(dir, { recursive: true, force: true });
    }
  });

program.parseAsync().catch((error: unknown) => {
  // Not every thrown value is an Error with a message (Binaryen throws bare objects, wasm exceptions have none).
  console.error(`cohort: ${describeThrown(error)}`);
  process.exitCode = 1;
});
