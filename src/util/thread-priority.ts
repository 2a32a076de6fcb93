/**
 * Worker threads that run guests or instrument modules yield the CPU to their
 * host's main thread. The main thread carries the heartbeats and the protocol:
 * when a host's VM threads (two per VM: a primary's and a backup's) outnumber
 * the cores, an equal share left it descheduled for hundreds of milliseconds,
 * and peers declared a live host failed (a 16-VM deploy over 3 hosts on 2
 * cores did, with the default 300 ms detector). A lower priority costs the
 * VMs nothing when the main thread is idle, which is most of the time.
 */
import { readdirSync } from "node:fs";
import { setPriority } from "node:os";

/** The nice value of VM and instrumenter threads (the main thread keeps the process's, normally 0). */
export const WORKER_THREAD_NICE = 10;

/**
 * Lowers the calling thread's scheduling priority. On Linux a nice value is a
 * per-thread attribute and `setPriority(0, …)` names the calling thread; on
 * other systems it would change the whole process, main thread included, so
 * there it does nothing. Best effort: a refusal (a container's seccomp policy)
 * leaves the thread as it was.
 */
export function yieldCpuToMainThread(): boolean {
  if (process.platform !== "linux") return false;
  try {
    setPriority(0, WORKER_THREAD_NICE);
    return true;
  } catch {
    return false;
  }
}

/**
 * Creates a thread (`create` makes a Worker) at the lowered priority from
 * its first instruction. A worker lowers itself once its own code runs, but
 * Node's bootstrap of the thread before that costs 60-100 ms of CPU, at the
 * creator's priority: spare VM threads started 1 s after a deploy on each
 * of 4 hosts (2 cores) held the hosts' main loops up to 110-150 ms late
 * (`late_seconds` in `status`), and at most 37 ms without those starts.
 * `new Worker()` returns once the OS thread exists, so the one task of this
 * process that appeared meanwhile is the new thread; if more than one
 * appeared (another thread started one too) none is touched and the worker
 * lowers itself as before. Linux only, best effort (yieldCpuToMainThread).
 */
export function createLowered<T>(create: () => T): T {
  if (process.platform !== "linux") return create();
  const before = new Set(threadIds());
  const created = create();
  const fresh = threadIds().filter((id) => !before.has(id));
  if (fresh.length === 1) {
    try {
      setPriority(fresh[0], WORKER_THREAD_NICE);
    } catch {
      // As yieldCpuToMainThread: a refusal leaves the thread as it was.
    }
  }
  return created;
}

/** This process's threads (Linux: /proc/self/task), or none if they cannot be listed. */
function threadIds(): number[] {
  try {
    return readdirSync("/proc/self/task").map(Number);
  } catch {
    return [];
  }
}
