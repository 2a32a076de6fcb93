/**
 * CPU time of one thread of this process, read from Linux's /proc. The per-call
 * CPU limit is a limit on CPU, not on wall time: on a loaded machine (more VM
 * threads than cores, and VM threads yield to their host's main thread; see
 * thread-priority.ts) a guest call can wait for a core far longer than it runs,
 * and a wall-clock budget crashed healthy VMs during large deploys. Node 20 has
 * no per-thread CPU clock for another thread, so the thread publishes its
 * kernel id (threadIdOfThisThread) and its watchdog reads that thread's
 * schedstat.
 */
import { readFileSync, readlinkSync } from "node:fs";

/** The kernel's id of the calling thread, or 0 where /proc/thread-self is not available (not Linux). */
export function threadIdOfThisThread(): number {
  try {
    const tid = Number(readlinkSync("/proc/thread-self").split("/").pop());
    return Number.isSafeInteger(tid) && tid > 0 ? tid : 0;
  } catch {
    return 0;
  }
}

/**
 * CPU time (ms) thread `tid` of this process has run, or null if it cannot be
 * read (no such thread, not Linux): schedstat's first field, nanoseconds on
 * the CPU.
 */
export function threadCpuMs(tid: number): number | null {
  if (tid <= 0) return null;
  try {
    return Number(readFileSync(`/proc/self/task/${tid}/schedstat`, "utf8").split(" ")[0]) / 1e6;
  } catch {
    return null;
  }
}
