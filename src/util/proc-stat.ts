/**
 * Linux's /proc/<pid>/stat (or /proc/<pid>/task/<tid>/stat), split into its
 * fields after the command name, which sits in parentheses and may contain
 * spaces and parentheses itself. Index 0 is field 3 (state) of proc(5):
 * field n is at index n - 3.
 */
import { readFileSync } from "node:fs";

/** Fields of `/proc/<of>/stat` after the command name (`of`: a pid, "self", "self/task/<tid>"), or null (no such process or thread, or no procfs). */
export function procStatFields(of: number | string): string[] | null {
  try {
    const stat = readFileSync(`/proc/${of}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  } catch {
    return null;
  }
}
