/**
 * Everything one host does for one protected group, sans I/O: the group
 * protocol's one implementation (docs/PROTOCOL.md). The host daemon
 * (src/host/group/driver.ts) and the simulator (src/sim/) both drive it:
 *
 *   const core = GroupCore.deployed({ host, record, now_ms, detect_ms });
 *   for each event: for (const action of core.handle(event)) carry it out, in order
 *   and call handle({ type: "tick", now_ms }) by core.deadline() at the latest.
 *
 * Roles on this host: the primaries and backups the record places here, the
 * leader (group mode) when the record names this host, one epoch clock per
 * member (vm, none mode), and this host's part in a failover: proposing the
 * decision, coordinating the recovery when its proposal won, or taking part.
 *
 * Time only enters through `tick`; everything else is a function of the
 * events, so a recorded run replays to the same actions.
 */
import { assert } from "../util/assert.js";
import { senderColumn } from "./channel.js";
import { EpochTimer } from "./epoch-timer.js";
import { checkFrameRanges, type FrameOf, type GroupFrame, type OutgoingFrame, type Route } from "./frames.js";
import { Leader, type CutCommit } from "./leader.js";
import { planRecovery, type HostReport, type RecoveryPlan } from "./recovery.js";
import { activeHostsOf, needsFailover, onlyDegrades, planFailover, primaryHostsOf } from "./record.js";
import type { BackupStep, CoreAction, CoreEvent, Handle, MembersStep, Notice, VmStep } from "./events.js";
import {
  MEMBER_INFLIGHT_MAX,
  PROPOSE_BACKOFF_DETECTS,
  RECOVER_RETRY_MS,
  STORE_RETRY_MS,
  STALE_TELL_INTERVAL_MS,
  protectionKey,
  type Epoch,
  type HostId,
  type Incarnation,
  type ProtectionRecord,
  type Rank,
} from "./types.js";

/** A primary on this host, as the core tracks it (the VM itself is the driver's). */
interface Member {
  rank: Rank;
  state: "frozen" | "running";
  /** Newest checkpoint captured. */
  captured: Epoch;
  committed: Epoch;
  /** vm mode: messages held for a commit at the last capture (they hurry the clock like output). */
  held: number;
  /** vm, none mode: the member's own epoch clock. */
  clock: MemberClock | null;
  /** vm, none mode: newest epoch the member did something in (`active` event); its clock ends only such epochs. */
  active: Epoch;
}

interface MemberClock {
  timer: EpochTimer;
  capturing: boolean;
  /** The epoch the capture in progress ends (its output is on its way); output of later epochs waits for the next. */
  ending: Epoch;
  /** vm mode: deltas shipped and not staged yet, oldest first. */
  inflight: { epoch: Epoch; delivered: number[] }[];
}

/** A backup on this host. */
interface Backup {
  rank: Rank;
  /** False until a new backup's image is installed. */
  has_image: boolean;
  /** Committed cut of the image (folded lazily by the driver, always before promotion or rollback). */
  lo: Epoch;
  /** Newest staged checkpoint. */
  hi: Epoch;
  /** The incarnation whose recovery sent this backup its image (0: deployed with the group). */
  image_inc?: Incarnation;
}

/** Steps waiting for their `done`, and what to do then. */
type StepContext =
  | { kind: "capture_to"; rank: Rank }
  | { kind: "capture"; rank: Rank; member: Member }
  | { kind: "commit"; rank: Rank; member: Member; epoch: Epoch; delivered: number[] | null }
  | { kind: "plain"; rank: Rank | null; what: string }
  | { kind: "stage"; rank: Rank; epoch: Epoch; delivered: number[]; inc: Incarnation }
  | { kind: "install"; rank: Rank; epoch: Epoch; inc: Incarnation }
  | { kind: "restore"; rank: Rank; inc: Incarnation }
  | { kind: "run"; inc: Incarnation; epoch: Epoch | null };

/** The coordinator's side of a recovery (this host's proposal won). */
interface Coordination {
  record: ProtectionRecord;
  /** Hosts that take part: every host of the record not declared failed. */
  hosts: HostId[];
  reports: Map<HostId, HostReport>;
  rolled: Map<HostId, Record<string, number[]>>;
  routes: Record<string, Route>;
  plan: RecoveryPlan | null;
  started_ms: number;
  retryDue_ms: number;
}

/** This host's part in a recovery step (`rollback`), until every replica here is done. */
interface LocalRecovery {
  inc: Incarnation;
  coordinator: HostId;
  outstanding: number;
  /** A replica here cannot go where the rollback frame says: no `rolled` answer (a wrong delivered matrix would follow). */
  failed: boolean;
  delivered: Record<string, number[]>;
  routes: Record<string, Route>;
}

export interface CoreOptions {
  host: HostId;
  record: ProtectionRecord;
  now_ms: number;
  /** The failure detector's timeout: a proposer that is not first waits PROPOSE_BACKOFF_DETECTS of these. */
  detect_ms: number;
  /** Hosts alive at start (this one included). */
  live: HostId[];
  /** Hosts registered in the store at start (this one included); see the `hosts` event. */
  registered: HostId[];
}

export interface CoreStatus {
  incarnation: Incarnation;
  leader: HostId;
  /** Leader: newest committed cut. */
  committed: Epoch | null;
  recovering: boolean;
  state: "running" | "fenced" | "halted";
  lost: Rank[];
  primaries: { rank: Rank; state: Member["state"]; captured: Epoch; committed: Epoch }[];
  backups: { rank: Rank; has_image: boolean; cut: Epoch; staged: Epoch }[];
  refused: number;
  steps_failed: number;
}

export class GroupCore {
  readonly host: HostId;
  private record: ProtectionRecord;
  private readonly detect_ms: number;
  private now_ms: number;
  private live: Set<HostId>;
  private registered: Set<HostId>;
  /** Live hosts heard from within half the detection timeout (see the `hosts` event). */
  private heard: Set<HostId>;
  /** Whether this host last found itself without a quorum (told once per change). */
  private withoutQuorum = false;
  private readonly members = new Map<Rank, Member>();
  private readonly backups = new Map<Rank, Backup>();
  private leader: Leader | null = null;
  /** group mode: the epoch this host last told the leader it has output waiting in, and the last it said was urgent. */
  private pendingSentEpoch = 0;
  private urgentSentEpoch = 0;
  /** group mode: the epoch this host last told the leader a member here did something in (`active`), in this incarnation. */
  private activeSentEpoch = 0;
  /** group mode, the leader's host: newest epoch a member did something in, as told in this incarnation (kept for a leader started later). */
  private activeSeen = 0;
  /** vm mode: newest committed delivered vector of each receiver (index: receiver, then sender). */
  private readonly committedDelivered: number[][];
  private nextStepId = 1;
  private readonly steps = new Map<number, StepContext>();
  private state: CoreStatus["state"] = "running";
  private lost: Rank[] = [];
  private started = false;
  /**
   * Deployed and not started yet (`start` clears it): a deploy has the group
   * prepared on its hosts. A host that fails meanwhile is the deploy's to
   * handle (it aborts the attempt and places the group again under the next
   * incarnation, src/host/deploy.ts); a failover decided here would write an
   * incarnation of its own over that attempt. The views are kept; the driver
   * tells the hosts again once the group started.
   */
  private preparedOnly = false;
  /** A failover proposal is due at this time (Infinity: none). */
  private proposeDue_ms = Infinity;
  private storeOp: { op: "get" } | { op: "cas"; value: ProtectionRecord } | null = null;
  private coordination: Coordination | null = null;
  private local: LocalRecovery | null = null;
  private refusedCount = 0;
  /** When a failure of backup hosts alone was first seen (its decision waits a detection period). */
  private backupsLostSince_ms: number | null = null;
  /** When each failed host that still sent was last told its incarnation is over. */
  private readonly staleToldAt = new Map<HostId, number>();
  private stepsFailed = 0;
  /** The recovery step this host takes next (a `rollback` after adopting an incarnation, then its `resume`); null: none expected. */
  private recoveryNext: { k: "rollback" } | { k: "resume"; cut: Epoch | null } | null = null;

  private constructor(options: CoreOptions) {
    this.host = options.host;
    this.record = options.record;
    this.detect_ms = options.detect_ms;
    this.now_ms = options.now_ms;
    this.live = new Set(options.live);
    this.registered = new Set(options.registered);
    this.heard = new Set(options.live);
    this.committedDelivered = Array.from({ length: options.record.size }, () => new Array<number>(options.record.size).fill(0));
  }

  /** A freshly deployed group: the driver booted the primaries placed here (frozen, cut 0) and installed the deployed image on the backups. */
  static deployed(options: CoreOptions): GroupCore {
    const core = new GroupCore(options);
    core.preparedOnly = true;
    options.record.placement.forEach((p, rank) => {
      assert(p.primary !== p.backup, `member ${rank}: primary and backup on one host`);
      if (p.primary === core.host) core.members.set(rank, core.newMember(rank, 0));
      if (p.backup === core.host) core.backups.set(rank, { rank, has_image: true, lo: 0, hi: 0 });
    });
    return core;
  }

  /** A host the record names that holds nothing of the group yet (a new backup host during a recovery). */
  static joined(options: CoreOptions): GroupCore {
    // It took part in no earlier incarnation: it adopts the `recover` of this one when it arrives.
    return new GroupCore({ ...options, record: { ...options.record, incarnation: options.record.incarnation - 1 } });
  }

  get incarnation(): Incarnation {
    return this.record.incarnation;
  }

  get currentRecord(): ProtectionRecord {
    return this.record;
  }

  /** The latest time by which the driver must call `tick` (Infinity: nothing scheduled). */
  deadline(): number {
    if (this.state !== "running") return Infinity;
    let due = this.proposeDue_ms;
    if (this.leader) due = Math.min(due, this.leader.deadline());
    if (this.coordination && this.coordination.plan === null) due = Math.min(due, this.coordination.retryDue_ms);
    // Member clocks exist in vm and none mode only: group mode's per-event path does not walk the members.
    if (this.record.mode !== "group") for (const m of this.members.values()) if (m.clock && this.clockCanRun(m) && this.clockWorthEnding(m)) due = Math.min(due, m.clock.timer.due(m.held > 0));
    return due;
  }

  status(): CoreStatus {
    return {
      incarnation: this.record.incarnation,
      leader: this.record.leader,
      committed: this.leader?.committed ?? null,
      recovering: this.coordination !== null || this.local !== null,
      state: this.state,
      lost: [...this.lost],
      primaries: [...this.members.values()].map((m) => ({ rank: m.rank, state: m.state, captured: m.captured, committed: m.committed })),
      backups: [...this.backups.values()].map((b) => ({ rank: b.rank, has_image: b.has_image, cut: b.lo, staged: b.hi })),
      refused: this.refusedCount,
      steps_failed: this.stepsFailed,
    };
  }

  // ---- events ------------------------------------------------------------------------------

  handle(event: CoreEvent): CoreAction[] {
    const out: CoreAction[] = [];
    if (this.state === "fenced") return out;
    switch (event.type) {
      case "tick":
        assert(event.now_ms >= this.now_ms, "time does not go back");
        this.now_ms = event.now_ms;
        if (this.state === "running") this.tick(out);
        break;
      case "frame":
        if (this.state === "running") this.onFrame(event.from, event.frame, event.body, out);
        break;
      case "hosts":
        this.onHosts(event, out);
        break;
      case "store":
        this.onStore(event, out);
        break;
      case "start":
        this.start(event.routes, out);
        break;
      case "captured":
        this.onCaptured(event.rank, event.epoch, event.delivered, event.delta, out);
        break;
      case "output_pending":
        this.onOutputPending(event.rank, event.epoch, event.urgent, out);
        break;
      case "active":
        this.onActive(event.rank, event.epoch, out);
        break;
      case "done":
        this.onDone(event, out);
        break;
    }
    return out;
  }

  // ---- helpers -----------------------------------------------------------------------------

  private newMember(rank: Rank, cut: Epoch): Member {
    return { rank, state: "frozen", captured: cut, committed: cut, held: 0, clock: null, active: 0 };
  }

  private vm(out: CoreAction[], rank: Rank, step: VmStep, context: StepContext): void {
    const id = this.nextStepId++;
    this.steps.set(id, context);
    out.push({ type: "vm", id, rank, step });
  }

  private backup(out: CoreAction[], rank: Rank, step: BackupStep, context: StepContext): void {
    const id = this.nextStepId++;
    this.steps.set(id, context);
    out.push({ type: "backup", id, rank, step });
  }

  private membersStep(out: CoreAction[], step: MembersStep, context: StepContext): void {
    const id = this.nextStepId++;
    this.steps.set(id, context);
    out.push({ type: "members", id, step });
  }

  private notify(out: CoreAction[], notice: Notice): void {
    out.push({ type: "notify", notice });
  }

  /** Sends to each host; this host's own copy is handled at once, after the others left. */
  private broadcast(out: CoreAction[], hosts: readonly HostId[], frame: OutgoingFrame, body?: Handle | "module"): void {
    let self = false;
    for (const h of hosts) {
      if (h === this.host) self = true;
      else out.push({ type: "send", to: h, frame, body });
    }
    if (self) this.onFrame(this.host, { ...frame, v: 1, g: this.record.group, from: this.host } as GroupFrame, body, out);
  }

  private sendTo(out: CoreAction[], host: HostId, frame: OutgoingFrame, body?: Handle): void {
    this.broadcast(out, [host], frame, body);
  }

  private refuse(out: CoreAction[], reason: string): void {
    this.refusedCount++;
    this.notify(out, { kind: "refused", reason });
  }

  // ---- running the group -------------------------------------------------------------------

  /** Deploy done everywhere: run the members with every route, start the clocks. */
  private start(routes: (Route | null)[], out: CoreAction[]): void {
    if (this.started || this.state !== "running") return;
    this.started = true;
    this.preparedOnly = false;
    assert(routes.length === this.record.size, `${routes.length} routes for a group of ${this.record.size}`);
    for (const m of this.members.values()) m.state = "running";
    this.membersStep(out, { op: "run", routes, delivered: null }, { kind: "run", inc: this.record.incarnation, epoch: null });
  }

  private startClocks(committed: Epoch): void {
    this.pendingSentEpoch = 0;
    this.urgentSentEpoch = 0;
    if (this.record.mode === "group") {
      this.leader = this.record.leader === this.host ? new Leader(this.record.size, this.record.epoch, committed, this.now_ms) : null;
      // Members may have done something before this leader started (their run step delivers re-sent messages).
      this.leader?.active(this.activeSeen);
      return;
    }
    for (const m of this.members.values()) m.clock = { timer: new EpochTimer(this.record.epoch, this.now_ms), capturing: false, ending: m.captured, inflight: [] };
  }

  private stopClocks(): void {
    this.leader = null;
    for (const m of this.members.values()) m.clock = null;
  }

  private tick(out: CoreAction[]): void {
    const now = this.now_ms;
    if (now >= this.proposeDue_ms) {
      this.proposeDue_ms = Infinity;
      this.readStore(out);
    }
    const c = this.coordination;
    if (c && c.plan === null && now >= c.retryDue_ms) {
      c.retryDue_ms = now + RECOVER_RETRY_MS;
      for (const h of c.hosts) if (h !== this.host && !c.reports.has(h)) out.push({ type: "send", to: h, frame: { k: "recover", inc: c.record.incarnation, record: c.record }, body: "module" });
    }
    if (this.leader) {
      const action = this.leader.tick(now);
      if (action?.kind === "end") {
        // A commit riding on the end goes to backup hosts too (they fold); a bare end only to primaries.
        const hosts = action.commit ? activeHostsOf(this.record) : primaryHostsOf(this.record);
        this.broadcast(out, hosts, action.commit ? { k: "end", inc: this.record.incarnation, e: action.e, c: action.commit.c, d: action.commit.d } : { k: "end", inc: this.record.incarnation, e: action.e });
      } else if (action?.kind === "commit") {
        this.broadcast(out, activeHostsOf(this.record), { k: "commit", inc: this.record.incarnation, c: action.commit.c, d: action.commit.d });
      }
      if (action?.commit) this.notify(out, { kind: "committed", inc: this.record.incarnation, cut: action.commit.c });
    }
    if (this.record.mode === "group") return;
    for (const m of this.members.values()) {
      if (!m.clock || !this.clockCanRun(m) || !this.clockWorthEnding(m) || now < m.clock.timer.due(m.held > 0)) continue;
      // The epoch ends now, as the VM sees it: output that shows up from here on is the next epoch's.
      m.clock.capturing = true;
      m.clock.ending = m.captured + 1;
      m.clock.timer.ended(now);
      this.vm(out, m.rank, { op: "capture" }, { kind: "capture", rank: m.rank, member: m });
    }
  }

  /** vm, none mode: may this member's clock capture now? (vm mode needs a backup and room in flight.) */
  private clockCanRun(m: Member): boolean {
    if (!m.clock || m.clock.capturing || m.state !== "running") return false;
    if (this.record.mode === "none") return true;
    return this.record.placement[m.rank].backup !== null && m.clock.inflight.length < MEMBER_INFLIGHT_MAX;
  }

  /**
   * vm, none mode: did the member do anything since its last checkpoint, or
   * does something wait for one? (An idle epoch is not ended.) Checkpoints
   * taken that nothing will commit (taken while the member had no backup, a
   * delta lost with its backup, a fresh image's) hold output that waits too:
   * the next checkpoint's commit releases it.
   */
  private clockWorthEnding(m: Member): boolean {
    const clock = m.clock!;
    return m.active > m.captured || m.held > 0 || clock.timer.outputWaiting || (m.committed < m.captured && clock.inflight.length === 0);
  }

  /**
   * Member `rank` did something in `epoch`. group mode: the leader hears of it
   * once per epoch from this host (it ends only epochs something happened
   * in); vm, none mode: the member's own clock does.
   */
  private onActive(rank: Rank, epoch: Epoch, out: CoreAction[]): void {
    const m = this.members.get(rank);
    if (!m || m.state !== "running" || this.state !== "running") return;
    if (this.record.mode !== "group") {
      if (epoch > m.active) m.active = epoch;
      return;
    }
    if (epoch <= m.captured || epoch <= this.activeSentEpoch) return; // captured already, or told
    this.activeSentEpoch = epoch;
    this.sendTo(out, this.record.leader, { k: "active", inc: this.record.incarnation, e: epoch });
  }

  private onOutputPending(rank: Rank, epoch: Epoch, urgent: boolean, out: CoreAction[]): void {
    const m = this.members.get(rank);
    if (!m || m.state !== "running" || this.state !== "running") return;
    if (this.record.mode !== "group") {
      if (m.clock && epoch > Math.max(m.captured, m.clock.ending)) m.clock.timer.outputPending(urgent);
      return;
    }
    if (epoch <= m.captured) return; // captured already: its commit is on its way
    // One `pending` per epoch from this host is all the leader needs, however many members have
    // output, and one more if output that was not urgent became urgent.
    if (urgent ? epoch <= this.urgentSentEpoch : epoch <= this.pendingSentEpoch) return;
    this.pendingSentEpoch = Math.max(this.pendingSentEpoch, epoch);
    if (urgent) this.urgentSentEpoch = epoch;
    if (this.leader) this.leader.outputPending(urgent, epoch);
    else this.sendTo(out, this.record.leader, { k: "pending", inc: this.record.incarnation, u: urgent, e: epoch });
  }

  /** group mode: a member's checkpoint, in epoch order: ship the delta to its backup. */
  private onCaptured(rank: Rank, epoch: Epoch, delivered: number[], delta: Handle, out: CoreAction[]): void {
    const m = this.members.get(rank);
    if (!m || this.state !== "running") return;
    m.captured = Math.max(m.captured, epoch);
    // Frozen: a recovery started; what the VM captured since is decided by the recovery cut.
    if (m.state !== "running" || this.record.mode !== "group") return;
    const backup = this.record.placement[rank].backup;
    if (backup === null) return; // degraded: nothing commits until the group has a backup again
    this.sendTo(out, backup, { k: "delta", inc: this.record.incarnation, rank, e: epoch, d: delivered }, delta);
  }

  // ---- frames ------------------------------------------------------------------------------

  private onFrame(from: HostId, frame: GroupFrame, body: Handle, out: CoreAction[]): void {
    try {
      checkFrameRanges(frame, this.record.size);
    } catch (error) {
      this.refuse(out, (error as Error).message);
      return;
    }
    if (frame.k === "recover") {
      if (frame.inc > this.record.incarnation) this.adopt(frame.record, from, out);
      return;
    }
    // A halt may come from a coordinator whose incarnation this host never adopted (it found a member lost at once).
    if (frame.k === "halt" && frame.inc >= this.record.incarnation) {
      const problem = this.haltProblem(from, frame);
      return problem ? this.refuse(out, problem) : this.halt(frame.lost, out);
    }
    // A newer incarnation exists and this host was not told: the store says whether it was declared failed.
    if (frame.k === "stale" && frame.inc > this.record.incarnation) {
      this.proposeDue_ms = this.now_ms;
      return;
    }
    if (frame.inc !== this.record.incarnation) {
      // Older: in flight when the group moved on. Newer: not adopted here (yet). Either way not acted on.
      this.refuse(out, `${frame.k} frame of incarnation ${frame.inc} from ${from}: this host is at ${this.record.incarnation}`);
      if (frame.inc < this.record.incarnation) this.onStaleFrame(from, out);
      return;
    }
    const sender = this.senderProblem(from, frame);
    if (sender) return this.refuse(out, sender);
    switch (frame.k) {
      case "end":
        return this.onEnd(frame.e, frame.c !== undefined && frame.d ? { c: frame.c, d: frame.d } : null, out);
      case "pending":
        this.leader?.outputPending(frame.u, frame.e);
        return;
      case "active":
        if (this.record.mode !== "group") return this.refuse(out, `active frame for a group in mode ${this.record.mode}`);
        if (frame.e > this.activeSeen) this.activeSeen = frame.e;
        this.leader?.active(frame.e);
        return;
      case "delta":
        return this.onDelta(frame, body, out);
      case "image":
        return this.onImage(frame, body, out);
      case "staged":
        return this.onStaged(frame, out);
      case "commit":
        return this.onCommit(frame.c, frame.d, out);
      case "vcommit": {
        const b = this.backups.get(frame.rank);
        if (this.record.mode !== "vm") return this.refuse(out, `vcommit frame for a group in mode ${this.record.mode}`);
        if (b && frame.e > b.hi) return this.refuse(out, `vcommit frame: checkpoint ${frame.e} of member ${frame.rank} was never staged here (newest ${b.hi})`);
        if (b && frame.e > b.lo) {
          b.lo = frame.e;
          this.backup(out, frame.rank, { op: "commit", cut: frame.e }, { kind: "plain", rank: frame.rank, what: "backup commit" });
        }
        return;
      }
      case "dv":
        if (this.record.mode !== "vm") return this.refuse(out, `dv frame for a group in mode ${this.record.mode}`);
        return this.onDeliveredVector(frame.rank, frame.d, out);
      case "report":
        return this.onReport(from, frame, out);
      case "rollback":
        return this.onRollback(from, frame, out);
      case "rolled":
        return this.onRolled(from, frame, out);
      case "resume":
        return this.onResume(frame, out);
      case "halt":
        return; // handled above
    }
  }

  /**
   * A frame of an older incarnation: dropped. If its sender is one the record
   * declares failed (paused, or cut off, while the others decided), it may
   * not know: tell it, so that it reads the store and stops (fencing).
   */
  private onStaleFrame(from: HostId, out: CoreAction[]): void {
    if (!this.record.failed.includes(from) || from === this.host) return;
    const last = this.staleToldAt.get(from) ?? -Infinity;
    if (this.now_ms - last < STALE_TELL_INTERVAL_MS) return;
    this.staleToldAt.set(from, this.now_ms);
    out.push({ type: "send", to: from, frame: { k: "stale", inc: this.record.incarnation } });
  }

  /**
   * Who may send `frame` in this incarnation: the leader ends, commits and
   * steers a recovery; a member's primary host ships its deltas, images and
   * vm-mode commits; its backup host acknowledges. Anything else is refused
   * (a bug, or a peer that is not what it claims).
   */
  private senderProblem(from: HostId, frame: GroupFrame): string | null {
    const r = this.record;
    const expect = (host: HostId | null, role: string) => (from === host ? null : `${frame.k} frame from ${from}, but ${role} is ${host ?? "nobody"}`);
    switch (frame.k) {
      case "end":
      case "commit":
      case "rollback":
      case "resume":
        return expect(r.leader, "the leader");
      case "delta":
      case "image":
      case "vcommit":
      case "dv":
        return expect(r.placement[frame.rank].primary, `member ${frame.rank}'s primary host`);
      case "staged":
        return expect(r.placement[frame.rank].backup, `member ${frame.rank}'s backup host`);
      case "pending":
      case "active":
        return primaryHostsOf(r).includes(from) ? null : `${frame.k} frame from ${from}, which holds no primary of the group`;
      default:
        return null; // recover, report, rolled: checked where they are handled
    }
  }

  /** A halt stops the group here: never for a member whose primary runs on this host (its copy survived), never for nothing. */
  private haltProblem(from: HostId, frame: FrameOf<"halt">): string | null {
    if (frame.lost.length === 0) return "halt frame names no lost member";
    // In this host's own incarnation only its coordinator decides; a newer one's coordinator is not known here yet.
    if (frame.inc === this.record.incarnation && from !== this.record.leader) return `halt frame from ${from}, but the leader is ${this.record.leader}`;
    const here = frame.lost.filter((rank) => this.members.has(rank));
    return here.length ? `halt frame: members ${here.join(", ")} it calls lost have their primary running on this host` : null;
  }

  /** group mode: end epoch `e` of every member here (those a marker reached ended it already). */
  private onEnd(e: Epoch, commit: CutCommit | null, out: CoreAction[]): void {
    if (this.record.mode !== "group") return this.refuse(out, `end frame for a group in mode ${this.record.mode}`);
    // The leader ends e once cut e-1 committed, which needed every member's checkpoint e-1: a member is never more than one epoch behind.
    for (const m of this.members.values()) {
      if (m.state !== "running") continue;
      if (e > m.captured + 1) return this.refuse(out, `end frame: epoch ${e} is past member ${m.rank}'s next (${m.captured + 1})`);
      if (commit && commit.c > m.captured) return this.refuse(out, `end frame: cut ${commit.c} commits a checkpoint member ${m.rank} never took (newest ${m.captured})`);
    }
    for (const m of this.members.values()) {
      if (m.state !== "running") continue;
      // Sender `rank` may drop what each receiver delivered at the committed cut.
      const fresh = commit && commit.c > m.committed ? { epoch: commit.c, trim: senderColumn(commit.d, m.rank) } : undefined;
      if (fresh) m.committed = fresh.epoch;
      this.vm(out, m.rank, { op: "capture_to", epoch: e, commit: fresh }, { kind: "capture_to", rank: m.rank });
    }
    if (commit) this.commitBackups(commit.c, out);
  }

  private onCommit(c: Epoch, delivered: number[][], out: CoreAction[]): void {
    if (this.record.mode !== "group") return this.refuse(out, `commit frame for a group in mode ${this.record.mode}`);
    for (const m of this.members.values()) {
      if (m.state === "running" && c > m.captured) return this.refuse(out, `commit frame: cut ${c} commits a checkpoint member ${m.rank} never took (newest ${m.captured})`);
    }
    for (const m of this.members.values()) {
      if (m.state !== "running" || c <= m.committed) continue;
      m.committed = c;
      this.vm(out, m.rank, { op: "commit", epoch: c, trim: senderColumn(delivered, m.rank) }, { kind: "plain", rank: m.rank, what: "commit" });
    }
    this.commitBackups(c, out);
  }

  private commitBackups(c: Epoch, out: CoreAction[]): void {
    for (const b of this.backups.values()) {
      if (!b.has_image || c <= b.lo) continue;
      b.lo = Math.min(c, b.hi);
      this.backup(out, b.rank, { op: "commit", cut: b.lo }, { kind: "plain", rank: b.rank, what: "backup commit" });
    }
  }

  private onDelta(frame: FrameOf<"delta">, body: Handle, out: CoreAction[]): void {
    const b = this.backups.get(frame.rank);
    if (!b || !b.has_image) return this.refuse(out, `delta of member ${frame.rank}, which has no backup here`);
    // Deltas come in epoch order on one connection; any other one would leave a gap the backup cannot fold past.
    if (frame.e !== b.hi + 1) return this.refuse(out, `delta ${frame.e} of member ${frame.rank} does not follow the newest staged ${b.hi}`);
    b.hi = frame.e;
    this.backup(out, frame.rank, { op: "stage", epoch: frame.e, delta: body }, { kind: "stage", rank: frame.rank, epoch: frame.e, delivered: frame.d, inc: frame.inc });
  }

  private onImage(frame: FrameOf<"image">, body: Handle, out: CoreAction[]): void {
    if (this.record.placement[frame.rank].backup !== this.host) return this.refuse(out, `image of member ${frame.rank}, whose backup is not this host`);
    // Replaces whatever copy is here: the new backup starts from this image. The driver runs this
    // rank's steps in order, so deltas staged after it wait for the install.
    this.backups.set(frame.rank, { rank: frame.rank, has_image: true, lo: frame.e, hi: frame.e, image_inc: frame.inc });
    this.backup(out, frame.rank, { op: "install", epoch: frame.e, image: body, released_seq: frame.released_seq, history: frame.history }, { kind: "install", rank: frame.rank, epoch: frame.e, inc: frame.inc });
  }

  private onStaged(frame: FrameOf<"staged">, out: CoreAction[]): void {
    if (this.record.mode === "group") {
      this.leader?.onStaged(frame.rank, frame.e, frame.d, this.now_ms);
      return;
    }
    const m = this.members.get(frame.rank);
    if (!m?.clock) return;
    const inflight = m.clock.inflight;
    while (inflight.length && inflight[0].epoch < frame.e) inflight.shift();
    const head = inflight[0];
    if (!head || head.epoch !== frame.e) return; // a stale ack (an earlier backup)
    inflight.shift();
    m.committed = Math.max(m.committed, frame.e);
    this.vm(out, m.rank, { op: "commit", epoch: frame.e }, { kind: "commit", rank: m.rank, member: m, epoch: frame.e, delivered: head.delivered });
  }

  /** vm mode: receiver `rank` committed a checkpoint with `delivered`: local senders trim. */
  private onDeliveredVector(rank: Rank, delivered: number[], out: CoreAction[]): void {
    const row = this.committedDelivered[rank];
    let changed = false;
    for (let s = 0; s < row.length; s++) {
      if (delivered[s] > row[s]) {
        row[s] = delivered[s];
        changed = true;
      }
    }
    if (!changed) return;
    for (const m of this.members.values()) {
      if (m.state === "running") this.vm(out, m.rank, { op: "trim", delivered_by_receiver: this.committedDelivered.map((r) => r[m.rank]) }, { kind: "plain", rank: m.rank, what: "trim" });
    }
  }

  // ---- step results ----------------------------------------------------------------------------

  private onDone(event: Extract<CoreEvent, { type: "done" }>, out: CoreAction[]): void {
    const ctx = this.steps.get(event.id);
    if (!ctx) return; // a step of a replica this host dropped since
    this.steps.delete(event.id);
    if (!event.ok) {
      this.stepsFailed++;
      this.notify(out, { kind: "step_failed", rank: "rank" in ctx ? ctx.rank : null, step: ctx.kind === "plain" ? ctx.what : ctx.kind, error: event.error });
      if (ctx.kind === "capture" && ctx.member.clock) ctx.member.clock.capturing = false;
      if (ctx.kind === "stage") this.refuse(out, `delta ${ctx.epoch} of member ${ctx.rank} refused: ${event.error}`);
      if (ctx.kind === "install") this.backups.delete(ctx.rank);
      if (ctx.kind === "restore") this.localStepDone(ctx.inc, out);
      return;
    }
    const v = event.value;
    switch (ctx.kind) {
      case "capture": {
        const m = ctx.member;
        if (m.clock) m.clock.capturing = false;
        if (this.members.get(m.rank) !== m || m.state !== "running" || !m.clock) return;
        assert(v.epoch !== undefined && v.delivered && v.delta !== undefined, "capture answers epoch, delivered and delta");
        m.captured = v.epoch;
        m.held = v.held ?? 0;
        if (this.record.mode === "none") {
          m.committed = v.epoch;
          this.vm(out, m.rank, { op: "commit", epoch: v.epoch }, { kind: "plain", rank: m.rank, what: "commit" });
          return;
        }
        const backup = this.record.placement[m.rank].backup;
        if (backup === null) return;
        m.clock.inflight.push({ epoch: v.epoch, delivered: v.delivered });
        this.sendTo(out, backup, { k: "delta", inc: this.record.incarnation, rank: m.rank, e: v.epoch, d: v.delivered }, v.delta);
        return;
      }
      case "commit": {
        // vm mode: the member's checkpoint committed (its held messages went out): tell its backup and the senders.
        if (this.members.get(ctx.rank) !== ctx.member || ctx.member.state !== "running") return;
        const backup = this.record.placement[ctx.rank].backup;
        if (backup !== null) this.sendTo(out, backup, { k: "vcommit", inc: this.record.incarnation, rank: ctx.rank, e: ctx.epoch });
        if (ctx.delivered) this.broadcast(out, primaryHostsOf(this.record), { k: "dv", inc: this.record.incarnation, rank: ctx.rank, e: ctx.epoch, d: ctx.delivered });
        return;
      }
      case "stage": {
        if (ctx.inc !== this.record.incarnation) return;
        const to = this.record.mode === "group" ? this.record.leader : this.record.placement[ctx.rank].primary;
        this.sendTo(out, to, { k: "staged", inc: ctx.inc, rank: ctx.rank, e: ctx.epoch, d: ctx.delivered });
        return;
      }
      case "restore": {
        // A fresh image (vm mode) is a checkpoint the VM took: the next delta must follow it.
        const m = this.members.get(ctx.rank);
        if (m && v.epoch !== undefined && v.epoch > m.captured) m.captured = v.epoch;
        if (this.local && this.local.inc === ctx.inc) {
          assert(v.delivered, "restore answers the delivered vector");
          this.local.delivered[ctx.rank] = v.delivered;
          if (v.route) this.local.routes[ctx.rank] = v.route;
        }
        this.localStepDone(ctx.inc, out);
        return;
      }
      case "run":
        if (ctx.inc === this.record.incarnation && this.state === "running") this.startClocks(ctx.epoch === null ? 0 : ctx.epoch - 1);
        return;
      case "capture_to":
      case "install":
      case "plain":
        return;
    }
  }

  // ---- failure handling: detection and the decision ----------------------------------------

  private onHosts({ live, heard, registered }: Extract<CoreEvent, { type: "hosts" }>, out: CoreAction[]): void {
    const before = this.live;
    this.live = new Set(live);
    const registrationsGone = [...this.registered].some((h) => !registered.includes(h));
    const heardMore = heard.some((h) => !this.heard.has(h));
    this.registered = new Set(registered);
    this.heard = new Set(heard);
    if (this.state !== "running" || this.preparedOnly) return;
    // A registration lapsed, or a peer is heard again: a side that lacked a quorum may have one now.
    if ((registrationsGone || heardMore) && this.withoutQuorum) this.proposeDue_ms = Math.min(this.proposeDue_ms, this.now_ms);
    const gone = [...before].filter((h) => !this.live.has(h));
    for (const h of gone) this.notify(out, { kind: "suspected", host: h });
    // A host is back (or joined) and members lack a backup: the leader re-protects them.
    const back = [...this.live].filter((h) => !before.has(h));
    if (back.length && this.record.leader === this.host && this.degradedRanks(this.record).length) this.proposeDue_ms = Math.min(this.proposeDue_ms, this.now_ms);
    // A participant of a recovery this host coordinates is gone: if it died, this incarnation cannot
    // finish, so look at the store now; a decision supersedes this coordination (coordinate() replaces
    // it). It is kept meanwhile: a host that was only paused comes back, answers the `recover` that is
    // repeated every RECOVER_RETRY_MS, and the recovery finishes (dropping it left the group frozen
    // when no decision followed).
    const c = this.coordination;
    if (c && gone.some((h) => c.hosts.includes(h))) {
      this.proposeDue_ms = this.now_ms;
      return;
    }
    if (needsFailover(this.record, this.live).length === 0) return;
    // Survivors all see the failure; the lowest-named live one proposes first, the others only if
    // nothing happened after a while (it may have died too). The compare-and-swap decides either way.
    const candidates = activeHostsOf(this.record).filter((h) => this.live.has(h));
    const delay = candidates[0] === this.host ? 0 : this.backoff_ms();
    this.proposeDue_ms = Math.min(this.proposeDue_ms, this.now_ms + delay);
  }

  /**
   * Whether this host may write a decision: it hears from (itself included)
   * at least half of the cluster (the registered hosts and any it hears
   * from), and the store's compare-and-swap is one more voter, on the side
   * of whoever reaches it: a strict majority of hosts and store.
   *
   * Why: a host cut off from its peers but not from the store suspects them
   * all, as they suspect it, and both sides reach the store; whoever wrote
   * first would win. So a minority does not write at all: it only reads the
   * record (and so finds itself fenced). Two halves that both reach the
   * store are told apart by the compare-and-swap alone (with two hosts, one
   * dying is decided at once). "Hears from" means within half the detection
   * timeout: a cut host times its peers out one by one, a few ms apart, and
   * must not count the second on its side while deciding about the first.
   * A dead host keeps its registration until its lease lapses: a survivor of
   * more than half of the cluster dying at once decides only after that.
   */
  private quorate(): boolean {
    const cluster = new Set([...this.registered, ...this.live, ...this.heard]);
    const seen = [...cluster].filter((h) => this.heard.has(h)).length;
    return 2 * seen >= cluster.size;
  }

  /** Writes `value` as the group's record if this side has a quorum; otherwise reads the store again later. */
  private propose(out: CoreAction[], expected: number, value: ProtectionRecord): void {
    if (!this.quorate()) {
      if (!this.withoutQuorum) this.notify(out, { kind: "no_quorum", heard: [...this.heard].sort(), registered: [...this.registered].sort() });
      this.withoutQuorum = true;
      this.proposeDue_ms = Math.min(this.proposeDue_ms, this.now_ms + this.backoff_ms());
      return;
    }
    this.withoutQuorum = false;
    this.storeOp = { op: "cas", value };
    out.push({ type: "store_cas", key: protectionKey(this.record.group), expected, value });
  }

  /** How long a host that is not the first candidate waits before it proposes or looks again; never 0, so a look never loops. */
  private backoff_ms(): number {
    return Math.max(PROPOSE_BACKOFF_DETECTS * this.detect_ms, RECOVER_RETRY_MS);
  }

  private readStore(out: CoreAction[]): void {
    if (this.storeOp) return;
    this.storeOp = { op: "get" };
    out.push({ type: "store_get", key: protectionKey(this.record.group) });
  }

  private onStore(result: Extract<CoreEvent, { type: "store" }>, out: CoreAction[]): void {
    const op = this.storeOp;
    if (!op || op.op !== result.op) return;
    this.storeOp = null;
    if (this.state !== "running") return;
    if (result.unavailable) {
      // Unreachable store: nothing was read or decided. Look again soon (a CAS's outcome is
      // unknown, so it is not repeated blindly: the next read decides afresh).
      this.proposeDue_ms = Math.min(this.proposeDue_ms, this.now_ms + STORE_RETRY_MS);
      return;
    }
    const current = result.record;
    if (!current) return; // the group was removed
    if (current.failed.includes(this.host)) return this.fence(out);
    if (op.op === "cas") {
      if (result.ok) {
        this.notify(out, { kind: "decided", inc: op.value.incarnation, dead: op.value.failed.filter((h) => !this.record.failed.includes(h)), record: op.value });
        this.coordinate(op.value, out);
      } else {
        this.proposeDue_ms = this.now_ms; // someone else changed the record: look again
      }
      return;
    }
    if (current.incarnation > this.record.incarnation && current.leader === this.host) {
      // This host's own decision: its compare-and-swap took effect, but the store went away before
      // the answer came back (`unavailable`). Only this host writes itself as the leader, and adopting
      // a decision makes it the record here, so nobody else will carry it out: coordinate it now.
      this.notify(out, { kind: "decided", inc: current.incarnation, dead: current.failed.filter((h) => !this.record.failed.includes(h)), record: current });
      this.coordinate(current, out);
      return;
    }
    const dead = needsFailover(current, this.live);
    if (current.incarnation > this.record.incarnation && !dead.includes(current.leader)) {
      // Decided already by a live coordinator: its `recover` is on its way. Look again later in case it dies.
      this.proposeDue_ms = this.now_ms + this.backoff_ms();
      return;
    }
    if (dead.length === 0) {
      // No failure to decide; a degraded group whose leader this is gets backups if a host is free.
      if (current.incarnation !== this.record.incarnation || current.leader !== this.host || this.degradedRanks(current).length === 0) return;
      const healed = planFailover(current, [], [...this.live], this.host);
      if (this.degradedRanks(healed).length === this.degradedRanks(current).length) return; // no host to place them on
      return this.propose(out, result.version, healed);
    }
    // Only backups lost (no primary, not the leader): nothing is running on them, so the decision can
    // wait one detection period. Hosts that fail close together (a rack, a pause of several) are then
    // decided together: replacing the first backup by one on a host about to be found dead too would
    // fence a valid copy for a new one that never gets its image.
    const backupsOnly = !dead.includes(current.leader) && current.placement.every((p) => !dead.includes(p.primary));
    if (!backupsOnly) this.backupsLostSince_ms = null;
    else {
      this.backupsLostSince_ms ??= this.now_ms;
      const due = this.backupsLostSince_ms + Math.max(this.detect_ms, RECOVER_RETRY_MS);
      if (this.now_ms < due) {
        this.proposeDue_ms = Math.min(this.proposeDue_ms, due);
        return;
      }
    }
    const next = planFailover(current, dead, [...this.live], this.host);
    if (onlyDegrades(current, next, dead)) {
      // Only backups are down and no live host can replace them: a decision would fence them for
      // nothing. The group waits (nothing commits, output waits) for them to return or a host to join.
      const ranks = current.placement.flatMap((p, rank) => (p.backup !== null && dead.includes(p.backup) ? [rank] : []));
      this.notify(out, { kind: "degraded", inc: current.incarnation, ranks });
      return;
    }
    this.propose(out, result.version, next);
  }

  /** Members without a backup (none mode has none by design). */
  private degradedRanks(record: ProtectionRecord): Rank[] {
    if (record.mode === "none") return [];
    return record.placement.flatMap((p, rank) => (p.backup === null ? [rank] : []));
  }

  // ---- recovery: the coordinator -----------------------------------------------------------

  /** This host won the compare-and-swap: it coordinates the recovery and leads the group afterwards. */
  private coordinate(next: ProtectionRecord, out: CoreAction[]): void {
    // Members the record shows without a copy are not halted on here: whether a live host holds one
    // (a new backup's image may never have arrived) only the reports tell, and the halt names them all.
    const hosts = activeHostsOf(next);
    if (!hosts.includes(this.host)) hosts.push(this.host);
    this.coordination = { record: next, hosts, reports: new Map(), rolled: new Map(), routes: {}, plan: null, started_ms: this.now_ms, retryDue_ms: this.now_ms + RECOVER_RETRY_MS };
    for (const h of hosts) if (h !== this.host) out.push({ type: "send", to: h, frame: { k: "recover", inc: next.incarnation, record: next }, body: "module" });
    this.adopt(next, this.host, out);
    // A host of this incarnation died while the decision was in flight (its death came meanwhile, with
    // nothing left to re-trigger the proposal): look at the store now (see onHosts: the coordination
    // stays until a decision supersedes it, in case the host was only paused).
    if (this.coordination && hosts.some((h) => !this.live.has(h))) this.proposeDue_ms = this.now_ms;
  }

  private onReport(from: HostId, frame: FrameOf<"report">, out: CoreAction[]): void {
    const c = this.coordination;
    if (!(c ? c.hosts : activeHostsOf(this.record)).includes(from)) return this.refuse(out, `report frame from ${from}, which takes no part in the recovery`);
    if (!c || c.plan !== null) return; // late: this host does not coordinate (now)
    // A host reports only the replicas the record places on it: a claim about another's would steer the cut.
    const p = c.record.placement;
    const primary = frame.primaries.find((x) => p[x.rank].primary !== from);
    if (primary) return this.refuse(out, `report frame from ${from}: member ${primary.rank}'s primary is not placed there`);
    const backup = frame.backups.find((x) => p[x.rank].primary !== from && p[x.rank].backup !== from);
    if (backup) return this.refuse(out, `report frame from ${from}: no replica of member ${backup.rank} is placed there`);
    c.reports.set(from, { primaries: frame.primaries, backups: frame.backups });
    if (c.reports.size < c.hosts.length) return;
    const plan = planRecovery(c.record, c.reports);
    c.plan = plan;
    if (plan.refused) {
      // Rolling back to a cut below a released one would undo output: the group stays stopped here (a further failure decides again).
      this.coordination = null;
      return this.refuse(out, `recovery of incarnation ${c.record.incarnation} not carried out: ${plan.refused}`);
    }
    if (plan.lost.length) {
      this.coordination = null;
      this.broadcast(out, c.hosts, { k: "halt", inc: c.record.incarnation, lost: plan.lost });
      return;
    }
    this.notify(out, { kind: "cut_chosen", inc: c.record.incarnation, cut: plan.cut, images: plan.images, committed: plan.committed });
    this.broadcast(out, c.hosts, { k: "rollback", inc: c.record.incarnation, cut: plan.cut, targets: plan.targets, images: plan.images });
  }

  private onRolled(from: HostId, frame: FrameOf<"rolled">, out: CoreAction[]): void {
    const c = this.coordination;
    if (!(c ? c.hosts : activeHostsOf(this.record)).includes(from)) return this.refuse(out, `rolled frame from ${from}, which takes no part in the recovery`);
    if (!c || c.plan === null) return; // late: this host does not coordinate (now)
    const notHere = [...Object.keys(frame.d), ...Object.keys(frame.routes)].find((rank) => c.record.placement[Number(rank)].primary !== from);
    if (notHere !== undefined) return this.refuse(out, `rolled frame from ${from}: member ${notHere}'s primary is not placed there`);
    c.rolled.set(from, frame.d);
    Object.assign(c.routes, frame.routes);
    if (c.rolled.size < c.hosts.length) return;
    const size = c.record.size;
    const matrix = Array.from({ length: size }, () => new Array<number>(size).fill(0));
    for (const d of c.rolled.values()) for (const [rank, vector] of Object.entries(d)) matrix[Number(rank)] = vector;
    const routes = c.record.placement.map((_, rank) => c.routes[rank] ?? null);
    const cut = c.plan.cut;
    this.coordination = null;
    this.notify(out, { kind: "resumed", inc: c.record.incarnation, cut, recovery_ms: this.now_ms - c.started_ms });
    this.broadcast(out, c.hosts, { k: "resume", inc: c.record.incarnation, e: (cut ?? 0) + 1, d: matrix, routes });
  }

  // ---- recovery: every participant ------------------------------------------------------------

  /** A new incarnation: refuse older frames from now on, stop, say what each replica here can reach. */
  private adopt(record: ProtectionRecord, coordinator: HostId, out: CoreAction[]): void {
    if (record.failed.includes(this.host)) {
      // A coordinator sends `recover` only to hosts it keeps: the store, not this frame, says whether this host was declared failed.
      this.refuse(out, `recover frame: record declares this host failed; asking the store`);
      this.proposeDue_ms = this.now_ms;
      return;
    }
    if (record.leader !== coordinator) return this.refuse(out, `recover frame from ${coordinator}, but its record's leader is ${record.leader}`);
    const revived = this.record.failed.filter((h) => !record.failed.includes(h));
    if (revived.length) return this.refuse(out, `recover frame: record places hosts declared failed again (${revived.join(", ")})`);
    if (record.group !== this.record.group || record.mode !== this.record.mode || record.size !== this.record.size) {
      return this.refuse(out, `recover frame: record of group ${record.group} (${record.mode}, ${record.size}) does not describe this group`);
    }
    // A primary that lives is never moved by a failover decision: a record that does is not one.
    for (const m of this.members.values()) {
      if (record.placement[m.rank].primary !== this.host) return this.refuse(out, `recover frame: record moves member ${m.rank}'s live primary off this host`);
    }
    this.record = record;
    this.local = null;
    this.recoveryNext = { k: "rollback" };
    // Epochs start again from the recovery cut: what was told in the old incarnation says nothing about them.
    this.activeSentEpoch = 0;
    this.activeSeen = 0;
    this.proposeDue_ms = Infinity;
    this.backupsLostSince_ms = null;
    if (this.coordination && this.coordination.record.incarnation !== record.incarnation) this.coordination = null;
    this.stopClocks();
    for (const m of this.members.values()) {
      if (m.state === "running") this.vm(out, m.rank, { op: "freeze" }, { kind: "plain", rank: m.rank, what: "freeze" });
      m.state = "frozen";
    }
    const primaries = [...this.members.values()].map((m) => ({ rank: m.rank, hi: m.captured, committed: m.committed }));
    const backups = [...this.backups.values()].map((b) => ({ rank: b.rank, has_image: b.has_image, lo: b.lo, hi: b.hi }));
    this.sendTo(out, coordinator, { k: "report", inc: record.incarnation, primaries, backups });
  }

  /** Every host: go to the recovery cut (group) or promote the lost members (vm). */
  private onRollback(from: HostId, frame: FrameOf<"rollback">, out: CoreAction[]): void {
    const record = this.record;
    const inc = record.incarnation;
    // Only once per incarnation this host adopted, before its resume: a rollback at any other time would undo a running group's work.
    if (this.recoveryNext?.k !== "rollback") return this.refuse(out, `rollback frame while no recovery of incarnation ${inc} awaits one`);
    if ((frame.cut === null) !== (record.mode !== "group")) return this.refuse(out, `rollback frame: ${frame.cut === null ? "no cut" : `cut ${frame.cut}`} for a group in mode ${record.mode}`);
    this.recoveryNext = { k: "resume", cut: frame.cut };
    const local: LocalRecovery = { inc, coordinator: from, outstanding: 1, failed: false, delivered: {}, routes: {} };
    this.local = local;
    const rolledBack: Rank[] = [];
    const promoted: Rank[] = [];
    // First the copies that new images replace and those the new placement does not keep here.
    for (const [rank, b] of [...this.backups]) {
      const p = record.placement[rank];
      // The image of this very recovery may arrive before the coordinator's rollback (it comes from
      // the member's primary host, on another connection): that copy is the new one, not one to replace.
      const replaced = p.backup === this.host && frame.images.includes(rank) && b.image_inc !== inc;
      if (replaced || (p.backup !== this.host && p.primary !== this.host)) {
        this.backups.delete(rank);
        this.backup(out, b.rank, { op: "drop" }, { kind: "plain", rank, what: "drop backup" });
      }
    }
    for (let rank = 0; rank < record.size; rank++) {
      const p = record.placement[rank];
      const image_to = frame.images.includes(rank) ? p.backup : null;
      if (p.primary === this.host) {
        const target = frame.cut ?? frame.targets[rank] ?? null;
        let m = this.members.get(rank);
        let how: "rollback" | "keep" = "keep";
        if (m) {
          if (target !== null) {
            if (target < m.committed || target > m.captured) {
              // The coordinator chose from this host's own report, so this is a bug or a hostile peer.
              local.failed = true;
              this.refuse(out, `rollback frame: member ${rank} cannot go to cut ${target} (reaches ${m.committed}..${m.captured})`);
              continue;
            }
            how = "rollback";
            m.captured = target;
            rolledBack.push(rank);
          }
        } else {
          const b = this.backups.get(rank);
          if (!b || target === null) {
            this.notify(out, { kind: "step_failed", rank, step: "promote", error: "no copy of this member here to promote" });
            continue;
          }
          if (target < b.lo || target > b.hi) {
            local.failed = true;
            this.refuse(out, `rollback frame: the backup of member ${rank} here cannot be promoted at ${target} (reaches ${b.lo}..${b.hi})`);
            continue;
          }
          this.backups.delete(rank);
          this.backup(out, rank, { op: "promote", cut: target }, { kind: "plain", rank, what: "promote" });
          m = this.newMember(rank, target);
          m.committed = b.lo;
          this.members.set(rank, m);
          promoted.push(rank);
        }
        if (target !== null) {
          m.captured = Math.max(m.captured, target);
          m.committed = Math.max(m.committed, target);
        }
        local.outstanding++;
        this.vm(out, rank, { op: "restore", how, cut: target, inc, image_to, fresh_image: target === null }, { kind: "restore", rank, inc });
      } else if (p.backup === this.host && !frame.images.includes(rank)) {
        const b = this.backups.get(rank);
        const target = frame.cut ?? frame.targets[rank];
        if (b && target !== undefined && (target < b.lo || target > b.hi)) {
          local.failed = true;
          this.refuse(out, `rollback frame: the backup of member ${rank} here cannot go to cut ${target} (reaches ${b.lo}..${b.hi})`);
        } else if (b && target !== undefined) {
          b.lo = b.hi = target;
          this.backup(out, rank, { op: "rollback_to", cut: target }, { kind: "plain", rank, what: "backup rollback" });
        }
      }
    }
    this.notify(out, { kind: "rolled_back", inc, cut: frame.cut, rolled_back: rolledBack, promoted });
    this.localStepDone(inc, out);
  }

  private localStepDone(inc: Incarnation, out: CoreAction[]): void {
    const l = this.local;
    if (!l || l.inc !== inc || l.inc !== this.record.incarnation) return;
    if (--l.outstanding > 0) return;
    this.local = null;
    if (l.failed) {
      // The group waits here rather than resume on a wrong delivered matrix; the refusal is logged and counted.
      this.notify(out, { kind: "step_failed", rank: null, step: "rollback", error: "a replica here could not go to the recovery cut: not answering rolled" });
      return;
    }
    this.sendTo(out, l.coordinator, { k: "rolled", inc, d: l.delivered, routes: l.routes });
  }

  /** Every host: new routes, re-send what each receiver's restored state lacks, then run. */
  private onResume(frame: FrameOf<"resume">, out: CoreAction[]): void {
    const next = this.recoveryNext;
    if (next?.k !== "resume") return this.refuse(out, `resume frame while no recovery of incarnation ${this.record.incarnation} awaits one`);
    if (frame.e !== (next.cut ?? 0) + 1) return this.refuse(out, `resume frame: epoch ${frame.e} does not follow the recovery cut ${next.cut ?? 0}`);
    this.recoveryNext = null;
    // Running from now on: the leader's first `end` may arrive while the members' run step is in
    // progress, and the deltas of the captures it asks for must be shipped.
    for (const m of this.members.values()) m.state = "running";
    for (let r = 0; r < this.record.size; r++) for (let s = 0; s < this.record.size; s++) this.committedDelivered[r][s] = Math.max(this.committedDelivered[r][s], frame.d[r][s]);
    this.started = true;
    this.membersStep(out, { op: "run", routes: frame.routes, delivered: frame.d }, { kind: "run", inc: frame.inc, epoch: frame.e });
  }

  /** No copy of some member survived: the group stops here, and says which members were lost. */
  private halt(lost: Rank[], out: CoreAction[]): void {
    if (this.state !== "running") return;
    this.state = "halted";
    this.lost = [...lost];
    this.stopAll(out);
    this.notify(out, { kind: "lost", inc: this.record.incarnation, ranks: lost });
  }

  /**
   * The store names this host failed (it was suspected while alive, e.g.
   * paused or cut off): others may have promoted its backups, so it stops its
   * primaries and drops its backups; they release nothing more.
   */
  private fence(out: CoreAction[]): void {
    this.state = "fenced";
    this.stopAll(out);
    this.notify(out, { kind: "fenced", inc: this.record.incarnation });
  }

  private stopAll(out: CoreAction[]): void {
    this.stopClocks();
    this.coordination = null;
    this.local = null;
    this.recoveryNext = null;
    this.proposeDue_ms = Infinity;
    for (const m of this.members.values()) this.vm(out, m.rank, { op: "stop" }, { kind: "plain", rank: m.rank, what: "stop" });
    for (const b of this.backups.values()) this.backup(out, b.rank, { op: "drop" }, { kind: "plain", rank: b.rank, what: "drop backup" });
    this.members.clear();
    this.backups.clear();
  }
}
