import { readFileSync } from "node:fs";
import { Worker } from "node:worker_threads";
import { describe, expect, it } from "vitest";
import { createLowered, WORKER_THREAD_NICE } from "../src/util/thread-priority.js";

/** Field 19 of a /proc stat line: the nice value (the command name, field 2, may hold spaces: split after it). */
function niceOf(statLine: string): number {
  return Number(statLine.slice(statLine.lastIndexOf(")") + 2).split(" ")[19 - 3]);
}

/** A worker whose first statement reports its own nice value; it does not lower itself. */
function reportingNice(create: (make: () => Worker) => Worker): Promise<number> {
  const source = `
    const { parentPort } = require("node:worker_threads");
    parentPort.postMessage(require("node:fs").readFileSync("/proc/thread-self/stat", "utf8"));
  `;
  const worker = create(() => new Worker(source, { eval: true }));
  return new Promise((resolve, reject) => {
    worker.once("message", (stat: string) => {
      void worker.terminate();
      resolve(niceOf(stat));
    });
    worker.once("error", reject);
  });
}

describe.runIf(process.platform === "linux")("thread priority", () => {
  it("a thread created through createLowered runs its bootstrap at the lowered priority already; one created plainly at its creator's; the creator keeps its own", async () => {
    expect(await reportingNice((make) => createLowered(make))).toBe(WORKER_THREAD_NICE);
    expect(await reportingNice((make) => make())).toBe(0);
    expect(niceOf(readFileSync("/proc/thread-self/stat", "utf8"))).toBe(0);
  });
});
