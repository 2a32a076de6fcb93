/**
 * The simulator's model VMs: what the daemon's VM threads do for the group
 * protocol core (src/core/events.ts VmStep, BackupStep, MembersStep), on a
 * tiny guest whose whole memory is a few append-only histories.
 *
 * The channel logic (stamps, sender log, delivered vector, consistent-cut
 * rule, marker decision, resendFor, trim) is the real one, src/core/channel.ts,
 * the same code VmCore runs; only the guest and the bytes are models.
 *
 * Guest memory: `sent[r]` = ids of the messages sent to rank r, in order;
 * `recv[s]` = ids delivered from rank s, in order; `outs` = ids of external
 * outputs (with the epoch of each); a counter. A checkpoint is the lengths of
 * those histories plus the channel record, so capture, rollback and deltas
 * cost what changed, not the whole state.
 */
import { Channels, type ChannelLimits, type ChannelRecord, type GroupMessage } from "../core/channel.js";
import type { Route } from "../core/frames.js";
import type { Epoch, Mode, Rank } from "../core/types.js";

export const MODEL_LIMITS: ChannelLimits = {
  message_bytes_max: 16,
  outbox_max: 64,
  sender_log_bytes_max: 256 * 48,
  pending_messages_max: 128,
  pending_bytes_max: 128 * 16,
};
/** Arrivals a frozen message path keeps until it runs (the daemon's inbox); beyond it the run is reported broken. */
export const INBOX_MAX = 4096;
/** Messages refused for now (pending full, newer incarnation), offered again after a capture or an incarnation. */
export const REFUSED_MAX = 1024;
/** Checkpoints a primary keeps to roll back to (committed..captured): a few in group mode, MEMBER_INFLIGHT_MAX + 2 in vm mode. */
export const UNDO_MAX = 32;

export interface GuestMemory {
  counter: number;
  sent: number[][];
  recv: number[][];
  outs: number[];
  outEpochs: number[];
}

interface Checkpoint {
  epoch: Epoch;
  counter: number;
  sentLen: number[];
  recvLen: number[];
  outLen: number;
  released: number;
  channels: ChannelRecord;
}

/** A sealed delta: what checkpoint `epoch` appended since checkpoint `epoch - 1`. */
export interface ModelDelta {
  epoch: Epoch;
  counter: number;
  sent: number[][];
  recv: number[][];
  outs: number[];
  outEpochs: number[];
  released: number;
  channels: ChannelRecord;
}

export interface ModelImage {
  epoch: Epoch;
  memory: GuestMemory;
  released: number;
  channels: ChannelRecord;
}

/** Bytes an image takes on the wire: the unit of "memory moved" (invariant 6). */
export function imageBytes(image: ModelImage): number {
  const m = image.memory;
  let n = m.outs.length * 2;
  for (const s of m.sent) n += s.length;
  for (const r of m.recv) n += r.length;
  return 64 + 8 * n;
}

export function emptyMemory(size: number): GuestMemory {
  return { counter: 0, sent: Array.from({ length: size }, () => []), recv: Array.from({ length: size }, () => []), outs: [], outEpochs: [] };
}

function copyMemory(m: GuestMemory): GuestMemory {
  return { counter: m.counter, sent: m.sent.map((x) => x.slice()), recv: m.recv.map((x) => x.slice()), outs: m.outs.slice(), outEpochs: m.outEpochs.slice() };
}

/** A detached channel record (the sender log's entries are immutable and may be shared). */
export function copyRecord(r: ChannelRecord): ChannelRecord {
  return {
    incarnation: r.incarnation,
    sent_seq: r.sent_seq.slice(),
    delivered: r.delivered.slice(),
    sender_log: r.sender_log.slice(),
    sender_log_bytes: r.sender_log_bytes,
    sender_log_trimmed: r.sender_log_trimmed.slice(),
  };
}

export function encodeId(id: number): Uint8Array {
  return Uint8Array.of(id & 255, (id >>> 8) & 255, (id >>> 16) & 255, (id >>> 24) & 255);
}

export function decodeId(bytes: Uint8Array): number {
  return (bytes[0] | (bytes[1] << 8) | (bytes[2] << 16) | (bytes[3] << 24)) >>> 0;
}

/** Deliberately broken VM behaviours the simulator can switch on, to show the checkers catch them. */
export interface VmFaults {
  /** Release external output when its checkpoint is captured, not when its cut commits. */
  releaseAtCapture?: boolean;
  /** Deliver whatever arrives, in any epoch: no consistent-cut rule (and so no marker captures). */
  ignoreCutRule?: boolean;
}

/** What a model VM hands back to its host (the simulator's driver). */
export interface VmHost {
  /** Group messages leaving this VM on its message path. */
  transmit(vm: ModelVm, messages: GroupMessage[]): void;
  /** group mode: checkpoint `delta.epoch` taken (capture_to or a marker): the core's `captured` event. */
  captured(vm: ModelVm, delta: ModelDelta, delivered: number[]): void;
  /**
   * First external output (vm mode: or held message) of an epoch, and the first
   * urgent one (a reply; a held message) if the first was not: the core's `output_pending` event.
   */
  outputPending(vm: ModelVm, epoch: Epoch, urgent: boolean): void;
  /** The VM did something in `epoch` (the guest ran, a message was accepted): once per epoch, again after a rollback; the core's `active` event. */
  active(vm: ModelVm, epoch: Epoch): void;
  /** Output released to the VM's sinks: seq is 1-based and dense. */
  release(vm: ModelVm, records: { seq: number; id: number; epoch: Epoch }[]): void;
  /** A message the guest handed to the VM (for the checkers). */
  delivered(vm: ModelVm, from: Rank, id: number): void;
}

/** A primary: the guest, its channels, its undo log of checkpoints, its message path state. */
export class ModelVm {
  channels: Channels;
  /** The epoch the guest executes in (checkpoint `epoch - 1` is the newest captured). */
  epoch: Epoch;
  committed: Epoch;
  /** Output records released so far (the host's output log); the sinks drop what they have. */
  released: number;
  running = false;
  stopped = false;
  routes: (Route | null)[] = [];
  private readonly undo = new Map<Epoch, Checkpoint>();
  /** vm mode: sent, waiting for the sender's checkpoint of their epoch to commit. */
  private held: GroupMessage[] = [];
  /** Arrivals while frozen (kept until run) and arrivals refused for now. */
  private inbox: GroupMessage[] = [];
  private refused: GroupMessage[] = [];
  /** The epochs output_pending was last signalled for (any output; urgent output). */
  private pendingSignalled = 0;
  private urgentSignalled = 0;
  /** The epoch `active` was last signalled for (VmCore.activeEpoch and the worker's afterCall). */
  private activeSignalled = 0;
  /** Set when the path lost something it should not have (a bounded queue overflowed): the checkers report it. */
  overflow: string | null = null;

  constructor(
    readonly rank: Rank,
    readonly size: number,
    readonly mode: Mode,
    readonly route: Route,
    public memory: GuestMemory,
    record: ChannelRecord,
    cut: Epoch,
    /**
     * Output records released when the checkpoint was taken (part of the
     * runtime state, as in VmCore: a promoted backup re-releases the rest of
     * its checkpoint's output, and the sinks drop what they have).
     */
    released: number,
    private readonly host: VmHost,
    private readonly faults: VmFaults,
  ) {
    this.channels = new Channels(this.channelConfig(), record);
    this.epoch = cut + 1;
    this.committed = cut;
    this.released = released;
    this.undo.set(cut, this.checkpoint(cut));
  }

  private channelConfig() {
    return { rank: this.rank, size: this.size, limits: MODEL_LIMITS, consistent_cut: this.mode === "group" && !this.faults.ignoreCutRule, sender_log: this.mode !== "none" };
  }

  private checkpoint(epoch: Epoch): Checkpoint {
    const m = this.memory;
    return { epoch, counter: m.counter, sentLen: m.sent.map((x) => x.length), recvLen: m.recv.map((x) => x.length), outLen: m.outs.length, released: this.released, channels: this.channels.snapshot() };
  }

  /** Checkpoint `epoch` if this VM still keeps it (the checkers read cuts from it). */
  checkpointAt(epoch: Epoch): { sentLen: number[]; recvLen: number[]; outLen: number } | null {
    return this.undo.get(epoch) ?? null;
  }

  // ---- the guest ------------------------------------------------------------------------------

  /** The guest sends message `id` to `to`; false if the channels refused it (the guest sees E_FULL). */
  send(to: Rank, id: number): boolean {
    const m = this.channels.send(to, encodeId(id), this.epoch);
    if (typeof m === "string") return false;
    this.memory.sent[to].push(id);
    this.signalActive();
    const out = this.channels.takeOutbox();
    if (this.mode === "vm") {
      // Remus: a message leaves only once the checkpoint of its epoch committed.
      this.held.push(...out);
      this.signalPending(true);
    } else {
      this.host.transmit(this, out);
    }
    return true;
  }

  /** External output `id`; `urgent`: a reply someone waits for, else a log line. */
  output(id: number, urgent: boolean): void {
    this.memory.outs.push(id);
    this.memory.outEpochs.push(this.epoch);
    this.signalActive();
    this.signalPending(urgent);
  }

  compute(): void {
    this.memory.counter++;
    this.signalActive();
  }

  /** The newest epoch this VM did something in since it started or last rolled back (0: nothing). */
  get lastActive(): Epoch {
    return this.activeSignalled;
  }

  private signalActive(): void {
    if (this.activeSignalled === this.epoch) return;
    this.activeSignalled = this.epoch;
    this.host.active(this, this.epoch);
  }

  private signalPending(urgent: boolean): void {
    if (urgent ? this.urgentSignalled >= this.epoch : this.pendingSignalled >= this.epoch) return;
    this.pendingSignalled = this.epoch;
    if (urgent) this.urgentSignalled = this.epoch;
    this.host.outputPending(this, this.epoch, urgent);
  }

  // ---- the message path -----------------------------------------------------------------------

  /** A message reached this VM's path. */
  arrive(m: GroupMessage): void {
    if (this.stopped) return;
    if (!this.running) {
      if (this.inbox.length >= INBOX_MAX) this.overflow = `rank ${this.rank}: inbox over ${INBOX_MAX}`;
      else this.inbox.push(m);
      return;
    }
    this.offer(m);
  }

  private offer(m: GroupMessage): void {
    // The marker rule: a message of a later epoch proves the leader ended this one; capture now.
    const e = this.channels.markerEpoch(m, this.epoch);
    if (e !== null) while (this.epoch < e) this.captureNow(true);
    const decision = this.channels.receive(m, this.epoch);
    // Held and refused-for-now messages need a capture too (as in VmCore.receive).
    if (decision !== "duplicate" && decision !== "stale" && decision !== "early") this.signalActive();
    if (decision === "deliver") {
      this.deliver(m);
      for (let next = this.channels.next(m.from, this.epoch); next; next = this.channels.next(m.from, this.epoch)) this.deliver(next);
    } else if (decision === "full" || decision === "early") {
      if (this.refused.length >= REFUSED_MAX) this.overflow = `rank ${this.rank}: refused list over ${REFUSED_MAX}`;
      else this.refused.push(m);
    }
  }

  private deliver(m: GroupMessage): void {
    const id = decodeId(m.bytes);
    this.memory.recv[m.from].push(id);
    this.memory.counter++;
    this.signalActive();
    this.host.delivered(this, m.from, id);
  }

  private retryRefused(): void {
    if (!this.running || this.refused.length === 0) return;
    const again = this.refused;
    this.refused = [];
    for (const m of again) this.offer(m);
  }

  // ---- checkpoints ----------------------------------------------------------------------------

  /** Takes checkpoint `this.epoch` and enters the next epoch; returns the sealed delta. */
  private captureNow(emit: boolean): ModelDelta {
    const e = this.epoch;
    const prev = this.undo.get(e - 1);
    if (!prev) throw new Error(`rank ${this.rank}: capture ${e} without checkpoint ${e - 1}`);
    const m = this.memory;
    const cp = this.checkpoint(e);
    const delta: ModelDelta = {
      epoch: e,
      counter: m.counter,
      sent: m.sent.map((x, r) => x.slice(prev.sentLen[r])),
      recv: m.recv.map((x, s) => x.slice(prev.recvLen[s])),
      outs: m.outs.slice(prev.outLen),
      outEpochs: m.outEpochs.slice(prev.outLen),
      released: cp.released,
      channels: cp.channels,
    };
    this.undo.set(e, cp);
    if (this.undo.size > UNDO_MAX) throw new Error(`rank ${this.rank}: more than ${UNDO_MAX} uncommitted checkpoints`);
    this.epoch = e + 1;
    if (this.faults.releaseAtCapture) this.releaseThrough(e);
    if (emit) this.host.captured(this, delta, this.channels.deliveredVector());
    // A new epoch may make held arrivals deliverable (consistent-cut rule), and refused ones fit.
    if (this.running) {
      for (let next = this.channels.deliverPending(this.epoch); next; next = this.channels.deliverPending(this.epoch)) this.deliver(next);
      this.retryRefused();
    }
    return delta;
  }

  /** group mode (VmStep capture_to): commit first if asked; capture unless a marker did already. */
  captureTo(epoch: Epoch, commit: { epoch: Epoch; trim: number[] } | undefined): void {
    if (commit) this.commit(commit.epoch, commit.trim);
    if (this.epoch > epoch) {
      this.retryRefused();
      return;
    }
    if (this.epoch !== epoch) throw new Error(`capture_to ${epoch}: the VM is in epoch ${this.epoch}`);
    this.captureNow(true);
  }

  /** vm, none mode (VmStep capture): checkpoint now; the step answers epoch, delivered, delta, held. */
  capture(): { epoch: Epoch; delivered: number[]; delta: ModelDelta; held: number } {
    const delta = this.captureNow(false);
    return { epoch: delta.epoch, delivered: this.channels.deliveredVector(), delta, held: this.held.length };
  }

  /** Cut `epoch` committed: release its output, trim the sender log, let held messages of epochs <= it go. */
  commit(epoch: Epoch, trim?: number[]): void {
    if (epoch > this.committed) this.committed = epoch;
    this.releaseThrough(epoch);
    if (trim) this.channels.trim(trim);
    for (const k of this.undo.keys()) if (k < this.committed) this.undo.delete(k);
    if (this.held.length) {
      const free = this.held.filter((m) => m.epoch <= epoch);
      if (free.length) {
        this.held = this.held.filter((m) => m.epoch > epoch);
        // A frozen path drops them: the sender log re-sends after the recovery.
        if (this.running) this.host.transmit(this, free);
      }
    }
  }

  trim(deliveredByReceiver: number[]): void {
    this.channels.trim(deliveredByReceiver);
  }

  private releaseThrough(epoch: Epoch): void {
    const m = this.memory;
    const records: { seq: number; id: number; epoch: Epoch }[] = [];
    while (this.released < m.outs.length && m.outEpochs[this.released] <= epoch) {
      records.push({ seq: this.released + 1, id: m.outs[this.released], epoch: m.outEpochs[this.released] });
      this.released++;
    }
    if (records.length) this.host.release(this, records);
  }

  // ---- recovery -------------------------------------------------------------------------------

  freeze(): void {
    this.running = false;
    this.inbox = [];
    this.refused = [];
  }

  /**
   * VmStep restore: go to the cut (roll back in place; cut 0 is the booted state) or keep the state,
   * adopt the incarnation, release the cut's output, and make the image a
   * new backup needs (at the cut, or at a fresh checkpoint).
   */
  restore(how: "rollback" | "keep", cut: Epoch | null, inc: number, imageFor: boolean, fresh: boolean): { delivered: number[]; image: ModelImage | null } {
    if (how === "rollback") {
      if (cut === null) throw new Error("rollback without a cut");
      const cp = this.undo.get(cut);
      if (!cp) throw new Error(`rank ${this.rank}: rollback to ${cut}, not kept (kept ${[...this.undo.keys()].join(",")})`);
      const m = this.memory;
      m.counter = cp.counter;
      m.sent.forEach((x, r) => (x.length = cp.sentLen[r]));
      m.recv.forEach((x, s) => (x.length = cp.recvLen[s]));
      m.outs.length = m.outEpochs.length = cp.outLen;
      this.channels.restore(copyRecord(cp.channels));
      for (const k of this.undo.keys()) if (k > cut) this.undo.delete(k);
      this.epoch = cut + 1;
      this.activeSignalled = 0; // epochs start again from the cut (the worker's forgetActivity)
      this.held = this.held.filter((x) => x.epoch <= cut);
      if (this.released > cp.outLen) this.released = cp.outLen;
    }
    this.channels.setIncarnation(inc);
    for (const m of this.held) m.incarnation = inc;
    if (cut !== null) {
      if (cut > this.committed) this.committed = cut;
      for (const k of this.undo.keys()) if (k < this.committed) this.undo.delete(k);
      this.releaseThrough(cut);
      // vm mode: what the cut committed is re-sent from the sender log when the group runs.
      this.held = this.held.filter((x) => x.epoch > this.committed);
    }
    let image: ModelImage | null = null;
    if (imageFor) {
      if (fresh) this.captureNow(false);
      image = { epoch: this.epoch - 1, memory: copyMemory(this.memory), released: this.released, channels: this.channels.snapshot() };
    }
    return { delivered: this.channels.deliveredVector(), image };
  }

  /**
   * MembersStep run: new routes; re-send from the sender log what each
   * receiver's restored state lacks (vm mode: only what committed, the rest
   * is held); then the path and the guest run, and what arrived meanwhile is
   * offered.
   */
  run(routes: (Route | null)[], delivered: number[][] | null, skipResend: boolean): void {
    this.routes = routes;
    if (delivered && !skipResend) {
      for (let r = 0; r < this.size; r++) {
        if (r === this.rank) continue;
        let again = this.channels.resendFor(r, delivered[r][this.rank]);
        if (this.mode === "vm") again = again.filter((m) => m.epoch <= this.committed);
        if (again.length) this.host.transmit(this, again);
      }
    }
    this.running = true;
    const waiting = this.inbox;
    this.inbox = [];
    for (const m of waiting) if (this.running) this.offer(m);
    this.retryRefused();
  }

  stop(): void {
    this.stopped = true;
    this.running = false;
    this.inbox = [];
    this.refused = [];
    this.held = [];
  }
}

/** A backup: the committed image (folded lazily) and the staged deltas above it. */
export class ModelBackup {
  /** Newest checkpoint folded into the image. */
  folded: Epoch;
  /** Newest staged checkpoint. */
  hi: Epoch;
  private committedCut: Epoch;
  private readonly staged = new Map<Epoch, ModelDelta>();

  constructor(
    readonly rank: Rank,
    private memory: GuestMemory,
    private channels: ChannelRecord,
    epoch: Epoch,
    private released: number,
  ) {
    this.folded = this.hi = this.committedCut = epoch;
  }

  static fromImage(rank: Rank, image: ModelImage): ModelBackup {
    return new ModelBackup(rank, copyMemory(image.memory), copyRecord(image.channels), image.epoch, image.released);
  }

  /** Does this backup hold checkpoint `e` (to promote or roll back to)? */
  holds(e: Epoch): boolean {
    return e >= this.folded && e <= this.hi;
  }

  stage(epoch: Epoch, delta: ModelDelta): void {
    if (epoch !== this.hi + 1 || delta.epoch !== epoch) throw new Error(`rank ${this.rank}: delta ${delta.epoch} does not follow staged ${this.hi}`);
    this.staged.set(epoch, delta);
    this.hi = epoch;
  }

  /** Cut committed: fold lazily, 8 at a time, as the daemon's backups do. */
  commit(cut: Epoch): void {
    if (cut > this.committedCut) this.committedCut = Math.min(cut, this.hi);
    if (this.committedCut - this.folded >= 8) this.fold(this.committedCut);
  }

  private fold(to: Epoch): void {
    for (let e = this.folded + 1; e <= to; e++) {
      const d = this.staged.get(e);
      if (!d) throw new Error(`rank ${this.rank}: fold to ${to}, delta ${e} missing`);
      const m = this.memory;
      m.counter = d.counter;
      d.sent.forEach((x, r) => m.sent[r].push(...x));
      d.recv.forEach((x, s) => m.recv[s].push(...x));
      m.outs.push(...d.outs);
      m.outEpochs.push(...d.outEpochs);
      this.channels = d.channels;
      this.released = d.released;
      this.staged.delete(e);
      this.folded = e;
    }
  }

  rollbackTo(cut: Epoch): void {
    if (!this.holds(cut)) throw new Error(`rank ${this.rank}: backup rollback to ${cut}, holds ${this.folded}..${this.hi}`);
    this.fold(cut);
    for (const e of this.staged.keys()) if (e > cut) this.staged.delete(e);
    this.hi = this.committedCut = cut;
  }

  /** Zero-copy promotion: the image becomes the primary's memory, paused. */
  promote(cut: Epoch | null, route: Route, mode: Mode, size: number, host: VmHost, faults: VmFaults): ModelVm {
    const target = cut ?? this.hi;
    this.rollbackTo(target);
    return new ModelVm(this.rank, size, mode, route, this.memory, copyRecord(this.channels), target, this.released, host, faults);
  }
}
