import { Worker } from "node:worker_threads";
import { describe, expect, it } from "vitest";
import { processCpuNs } from "../src/util/proc-stat.js";

describe.runIf(process.platform === "linux")("processCpuNs", () => {
  it("counts the CPU of every thread of a process: a worker that spins 300 ms while this thread sleeps adds about 300 ms", async () => {
    const before = processCpuNs(process.pid);
    const worker = new Worker(`const end = Date.now() + 300; while (Date.now() < end); require("node:worker_threads").parentPort.postMessage("done");`, { eval: true });
    await new Promise((resolve) => worker.once("message", resolve));
    const added_ms = (processCpuNs(process.pid) - before) / 1e6;
    await worker.terminate();
    // Spinning 300 ms of wall time is at most 300 ms of CPU; at least most of it unless the machine is very busy.
    expect(added_ms).toBeGreaterThan(150);
    expect(added_ms).toBeLessThan(2000);
  });

  it("says a process that is gone is gone", () => {
    expect(() => processCpuNs(2 ** 22 + 1)).toThrow(/gone/);
  });
});
