/**
 * Linux's /proc/<pid>/stat (or /proc/<pid>/task/<tid>/stat), split into its
 * fields after the command name, which sits in parentheses and may contain
 * spaces and parentheses itself. Index 0 is field 3 (state) of proc(5):
 * field n is at index n - 3.
 */
import { readdirSync, readFileSync } from "node:fs";

/** Fields of `/proc/<of>/stat` after the command name (`of`: a pid, "self", "self/task/<tid>"), or null (no such process or thread, or no procfs). */
export function procStatFields(of: number | string): string[] | null {
  try {
    const stat = readFileSync(`/proc/${of}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  } catch {
    return null;
  }
}

/** USER_HZ: 100 on every Linux architecture Node runs on (the kernel scales /proc times to it). */
const CLOCK_TICKS_PER_S = 100;

/**
 * CPU time of process `pid` in nanoseconds, every thread counted: the time
 * each live thread spent on a CPU (`/proc/<pid>/task/<tid>/schedstat`, its
 * first field), summed. That clock is exact, where utime and stime are
 * sampled at the 10 ms clock tick: a thread that runs 100 µs at each of its
 * wake-ups is charged a whole tick now and then, and an idle host's few
 * percent of a core measured over 5 s came out 25 % either way from one
 * window to the next. A thread that exited takes its time with it (over an
 * idle window a host's threads stay). Without schedstat (a kernel built
 * without it): utime + stime of the process. Throws if the process is gone.
 */
export function processCpuNs(pid: number): number {
  let total = 0;
  let tasks: string[];
  try {
    tasks = readdirSync(`/proc/${pid}/task`);
  } catch {
    throw new Error(`process ${pid} is gone`);
  }
  for (const tid of tasks) {
    let schedstat: string;
    try {
      schedstat = readFileSync(`/proc/${pid}/task/${tid}/schedstat`, "utf8");
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT" && tid === tasks[0] && procStatFields(pid) !== null) return processCpuNsFromTicks(pid);
      continue; // the thread exited since the listing
    }
    total += Number(schedstat.split(" ")[0]);
  }
  return total;
}

function processCpuNsFromTicks(pid: number): number {
  const fields = procStatFields(pid);
  if (fields === null) throw new Error(`process ${pid} is gone`);
  return ((Number(fields[14 - 3]) + Number(fields[15 - 3])) * 1e9) / CLOCK_TICKS_PER_S; // utime, stime
}
