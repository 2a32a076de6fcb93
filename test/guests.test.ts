/**
 * Unit tests of the AssemblyScript example and benchmark guests' own logic.
 *
 * The raw modules from build/guests (run `node scripts/build-guests.mjs`
 * first) are instantiated directly, without Cohort, against a small fake
 * `cohort` import object that records what the guest does.
 */
import { beforeAll, describe, expect, it } from "vitest";
import fs from "node:fs";
import { fileURLToPath } from "node:url";
import binaryen from "binaryen";

const GUEST_DIR = fileURLToPath(new URL("../build/guests/", import.meta.url));
const GUESTS = ["ticker", "kv", "bank", "store_loop", "sort", "hash_map", "matmul"] as const;
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
      clock_ms: () => Date.now(),
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

describe("bank", () => {
  const TOTAL_PER_RANK = 8 * 1000;
  const LINE = /^bank rank=(\d+) balance=(\d+) sent=(\d+) recv=(\d+) transfers_out=(\d+) transfers_in=(\d+)$/;

  interface Audit {
    rank: number;
    balance: number;
    sent: number;
    recv: number;
    out: number;
    in: number;
  }
  const parse = (line: string): Audit => {
    const m = LINE.exec(line);
    if (!m) throw new Error(`not an audit line: ${JSON.stringify(line)}`);
    const [rank, balance, sent, recv, out, inn] = m.slice(1).map(Number);
    return { rank, balance, sent, recv, out, in: inn };
  };
  let nextRequest = 1;
  const audit = (vm: FakeVm) => parse(vm.request(9, nextRequest++, "audit"));

  it("starts with 8 accounts of 1000 and arms its timer", () => {
    const vm = new FakeVm("bank", 0, 1);
    expect(vm.request(1, 1, "audit")).toBe("bank rank=0 balance=8000 sent=0 recv=0 transfers_out=0 transfers_in=0");
    vm.exports.start!();
    expect([...vm.timers.keys()]).toEqual([1]);
    expect(vm.request(1, 2, "nonsense")).toMatch(/^error:/);
  });

  it("alone in its group, logs a line per tick and sends nothing", () => {
    const vm = new FakeVm("bank", 0, 1);
    vm.exports.start!();
    for (let i = 0; i < 5; i++) vm.exports.timer!(1);
    expect(vm.sent).toEqual([]);
    expect(vm.logs).toEqual(Array(5).fill("bank rank=0 balance=8000 sent=0 recv=0 transfers_out=0 transfers_in=0\n"));
    expect(vm.timerSetCalls).toBe(6);
  });

  it("conserves money across two ranks, with transfers in flight", () => {
    const vms = [new FakeVm("bank", 0, 2, 1), new FakeVm("bank", 1, 2, 2)];
    for (const vm of vms) vm.exports.start!();
    const inFlight: { from: number; to: number; bytes: Uint8Array }[] = [];
    const collect = (from: number) => {
      for (const s of vms[from].sent.splice(0)) inFlight.push({ from, to: s.to, bytes: s.bytes });
    };
    const checkInvariant = () => {
      const a = vms.map(audit);
      const balance = a[0].balance + a[1].balance;
      const sent = a[0].sent + a[1].sent;
      const recv = a[0].recv + a[1].recv;
      expect(balance + sent - recv).toBe(2 * TOTAL_PER_RANK);
      const pending = inFlight.reduce((sum, m) => sum + new DataView(m.bytes.buffer).getInt32(16, true), 0);
      expect(sent - recv).toBe(pending);
      return a;
    };

    const seenIds = new Set<bigint>();
    for (let step = 0; step < 400; step++) {
      const r = step % 2;
      vms[r].exports.timer!(1);
      collect(r);
      // Deliver only some of what is in flight, so money is often on the wire.
      while (inFlight.length > 3) {
        const m = inFlight.shift()!;
        expect(m.to).toBe(1 - m.from);
        expect(m.bytes.length).toBe(20);
        const view = new DataView(m.bytes.buffer);
        const id = view.getBigUint64(0, true);
        expect(Number(id >> 40n)).toBe(m.from);
        expect(view.getInt32(8, true)).toBe(m.from);
        const amount = view.getInt32(16, true);
        expect(amount).toBeGreaterThanOrEqual(1);
        expect(amount).toBeLessThanOrEqual(100);
        expect(seenIds.has(id)).toBe(false);
        seenIds.add(id);
        vms[m.to].message(m.from, m.bytes);
      }
      if (step % 50 === 0) checkInvariant();
    }

    // Every tick logged one audit line that also satisfies the invariant's parts.
    for (const vm of vms) {
      expect(vm.logs.length).toBe(200);
      for (const line of vm.logs) expect(line).toMatch(/\n$/);
      expect(parse(vm.logs[0].trimEnd()).rank).toBe(vm.rank);
    }

    // Quiesce: deliver everything, then sent == recv and out == in.
    for (const m of inFlight.splice(0)) vms[m.to].message(m.from, m.bytes);
    const a = checkInvariant();
    expect(a[0].balance + a[1].balance).toBe(2 * TOTAL_PER_RANK);
    expect(a[0].sent + a[1].sent).toBe(a[0].recv + a[1].recv);
    expect(a[0].out + a[1].out).toBe(a[0].in + a[1].in);
    expect(a[0].out).toBeGreaterThan(150); // it really moved money
    expect(a[1].out).toBeGreaterThan(150);
  });

  it("debits nothing when the host refuses the transfer", () => {
    const vm = new FakeVm("bank", 0, 2);
    vm.sendResults.push(E_FULL);
    vm.exports.timer!(1);
    expect(vm.sent).toEqual([]);
    expect(audit(vm)).toEqual({ rank: 0, balance: TOTAL_PER_RANK, sent: 0, recv: 0, out: 0, in: 0 });
    vm.exports.timer!(1);
    expect(vm.sent.length).toBe(1);
    const a = audit(vm);
    expect(a.out).toBe(1);
    expect(a.balance + a.sent).toBe(TOTAL_PER_RANK);
  });

  it("traps on a malformed transfer instead of corrupting its books", () => {
    const vm = new FakeVm("bank", 1, 2);
    expect(() => vm.message(0, new Uint8Array(7))).toThrow(/guest abort: bank: transfer of 7 bytes/);
    const bad = new Uint8Array(20);
    new DataView(bad.buffer).setInt32(12, 99, true); // account 99 does not exist
    new DataView(bad.buffer).setInt32(16, 5, true);
    expect(() => vm.message(0, bad)).toThrow(/malformed transfer/);
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
