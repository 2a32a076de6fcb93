/**
 * The primary side of one group member, sans I/O: stamps, logs and transmits
 * the guest's group messages; holds received ones until the consistent-cut
 * rule allows delivery; captures on `end-epoch`; releases output, trims the
 * sender log and relays the commit to the backup on `commit`; freezes,
 * rolls back in place and re-sends its log during recovery.
 *
 * Checkpointed state (travels in every delta as a RuntimeCheckpoint): send
 * sequence numbers, sender log, delivered vector, unreleased output. Not
 * checkpointed: the pending queue (messages received, not delivered — after
 * a rollback the senders re-send whatever the restored state lacks) and the
 * transmit cursors.
 *
 * Undo: the member keeps its RuntimeCheckpoint at every cut from the oldest
 * one it may still be asked to reach up to the newest captured one (the VM
 * keeps its memory undo logs for the same range, `vm.commit`/`vm.rollback`).
 */
import { assert } from "../util/assert.js";
import {
  OUTPUT_PENDING_MAX,
  PENDING_PER_CHANNEL_MAX,
  SENDER_LOG_PER_CHANNEL_MAX,
  UNDO_CUTS_MAX,
  send,
  type CoreContext,
  type Effect,
  type Epoch,
  type GroupMessage,
  type Incarnation,
  type LogEntry,
  type Opaque,
  type OutputRecord,
  type Rank,
  type ReplicaReport,
  type RuntimeCheckpoint,
} from "./protocol.js";

type GroupMsg = Extract<GroupMessage, { kind: "group" }>;

/** running: executing epoch `epoch`. frozen: stopped by a recovery, state untouched. rolled-back: at the recovery cut, waiting for `resume`. */
export type MemberState = "running" | "frozen" | "rolled-back";

export interface MemberStatus {
  rank: Rank;
  state: MemberState;
  epoch: Epoch;
  committed: Epoch;
  /** Sender-log entries over all channels. */
  logged: number;
  /** Received, undelivered messages over all channels. */
  pending: number;
  /** Unreleased output records. */
  unreleased: number;
}

export class MemberPrimary {
  private state: MemberState;
  /** The epoch being executed (checkpoint `epoch` ends it). */
  private epoch: Epoch;
  /** Highest committed cut this member has heard of. */
  private committed: Epoch;
  private sendSeq: number[] = [];
  private log: LogEntry[][] = [];
  private delivered: number[] = [];
  private output: OutputRecord[] = [];
  private outputSeq = 0;
  /** Undo: runtime state at each reachable cut, oldest first. */
  private readonly cuts = new Map<Epoch, RuntimeCheckpoint>();
  /** Per sender: received, undelivered messages by sequence number. */
  private readonly pending: Map<number, GroupMsg>[];
  /** Per receiver: next sequence number to transmit; null until the receiver said what it has (after a rollback). */
  private readonly cursor: (number | null)[];
  /** Cut of the image requested from the VM (a new backup waits for it). */
  private imageCut: Epoch | null = null;

  private constructor(
    private readonly ctx: CoreContext,
    readonly rank: Rank,
    at: RuntimeCheckpoint,
    committed: Epoch,
    state: MemberState,
  ) {
    const n = ctx.config.size;
    this.restore(at);
    this.cuts.set(at.cut, at);
    this.epoch = at.cut + 1;
    this.committed = committed;
    this.state = state;
    this.pending = Array.from({ length: n }, () => new Map<number, GroupMsg>());
    this.cursor = state === "running" ? this.sendSeq.map((s) => s + 1) : new Array<number | null>(n).fill(null);
  }

  /** A freshly deployed member at cut 0, running epoch 1. */
  static boot(ctx: CoreContext, rank: Rank, at: RuntimeCheckpoint): MemberPrimary {
    assert(at.cut === 0, "a member boots at cut 0");
    return new MemberPrimary(ctx, rank, at, 0, "running");
  }

  /**
   * A promoted backup: the VM is at recovery cut `at.cut` (paused). Like a
   * rolled-back member it announces its delivered vector and waits for `resume`.
   */
  static promoted(ctx: CoreContext, rank: Rank, at: RuntimeCheckpoint, committed: Epoch, out: Effect[]): MemberPrimary {
    assert(committed <= at.cut, "a promoted member is at or above the committed cut");
    const member = new MemberPrimary(ctx, rank, at, committed, "rolled-back");
    member.announce(out);
    return member;
  }

  get memberState(): MemberState {
    return this.state;
  }

  get running(): boolean {
    return this.state === "running";
  }

  status(): MemberStatus {
    let logged = 0;
    let pending = 0;
    for (const l of this.log) logged += l.length;
    for (const p of this.pending) pending += p.size;
    return { rank: this.rank, state: this.state, epoch: this.epoch, committed: this.committed, logged, pending, unreleased: this.output.length };
  }

  canSend(to: Rank): boolean {
    return this.state === "running" && to !== this.rank && to >= 0 && to < this.ctx.config.size && this.log[to].length < SENDER_LOG_PER_CHANNEL_MAX;
  }

  canOutput(): boolean {
    return this.state === "running" && this.output.length < OUTPUT_PENDING_MAX;
  }

  // ---- the guest ---------------------------------------------------------------------------

  onVmSend(to: Rank, payload: Opaque, out: Effect[]): void {
    assert(this.canSend(to), `member ${this.rank}: send to ${to} while it may not (state ${this.state}, log full or bad rank)`);
    const seq = ++this.sendSeq[to];
    this.log[to].push(Object.freeze({ to, seq, s: this.epoch, payload }));
    this.flush(to, out);
  }

  onVmOutput(payload: Opaque, out: Effect[]): void {
    assert(this.canOutput(), `member ${this.rank}: output while it may not (state ${this.state} or queue full)`);
    const record: OutputRecord = Object.freeze({ seq: ++this.outputSeq, epoch: this.epoch, payload });
    this.output.push(record);
    if (this.ctx.config.fault === "release-early") out.push({ type: "release", rank: this.rank, records: [record] });
  }

  // ---- epochs --------------------------------------------------------------------------------

  onEndEpoch(e: Epoch, out: Effect[]): void {
    assert(this.state === "running", `member ${this.rank}: end-epoch ${e} while ${this.state}`);
    assert(e === this.epoch, `member ${this.rank}: end-epoch ${e} while in epoch ${this.epoch} (epochs end in order)`);
    this.cuts.set(e, this.snapshot(e));
    assert(this.cuts.size <= UNDO_CUTS_MAX, `member ${this.rank}: ${this.cuts.size} undo cuts (max ${UNDO_CUTS_MAX})`);
    out.push({ type: "vm.capture", rank: this.rank, inc: this.ctx.inc, epoch: e });
    this.epoch = e + 1;
    // Held messages sent in epoch e+1 may now be delivered.
    this.deliverAll(out);
  }

  /** The VM's delta of checkpoint `e`: ship it with the runtime state to the backup. */
  onCaptured(inc: Incarnation, e: Epoch, payload: Opaque, bytes: number, out: Effect[]): void {
    const runtime = this.cuts.get(e);
    if (inc !== this.ctx.inc || !runtime || this.state !== "running") return; // overtaken by a recovery
    const backup = this.ctx.record.placement[this.rank].backup;
    if (backup === null) return; // degraded: nothing commits until a backup exists
    send(out, backup, { kind: "delta", inc, rank: this.rank, epoch: e, runtime, payload, bytes });
  }

  /** Cut `c` committed: release its output, drop undo below it, trim the log, tell the backup. */
  onCommit(c: Epoch, delivered: readonly (readonly number[])[], out: Effect[]): void {
    if (c <= this.committed) return;
    assert(this.cuts.has(c), `member ${this.rank}: commit of cut ${c}, which it cannot reach (cuts ${[...this.cuts.keys()]})`);
    this.committed = c;
    for (const k of this.cuts.keys()) if (k < c) this.cuts.delete(k);
    out.push({ type: "vm.commit", rank: this.rank, epoch: c });
    const ready = this.output.filter((r) => r.epoch <= c);
    if (ready.length) {
      this.output = this.output.filter((r) => r.epoch > c);
      out.push({ type: "release", rank: this.rank, records: ready });
    }
    for (let j = 0; j < this.ctx.config.size; j++) {
      if (j === this.rank) continue;
      const d = delivered[j][this.rank];
      assert(d <= this.sendSeq[j], `consistent cut: ${j} delivered seq ${d} from ${this.rank}, which sent only ${this.sendSeq[j]}`);
      const l = this.log[j];
      while (l.length && l[0].seq <= d) l.shift();
      const c2 = this.cursor[j];
      assert(c2 === null || c2 > d, `member ${this.rank}: ${j} delivered seq ${d}, never transmitted (cursor ${c2})`);
    }
    const backup = this.ctx.record.placement[this.rank].backup;
    if (backup !== null) send(out, backup, { kind: "backup-commit", inc: this.ctx.inc, rank: this.rank, cut: c });
    if (this.ctx.config.mode === "vm") for (let j = 0; j < this.ctx.config.size; j++) this.flush(j, out);
  }

  // ---- group messages ------------------------------------------------------------------------

  onGroup(m: GroupMsg, out: Effect[]): void {
    assert(m.to === this.rank && m.from !== this.rank, "group message routed to its receiver");
    if (m.seq <= this.delivered[m.from]) return; // duplicate (a re-send)
    const q = this.pending[m.from];
    if (!q.has(m.seq)) {
      assert(q.size < PENDING_PER_CHANNEL_MAX, `member ${this.rank}: more than ${PENDING_PER_CHANNEL_MAX} pending from ${m.from}`);
      q.set(m.seq, m);
    }
    if (this.state === "running") this.deliverFrom(m.from, out);
  }

  /** Receiver `receiver`'s restored state delivered up to `seq` from us: re-send the log above it. */
  onDelivered(receiver: Rank, seq: number, out: Effect[]): void {
    assert(this.state !== "frozen", "delivered announcements wait until the sender rolled back");
    assert(seq <= this.sendSeq[receiver], `consistent cut: ${receiver} restored delivered seq ${seq} from ${this.rank}, whose restored state sent only ${this.sendSeq[receiver]}`);
    const head = this.log[receiver].length ? this.log[receiver][0].seq : this.sendSeq[receiver] + 1;
    assert(head <= seq + 1, `exactly once: ${this.rank}'s log starts at ${head}, ${receiver} has only ${seq}`);
    this.cursor[receiver] = this.ctx.config.fault === "skip-resend" ? this.sendSeq[receiver] + 1 : seq + 1;
    this.flush(receiver, out);
  }

  private deliverAll(out: Effect[]): void {
    for (let i = 0; i < this.ctx.config.size; i++) if (this.pending[i].size) this.deliverFrom(i, out);
  }

  /** Delivers from `from` in sequence order while the cut rule allows (s <= r). */
  private deliverFrom(from: Rank, out: Effect[]): void {
    const q = this.pending[from];
    for (;;) {
      const next = this.delivered[from] + 1;
      const m = q.get(next);
      if (!m) return;
      if (m.s > this.epoch && this.ctx.config.fault !== "deliver-future") return; // wait until we enter epoch s
      assert(m.inc === this.ctx.inc, "only current-incarnation messages are delivered");
      q.delete(next);
      this.delivered[from] = next;
      out.push({ type: "vm.deliver", rank: this.rank, from, seq: next, payload: m.payload });
    }
  }

  /** Transmits the log to `to` from its cursor (in `vm` mode only what the committed cut covers). */
  private flush(to: Rank, out: Effect[]): void {
    const c = this.cursor[to];
    if (c === null || to === this.rank) return;
    const l = this.log[to];
    if (!l.length) return;
    let i = c - l[0].seq;
    assert(i >= 0, `exactly once: cursor ${c} to ${to} behind the log head ${l[0].seq}`);
    const host = this.ctx.record.placement[to].primary;
    let next = c;
    for (; i < l.length; i++) {
      const e = l[i];
      if (this.ctx.config.mode === "vm" && e.s > this.committed) break;
      send(out, host, { kind: "group", inc: this.ctx.inc, from: this.rank, to, s: e.s, seq: e.seq, payload: e.payload });
      next = e.seq + 1;
    }
    this.cursor[to] = next;
  }

  // ---- recovery ------------------------------------------------------------------------------

  /** A recovery started (new incarnation adopted): stop, and say which cuts this copy can reach. */
  freeze(out: Effect[]): ReplicaReport {
    if (this.state === "running") out.push({ type: "vm.pause", rank: this.rank });
    this.state = "frozen";
    this.imageCut = null;
    return { rank: this.rank, role: "primary", reach: { lo: this.oldestCut(), hi: this.epoch - 1 }, committed: this.committed };
  }

  /** Rolls back in place to cut `cut`; no later recovery goes below it, so older undo goes too. */
  rollback(cut: Epoch, out: Effect[]): void {
    assert(this.state === "frozen", `member ${this.rank}: rollback while ${this.state}`);
    const at = this.cuts.get(cut);
    assert(at, `member ${this.rank}: cannot reach cut ${cut} (cuts ${[...this.cuts.keys()]})`);
    assert(cut >= this.committed, `output commit: rollback of ${this.rank} to ${cut} below committed ${this.committed}`);
    this.cuts.clear();
    this.cuts.set(cut, at);
    out.push({ type: "vm.rollback", rank: this.rank, epoch: cut });
    this.restore(at);
    this.epoch = cut + 1;
    for (const q of this.pending) q.clear();
    this.cursor.fill(null);
    this.state = "rolled-back";
    this.announce(out);
  }

  /** Asks the VM (paused at the recovery cut) for a full image, for a new backup. */
  requestImage(out: Effect[]): void {
    assert(this.state === "rolled-back", "an image is taken at the recovery cut, before resuming");
    this.imageCut = this.epoch - 1;
    out.push({ type: "vm.image", rank: this.rank, inc: this.ctx.inc, epoch: this.imageCut });
  }

  onImaged(inc: Incarnation, e: Epoch, payload: Opaque, bytes: number, out: Effect[]): void {
    if (inc !== this.ctx.inc || e !== this.imageCut) return;
    this.imageCut = null;
    const runtime = this.cuts.get(e);
    assert(runtime, `member ${this.rank}: image of cut ${e} without its runtime state`);
    const backup = this.ctx.record.placement[this.rank].backup;
    if (backup !== null) send(out, backup, { kind: "image", inc, rank: this.rank, epoch: e, runtime, payload, bytes });
  }

  resume(epoch: Epoch, out: Effect[]): void {
    assert(this.state === "rolled-back", `member ${this.rank}: resume while ${this.state}`);
    assert(epoch === this.epoch, `member ${this.rank}: resume at ${epoch}, restored epoch is ${this.epoch}`);
    this.state = "running";
    out.push({ type: "vm.resume", rank: this.rank });
    this.deliverAll(out);
  }

  /** Tells every sender what the restored state delivered from it. */
  private announce(out: Effect[]): void {
    for (let i = 0; i < this.ctx.config.size; i++) {
      if (i === this.rank) continue;
      send(out, this.ctx.record.placement[i].primary, { kind: "delivered", inc: this.ctx.inc, receiver: this.rank, sender: i, seq: this.delivered[i] });
    }
  }

  // ---- runtime state -------------------------------------------------------------------------

  private oldestCut(): Epoch {
    let lo = Infinity;
    for (const k of this.cuts.keys()) lo = Math.min(lo, k);
    return lo;
  }

  private snapshot(cut: Epoch): RuntimeCheckpoint {
    return Object.freeze({
      cut,
      sendSeq: [...this.sendSeq],
      log: this.log.map((l) => [...l]),
      delivered: [...this.delivered],
      output: [...this.output],
      outputSeq: this.outputSeq,
    });
  }

  private restore(at: RuntimeCheckpoint): void {
    const n = this.ctx.config.size;
    assert(at.sendSeq.length === n && at.log.length === n && at.delivered.length === n, "runtime state matches the group size");
    this.sendSeq = [...at.sendSeq];
    this.log = at.log.map((l) => [...l]);
    this.delivered = [...at.delivered];
    this.output = [...at.output];
    this.outputSeq = at.outputSeq;
  }
}
