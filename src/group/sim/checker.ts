/**
 * Invariant checkers for simulated runs (DESIGN.md "Invariants"). They judge
 * from ground truth the simulator keeps outside the protocol core: the model
 * VMs' states, the driver's own epoch counts, what actually left each host.
 *
 *   inv1 output commit: an output of epoch e is released only once cut e
 *        committed (every member's backup verified to hold it); a released
 *        output is never changed or taken back (the sink stream per member is
 *        duplicate-free and gap-free, and equals the final history's outputs)
 *   inv2 consistent cut: at every committed cut e, every message a member's
 *        checkpoint e delivered was sent in sender epoch <= e and is in the
 *        sender's checkpoint e
 *   inv3 exactly once: in the final states, every message sent was delivered
 *        once, and every delivered message was sent
 *   inv6 a member whose primary and backup both survived a crash moves no
 *        memory (no image) during that recovery
 *   liveness: after the last crash the group commits new cuts and quiesces
 */
import type { OutputRecord, Rank } from "../protocol.js";
import type { VmState } from "./model-vm.js";

export type Invariant = "inv1" | "inv2" | "inv3" | "inv6" | "liveness" | "sanity";

export interface Violation {
  invariant: Invariant;
  message: string;
}

const VIOLATIONS_KEPT_MAX = 50;

interface SentInfo {
  from: Rank;
  to: Rank;
  /** Sender VM's epoch at the send (driver's count). */
  s: number;
}

interface Episode {
  /** Members with both replicas alive after the crash. */
  keptBoth: Set<Rank>;
  /** Incarnation at the crash: the episode ends at a reprotected notice of a newer one. */
  inc: number;
}

export class Checker {
  readonly violations: Violation[] = [];
  private readonly sent = new Map<string, SentInfo>();
  private readonly outputs = new Map<string, { rank: Rank; epoch: number }>();
  /** Highest cut verified committed. */
  committed = 0;
  /** Released output per member, by sequence number - 1. */
  readonly sinks: string[][];
  readonly imageBytes: number[];
  private episode: Episode | null = null;
  releasedRecords = 0;

  constructor(private readonly size: number) {
    this.sinks = Array.from({ length: size }, () => []);
    this.imageBytes = new Array<number>(size).fill(0);
  }

  fail(invariant: Invariant, message: string): void {
    if (this.violations.length < VIOLATIONS_KEPT_MAX) this.violations.push({ invariant, message });
  }

  has(invariant: Invariant): boolean {
    return this.violations.some((v) => v.invariant === invariant);
  }

  onSend(id: string, from: Rank, to: Rank, s: number): void {
    this.sent.set(id, { from, to, s });
  }

  onOutput(id: string, rank: Rank, epoch: number): void {
    this.outputs.set(id, { rank, epoch });
  }

  get messagesSent(): number {
    return this.sent.size;
  }

  get outputsMade(): number {
    return this.outputs.size;
  }

  // ---- invariant 1 -----------------------------------------------------------------------------

  onRelease(rank: Rank, records: readonly OutputRecord[]): void {
    const sink = this.sinks[rank];
    for (const r of records) {
      this.releasedRecords++;
      const id = r.payload as string;
      const info = this.outputs.get(id);
      if (!info || info.rank !== rank) {
        this.fail("sanity", `member ${rank} released unknown output ${id}`);
        continue;
      }
      if (info.epoch !== r.epoch) this.fail("sanity", `output ${id}: core says epoch ${r.epoch}, the VM was in ${info.epoch}`);
      if (info.epoch > this.committed) this.fail("inv1", `member ${rank} released output ${id} of epoch ${info.epoch}; committed cut is ${this.committed}`);
      if (r.seq <= sink.length) {
        if (sink[r.seq - 1] !== id) this.fail("inv1", `member ${rank} output #${r.seq} was ${sink[r.seq - 1]}, now ${id}: released output undone`);
      } else if (r.seq === sink.length + 1) {
        sink.push(id);
      } else {
        this.fail("inv1", `member ${rank} released output #${r.seq} after #${sink.length}: gap`);
      }
    }
  }

  // ---- invariant 2 (and the commit itself) -------------------------------------------------------

  /**
   * Cut `cut` was committed. `checkpoints[rank]` is that member's checkpoint
   * `cut` (from its backup, or its primary if the backup host is gone; null
   * when unavailable); `missing` lists members whose live backup does not
   * hold the cut (a commit it should not have been).
   */
  onCommitted(cut: number, checkpoints: readonly (VmState | null)[], missing: readonly Rank[]): void {
    if (cut < this.committed) this.fail("inv1", `committed cut went back from ${this.committed} to ${cut}`);
    for (const rank of missing) this.fail("inv1", `cut ${cut} committed, but member ${rank}'s backup does not hold it`);
    this.committed = Math.max(this.committed, cut);
    for (let rank = 0; rank < this.size; rank++) {
      const cp = checkpoints[rank];
      if (!cp) continue;
      for (const key of cp.keys()) {
        if (!key.startsWith("recv:")) continue;
        const id = key.slice(5);
        const info = this.sent.get(id);
        if (!info) {
          this.fail("sanity", `member ${rank} received unknown message ${id}`);
          continue;
        }
        if (info.s > cut) this.fail("inv2", `cut ${cut}: member ${rank} delivered ${id}, sent by ${info.from} in epoch ${info.s} > ${cut}`);
        const sender = checkpoints[info.from];
        if (sender && !sender.has(`sent:${id}`)) this.fail("inv2", `cut ${cut}: member ${rank} delivered ${id}, which ${info.from}'s checkpoint ${cut} never sent (orphan)`);
      }
    }
  }

  // ---- invariant 6 -------------------------------------------------------------------------------

  onCrash(keptBoth: Set<Rank>, inc: number): void {
    this.episode = { keptBoth, inc };
  }

  onImage(rank: Rank, bytes: number): void {
    this.imageBytes[rank] += bytes;
    if (this.episode?.keptBoth.has(rank)) this.fail("inv6", `member ${rank} kept both replicas, yet ${bytes} bytes of memory moved in recovery`);
  }

  onReprotected(inc: number): void {
    if (this.episode && inc > this.episode.inc) this.episode = null;
  }

  // ---- invariant 3 and the final output stream ---------------------------------------------------

  /** `states[rank]`: the final state of each member's (unique, live) primary. */
  final(states: readonly VmState[]): void {
    for (let rank = 0; rank < this.size; rank++) {
      const state = states[rank];
      for (const [key, value] of state) {
        if (key.startsWith("sent:")) {
          const id = key.slice(5);
          const to = value as number;
          const got = states[to].get(`recv:${id}`);
          if (got !== 1) this.fail("inv3", `message ${id} from ${rank} to ${to} delivered ${got ?? 0} times`);
        } else if (key.startsWith("recv:")) {
          const id = key.slice(5);
          const info = this.sent.get(id);
          if (!info || states[info.from].get(`sent:${id}`) !== rank) this.fail("inv3", `member ${rank} delivered ${id}, which no surviving sender state sent to it`);
          else if (value !== 1) this.fail("inv3", `member ${rank} delivered ${id} ${value} times`);
        }
      }
      const outs = state.get("outs") as number;
      const sink = this.sinks[rank];
      if (sink.length !== outs) this.fail("inv1", `member ${rank}: ${outs} outputs in its final history, ${sink.length} released`);
      for (let k = 1; k <= Math.min(outs, sink.length); k++) {
        if (state.get(`out:${k}`) !== sink[k - 1]) {
          this.fail("inv1", `member ${rank}: released output #${k} ${sink[k - 1]} is not the history's ${String(state.get(`out:${k}`))}`);
          break;
        }
      }
    }
  }
}
