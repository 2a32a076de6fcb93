/**
 * Differential run of one module: a plain (uninstrumented) WebAssembly
 * instance against the instrumented module in a VmCore, on the same calls,
 * with checkpoints, in-place rollbacks, promotions of a backup folded from
 * sealed deltas and restores from an encoded image in between.
 *
 * The plain side has no checkpoints: its state at a cut is rebuilt by
 * instantiating afresh and replaying the calls made up to that cut (the module
 * is deterministic, and this also restores what no snapshot of a plain
 * instance could: memory size, dropped segments). Any difference in a call's
 * result, in trap versus no trap, in guest memory or in a mutable global's
 * bits is a failure; `seed` reproduces it.
 */
import { BackupImage } from "../../src/checkpoint/backup-image.js";
import { decodeImage, encodeImage } from "../../src/checkpoint/format.js";
import { VmCore, VmCrashedError, type GuestModule } from "../../src/vm/machine.js";
import { BASE_BYTES, RESERVED_WASM_PAGES } from "../../src/vm/layout.js";
import { imageBytes, shipDelta } from "./checkpoint.js";
import { options } from "./guests.js";
import { GLOBALS_EXPORT, plainMemoryExport, prng, type CallableExport, type PreparedModule, type ValueType } from "./wasm-fuzz.js";

export type Arg = number | bigint;
export interface Call {
  name: string;
  args: Arg[];
}
type Outcome = { trap: false; value: unknown } | { trap: true; message: string };

export interface DifferentialStats {
  calls: number;
  traps: number;
  captures: number;
  commits: number;
  rollbacks: number;
  /** Calls re-executed after a rollback, compared with their first execution. */
  replayed: number;
  promotions: number;
  restores: number;
}

/** A difference between the plain and the instrumented module. */
export class DivergenceError extends Error {
  override name = "DivergenceError";
}

/** Plain instance of the module, rebuilt at any cut by re-instantiating and replaying the calls up to it. */
class PlainReplica {
  private instance!: WebAssembly.Instance;
  private readonly memoryName: string | undefined;
  /** Calls that completed (did not trap) since instantiation, in order. */
  history: Call[] = [];

  constructor(private readonly module: WebAssembly.Module) {
    this.memoryName = plainMemoryExport(module);
  }

  /** Instantiates afresh (runs active segments and the start function). */
  boot(): Outcome {
    this.history = [];
    try {
      this.instance = new WebAssembly.Instance(this.module, {});
      return { trap: false, value: undefined };
    } catch (error) {
      return { trap: true, message: (error as Error).message };
    }
  }

  call(call: Call): Outcome {
    const outcome = this.raw(call);
    if (!outcome.trap) this.history.push(call);
    return outcome;
  }

  /** The state after the first `count` calls of the history. */
  resetTo(count: number): void {
    const calls = this.history.slice(0, count);
    const booted = this.boot();
    if (booted.trap) throw new DivergenceError(`plain module no longer boots on replay: ${booted.message}`);
    for (const call of calls) {
      const outcome = this.call(call);
      if (outcome.trap) throw new DivergenceError(`plain module is not deterministic: ${call.name} trapped on replay`);
    }
  }

  memory(): Uint8Array {
    if (!this.memoryName) return new Uint8Array(0);
    return new Uint8Array((this.instance.exports[this.memoryName] as WebAssembly.Memory).buffer);
  }

  global(i: number): bigint {
    return (this.instance.exports[GLOBALS_EXPORT] as (i: number) => bigint)(i);
  }

  private raw(call: Call): Outcome {
    try {
      return { trap: false, value: (this.instance.exports[call.name] as (...a: Arg[]) => unknown)(...call.args) };
    } catch (error) {
      return { trap: true, message: (error as Error).message };
    }
  }
}

const I32_EDGES = [0, 1, -1, 2, 0x7fffffff, -0x80000000, 0xffff, 0x10000, 4096, 65535, 65536 * 16 - 1];
const I64_EDGES = [0n, 1n, -1n, 0x7fffffffffffffffn, -0x8000000000000000n, 0xffffffffn, 0x100000000n];
const F_EDGES = [0, -0, 1, -1, 0.5, 1e10, -1e-10, Infinity, -Infinity, 2 ** 31, 2 ** 63];

function randomArg(type: ValueType, next: () => number): Arg {
  const edge = next() % 3 === 0;
  switch (type) {
    case "i32":
      return edge ? I32_EDGES[next() % I32_EDGES.length] : next() % 2 ? next() % 256 : next() | 0;
    case "i64":
      return edge ? I64_EDGES[next() % I64_EDGES.length] : BigInt.asIntN(64, (BigInt(next()) << 32n) | BigInt(next()));
    case "f32":
      return edge ? F_EDGES[next() % F_EDGES.length] : Math.fround(((next() | 0) / 65536) * (next() % 2 ? 1 : 1e-3));
    case "f64":
      return edge ? F_EDGES[next() % F_EDGES.length] : ((next() | 0) / 65536) * (next() % 2 ? 1 : 1e9);
  }
}

function sameValue(a: unknown, b: unknown): boolean {
  if (Array.isArray(a) && Array.isArray(b)) return a.length === b.length && a.every((x, i) => Object.is(x, b[i]));
  return Object.is(a, b);
}

const show = (v: unknown) => (Array.isArray(v) ? `[${v.map(String).join(", ")}]` : String(v));

/**
 * Runs `steps` random operations on the module (calls, captures, commits,
 * rollbacks, promotions, restores); throws DivergenceError on the first
 * difference. Returns what it did. `prepared` must have instrumented as
 * `guest`.
 */
export function runDifferential(prepared: PreparedModule, guest: GuestModule, seed: number, steps: number): DifferentialStats & { boot_trapped: boolean } {
  const next = prng(seed ^ 0x5eed);
  const stats: DifferentialStats = { calls: 0, traps: 0, captures: 0, commits: 0, rollbacks: 0, replayed: 0, promotions: 0, restores: 0 };
  const opts = options();
  const plain = new PlainReplica(new WebAssembly.Module(prepared.plain as Uint8Array<ArrayBuffer>));
  const fail = (what: string): never => {
    throw new DivergenceError(`${what} (seed ${seed}, after ${JSON.stringify(stats)})`);
  };

  const plainBoot = plain.boot();
  let vm: VmCore;
  try {
    vm = VmCore.boot(guest, opts);
  } catch (error) {
    if (!(error instanceof VmCrashedError)) throw error;
    if (!plainBoot.trap) fail(`boot traps instrumented (${error.message}) but not plain`);
    return { ...stats, boot_trapped: true };
  }
  if (plainBoot.trap) fail(`boot traps plain (${plainBoot.message}) but not instrumented`);

  let backup = BackupImage.blank(guest, opts, RESERVED_WASM_PAGES + guest.info.guest_initial_pages);
  /** Per cut: plain history length and the primary's encoded image at that cut. */
  const cuts = new Map<number, { calls: number; image: Buffer }>();

  const compareState = (where: string, globals = true) => {
    const mine = vm.bytes().subarray(BASE_BYTES);
    const theirs = plain.memory();
    if (mine.length !== theirs.length) fail(`${where}: guest memory is ${mine.length} bytes instrumented, ${theirs.length} plain`);
    if (!Buffer.from(mine.buffer, mine.byteOffset, mine.length).equals(theirs)) {
      let at = 0;
      while (mine[at] === theirs[at]) at++;
      fail(`${where}: guest memory differs first at address ${at} (instrumented ${mine[at]}, plain ${theirs[at]})`);
    }
    if (!globals) return;
    for (let i = 0; i < prepared.global_reads; i++) {
      const a = vm.invoke(GLOBALS_EXPORT, [i]) as bigint;
      const p = plain.global(i);
      if (a !== p) fail(`${where}: mutable global slot ${i} is ${a} instrumented, ${p} plain`);
    }
  };

  const capture = () => {
    const epoch = shipDelta(vm, backup);
    const image = imageBytes(vm);
    if (!imageBytes(backup).equals(image)) fail(`backup folded from sealed deltas differs from the primary at cut ${epoch}`);
    cuts.set(epoch, { calls: plain.history.length, image });
    stats.captures++;
    compareState(`at cut ${epoch}`);
    return epoch;
  };

  /** One call on both sides; on a trap both roll back to the last cut. Returns the instrumented outcome. */
  const call = (c: Call, where: string): Outcome => {
    stats.calls++;
    let mine: Outcome;
    try {
      mine = { trap: false, value: vm.invoke(c.name, c.args) };
    } catch (error) {
      if (!(error instanceof VmCrashedError)) throw error;
      mine = { trap: true, message: error.message };
    }
    const theirs = plain.call(c);
    const desc = `${where} ${c.name}(${c.args.map(String).join(", ")})`;
    if (mine.trap !== theirs.trap) {
      fail(`${desc}: ${mine.trap ? `traps instrumented (${mine.message})` : "returns instrumented"} but ${theirs.trap ? `traps plain (${theirs.message})` : "returns plain"}`);
    }
    if (!mine.trap && !theirs.trap && !sameValue(mine.value, theirs.value)) fail(`${desc}: returns ${show(mine.value)} instrumented, ${show(theirs.value)} plain`);
    if (mine.trap) {
      stats.traps++;
      // The partial effects of the trapped call are the same on both sides too.
      compareState(`after ${desc} trapped`, false);
      const last = vm.epoch - 1;
      vm.rollback(last);
      plain.resetTo(cuts.get(last)!.calls);
      compareState(`after the rollback of a trap to cut ${last}`);
    }
    return mine;
  };

  const randomCall = (): Call => {
    const e: CallableExport = prepared.callable[next() % prepared.callable.length];
    return { name: e.name, args: e.params.map((t) => randomArg(t, next)) };
  };

  /** After a rollback to `cut`: the calls made after it, run again, give what they gave the first time. */
  const replayAfter = (cut: number, calls: Call[], firstResults: Map<Call, Outcome>) => {
    for (const c of calls) {
      const again = call(c, `re-executed after rollback to cut ${cut}:`);
      const first = firstResults.get(c);
      stats.replayed++;
      if (first && (first.trap !== again.trap || (!first.trap && !again.trap && !sameValue(first.value, again.value)))) {
        fail(`${c.name} re-executed after rollback to cut ${cut} gives ${again.trap ? "a trap" : show(again.value)}, first gave ${first.trap ? "a trap" : show(first.value)}`);
      }
      if (again.trap) return;
    }
  };

  // Cut 1 right after boot: every later rollback has a booted cut to go to
  // (rollback(0) un-boots the VM, issue 10 defect 2, so it is never asked for).
  capture();
  const results = new Map<Call, Outcome>();
  for (let step = 0; step < steps; step++) {
    const r = next() % 100;
    const last = vm.epoch - 1;
    if (r < 55 && prepared.callable.length) {
      const c = randomCall();
      results.set(c, call(c, `step ${step}:`));
    } else if (r < 72) {
      capture();
    } else if (r < 77) {
      if (last > vm.committedEpoch) {
        vm.commit(last);
        stats.commits++;
      }
    } else if (r < 90) {
      const low = Math.max(1, vm.committedEpoch);
      const cut = low + (next() % (last - low + 1));
      const undone = plain.history.slice(cuts.get(cut)!.calls);
      vm.rollback(cut);
      stats.rollbacks++;
      for (const k of cuts.keys()) if (k > cut) cuts.delete(k);
      if (!imageBytes(vm).equals(cuts.get(cut)!.image)) fail(`rollback to cut ${cut} differs from the image taken at that cut`);
      plain.resetTo(cuts.get(cut)!.calls);
      compareState(`after rollback to cut ${cut}`);
      // The backup held a later cut: it restarts from this one, as after a re-protection.
      backup = BackupImage.fromImage(guest, opts, decodeImage(cuts.get(cut)!.image));
      replayAfter(cut, undone.slice(0, 1 + (next() % 8)), results);
    } else {
      // Failover: the primary is lost with whatever it ran since its last capture.
      const promote = r < 96;
      const cut = backup.epoch;
      vm = promote ? backup.promote() : VmCore.restore(guest, decodeImage(encodeImage(backup.image())), opts);
      if (promote) stats.promotions++;
      else stats.restores++;
      const image = cuts.get(cut)!.image;
      if (!imageBytes(vm).equals(image)) fail(`${promote ? "promoted" : "restored"} VM differs from the image of cut ${cut}`);
      for (const k of cuts.keys()) if (k > cut) cuts.delete(k);
      plain.resetTo(cuts.get(cut)!.calls);
      compareState(`after ${promote ? "promotion" : "restore"} at cut ${cut}`);
      backup = BackupImage.fromImage(guest, opts, decodeImage(image));
    }
  }
  capture();
  return { ...stats, boot_trapped: false };
}
