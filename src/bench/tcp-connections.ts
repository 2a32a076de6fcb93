/**
 * TCP connections between processes of this machine, from Linux's own tables:
 * each process's socket inodes (/proc/<pid>/fd) and the established TCP
 * sockets of this network namespace (/proc/net/tcp, /proc/net/tcp6). A
 * loopback connection appears there twice, once per end; it is counted once,
 * under the pair of processes that own its two ends. What `cohort bench
 * scale` reports as the connections between hosts: the peer connections of
 * the hosts' main threads and the message paths of their VM threads alike
 * (every thread's sockets are the process's).
 */
import { readdirSync, readFileSync, readlinkSync } from "node:fs";

/** TCP state 01 in /proc/net/tcp: ESTABLISHED. */
const ESTABLISHED = "01";

interface TcpEnd {
  local: string;
  remote: string;
  inode: string;
}

/** Established TCP sockets of this network namespace (IPv4 and IPv6). */
function establishedSockets(): TcpEnd[] {
  const out: TcpEnd[] = [];
  for (const table of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    let text: string;
    try {
      text = readFileSync(table, "utf8");
    } catch {
      continue; // no IPv6 on this kernel
    }
    for (const line of text.split("\n").slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length < 10 || f[3] !== ESTABLISHED) continue;
      out.push({ local: f[1], remote: f[2], inode: f[9] });
    }
  }
  return out;
}

/** Socket inodes a live process holds open (empty if it is gone). */
function socketInodes(pid: number): string[] {
  let fds: string[];
  try {
    fds = readdirSync(`/proc/${pid}/fd`);
  } catch {
    return [];
  }
  const out: string[] = [];
  for (const fd of fds) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
      if (m) out.push(m[1]);
    } catch {
      // closed meanwhile
    }
  }
  return out;
}

export interface ConnectionCount {
  /** Connections whose two ends are held by two different processes of the set. */
  total: number;
  /** The most between one pair of the processes. */
  pair_max: number;
}

/**
 * Counts the established TCP connections between the given processes (by
 * pid; each connection once). A connection to a process outside the set, or
 * between two sockets of one process, is not counted.
 */
export function connectionsBetween(pids: readonly number[]): ConnectionCount {
  const owner = new Map<string, number>();
  for (const pid of pids) for (const inode of socketInodes(pid)) owner.set(inode, pid);
  const sockets = establishedSockets().filter((s) => owner.has(s.inode));
  const byEnd = new Map<string, number>();
  for (const s of sockets) byEnd.set(`${s.local}>${s.remote}`, owner.get(s.inode)!);
  const by_pair = new Map<string, number>();
  let total = 0;
  for (const s of sockets) {
    const mine = owner.get(s.inode)!;
    const theirs = byEnd.get(`${s.remote}>${s.local}`);
    // Each connection is seen from both ends: count it from the end with the lower local address.
    if (theirs === undefined || theirs === mine || s.local > s.remote) continue;
    const [a, b] = mine < theirs ? [mine, theirs] : [theirs, mine];
    by_pair.set(`${a}-${b}`, (by_pair.get(`${a}-${b}`) ?? 0) + 1);
    total++;
  }
  return { total, pair_max: Math.max(0, ...by_pair.values()) };
}
