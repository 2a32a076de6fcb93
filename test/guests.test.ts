/**
 * Unit tests of the AssemblyScript example and benchmark guests' own logic.
 *
 * The raw modules from build/guests (run `node scripts/build-guests.mjs`
 * first) are instantiated directly, without Cohort, against a small fake
 * `cohort` import object that records what the guest does.
 */
import { beforeAll, describe, expect, it } from "vitest";
import fc from "fast-check";
import fs from "node:fs";
import { fileURLToPath } from "node:url";
import binaryen from "binaryen";

const GUEST_DIR = fileURLToPath(new URL("../build/guests/", import.meta.url));
const GUESTS = ["ticker", "kv", "bank", "pingpong", "store_loop", "sort", "hash_map", "matmul"] as const;
type GuestName = (typeof GUESTS)[number];

const E_FULL = -4;
const E_TOO_BIG = -2;

const modules = new Map<GuestName, WebAssembly.Module>();

beforeAll(() => {
  for (const name of GUESTS) {
    const file = `${GUEST_DIR}${name}.wasm`;
    if (!fs.existsSync(file)) throw new Error(`${file} is missing: run \`node scripts/build-guests.mjs\` first`);
    modules.set(name, new WebAssembly.Module(fs.readFileSync(file)));
  }
});

// ---------------------------------------------------------------------------
// Fake host

interface GuestExports {
  memory: WebAssembly.Memory;
  start?: () => void;
  timer?: (id: number) => void;
  message?: (from: number, ptr: number, len: number) => void;
  request?: (session: number, requestId: number, ptr: number, len: number) => void;
  cohort_inbox?: (len: number) => number;
  run?: (n: number) => number;
}

interface Reply {
  session: number;
  requestId: number;
  text: string;
}

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

/** One guest instance plus the fake host state it talks to. */
class FakeVm {
  readonly logs: string[] = [];
  readonly sent: { to: number; bytes: Uint8Array }[] = [];
  readonly replies: Reply[] = [];
  readonly timers = new Map<number, number>();
  timerSetCalls = 0;
  /** What clock_ms returns (f64 ms); tests that time things replace it. */
  clock: () => number = () => Date.now();
  /** Return codes to use for the next log / send calls (then 0). */
  readonly logResults: number[] = [];
  readonly sendResults: number[] = [];
  readonly replyResults: number[] = [];
  readonly exports: GuestExports;
  private rngState: number;

  constructor(
    name: GuestName,
    readonly rank = 0,
    readonly size = 1,
    seed = 12345,
  ) {
    this.rngState = seed >>> 0 || 1;
    const bytes = (ptr: number, len: number): Uint8Array => new Uint8Array(this.exports.memory.buffer, ptr, len).slice();
    const cohort = {
      log: (ptr: number, len: number) => {
        const rc = this.logResults.shift() ?? 0;
        if (rc === 0) this.logs.push(fromUtf8.decode(bytes(ptr, len)));
        return rc;
      },
      send: (to: number, ptr: number, len: number) => {
        const rc = this.sendResults.shift() ?? 0;
        if (rc === 0) this.sent.push({ to, bytes: bytes(ptr, len) });
        return rc;
      },
      reply: (session: number, requestId: number, ptr: number, len: number) => {
        const rc = this.replyResults.shift() ?? 0;
        if (rc === 0) this.replies.push({ session, requestId, text: fromUtf8.decode(bytes(ptr, len)) });
        return rc;
      },
      timer_set: (id: number, delay: number) => {
        this.timerSetCalls++;
        this.timers.set(id, delay);
        return 0;
      },
      timer_cancel: (id: number) => {
        this.timers.delete(id);
        return 0;
      },
      clock_ms: () => this.clock(),
      random_fill: (ptr: number, len: number) => {
        // Deterministic xorshift32, so failures reproduce.
        const view = new Uint8Array(this.exports.memory.buffer, ptr, len);
        for (let i = 0; i < len; i++) {
          let x = this.rngState;
          x ^= x << 13;
          x ^= x >>> 17;
          x ^= x << 5;
          this.rngState = x >>> 0;
          view[i] = x & 0xff;
        }
        return 0;
      },
      rank: () => this.rank,
      size: () => this.size,
    };
    const env = {
      abort: (msg: number, file: number, line: number, col: number) => {
        throw new Error(`guest abort: ${this.asString(msg)} at ${this.asString(file)}:${line}:${col}`);
      },
      seed: () => 42,
    };
    const instance = new WebAssembly.Instance(modules.get(name)!, { cohort, env });
    this.exports = instance.exports as unknown as GuestExports;
  }

  /** Delivers a payload the way the host does: cohort_inbox, copy, then the handler. */
  private deliver(payload: Uint8Array): number {
    const ptr = this.exports.cohort_inbox!(payload.length);
    new Uint8Array(this.exports.memory.buffer, ptr, payload.length).set(payload);
    return ptr;
  }

  request(session: number, requestId: number, text: string | Uint8Array): string {
    const payload = typeof text === "string" ? utf8.encode(text) : text;
    const ptr = this.deliver(payload);
    const before = this.replies.length;
    this.exports.request!(session, requestId, ptr, payload.length);
    expect(this.replies.length, "one reply per request").toBe(before + 1);
    const r = this.replies[this.replies.length - 1];
    expect([r.session, r.requestId]).toEqual([session, requestId]);
    return r.text;
  }

  message(from: number, payload: Uint8Array): void {
    const ptr = this.deliver(payload);
    this.exports.message!(from, ptr, payload.length);
  }

  /** Fires armed timer `id` (one-shot: disarmed first, as the host does). */
  fire(id: number): void {
    expect(this.timers.has(id), `timer ${id} armed`).toBe(true);
    this.timers.delete(id);
    this.exports.timer!(id);
  }

  /** An AssemblyScript string (UTF-16, byte length in the object header at ptr - 4). */
  private asString(ptr: number): string {
    if (ptr === 0) return "<null>";
    const buf = this.exports.memory.buffer;
    const byteLen = new DataView(buf).getUint32(ptr - 4, true);
    return String.fromCharCode(...new Uint16Array(buf.slice(ptr, ptr + byteLen)));
  }
}

// ---------------------------------------------------------------------------

describe("module interface", () => {
  const ABI: Record<string, [number[], number]> = {
    "cohort.log": [[binaryen.i32, binaryen.i32], binaryen.i32],
    "cohort.send": [[binaryen.i32, binaryen.i32, binaryen.i32], binaryen.i32],
    "cohort.reply": [[binaryen.i32, binaryen.i32, binaryen.i32, binaryen.i32], binaryen.i32],
    "cohort.timer_set": [[binaryen.i32, binaryen.f64], binaryen.i32],
    "cohort.timer_cancel": [[binaryen.i32], binaryen.i32],
    "cohort.clock_ms": [[], binaryen.f64],
    "cohort.random_fill": [[binaryen.i32, binaryen.i32], binaryen.i32],
    "cohort.rank": [[], binaryen.i32],
    "cohort.size": [[], binaryen.i32],
    "env.abort": [[binaryen.i32, binaryen.i32, binaryen.i32, binaryen.i32], binaryen.none],
    "env.seed": [[], binaryen.f64],
  };

  const EXPORTS: Record<GuestName, string[]> = {
    ticker: ["start", "timer"],
    kv: ["request", "cohort_inbox"],
    bank: ["start", "timer", "message", "request", "cohort_inbox"],
    pingpong: ["start", "timer", "message", "request", "cohort_inbox"],
    store_loop: ["run"],
    sort: ["run"],
    hash_map: ["run"],
    matmul: ["run"],
  };

  it.each(GUESTS)("%s imports only ABI v1 functions, with the ABI's signatures", (name) => {
    const mod = modules.get(name)!;
    const imports = WebAssembly.Module.imports(mod);
    for (const imp of imports) {
      expect(imp.kind, `${imp.module}.${imp.name}`).toBe("function");
      expect(Object.keys(ABI), `${imp.module}.${imp.name}`).toContain(`${imp.module}.${imp.name}`);
    }
    // Signatures, which the JS API does not reflect: read them with Binaryen.
    const m = binaryen.readBinary(fs.readFileSync(`${GUEST_DIR}${name}.wasm`));
    try {
      for (let i = 0; i < m.getNumFunctions(); i++) {
        const f = binaryen.getFunctionInfo(m.getFunctionByIndex(i));
        if (!f.module) continue;
        const [params, result] = ABI[`${f.module}.${f.base}`];
        expect([binaryen.expandType(f.params), f.results], `${f.module}.${f.base}`).toEqual([params, result]);
      }
    } finally {
      m.dispose();
    }
    if (name === "store_loop" || name === "sort" || name === "hash_map" || name === "matmul") {
      expect(imports.map((i) => `${i.module}.${i.name}`).filter((n) => n !== "env.abort")).toEqual([]);
    }
  });

  it.each(GUESTS)("%s exports its entry points and an unshared memory, no table", (name) => {
    const exports = WebAssembly.Module.exports(modules.get(name)!);
    const functions = exports.filter((e) => e.kind === "function").map((e) => e.name);
    expect(functions.sort()).toEqual([...EXPORTS[name]].sort());
    expect(exports.filter((e) => e.kind === "memory").map((e) => e.name)).toEqual(["memory"]);
    expect(exports.some((e) => e.kind === "table")).toBe(false);
    const vm = new FakeVm(name);
    expect(vm.exports.memory.buffer).toBeInstanceOf(ArrayBuffer); // not SharedArrayBuffer
  });
});

describe("ticker", () => {
  it("arms timer 1 on start, then logs 1, 2, 3 and re-arms on each tick", () => {
    const vm = new FakeVm("ticker");
    vm.exports.start!();
    expect([...vm.timers]).toEqual([[1, 10]]);
    expect(vm.logs).toEqual([]);
    for (let i = 0; i < 3; i++) vm.exports.timer!(1);
    expect(vm.logs).toEqual(["1\n", "2\n", "3\n"]);
    expect(vm.timerSetCalls).toBe(4);
    expect(vm.timers.get(1)).toBe(10);
  });

  it("does not skip a number when the host refuses a line (E_FULL)", () => {
    const vm = new FakeVm("ticker");
    vm.exports.start!();
    vm.exports.timer!(1);
    vm.logResults.push(E_FULL);
    vm.exports.timer!(1); // refused: 2 is retried on the next tick
    vm.exports.timer!(1);
    vm.exports.timer!(1);
    expect(vm.logs).toEqual(["1\n", "2\n", "3\n"]);
    expect(vm.timerSetCalls).toBe(5);
  });

  it("ignores other timer ids", () => {
    const vm = new FakeVm("ticker");
    vm.exports.timer!(7);
    expect(vm.logs).toEqual([]);
    expect(vm.timerSetCalls).toBe(0);
  });

  it("keeps counting past 9 (multi-digit lines)", () => {
    const vm = new FakeVm("ticker");
    for (let i = 0; i < 120; i++) vm.exports.timer!(1);
    expect(vm.logs).toEqual(Array.from({ length: 120 }, (_, i) => `${i + 1}\n`));
  });
});

describe("kv", () => {
  it("answers put / get / del with the documented replies", () => {
    const vm = new FakeVm("kv");
    expect(vm.request(1, 1, "get a")).toBe("not_found");
    expect(vm.request(1, 2, "put a 1")).toBe("ok");
    expect(vm.request(1, 3, "get a")).toBe("1");
    expect(vm.request(2, 1, "put a two words")).toBe("ok"); // overwrite; value keeps its spaces
    expect(vm.request(2, 2, "get a")).toBe("two words");
    expect(vm.request(2, 3, "put b  leading space")).toBe("ok");
    expect(vm.request(2, 4, "get b")).toBe(" leading space");
    expect(vm.request(3, 1, "del a")).toBe("ok");
    expect(vm.request(3, 2, "del a")).toBe("not_found");
    expect(vm.request(3, 3, "get a")).toBe("not_found");
    expect(vm.request(3, 4, "get b")).toBe(" leading space");
  });

  it("replies error: to unknown or malformed commands", () => {
    const vm = new FakeVm("kv");
    for (const bad of ["", "frob", "frob x y", "PUT a 1", "put", "put a", "put a ", "get", "get a b", "del", "del a b"]) {
      expect(vm.request(1, 1, bad), JSON.stringify(bad)).toMatch(/^error:/);
    }
    expect(vm.request(1, 2, "get a")).toBe("not_found"); // nothing was stored by the bad puts
  });

  it("round-trips UTF-8 and ignores one trailing newline", () => {
    const vm = new FakeVm("kv");
    expect(vm.request(1, 1, "put clé héllo wörld €😀\n")).toBe("ok");
    expect(vm.request(1, 2, "get clé\r\n")).toBe("héllo wörld €😀");
  });

  it("handles payloads larger than the inbox, and reuses the inbox buffer", () => {
    const vm = new FakeVm("kv");
    const big = "x".repeat(300_000);
    expect(vm.request(1, 1, `put big ${big}`)).toBe("ok");
    expect(vm.request(1, 2, "get big")).toBe(big);

    const inbox = vm.exports.cohort_inbox!;
    const p = inbox(1000);
    expect(inbox(10)).toBe(p);
    expect(inbox(1000)).toBe(p);
    expect(inbox(0)).toBe(p);
  });

  it("does not leak memory per request", () => {
    const vm = new FakeVm("kv");
    const run = (from: number) => {
      for (let i = from; i < from + 5000; i++) {
        vm.request(1, i, `put k${i % 50} value-${i}`);
        vm.request(1, i, `get k${i % 50}`);
      }
    };
    run(0); // warm up: the map, the inbox and the GC reach their steady state
    const pages = vm.exports.memory.buffer.byteLength;
    run(5000);
    run(10000);
    expect(vm.exports.memory.buffer.byteLength).toBe(pages);
    expect(vm.request(1, 0, "get k7")).toBe("value-14957");
  });

  it("answers error: when a value is too big to reply", () => {
    const vm = new FakeVm("kv");
    vm.request(1, 1, "put k v");
    vm.replyResults.push(E_TOO_BIG);
    expect(vm.request(1, 2, "get k")).toMatch(/^error:/);
  });
});

// ---------------------------------------------------------------------------
// bank: a group of FakeVms wired by per-channel FIFO queues (Cohort keeps
// per-sender order; channels of different senders interleave freely).

const BANK_ACCOUNTS = 8;
const BANK_INITIAL = 1000;
const BANK_PER_RANK = BANK_ACCOUNTS * BANK_INITIAL;
const BANK_MAX_AMOUNT = 100;
const BANK_TIMER_ROUND = 1;
const BANK_TIMER_FLUSH = 2;
const BANK_LINE = /^bank round=(\d+) rank=(\d+) balance=(\d+) recv=(\d+) dup=(\d+) total=(\d+)$/;

interface BankLine {
  round: number;
  rank: number;
  balance: number;
  recv: number;
  dup: number;
  total: number;
}

function parseBankLine(line: string): BankLine {
  const m = BANK_LINE.exec(line);
  if (!m) throw new Error(`not a bank line: ${JSON.stringify(line)}`);
  const [round, rank, balance, recv, dup, total] = m.slice(1).map(Number);
  return { round, rank, balance, recv, dup, total };
}

/** Builds a transfer message as the bank's wire format says. */
function transferBytes(t: { round: number; from: number; account: number; amount: number; magic?: number; kind?: number; length?: number }): Uint8Array {
  const bytes = new Uint8Array(t.length ?? 20);
  const v = new DataView(bytes.buffer);
  v.setUint8(0, t.magic ?? 0xb4);
  v.setUint8(1, t.kind ?? 1);
  v.setUint32(4, t.round, true);
  v.setInt32(8, t.from, true);
  v.setInt32(12, t.account, true);
  v.setInt32(16, t.amount, true);
  return bytes;
}

interface Transfer {
  round: number;
  from: number;
  account: number;
  amount: number;
}

const isTransfer = (bytes: Uint8Array) => bytes[0] === 0xb4;

function parseTransfer(bytes: Uint8Array): Transfer {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return { round: v.getUint32(4, true), from: v.getInt32(8, true), account: v.getInt32(12, true), amount: v.getInt32(16, true) };
}

class BankGroup {
  readonly vms: FakeVm[];
  /** `${from}>${to}` -> messages sent and not delivered yet, in send order. */
  readonly channels = new Map<string, Uint8Array[]>();
  /** Every transfer sent, `${from}>${to}@${round}` -> amount. */
  readonly transfers = new Map<string, number>();
  /** Transfers delivered before their receiver entered their round (kept by the guest). */
  early = 0;

  constructor(
    readonly size: number,
    seed: number,
  ) {
    this.vms = Array.from({ length: size }, (_, r) => new FakeVm("bank", r, size, (seed * 7919 + r * 104729 + 1) >>> 0));
  }

  start(): void {
    for (const vm of this.vms) vm.exports.start!();
    this.collect();
  }

  /** Moves what the guests sent into the channels, checking every transfer's wire format. */
  collect(): void {
    for (const vm of this.vms) {
      for (const { to, bytes } of vm.sent.splice(0)) {
        expect(to).not.toBe(vm.rank);
        if (isTransfer(bytes)) {
          expect(bytes.length).toBe(20);
          const t = parseTransfer(bytes);
          expect(t.from).toBe(vm.rank);
          expect(t.account).toBeGreaterThanOrEqual(0);
          expect(t.account).toBeLessThan(BANK_ACCOUNTS);
          expect(t.amount).toBeGreaterThanOrEqual(0);
          expect(t.amount).toBeLessThanOrEqual(BANK_MAX_AMOUNT);
          const key = `${vm.rank}>${to}@${t.round}`;
          expect(this.transfers.has(key), `one transfer per round and receiver: ${key}`).toBe(false);
          this.transfers.set(key, t.amount);
        } else {
          expect(bytes[0], "a transfer or a collective message").toBe(0xc7);
        }
        const key = `${vm.rank}>${to}`;
        if (!this.channels.has(key)) this.channels.set(key, []);
        this.channels.get(key)!.push(bytes);
      }
    }
  }

  /** The enabled steps: deliver the head of a non-empty channel, or fire an armed timer. */
  actions(): (() => void)[] {
    const out: (() => void)[] = [];
    for (const [key, queue] of this.channels) {
      if (queue.length === 0) continue;
      const [from, to] = key.split(">").map(Number);
      out.push(() => this.deliver(from, to));
    }
    for (const vm of this.vms) {
      for (const id of vm.timers.keys()) {
        out.push(() => {
          vm.fire(id);
          this.collect();
        });
      }
    }
    return out;
  }

  deliver(from: number, to: number, opts: { keep?: boolean } = {}): Uint8Array {
    const queue = this.channels.get(`${from}>${to}`)!;
    const bytes = opts.keep ? queue[0] : queue.shift()!;
    const vm = this.vms[to];
    if (isTransfer(bytes)) {
      const r = parseTransfer(bytes).round;
      // Not yet in round r: its round r - 1 line is not out, or it is and the round timer has not fired.
      if (vm.logs.length < r - 1 || (vm.logs.length === r - 1 && vm.timers.has(BANK_TIMER_ROUND))) this.early++;
    }
    vm.message(from, bytes);
    this.collect();
    return bytes;
  }

  /** Delivers everything in flight (channels in a fixed order), without firing timers. */
  drain(): void {
    for (;;) {
      const busy = [...this.channels].find(([, q]) => q.length > 0);
      if (!busy) return;
      const [from, to] = busy[0].split(">").map(Number);
      this.deliver(from, to);
    }
  }

  lines(rank: number): BankLine[] {
    return this.vms[rank].logs.map((line) => {
      expect(line.endsWith("\n"), JSON.stringify(line)).toBe(true);
      return parseBankLine(line.slice(0, -1));
    });
  }

  /** The invariant, on every logged line, and the balances of each round summed over the ranks' lines. */
  check(): number {
    const total = this.size * BANK_PER_RANK;
    const byRank = this.vms.map((_, r) => this.lines(r));
    byRank.forEach((lines, r) => {
      lines.forEach((l, i) => {
        const where = `rank ${r} line ${i + 1}`;
        expect(l.round, where).toBe(i + 1);
        expect(l.rank, where).toBe(r);
        expect(l.total, where).toBe(total);
        expect(l.recv, where).toBe((this.size - 1) * l.round);
        expect(l.dup, where).toBe(0);
        expect(l.balance, where).toBeGreaterThanOrEqual(0);
      });
    });
    const rounds = Math.min(...byRank.map((lines) => lines.length));
    for (let k = 1; k <= rounds; k++) {
      expect(byRank.reduce((sum, lines) => sum + lines[k - 1].balance, 0), `balances of round ${k}`).toBe(total);
    }
    return rounds;
  }
}

describe("bank", () => {
  let nextRequest = 1;

  it("answers audit with the initial state before round 1, and error: to anything else", () => {
    const vm = new FakeVm("bank", 2, 3);
    expect(vm.request(1, 1, "audit")).toBe("bank round=0 rank=2 balance=8000 recv=0 dup=0 total=24000");
    expect(vm.request(1, 2, "audit\n")).toBe("bank round=0 rank=2 balance=8000 recv=0 dup=0 total=24000");
    expect(vm.request(1, 3, "nonsense")).toMatch(/^error:/);
    expect(vm.request(1, 4, "")).toMatch(/^error:/);
  });

  it("alone in its group, logs a round per timer tick and sends nothing", () => {
    const vm = new FakeVm("bank", 0, 1);
    vm.exports.start!();
    for (let i = 0; i < 4; i++) vm.fire(BANK_TIMER_ROUND);
    expect(vm.sent).toEqual([]);
    expect(vm.logs).toEqual([1, 2, 3, 4, 5].map((k) => `bank round=${k} rank=0 balance=8000 recv=0 dup=0 total=8000\n`));
    expect([...vm.timers]).toEqual([[BANK_TIMER_ROUND, 5]]);
    expect(vm.request(1, nextRequest++, "audit")).toBe("bank round=5 rank=0 balance=8000 recv=0 dup=0 total=8000");
  });

  it("retries a line the host refused (E_FULL) before starting the next round", () => {
    const vm = new FakeVm("bank", 0, 1);
    vm.logResults.push(E_FULL);
    vm.exports.start!();
    expect(vm.logs).toEqual([]);
    vm.logResults.push(E_FULL);
    vm.fire(BANK_TIMER_ROUND); // refused again: still round 1
    vm.fire(BANK_TIMER_ROUND); // round 1's line goes out; round 2 starts and completes
    vm.fire(BANK_TIMER_ROUND);
    expect(vm.logs.map((l) => parseBankLine(l.trimEnd()).round)).toEqual([1, 2, 3]);
  });

  it("one round of three ranks: one transfer to every other rank, then the audit line", () => {
    const g = new BankGroup(3, 1);
    g.start();
    expect(g.transfers.size).toBe(6); // round 1: 3 * 2 transfers
    g.drain();
    expect(g.check()).toBe(1);
    for (const vm of g.vms) {
      expect(vm.logs.length).toBe(1);
      expect([...vm.timers]).toEqual([[BANK_TIMER_ROUND, 5]]);
      expect(vm.request(1, nextRequest++, "audit")).toBe(vm.logs[0].trimEnd());
    }
    // Each rank's balance after round 1 is its start money - what it sent + what it got.
    const amount = (from: number, to: number) => g.transfers.get(`${from}>${to}@1`)!;
    g.lines(0).concat(g.lines(1), g.lines(2)).forEach((l) => {
      const others = [0, 1, 2].filter((r) => r !== l.rank);
      const got = others.reduce((s, o) => s + amount(o, l.rank), 0);
      const gave = others.reduce((s, o) => s + amount(l.rank, o), 0);
      expect(l.balance).toBe(BANK_PER_RANK - gave + got);
    });
  });

  it.each([3, 4])("%i ranks, random interleavings (per-sender FIFO), back-pressure: every line adds up", (size) => {
    const ROUNDS = 6;
    let early = 0;
    let refused = 0;
    fc.assert(
      fc.property(
        fc.nat(),
        fc.array(fc.record({ pick: fc.nat(), fault: fc.nat({ max: 24 }) }), { minLength: 50, maxLength: 800 }),
        (seed, schedule) => {
          const g = new BankGroup(size, seed);
          g.start();
          for (let step = 0; step < 20_000; step++) {
            if (g.vms.every((vm) => vm.logs.length >= ROUNDS)) break;
            // The schedule first (with injected E_FULLs), then a fair round-robin without faults.
            const s = step < schedule.length ? schedule[step] : { pick: step, fault: 99 };
            if (s.fault === 0) {
              g.vms[s.pick % size].sendResults.push(...Array<number>(1 + (s.pick % 3)).fill(E_FULL));
              refused++;
              continue;
            }
            if (s.fault === 1) {
              g.vms[s.pick % size].logResults.push(E_FULL);
              continue;
            }
            const actions = g.actions();
            expect(actions.length, "the group is not stuck").toBeGreaterThan(0);
            actions[s.pick % actions.length]();
          }
          expect(g.check(), "every rank completed the rounds").toBeGreaterThanOrEqual(ROUNDS);
          for (const vm of g.vms) {
            const last = vm.logs[vm.logs.length - 1].trimEnd();
            expect(vm.request(1, nextRequest++, "audit")).toBe(last);
          }
          early += g.early;
        },
      ),
      { numRuns: 40, seed: 20261124 + size },
    );
    // The schedules did exercise the paths that matter.
    expect(early, "transfers of round k + 1 arrived before their receiver finished round k").toBeGreaterThan(0);
    expect(refused).toBeGreaterThan(0);
  });

  it("counts a duplicated transfer in dup and does not credit it (of an old round, and of one kept for the next round)", () => {
    const g = new BankGroup(3, 5);
    g.start();
    // Round 1 everywhere, keeping a copy of rank 2's round-1 transfer to rank 1.
    const old = g.channels.get("2>1")![0];
    g.drain();
    expect(g.check()).toBe(1);

    // Rank 0 enters round 2; rank 1 is still waiting for its round timer.
    g.vms[0].fire(BANK_TIMER_ROUND);
    g.collect();
    const early = g.channels.get("0>1")!;
    expect(early.length).toBe(1);
    expect(parseTransfer(early[0]).round).toBe(2);
    g.deliver(0, 1, { keep: true }); // kept for round 2
    g.deliver(0, 1); // the same transfer again: a duplicate
    expect(g.early).toBe(2);
    g.vms[1].message(2, old); // round 1's transfer again: a duplicate
    g.vms[1].message(2, old);

    for (const vm of g.vms.slice(1)) vm.fire(BANK_TIMER_ROUND);
    g.collect();
    g.drain();
    const rank1 = g.lines(1);
    expect(rank1.map((l) => [l.round, l.recv, l.dup])).toEqual([
      [1, 2, 0],
      [2, 4, 3],
    ]);
    // Not credited: every round still adds up to the group's money.
    for (let r = 0; r < 3; r++) for (const l of g.lines(r)) expect(l.total).toBe(3 * BANK_PER_RANK);
    expect(g.lines(0)[1].balance + g.lines(1)[1].balance + g.lines(2)[1].balance).toBe(3 * BANK_PER_RANK);
  });

  it("queues transfers the host refuses (E_FULL) and sends them from the flush timer, debited once", () => {
    const g = new BankGroup(2, 9);
    g.vms[0].sendResults.push(E_FULL);
    g.start();
    expect(g.channels.get("0>1")).toBeUndefined(); // nothing went out from rank 0
    expect([...g.vms[0].timers.keys()].sort()).toEqual([BANK_TIMER_FLUSH]);
    g.drain(); // rank 1's transfer arrives; rank 0 contributes (queued behind its transfer)
    g.vms[0].fire(BANK_TIMER_FLUSH);
    g.collect();
    expect(g.channels.get("0>1")!.map((b) => isTransfer(b))).toEqual([true]);
    g.drain();
    expect(g.check()).toBe(1);
    expect(g.vms.map((vm) => vm.logs.length)).toEqual([1, 1]);
  });

  it("traps on a malformed or out-of-order transfer instead of corrupting its books", () => {
    const bad: [Uint8Array, RegExp][] = [
      [new Uint8Array(7), /guest abort: bank: malformed transfer from rank 0: 7 bytes/],
      [transferBytes({ round: 1, from: 0, account: 0, amount: 1, length: 21 }), /malformed transfer from rank 0: 21 bytes/],
      [transferBytes({ round: 1, from: 0, account: 0, amount: 1, magic: 0x00 }), /malformed transfer/],
      [transferBytes({ round: 1, from: 0, account: 0, amount: 1, magic: 0xc7, kind: 9 }), /malformed transfer/], // the collectives' magic, not one of their kinds
      // The collectives' header (0xC7, kind 4 = reduce, id 0, 0): the Allreduce's, which traps on it (rank 1 is not its root).
      [transferBytes({ round: 1, from: 0, account: 0, amount: 1, magic: 0xc7, kind: 4 }), /guest abort: .*collectives/],
      [transferBytes({ round: 1, from: 0, account: 0, amount: 1, kind: 2 }), /malformed transfer/],
      [transferBytes({ round: 1, from: 0, account: 99, amount: 5 }), /malformed transfer/],
      [transferBytes({ round: 1, from: 0, account: -1, amount: 5 }), /malformed transfer/],
      [transferBytes({ round: 1, from: 0, account: 3, amount: 101 }), /malformed transfer/],
      [transferBytes({ round: 1, from: 0, account: 3, amount: -1 }), /malformed transfer/],
      [transferBytes({ round: 1, from: 2, account: 3, amount: 5 }), /malformed transfer/], // claims another sender
      [transferBytes({ round: 0, from: 0, account: 3, amount: 5 }), /malformed transfer/],
      [transferBytes({ round: 3, from: 0, account: 3, amount: 5 }), /transfer of round 3 from rank 0 out of order/], // two rounds ahead
      [transferBytes({ round: 2, from: 0, account: 3, amount: 5 }), /transfer of round 2 from rank 0 out of order/], // skips round 1
    ];
    for (const [bytes, error] of bad) {
      const vm = new FakeVm("bank", 1, 3);
      vm.exports.start!();
      expect(() => vm.message(0, bytes), error.source).toThrow(error);
    }
    const self = new FakeVm("bank", 1, 3);
    self.exports.start!();
    expect(() => self.message(1, transferBytes({ round: 1, from: 1, account: 0, amount: 1 }))).toThrow(/malformed transfer from rank 1/);
    // A well-formed one is accepted.
    const ok = new FakeVm("bank", 1, 3);
    ok.exports.start!();
    ok.message(0, transferBytes({ round: 1, from: 0, account: 3, amount: 100 }));
    ok.message(0, transferBytes({ round: 2, from: 0, account: 3, amount: 0 })); // one round ahead: kept
  });
});

// ---------------------------------------------------------------------------

describe("pingpong", () => {
  const TIMER_PING = 1;
  const TIMER_FLUSH = 2;
  interface Stats {
    round_trips: number;
    elapsed_ms: number;
    latency_us_p50: number;
    latency_us_p99: number;
  }
  let nextRequest = 1;
  const stats = (vm: FakeVm): Stats => {
    const text = vm.request(1, nextRequest++, "stats");
    expect(text).toMatch(/^\{"round_trips":\d+,"elapsed_ms":[\d.]+,"latency_us_p50":[\d.]+,"latency_us_p99":[\d.]+\}$/);
    return JSON.parse(text) as Stats;
  };

  /** Two ranks on a shared fake clock (ms). */
  const pair = () => {
    const clock = { t: 1_700_000_000_000 };
    const vms = [new FakeVm("pingpong", 0, 2), new FakeVm("pingpong", 1, 2)];
    for (const vm of vms) vm.clock = () => clock.t;
    return { clock, vms };
  };

  /** One round trip of `us` microseconds: the ping out, the echo back (checked unchanged). */
  const roundTrip = ({ clock, vms }: ReturnType<typeof pair>, us: number) => {
    const ping = vms[0].sent.shift()!;
    expect(ping.to).toBe(1);
    expect(ping.bytes.length).toBe(64);
    clock.t += us / 2000;
    vms[1].message(0, ping.bytes);
    const echo = vms[1].sent.shift()!;
    expect(echo.to).toBe(0);
    expect(echo.bytes).toEqual(ping.bytes);
    clock.t += us / 2000;
    vms[0].message(1, echo.bytes);
    return ping.bytes;
  };

  /** Nearest-rank percentile. */
  const percentile = (values: number[], p: number) => [...values].sort((a, b) => a - b)[Math.max(1, Math.ceil((p / 100) * values.length)) - 1];

  it("rank 0 pings rank 1 on start; ranks >= 2 idle", () => {
    const { vms } = pair();
    vms[0].exports.start!();
    vms[1].exports.start!();
    expect(vms[0].sent.length).toBe(1);
    expect(vms[1].sent).toEqual([]);
    const idle = new FakeVm("pingpong", 2, 3);
    idle.exports.start!();
    expect(idle.sent).toEqual([]);
    expect(idle.timers.size).toBe(0);
    expect(stats(idle).round_trips).toBe(0);
    expect(() => idle.message(0, new Uint8Array(64))).toThrow(/pingpong: unexpected message/);
    const alone = new FakeVm("pingpong", 0, 1);
    alone.exports.start!();
    expect(alone.sent).toEqual([]);
  });

  it("counts N round trips, measures elapsed time, and reports percentiles within 5 %", () => {
    const p = pair();
    p.vms[0].exports.start!();
    const start = p.clock.t;
    // Latencies from 5 µs to ~50 ms, log-uniform, deterministic.
    let x = 12345;
    const rand = () => ((x = (Math.imul(x, 1103515245) + 12345) >>> 0) / 2 ** 32);
    const latencies = Array.from({ length: 2000 }, () => 5 * 10 ** (4 * rand()));
    const seqs = latencies.map((us) => new DataView(roundTrip(p, us).buffer).getBigUint64(0, true));
    expect(seqs.slice(0, 3)).toEqual([1n, 2n, 3n]);
    const s = stats(p.vms[0]);
    expect(s.round_trips).toBe(latencies.length);
    expect(s.elapsed_ms).toBeCloseTo(p.clock.t - start, 2);
    for (const [got, q] of [
      [s.latency_us_p50, 50],
      [s.latency_us_p99, 99],
    ] as const) {
      const want = percentile(latencies, q);
      expect(Math.abs(got - want) / want, `p${q}: ${got} vs ${want}`).toBeLessThan(0.05);
    }
    expect(s.latency_us_p50).toBeLessThan(s.latency_us_p99);
    expect(p.vms[0].sent.length, "the next ping is out").toBe(1);
  });

  it("reports sub-millisecond latencies exactly when they are all the same", () => {
    const p = pair();
    p.vms[0].exports.start!();
    for (let i = 0; i < 100; i++) roundTrip(p, 250);
    const s = stats(p.vms[0]);
    expect(s.round_trips).toBe(100);
    expect(s.latency_us_p50).toBeCloseTo(250, 1);
    expect(s.latency_us_p99).toBeCloseTo(250, 1);
    expect(s.elapsed_ms).toBeCloseTo(25, 2);
  });

  it("takes the nearest rank: p50 of 100, 200, 400, 800 µs is 200, p99 is 800", () => {
    const p = pair();
    p.vms[0].exports.start!();
    for (const us of [800, 100, 400, 200]) roundTrip(p, us);
    const s = stats(p.vms[0]);
    expect(Math.abs(s.latency_us_p50 - 200) / 200).toBeLessThan(0.02);
    expect(Math.abs(s.latency_us_p99 - 800) / 800).toBeLessThan(0.02);
  });

  it("reset zeroes the counters and the clock; the ping in flight at the reset is not counted", () => {
    const p = pair();
    p.vms[0].exports.start!();
    for (let i = 0; i < 10; i++) roundTrip(p, 1000);
    expect(stats(p.vms[0]).round_trips).toBe(10);
    expect(p.vms[0].request(1, nextRequest++, "reset\n")).toBe("ok");
    expect(stats(p.vms[0])).toEqual({ round_trips: 0, elapsed_ms: 0, latency_us_p50: 0, latency_us_p99: 0 });
    roundTrip(p, 1_000_000); // sent before the reset
    expect(stats(p.vms[0]).round_trips).toBe(0);
    roundTrip(p, 40);
    roundTrip(p, 40);
    const s = stats(p.vms[0]);
    expect(s.round_trips).toBe(2);
    expect(s.latency_us_p99).toBeCloseTo(40, 1);
    expect(s.elapsed_ms).toBeCloseTo(1000.08, 2);
    expect(p.vms[1].request(1, nextRequest++, "stats")).toMatch(/^\{"round_trips":0,/);
    expect(p.vms[0].request(1, nextRequest++, "frob")).toMatch(/^error:/);
  });

  it("retries a refused ping from a timer, and queues a refused echo (E_FULL)", () => {
    const p = pair();
    p.vms[0].sendResults.push(E_FULL);
    p.vms[0].exports.start!();
    expect(p.vms[0].sent).toEqual([]);
    expect([...p.vms[0].timers]).toEqual([[TIMER_PING, 1]]);
    p.vms[0].sendResults.push(E_FULL);
    p.vms[0].fire(TIMER_PING); // refused again
    p.vms[0].fire(TIMER_PING);
    expect(p.vms[0].sent.length).toBe(1);

    const ping = p.vms[0].sent.shift()!;
    p.vms[1].sendResults.push(E_FULL);
    p.vms[1].message(0, ping.bytes);
    expect(p.vms[1].sent).toEqual([]);
    expect([...p.vms[1].timers]).toEqual([[TIMER_FLUSH, 1]]);
    p.vms[1].fire(TIMER_FLUSH);
    expect(p.vms[1].sent.map((s) => [s.to, s.bytes])).toEqual([[0, ping.bytes]]);
    p.clock.t += 0.5;
    p.vms[0].message(1, p.vms[1].sent.shift()!.bytes);
    const s = stats(p.vms[0]);
    expect(s.round_trips).toBe(1);
    expect(s.latency_us_p50).toBeCloseTo(500, 0); // timed from the accepted send
  });

  it("traps on an echo that is not the ping in flight", () => {
    const p = pair();
    p.vms[0].exports.start!();
    const ping = p.vms[0].sent[0].bytes;
    const wrong = ping.slice();
    wrong[0] ^= 1;
    expect(() => p.vms[0].message(1, wrong)).toThrow(/pingpong: unexpected message of 64 bytes from rank 1/);
    const q = pair();
    q.vms[0].exports.start!();
    expect(() => q.vms[0].message(1, ping.slice(0, 63))).toThrow(/unexpected message of 63 bytes/);
  });

  it("does not leak memory per round trip", () => {
    const p = pair();
    p.vms[0].exports.start!();
    const run = () => {
      for (let i = 0; i < 5000; i++) roundTrip(p, 100);
    };
    run();
    const pages = p.vms.map((vm) => vm.exports.memory.buffer.byteLength);
    run();
    run();
    expect(p.vms.map((vm) => vm.exports.memory.buffer.byteLength)).toEqual(pages);
    expect(stats(p.vms[0]).round_trips).toBe(15000);
  });
});

describe("bench guests", () => {
  // Expected checksums computed independently here, for run(1).
  const lcgSortChecksum = () => {
    const N = 1_000_000;
    const a = new Int32Array(N);
    let x = 0x2545f491;
    for (let i = 0; i < N; i++) {
      x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
      a[i] = x | 0;
    }
    a.sort();
    return a[0] ^ a[N >> 2] ^ a[N >> 1] ^ a[N - 1];
  };
  const storeLoopChecksum = () => {
    const words = (16 << 20) / 4;
    const last = 64 - 1; // the final pass decides the buffer's contents
    const word = (i: number) => (Math.imul(last, 0x9e3779b9) + Math.imul(i, 0x01000193)) >>> 0;
    let sum = 0;
    for (let i = 0; i < words; i += (1 << 20) / 4) sum = (sum ^ word(i)) >>> 0;
    return (sum ^ word(words - 1)) | 0;
  };
  const hashMapChecksum = () => {
    const step = (x: number) => {
      x = (x ^ (x << 13)) >>> 0;
      x = (x ^ (x >>> 17)) >>> 0;
      return (x ^ (x << 5)) >>> 0;
    };
    let check = 0;
    for (let iter = 0; iter < 16; iter++) {
      const map = new Map<number, number>();
      let x = (0x9e3779b9 + iter) >>> 0;
      for (let i = 0; i < 200_000; i++) {
        x = step(x);
        map.set(x | 0, i);
      }
      x = (0x9e3779b9 + iter) >>> 0;
      let sum = 0;
      for (let i = 0; i < 200_000; i += 7) {
        x = step(x);
        if (map.has(x | 0)) sum = (sum + map.get(x | 0)!) | 0;
        for (let k = 0; k < 6; k++) x = step(x);
      }
      check = (Math.imul(check, 31) + map.size + sum) | 0;
    }
    return check;
  };
  const matmulChecksum = () => {
    const D = 256;
    let s = 0;
    for (let i = 0; i < D; i++)
      for (let j = 0; j < D; j++) for (let k = 0; k < D; k++) s += (((i * 3 + k) % 7) - 2) * (((k + j * 5) % 11) - 4);
    return s | 0;
  };

  it.each([
    ["store_loop", storeLoopChecksum],
    ["sort", lcgSortChecksum],
    ["hash_map", hashMapChecksum],
    ["matmul", matmulChecksum],
  ] as const)("%s: run(1) computes the expected checksum, every time", (name, expected) => {
    const vm = new FakeVm(name);
    const want = expected();
    expect(vm.exports.run!(1)).toBe(want);
    expect(vm.exports.run!(1)).toBe(want);
    expect(vm.exports.run!(0)).toBeTypeOf("number");
  });
});
