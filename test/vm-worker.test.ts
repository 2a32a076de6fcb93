/**
 * The VM runtime across the real worker-thread boundary: typed requests,
 * crash containment (a trap, a runaway loop, an output flood, a memory grab
 * each stop one VM and nothing else), promotion of a backup thread, and the
 * in-process primary/backup pair used by `cohort run`.
 */
import { afterEach, describe, expect, it } from "vitest";
import { readdirSync } from "node:fs";
import { procStatFields } from "../src/util/proc-stat.js";
import { WORKER_THREAD_NICE } from "../src/util/thread-priority.js";
import { decodeDelta } from "../src/checkpoint/format.js";
import { instrument } from "../src/guest/instrument.js";
import { compileGuest } from "../src/guest/module-cache.js";
import { DEFAULT_LIMITS, type VmLimits } from "../src/vm/machine.js";
import { unpackOutput } from "../src/vm/runtime-state.js";
import type { GuestBundle, WorkerVmOptions } from "../src/vm/protocol.js";
import { VM_THREAD_STARTS_MAX, VmWorker, vmThreadStarts } from "../src/vm/vm.js";
import { builtBytes, fixtureBytes, watBytes } from "./support/guests.js";

const started: VmWorker[] = [];
afterEach(async () => {
  await Promise.all(started.splice(0).map((vm) => vm.terminate()));
});

/** The nice value of every thread of this process, by thread id (Linux: /proc/self/task/<tid>/stat). */
function threadNices(): Map<number, number> {
  const out = new Map<number, number>();
  for (const tid of readdirSync("/proc/self/task")) {
    const fields = procStatFields(`self/task/${tid}`);
    if (fields) out.set(Number(tid), Number(fields[19 - 3])); // field 19: nice
  }
  return out;
}

async function bundle(bytes: Uint8Array): Promise<GuestBundle> {
  return compileGuest(instrument(bytes));
}

function opts(limits: Partial<VmLimits> = {}): WorkerVmOptions {
  return { rank: 0, size: 1, limits: { ...DEFAULT_LIMITS, ...limits }, timers: "manual" };
}

async function boot(guest: GuestBundle, o = opts()): Promise<VmWorker> {
  const vm = await VmWorker.boot(guest, o);
  started.push(vm);
  return vm;
}

const HOSTILE = watBytes(`(module
  (import "cohort" "log" (func $log (param i32 i32) (result i32)))
  (memory 1 1000)
  (data (i32.const 0) "x")
  (func (export "spin") (loop $forever (br $forever)))
  (func (export "trap") (unreachable))
  (func (export "flood") (loop $l (drop (call $log (i32.const 0) (i32.const 1))) (br $l)))
  (func (export "grab") (result i32) (memory.grow (i32.const 900)))
  (func (export "bump") (result i32) (i32.store (i32.const 8) (i32.add (i32.load (i32.const 8)) (i32.const 1))) (i32.load (i32.const 8))))`);

describe("VM worker", () => {
  it("kv over the worker boundary: requests, capture, apply on a backup thread, promote, same replies", async () => {
    const guest = await bundle(builtBytes("kv"));
    const primary = await boot(guest);
    const backup = await VmWorker.backup(guest, opts(), null);
    started.push(backup);
    await primary.request("request", { session: 1, request_id: 1, payload: Buffer.from("put a 1") });
    const captured = await primary.capture();
    expect(decodeDelta(captured.delta).epoch).toBe(captured.epoch); // sealed: decodes with a valid checksum
    await backup.request("apply", { delta: captured.delta });
    const released = await primary.request("commit", { epoch: captured.epoch });
    expect(unpackOutput(released).map((r) => Buffer.from(r.bytes).toString())).toEqual(["ok"]);
    // Uncommitted work on the primary dies with it.
    await primary.request("request", { session: 1, request_id: 2, payload: Buffer.from("put a 2") });
    await primary.terminate();
    const status = await backup.request("promote", {});
    expect(status.role).toBe("primary");
    await backup.request("request", { session: 1, request_id: 3, payload: Buffer.from("get a") });
    const after = await backup.capture();
    const out = await backup.request("commit", { epoch: after.epoch });
    expect(unpackOutput(out).map((r) => Buffer.from(r.bytes).toString()).at(-1)).toBe("1");
  });

  it("a VM thread runs at a lower scheduling priority than the thread that started it (Linux)", async () => {
    const vm = await boot(await bundle(builtBytes("kv")));
    await vm.request("request", { session: 1, request_id: 1, payload: Buffer.from("put a 1") });
    const nices = threadNices();
    expect(nices.get(process.pid)).toBe(0); // this (main) thread keeps its priority
    expect([...nices.values()]).toContain(WORKER_THREAD_NICE);
  });

  it("VM threads start at most VM_THREAD_STARTS_MAX at a time; the others wait their turn and all start", async () => {
    const guest = await bundle(builtBytes("kv"));
    const count = VM_THREAD_STARTS_MAX * 3;
    let running_max = 0;
    let waiting_max = 0;
    const sampler = setInterval(() => {
      const now = vmThreadStarts();
      running_max = Math.max(running_max, now.running);
      waiting_max = Math.max(waiting_max, now.waiting);
    }, 1);
    try {
      const vms = await Promise.all(Array.from({ length: count }, () => boot(guest)));
      expect(new Set(vms).size).toBe(count);
      for (const vm of vms) expect((await vm.request("status", {})).role).toBe("primary");
    } finally {
      clearInterval(sampler);
    }
    expect(running_max).toBe(VM_THREAD_STARTS_MAX);
    expect(waiting_max).toBeGreaterThanOrEqual(count - VM_THREAD_STARTS_MAX - 1);
    expect(vmThreadStarts()).toEqual({ running: 0, waiting: 0 });
  });

  it("replicas of one thread pool share at most threads_max threads and stay independent; the last one out ends its thread", async () => {
    const guest = await bundle(builtBytes("kv"));
    const threadsBefore = threadNices().size;
    const pool = { name: "test/shared", threads_max: 2 };
    const vms = await Promise.all(Array.from({ length: 6 }, (_, rank) => boot(guest, { ...opts(), rank, thread: pool })));
    expect(threadNices().size - threadsBefore).toBe(2);
    // Placed all at once, they are spread evenly over the pool's threads.
    const perThread = new Map<number, number>();
    for (const vm of vms) perThread.set(vm.thread_id, (perThread.get(vm.thread_id) ?? 0) + 1);
    expect([...perThread.values()]).toEqual([3, 3]);
    // Each replica keeps its own state: a value put in one is not seen by the others.
    for (const [i, vm] of vms.entries()) await vm.request("request", { session: 1, request_id: 1, payload: Buffer.from(`put k ${i}`) });
    for (const [i, vm] of vms.entries()) {
      await vm.request("request", { session: 1, request_id: 2, payload: Buffer.from("get k") });
      const cut = await vm.capture();
      const out = unpackOutput(await vm.request("commit", { epoch: cut.epoch })).map((r) => Buffer.from(r.bytes).toString());
      expect(out).toEqual(["ok", String(i)]);
      VmWorker.recycle(cut.delta);
    }
    // Leaving: the others run on; once every replica left, the pool's threads are gone.
    await vms[0].terminate();
    await expect(vms[0].status()).rejects.toThrow(/terminated/);
    await vms[1].request("request", { session: 1, request_id: 3, payload: Buffer.from("get k") });
    const cut = await vms[1].capture();
    expect(unpackOutput(await vms[1].request("commit", { epoch: cut.epoch })).map((r) => Buffer.from(r.bytes).toString())).toEqual(["1"]);
    for (const vm of vms.slice(1)) await vm.terminate();
    await expect.poll(() => threadNices().size - threadsBefore, { timeout: 5000 }).toBe(0);
  });

  it("a runaway call stops its thread: the replicas sharing it crash with the reason, another pool's replica runs on", async () => {
    const guest = await bundle(HOSTILE);
    const pool = { name: "test/runaway", threads_max: 1 };
    const bad = await boot(guest, { ...opts({ call_cpu_ms: 200 }), thread: pool });
    const neighbour = await boot(guest, { ...opts({ call_cpu_ms: 200 }), rank: 1, thread: pool });
    const elsewhere = await boot(guest, { ...opts(), thread: { name: "test/other", threads_max: 1 } });
    const crashes = Promise.all([bad, neighbour].map((vm) => new Promise<string>((resolve) => vm.once("crashed", resolve))));
    await expect(bad.request("invoke", { name: "spin", args: [] })).rejects.toThrow(/cpu limit exceeded/);
    const [badWhy, neighbourWhy] = await crashes;
    expect(badWhy).toMatch(/^cpu limit exceeded/);
    expect(neighbourWhy).toMatch(/^VM thread stopped: another VM on it exceeded its cpu limit/);
    await expect(neighbour.request("invoke", { name: "bump", args: [] })).rejects.toThrow(/cpu limit/);
    expect(await elsewhere.request("invoke", { name: "bump", args: [] })).toBe(1);
    // The pool starts a fresh thread for its next replica.
    const next = await boot(guest, { ...opts(), thread: pool });
    expect(await next.request("invoke", { name: "bump", args: [] })).toBe(1);
  });

  it("the watchdog of a thread that makes no guest call stops polling, and still stops a runaway call that comes later", async () => {
    const vm = await boot(await bundle(HOSTILE), opts({ call_cpu_ms: 40 })); // polls every 10 ms
    expect(await vm.request("invoke", { name: "bump", args: [] })).toBe(1);
    await expect.poll(() => vm.watchdog_parked, { timeout: 5000 }).toBe(true);
    await expect(vm.request("invoke", { name: "spin", args: [] })).rejects.toThrow(/cpu limit exceeded/);
  });

  it("a backup promoted on a thread it shares with another backup runs there, and the other still folds deltas", async () => {
    const guest = await bundle(builtBytes("kv"));
    const pool = { name: "test/backups", threads_max: 1 };
    const threadsBefore = threadNices().size;
    const [p0, p1] = [await boot(guest), await boot(guest, { ...opts(), rank: 1 })];
    const [b0, b1] = [await VmWorker.backup(guest, { ...opts(), thread: pool }, null), await VmWorker.backup(guest, { ...opts(), rank: 1, thread: pool }, null)];
    started.push(b0, b1);
    expect(threadNices().size - threadsBefore).toBe(3);
    for (const [p, b, value] of [[p0, b0, "x"], [p1, b1, "y"]] as const) {
      await p.request("request", { session: 1, request_id: 1, payload: Buffer.from(`put k ${value}`) });
      const cut = await p.capture();
      await b.request("apply", { delta: cut.delta });
      await p.request("commit", { epoch: cut.epoch });
    }
    await p0.terminate();
    expect((await b0.request("promote", {})).role).toBe("primary");
    await b0.request("request", { session: 1, request_id: 2, payload: Buffer.from("get k") });
    const after = await b0.capture();
    expect(unpackOutput(await b0.request("commit", { epoch: after.epoch })).map((r) => Buffer.from(r.bytes).toString()).at(-1)).toBe("x");
    // The other backup, on the same thread, takes the next checkpoint of its primary.
    await p1.request("request", { session: 1, request_id: 2, payload: Buffer.from("put k z") });
    const next = await p1.capture();
    expect((await b1.request("apply", { delta: next.delta })).epoch).toBe(next.epoch);
    expect((await b1.status()).role).toBe("backup");
  });

  it("a trap crashes only that VM, with the trap's message", async () => {
    const guest = await bundle(HOSTILE);
    const [bad, good] = [await boot(guest), await boot(guest)];
    const crashed = new Promise<string>((resolve) => bad.once("crashed", resolve));
    await expect(bad.request("invoke", { name: "trap", args: [] })).rejects.toThrow(/unreachable/);
    expect(await crashed).toMatch(/trap: unreachable/);
    expect((await bad.status()).crashed).toMatch(/unreachable/);
    await expect(bad.request("invoke", { name: "bump", args: [] })).rejects.toThrow(/crashed/);
    expect(await good.request("invoke", { name: "bump", args: [] })).toBe(1);
  });

  it("an infinite loop is stopped by the per-call CPU limit; other VMs keep running", async () => {
    const guest = await bundle(HOSTILE);
    const bad = await boot(guest, opts({ call_cpu_ms: 200 }));
    const good = await boot(guest);
    const crashed = new Promise<string>((resolve) => bad.once("crashed", resolve));
    const t0 = Date.now();
    await expect(bad.request("invoke", { name: "spin", args: [] })).rejects.toThrow(/cpu limit exceeded/);
    expect(Date.now() - t0).toBeLessThan(5000);
    expect(await crashed).toMatch(/cpu limit/);
    expect(bad.goneReason).toMatch(/cpu limit/);
    expect(await good.request("invoke", { name: "bump", args: [] })).toBe(1);
  });

  it("unreleased output beyond the limit crashes the VM instead of growing without bound", async () => {
    const guest = await bundle(HOSTILE);
    const vm = await boot(guest, opts({ output_bytes_max: 1000 }));
    await expect(vm.request("invoke", { name: "flood", args: [] })).rejects.toThrow(/output limit exceeded/);
  });

  it("memory.grow past the VM's memory limit fails in the guest (returns -1)", async () => {
    const guest = await bundle(HOSTILE);
    const vm = await boot(guest, opts({ memory_pages_max: 100 }));
    expect(await vm.request("invoke", { name: "grab", args: [] })).toBe(-1);
    const roomy = await boot(guest, opts({ memory_pages_max: 1000 }));
    expect(await roomy.request("invoke", { name: "grab", args: [] })).toBe(1);
  });

  it("rollback through the worker restores the cut and reports the pages moved", async () => {
    const guest = await bundle(HOSTILE);
    const vm = await boot(guest);
    await vm.request("invoke", { name: "bump", args: [] });
    const cut = await vm.capture();
    await vm.request("invoke", { name: "bump", args: [] });
    await vm.request("invoke", { name: "bump", args: [] });
    const result = await vm.request("rollback", { epoch: cut.epoch });
    expect(result.pages_restored).toBe(1);
    expect(await vm.request("invoke", { name: "bump", args: [] })).toBe(2);
  });

  it("rollback through the worker (group recovery's in-place path) undoes a data.drop: memory.init works again", async () => {
    const guest = await bundle(fixtureBytes("segments"));
    const vm = await boot(guest);
    const cut = await vm.capture();
    await vm.request("commit", { epoch: cut.epoch });
    await vm.request("invoke", { name: "drop", args: [] });
    await vm.request("rollback", { epoch: cut.epoch });
    await vm.request("invoke", { name: "init", args: [] });
    const head = await Promise.all([0, 1, 2].map((i) => vm.request("invoke", { name: "load8", args: [i] })));
    expect(Buffer.from(head as number[]).toString()).toBe("abc");
  });

  it("rollback(0) through the worker boots the guest again, as a backup promoted from cut 0 does", async () => {
    const guest = await bundle(fixtureBytes("segments"));
    const vm = await boot(guest);
    await vm.request("invoke", { name: "poke", args: [200, 0] });
    await vm.capture();
    await vm.request("rollback", { epoch: 0 });
    const backup = await VmWorker.backup(guest, opts(), null);
    started.push(backup);
    await backup.request("promote", {});
    for (const replica of [vm, backup]) {
      expect(await replica.request("invoke", { name: "started", args: [] })).toBe(1);
      expect(await replica.request("invoke", { name: "load8", args: [200] })).toBe(42);
      expect(await replica.request("invoke", { name: "load8", args: [100] })).toBe("a".charCodeAt(0));
    }
    expect((await vm.status()).crashed).toBeNull();
  });
  it("deltas cross to the host thread in pooled buffers and go back: steady-state captures reuse them", async () => {
    const primary = await boot(await bundle(HOSTILE));
    const backup = await VmWorker.backup(await bundle(HOSTILE), opts(), null);
    started.push(backup);
    for (let e = 1; e <= 20; e++) {
      await primary.request("invoke", { name: "bump", args: [] });
      const c = await primary.capture();
      expect(c.delta_loan).not.toBeNull();
      expect(decodeDelta(c.delta).epoch).toBe(c.epoch);
      await backup.request("apply", { delta: c.delta }); // copied to the backup's thread
      await primary.request("commit", { epoch: c.epoch });
      expect(VmWorker.recycle(c.delta.slice())).toBe(false); // a copy is not a loan
      expect(VmWorker.recycle(c.delta)).toBe(true);
      expect(c.delta.length).toBe(0); // transferred back: detached here
      expect(VmWorker.recycle(c.delta)).toBe(false);
    }
    const pool = (await primary.status()).delta_pool!;
    expect(pool).toMatchObject({ taken: 20, lent: 0, returned: 20, allocated: 1, reused: 19 });
    // A delta kept by the host is not reused: the VM thread lends another buffer meanwhile.
    const kept = await primary.capture();
    for (let i = 0; i < 3; i++) VmWorker.recycle((await primary.capture()).delta);
    expect((await primary.status()).delta_pool).toMatchObject({ taken: 24, lent: 1, allocated: 2 });
    expect(decodeDelta(kept.delta).epoch).toBe(kept.epoch);
    expect((await backup.status()).epoch).toBe(20);
  });
});
