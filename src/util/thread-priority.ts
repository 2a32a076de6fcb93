/**
 * Worker threads that run guests or instrument modules yield the CPU to their
 * host's main thread. The main thread carries the heartbeats and the protocol:
 * when a host's VM threads (two per VM: a primary's and a backup's) outnumber
 * the cores, an equal share left it descheduled for hundreds of milliseconds,
 * and peers declared a live host failed (a 16-VM deploy over 3 hosts on 2
 * cores did, with the default 300 ms detector). A lower priority costs the
 * VMs nothing when the main thread is idle, which is most of the time.
 */
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
