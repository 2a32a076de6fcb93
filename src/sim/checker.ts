/**
 * The invariants of docs/PROTOCOL.md, checked at every step of a simulated
 * run from ground truth the simulator keeps outside the protocol core: the
 * model VMs' memories and checkpoints, what each backup actually holds, what
 * actually left each host (releases, images), the store's decisions.
 *
 *   inv1 output commit: output of epoch e leaves only once cut e committed
 *        (every member's backup verified to hold it; vm mode: the member's
 *        backup staged e) or is the recovery cut; released output never
 *        changes, repeats differently or skips a sequence number
 *   inv2 consistent cut: at every committed cut, nothing delivered was sent
 *        in a sender epoch after the cut or is missing from its sender's
 *        checkpoint (no orphan)
 *   inv3 exactly once: in the final states every message sent was delivered
 *        once, in order, and nothing else
 *   inv4 durability: with at most one failure, nothing released is lost
 *        (the final history holds it; no member is declared lost)
 *   inv5 one primary per VM per incarnation; a host declared failed releases
 *        nothing beyond the cut committed when it was declared, and nothing
 *        at all once fenced
 *   inv6 a member whose primary and backup both survived a failure moves no
 *        memory (no image) in that recovery
 *   liveness: after the last failure the group commits every epoch a member
 *        did something in, and every message and output gets through; or, when no copy of some member
 *        survived, the group halts naming exactly those members
 */
import type { Epoch, HostId, Incarnation, Mode, Rank } from "../core/types.js";
import type { GuestMemory } from "./model-vm.js";

export type Invariant = "inv1" | "inv2" | "inv3" | "inv4" | "inv5" | "inv6" | "liveness" | "sanity";

export interface Violation {
  invariant: Invariant;
  at_ms: number;
  message: string;
}

const VIOLATIONS_KEPT_MAX = 20;

/** A member's checkpoint as the checkers read it: history lengths (the histories themselves are the live memory's prefixes). */
export interface CheckpointView {
  sentLen: number[];
  recvLen: number[];
  outLen: number;
}

export class Checker {
  readonly violations: Violation[] = [];
  now_ms = 0;
  /** group mode: newest cut verified committed. */
  committed: Epoch = 0;
  /** Newest recovery cut chosen (its output is released by the restore steps). */
  private recoveryCut: Epoch = 0;
  private staleCommitted: Epoch = 0;
  /** vm mode: per member, newest checkpoint a backup staged. */
  private readonly durable: Epoch[];
  private readonly msgEpoch = new Map<number, Epoch>();
  /** Released output per member, by seq - 1 (ids). */
  readonly sinks: number[][];
  /** Per member: the outputs of its newest committed checkpoint; a later commit must extend it. */
  private readonly committedOut: number[][];
  private readonly declaredFailed = new Map<HostId, Epoch>();
  private readonly fenced = new Set<HostId>();
  /** Incarnation → members that kept both replicas at that failover decision. */
  private readonly keptBoth = new Map<Incarnation, Set<Rank>>();
  readonly imageBytes: number[];

  constructor(
    private readonly size: number,
    private readonly mode: Mode,
  ) {
    this.durable = new Array<number>(size).fill(0);
    this.sinks = Array.from({ length: size }, () => []);
    this.committedOut = Array.from({ length: size }, () => []);
    this.imageBytes = new Array<number>(size).fill(0);
  }

  /** Violations found, including those not kept. */
  count = 0;

  fail(invariant: Invariant, message: string): void {
    this.count++;
    if (this.violations.length < VIOLATIONS_KEPT_MAX) this.violations.push({ invariant, at_ms: Math.round(this.now_ms * 1000) / 1000, message });
  }

  get clean(): boolean {
    return this.count === 0;
  }

  has(invariant: Invariant): boolean {
    return this.violations.some((v) => v.invariant === invariant);
  }

  onSend(id: number, epoch: Epoch): void {
    this.msgEpoch.set(id, epoch);
  }

  // ---- inv1, inv5 (release) ------------------------------------------------------------------

  onRelease(host: HostId, rank: Rank, records: readonly { seq: number; id: number; epoch: Epoch }[]): void {
    const sink = this.sinks[rank];
    for (const r of records) {
      if (this.fenced.has(host)) this.fail("inv5", `host ${host} released output #${r.seq} of member ${rank} after it was fenced`);
      const failedAt = this.declaredFailed.get(host);
      // What the recovered group also releases (its recovery cut) is no harm; anything beyond is.
      if (failedAt !== undefined && this.mode === "group" && r.epoch > Math.max(failedAt, this.recoveryCut, this.staleCommitted)) {
        this.fail("inv5", `host ${host}, declared failed at committed cut ${failedAt}, released output #${r.seq} of member ${rank} (epoch ${r.epoch})`);
      }
      if (this.mode === "group" && r.epoch > Math.max(this.committed, this.recoveryCut, this.staleCommitted)) {
        this.fail("inv1", `member ${rank} released output #${r.seq} of epoch ${r.epoch}; committed cut is ${this.committed}`);
      }
      if (this.mode === "vm" && r.epoch > this.durable[rank]) this.fail("inv1", `member ${rank} released output #${r.seq} of epoch ${r.epoch}; its backup staged only ${this.durable[rank]}`);
      const known = this.committedOut[rank];
      if (r.seq <= known.length && known[r.seq - 1] !== r.id) this.fail("inv1", `member ${rank} released #${r.seq} = ${r.id}, but its committed history has ${known[r.seq - 1]}`);
      if (r.seq <= sink.length) {
        if (sink[r.seq - 1] !== r.id) this.fail("inv1", `member ${rank} output #${r.seq} was ${sink[r.seq - 1]}, now ${r.id}: released output changed`);
      } else if (r.seq === sink.length + 1) {
        sink.push(r.id);
      } else {
        this.fail("inv1", `member ${rank} released output #${r.seq} after #${sink.length}: gap`);
      }
    }
  }

  // ---- commits: inv1 (backups hold the cut), inv2 ---------------------------------------------

  /**
   * group mode: the leader committed cut `cut`. `views[rank]`: that member's
   * checkpoint `cut` with its memory (null when no live replica keeps it);
   * `missing`: members whose live backup does not hold the cut.
   */
  onCommitted(cut: Epoch, views: readonly (CheckpointView | null)[], memories: readonly (GuestMemory | null)[], missing: readonly string[]): void {
    if (cut < this.committed) this.fail("inv1", `committed cut went back from ${this.committed} to ${cut}`);
    for (const m of missing) this.fail("inv1", `cut ${cut} committed, but ${m}`);
    if (cut > this.committed) this.committed = cut;
    for (let r = 0; r < this.size; r++) {
      const v = views[r];
      const mem = memories[r];
      if (!v || !mem) continue;
      this.extendCommittedOutput(r, mem.outs, v.outLen);
      for (let s = 0; s < this.size; s++) {
        const n = v.recvLen[s];
        if (n === 0) continue;
        const last = mem.recv[s][n - 1];
        const sentIn = this.msgEpoch.get(last);
        if (sentIn === undefined) this.fail("sanity", `member ${r} delivered unknown message ${last}`);
        else if (sentIn > cut) this.fail("inv2", `cut ${cut}: member ${r} delivered message ${last} from ${s}, sent in epoch ${sentIn}`);
        const sv = views[s];
        const sm = memories[s];
        if (sv && sm && (sv.sentLen[r] < n || sm.sent[r][n - 1] !== last)) {
          this.fail("inv2", `cut ${cut}: member ${r} delivered ${n} messages from ${s}, whose checkpoint sent it ${sv.sentLen[r]} (orphan)`);
        }
      }
    }
  }

  /** A committed checkpoint's outputs are final: they must extend what earlier cuts committed. */
  private extendCommittedOutput(rank: Rank, outs: readonly number[], n: number): void {
    const known = this.committedOut[rank];
    const common = Math.min(known.length, n);
    if (common > 0 && known[common - 1] !== outs[common - 1]) this.fail("inv1", `member ${rank}: committed output #${common} changed from ${known[common - 1]} to ${outs[common - 1]}`);
    for (let k = known.length; k < n; k++) known.push(outs[k]);
    const sink = this.sinks[rank];
    if (sink.length && sink.length <= n && sink[sink.length - 1] !== outs[sink.length - 1]) {
      this.fail("inv1", `member ${rank}: released output #${sink.length} (${sink[sink.length - 1]}) is not in committed cut's history (${outs[sink.length - 1]})`);
    }
  }

  /** vm mode: member `rank`'s checkpoint `epoch` is staged on its backup (so it may commit). */
  onStaged(rank: Rank, epoch: Epoch): void {
    if (epoch > this.durable[rank]) this.durable[rank] = epoch;
  }

  /**
   * A leader paused past its own failover committed `cut` on its return, from
   * acks its incarnation got before: the output is the cut's, and the
   * simulator checks that the recovered group reaches the cut too.
   */
  onStaleCommit(cut: Epoch): void {
    if (cut > this.staleCommitted) this.staleCommitted = cut;
  }

  onRecoveryCut(cut: Epoch | null): void {
    if (cut !== null && cut > this.recoveryCut) this.recoveryCut = cut;
  }

  // ---- inv5, inv6 -----------------------------------------------------------------------------

  onDeclaredFailed(host: HostId): void {
    if (!this.declaredFailed.has(host)) this.declaredFailed.set(host, this.committed);
  }

  onFenced(host: HostId): void {
    this.fenced.add(host);
  }

  onDecided(inc: Incarnation, keptBoth: Set<Rank>): void {
    this.keptBoth.set(inc, keptBoth);
  }

  onImage(inc: Incarnation, rank: Rank, bytes: number): void {
    this.imageBytes[rank] += bytes;
    if (this.keptBoth.get(inc)?.has(rank)) this.fail("inv6", `member ${rank} kept both replicas at incarnation ${inc}, yet ${bytes} bytes of its memory moved`);
  }

  /** A primary of `rank` runs on `host` in incarnation `inc`; `others`: other live hosts running one in the same incarnation. */
  onRunning(rank: Rank, inc: Incarnation, host: HostId, others: readonly HostId[]): void {
    if (others.length) this.fail("inv5", `member ${rank} runs in incarnation ${inc} on ${host} and on ${others.join(", ")}`);
  }

  // ---- the end: inv3, inv4, final output ------------------------------------------------------

  /** `states[rank]`: the final memory of each member's one live primary. */
  final(states: readonly GuestMemory[], failures: number): void {
    for (let r = 0; r < this.size; r++) {
      for (let s = 0; s < this.size; s++) {
        const sent = states[s].sent[r];
        const got = states[r].recv[s];
        if (sent.length !== got.length) {
          this.fail("inv3", `member ${s} sent ${sent.length} messages to ${r}, which delivered ${got.length}`);
          continue;
        }
        for (let k = 0; k < sent.length; k++) {
          if (sent[k] !== got[k]) {
            this.fail("inv3", `channel ${s}>${r}: message #${k + 1} sent ${sent[k]}, delivered ${got[k]}`);
            break;
          }
        }
      }
      const outs = states[r].outs;
      const sink = this.sinks[r];
      const inv: Invariant = failures <= 1 ? "inv4" : "inv1";
      if (sink.length > outs.length) this.fail(inv, `member ${r}: ${sink.length} outputs released, ${outs.length} in its final history`);
      else if (sink.length < outs.length) this.fail("liveness", `member ${r}: ${outs.length - sink.length} outputs never released`);
      for (let k = 0; k < Math.min(outs.length, sink.length); k++) {
        if (outs[k] !== sink[k]) {
          this.fail(inv, `member ${r}: released output #${k + 1} ${sink[k]} is not the final history's ${outs[k]}`);
          break;
        }
      }
    }
  }
}
