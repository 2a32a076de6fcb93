/**
 * The VM watchdog's clock: a thread's CPU time, not the wall time it spent
 * waiting (a blocked or descheduled VM thread is not a runaway guest).
 */
import { describe, expect, it } from "vitest";
import { Worker } from "node:worker_threads";
import { threadCpuMs, threadIdOfThisThread } from "../src/util/thread-cpu.js";

/** A thread that publishes its kernel id, then sleeps `sleep_ms` (no CPU), then spins `spin_ms`, stepping `phase` after each. */
function sleeper(shared: SharedArrayBuffer, sleep_ms: number, spin_ms: number): Worker {
  const source = `
    const { workerData } = require("node:worker_threads");
    const { readlinkSync } = require("node:fs");
    const s = new Int32Array(workerData.shared);
    Atomics.store(s, 0, Number(readlinkSync("/proc/thread-self").split("/").pop()));
    Atomics.wait(s, 2, 0, workerData.sleep_ms);
    Atomics.store(s, 1, 1);
    const end = Date.now() + workerData.spin_ms;
    while (Date.now() < end);
    Atomics.store(s, 1, 2);
    Atomics.wait(s, 3, 0, 5000);`;
  return new Worker(source, { eval: true, workerData: { shared, sleep_ms, spin_ms } });
}

async function until(cond: () => boolean): Promise<void> {
  while (!cond()) await new Promise((r) => setTimeout(r, 5));
}

describe("thread CPU time (Linux /proc)", () => {
  it("the calling thread's id is its kernel id: the main thread's is the pid", () => {
    expect(threadIdOfThisThread()).toBe(process.pid);
  });

  it("counts the time a thread ran, not the time it waited", async () => {
    const shared = new SharedArrayBuffer(16);
    const s = new Int32Array(shared);
    const worker = sleeper(shared, 400, 400);
    try {
      await until(() => Atomics.load(s, 0) !== 0);
      const tid = Atomics.load(s, 0);
      expect(tid).not.toBe(process.pid);
      const start = threadCpuMs(tid)!;
      await until(() => Atomics.load(s, 1) === 1);
      const afterSleep = threadCpuMs(tid)!;
      await until(() => Atomics.load(s, 1) === 2);
      const afterSpin = threadCpuMs(tid)!;
      expect(afterSleep - start).toBeLessThan(100); // 400 ms asleep
      expect(afterSpin - afterSleep).toBeGreaterThan(200); // 400 ms spinning (a loaded machine may take some of it)
    } finally {
      await worker.terminate();
    }
  });

  it("is null for a thread that is not this process's", () => {
    expect(threadCpuMs(0)).toBeNull();
    expect(threadCpuMs(2 ** 30)).toBeNull();
  });
});
