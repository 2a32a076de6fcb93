/**
 * The embedded store's watch: the kernel says when a file in the store
 * directory changes (inotify on Linux, through `fs.watch`), and the watch
 * looks again only then, or when a lease that a watched key lives by is due
 * to lapse. Polling instead (a list every 250 ms: a directory read, then a
 * file read per record and per lease, each through libuv's thread pool) cost
 * each host of an idle local cluster about 0.6 % of a core for nothing.
 *
 * What makes a watched prefix change, and how each is seen:
 *   - a record under the prefix written (put, cas, delete): its file
 *     `<enc>.json` is renamed into place, an event with its name;
 *   - a lease revoked: its file `<id>.lease` removed, a "rename" event with
 *     its name (the watch checks whether the file is still there rather than
 *     listing again); a renewal moves only the file's modification time, a
 *     "change" event the watch ignores;
 *   - a lease lapsing: no file changes, so a timer runs at the earliest
 *     expiry among the leases the last listing saw (renewed meanwhile, the
 *     listing finds the same keys and the timer moves on).
 * If the directory cannot be watched (no inotify instances left, a file
 * system without notifications) the watch falls back to polling.
 */
import { watch as fsWatch, type FSWatcher } from "node:fs";
import * as fsp from "node:fs/promises";
import * as path from "node:path";
import { type CoordinationStore, pollingWatch, type Watch } from "./store.js";

/** One look at the watched prefix. */
export interface Scan {
  /** Changes exactly when the prefix's keys or versions do. */
  signature: string;
  /** The leases the listed keys live by, with the wall-clock time each lapses at. */
  leases: Map<string, number>;
}

export interface FileWatchSource extends Pick<CoordinationStore, "list"> {
  dir: string;
  /** File-name prefix of the watched records (`hosts~` for `hosts/`). */
  record_prefix: string;
  scan(): Promise<Scan>;
}

export function fileWatch(source: FileWatchSource, prefix: string, onChange: () => void): Watch {
  let closed = false;
  let last: string | null = null;
  let leases = new Map<string, number>();
  let busy = false;
  let again = false;
  let expiryTimer: NodeJS.Timeout | null = null;

  // One look at a time; a change seen during a look is looked at once it ends (never dropped).
  const look = (): void => {
    if (closed) return;
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    source
      .scan()
      .then(
        (scan) => {
          if (closed) return;
          if (scan.signature !== last) onChange(); // the first look too: the watch is in place
          last = scan.signature;
          leases = scan.leases;
          armExpiry();
        },
        () => undefined, // the store's directory away: the host's slow re-read reports it
      )
      .finally(() => {
        busy = false;
        if (again) {
          again = false;
          look();
        }
      });
  };

  const armExpiry = (): void => {
    if (expiryTimer) clearTimeout(expiryTimer);
    expiryTimer = null;
    let next = Infinity;
    for (const at of leases.values()) next = Math.min(next, at);
    if (next === Infinity) return;
    expiryTimer = setTimeout(look, Math.max(0, next - Date.now()) + 1);
    expiryTimer.unref();
  };

  const leaseGone = (id: string): void => {
    fsp.access(path.join(source.dir, `${id}.lease`)).then(
      () => undefined, // renewed: the same keys, a later expiry the timer finds when it runs
      () => look(),
    );
  };

  let watcher: FSWatcher;
  try {
    watcher = fsWatch(source.dir, { persistent: false }, (event, name) => {
      if (closed) return;
      if (name === null) return look(); // the kernel did not say which file: assume it mattered
      const file = String(name);
      if (file.startsWith(source.record_prefix) && file.endsWith(".json")) return look();
      if (file.endsWith(".lease") && event === "rename") {
        const id = file.slice(0, -".lease".length);
        if (leases.has(id)) leaseGone(id);
      }
    });
  } catch {
    return pollingWatch(source, prefix, onChange);
  }
  let fallback: Watch | null = null;
  watcher.on("error", () => {
    // Notifications stopped (the directory removed, a queue overflow): poll from here on.
    watcher.close();
    if (!closed && !fallback) fallback = pollingWatch(source, prefix, onChange);
  });
  look();
  return {
    close: () => {
      closed = true;
      watcher.close();
      fallback?.close();
      if (expiryTimer) clearTimeout(expiryTimer);
    },
  };
}
