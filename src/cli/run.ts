/**
 * `cohort run <guest>`: one VM protected by an in-process backup replica,
 * checkpointed every interval, its output released only at commit, and (with
 * --failover-at-ms) its primary thread killed and the backup promoted.
 */
import { loadGuest } from "../guest/load.js";
import { LocalPair, type EpochReport } from "../protect/local-pair.js";
import { DEFAULT_LIMITS } from "../vm/machine.js";

export interface RunOptions {
  interval_ms: number;
  duration_ms: number;
  failover_at_ms: number | null;
  json: boolean;
  quiet: boolean;
}

export interface RunSummary {
  guest: string;
  epochs: number;
  released: number;
  output_contiguous: boolean;
  pause_us_p50: number;
  pause_us_max: number;
  commit_ms_p50: number;
  failover: { cut: number; promote_ms: number } | null;
}

export async function runGuest(guestName: string, options: RunOptions, write: (line: string) => void): Promise<RunSummary> {
  const guest = await loadGuest(guestName);
  const epochs: EpochReport[] = [];
  let released = 0;
  let contiguous = true;
  let lastSeq = 0;
  const pair = await LocalPair.start(
    guest,
    { rank: 0, size: 1, limits: DEFAULT_LIMITS, timers: "auto" },
    {
      onRelease: (records) => {
        for (const r of records) {
          contiguous &&= r.seq === lastSeq + 1;
          lastSeq = r.seq;
          released++;
          if (!options.json && !options.quiet) write(Buffer.from(r.bytes).toString().replace(/\n$/, ""));
        }
      },
      onEpoch: (report) => epochs.push(report),
    },
  );
  const started = performance.now();
  let failover: RunSummary["failover"] = null;
  try {
    while (performance.now() - started < options.duration_ms) {
      await sleep(options.interval_ms);
      if (options.failover_at_ms !== null && !failover && performance.now() - started >= options.failover_at_ms) {
        failover = await pair.failover();
        if (!options.json) write(`-- primary lost; backup promoted from cut ${failover.cut} in ${failover.promote_ms.toFixed(1)} ms`);
        continue;
      }
      await pair.checkpoint();
    }
  } finally {
    await pair.stop();
  }
  const pauses = epochs.map((e) => e.pause_us).sort((a, b) => a - b);
  const commits = epochs.map((e) => e.commit_ms).sort((a, b) => a - b);
  return {
    guest: guestName,
    epochs: epochs.length,
    released,
    output_contiguous: contiguous,
    pause_us_p50: Number((pauses[Math.floor(pauses.length / 2)] ?? 0).toFixed(1)),
    pause_us_max: Number((pauses[pauses.length - 1] ?? 0).toFixed(1)),
    commit_ms_p50: Number((commits[Math.floor(commits.length / 2)] ?? 0).toFixed(2)),
    failover,
  };
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
