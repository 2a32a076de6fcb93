/**
 * Replays recordings of real hosts' group cores (src/core/recording.ts,
 * written by hosts started with --record-core-events) through the core, and
 * checks them: every event must give exactly the recorded actions (the
 * daemon really drives this code, and it is deterministic), and across all
 * hosts' recordings the protocol-level invariants hold:
 *
 *   inv1 output commit: every VM step that releases output of epoch e does
 *        so for a cut the leader committed after every member's backup
 *        staged it (vm mode: after the member's own backup staged it), or
 *        for a recovery cut
 *   inv5 one primary per VM per incarnation
 *   inv6 a recovery ships an image only to a member whose backup changed
 *
 * Message-level invariants (2, 3) live in the VM threads, not in the core's
 * events: the simulator (src/sim/simulator.ts) checks them on model VMs, and
 * the multi-process tests on the guests' own output.
 */
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type { CoreAction, CoreEvent, Notice } from "../core/events.js";
import { GroupCore } from "../core/node.js";
import { RECORDING_VERSION, recordingText, type RecordingLine } from "../core/recording.js";
import type { Epoch, HostId, Incarnation, ProtectionRecord, Rank } from "../core/types.js";

export interface ReplayMismatch {
  file: string;
  step: number;
  event: string;
  recorded: string;
  replayed: string;
}

export interface ReplayViolation {
  invariant: "inv1" | "inv5" | "inv6";
  file: string;
  step: number;
  message: string;
}

export interface ReplayReport {
  files: number;
  steps: number;
  recoveries: number;
  commits: number;
  releases_checked: number;
  mismatches: ReplayMismatch[];
  violations: ReplayViolation[];
}

const KEPT_MAX = 20;

/** Reads every `*.jsonl` recording in `dir` (a last line cut short by a kill -9 is dropped). */
export function readRecordings(dir: string): Map<string, RecordingLine[]> {
  const out = new Map<string, RecordingLine[]>();
  for (const name of readdirSync(dir).filter((n) => n.endsWith(".jsonl")).sort()) {
    const lines: RecordingLine[] = [];
    for (const text of readFileSync(join(dir, name), "utf8").split("\n")) {
      if (!text) continue;
      try {
        lines.push(JSON.parse(text) as RecordingLine);
      } catch {
        break; // the line the host was writing when it died
      }
    }
    out.set(name, lines);
  }
  return out;
}

interface Release {
  file: string;
  step: number;
  group: string;
  mode: string;
  inc: Incarnation;
  rank: Rank;
  epoch: Epoch;
}

export function replay(recordings: ReadonlyMap<string, RecordingLine[]>): ReplayReport {
  const report: ReplayReport = { files: recordings.size, steps: 0, recoveries: 0, commits: 0, releases_checked: 0, mismatches: [], violations: [] };
  const violation = (v: ReplayViolation) => report.violations.length < KEPT_MAX && report.violations.push(v);
  /**
   * What may release output: `group/inc/cut` once a leader committed the cut after every ack or
   * a recovery chose it; vm mode: `group/inc/rank@epoch` once the member's backup staged it.
   */
  const releasable = new Set<string>();
  /** Members whose primary and backup both survived a decision: `group/inc/rank`. */
  const keptBoth = new Set<string>();
  const releases: Release[] = [];
  /** (group, inc, rank) → host running its primary. */
  const primaries = new Map<string, { host: HostId; file: string }>();
  const primary = (file: string, step: number, group: string, inc: Incarnation, rank: Rank, host: HostId) => {
    const key = `${group}/${inc}/${rank}`;
    const seen = primaries.get(key);
    if (seen && seen.host !== host) violation({ invariant: "inv5", file, step, message: `${group} rank ${rank} has primaries on ${seen.host} and ${host} in incarnation ${inc}` });
    else primaries.set(key, { host, file });
  };

  for (const [file, lines] of recordings) {
    const start = lines[0];
    if (!start || start.kind !== "start" || start.v !== RECORDING_VERSION) {
      report.mismatches.push({ file, step: 0, event: "start", recorded: JSON.stringify(start ?? null).slice(0, 200), replayed: "a start line of this version" });
      continue;
    }
    const core = start.made === "joined" ? GroupCore.joined(start.options) : GroupCore.deployed(start.options);
    const host = start.options.host;
    let record: ProtectionRecord = start.options.record;
    const group = record.group;
    if (start.made === "deployed") record.placement.forEach((p, rank) => p.primary === host && primary(file, 0, group, record.incarnation, rank, host));
    /** Acks the leader here received, per incarnation and epoch: ranks staged. */
    const staged = new Map<string, Set<Rank>>();
    const ack = (inc: Incarnation, epoch: Epoch, rank: Rank) => {
      const key = `${inc}/${epoch}`;
      if (!staged.has(key)) staged.set(key, new Set());
      staged.get(key)!.add(rank);
    };
    /** Stage steps of backups here: their `done` is a local ack (the core hands the `staged` frame to itself). */
    const stageSteps = new Map<number, { inc: Incarnation; epoch: Epoch; rank: Rank }>();
    for (let i = 1; i < lines.length; i++) {
      const line = lines[i];
      if (line.kind !== "step") continue;
      report.steps++;
      const event = line.event as CoreEvent;
      const inc = core.incarnation;
      const actions = core.handle(event);
      const got = recordingText({ kind: "step", event, actions });
      const want = recordingText(line);
      if (got !== want && report.mismatches.length < KEPT_MAX) {
        report.mismatches.push({ file, step: i, event: event.type, recorded: JSON.stringify(line.actions).slice(0, 400), replayed: JSON.stringify(actions).slice(0, 400) });
      }
      if (event.type === "done" && event.ok && stageSteps.has(event.id)) {
        const st = stageSteps.get(event.id)!;
        ack(st.inc, st.epoch, st.rank);
      }
      if (event.type === "frame" && event.frame.k === "staged") {
        ack(event.frame.inc, event.frame.e, event.frame.rank);
        // vm mode: the member's own backup staged it: that checkpoint may commit.
        if (record.mode === "vm") releasable.add(`${group}/${event.frame.inc}/${event.frame.rank}@${event.frame.e}`);
      }
      if (event.type === "frame" && event.frame.k === "recover" && core.incarnation === event.frame.inc) record = event.frame.record;
      for (const a of actions) observe(a, file, i, inc);
    }

    function observe(a: CoreAction, file: string, step: number, inc: Incarnation): void {
      if (a.type === "notify") return notice(a.notice, file, step);
      if (a.type === "backup" && a.step.op === "stage") stageSteps.set(a.id, { inc, epoch: a.step.epoch, rank: a.rank });
      if (a.type !== "vm") return;
      const s = a.step;
      if (s.op === "commit") releases.push({ file, step, group, mode: record.mode, inc, rank: a.rank, epoch: s.epoch });
      if (s.op === "capture_to" && s.commit) releases.push({ file, step, group, mode: record.mode, inc, rank: a.rank, epoch: s.commit.epoch });
      if (s.op === "restore") {
        primary(file, step, group, s.inc, a.rank, host);
        if (s.cut !== null) releasable.add(`${group}/${s.inc}/${s.cut}`);
      }
    }

    function notice(n: Notice, file: string, step: number): void {
      if (n.kind === "committed") {
        report.commits++;
        const acks = staged.get(`${n.inc}/${n.cut}`);
        if (!acks || acks.size < record.size) {
          violation({ invariant: "inv1", file, step, message: `${group}: cut ${n.cut} committed in incarnation ${n.inc} with ${acks?.size ?? 0} of ${record.size} backups' acks` });
        }
        releasable.add(`${group}/${n.inc}/${n.cut}`);
      }
      if (n.kind === "decided") {
        const before = record;
        n.record.placement.forEach((p, rank) => {
          // A member whose primary and backup both survived keeps both, where they were.
          const kept = before.placement[rank].primary === p.primary && before.placement[rank].backup === p.backup;
          if (kept) keptBoth.add(`${group}/${n.inc}/${rank}`);
        });
        record = n.record;
      }
      if (n.kind === "cut_chosen") {
        report.recoveries++;
        for (const rank of n.images) {
          if (keptBoth.has(`${group}/${n.inc}/${rank}`)) violation({ invariant: "inv6", file, step, message: `${group}: recovery of incarnation ${n.inc} ships an image to rank ${rank}, whose primary and backup both survived` });
        }
        if (n.cut !== null) releasable.add(`${group}/${n.inc}/${n.cut}`);
      }
    }
  }

  // Output released by a commit step must be of a cut that could be released (see inv1 above).
  for (const r of releases) {
    report.releases_checked++;
    const cut = `${r.group}/${r.inc}/${r.epoch}`;
    const ok = r.mode === "none" || releasable.has(cut) || (r.mode === "vm" && releasable.has(`${r.group}/${r.inc}/${r.rank}@${r.epoch}`));
    if (!ok) violation({ invariant: "inv1", file: r.file, step: r.step, message: `${r.group} rank ${r.rank} releases output of epoch ${r.epoch} in incarnation ${r.inc}, a cut nobody committed` });
  }
  return report;
}
