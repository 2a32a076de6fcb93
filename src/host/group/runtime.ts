/**
 * One protected group (size >= 2) as one host runs it: the primaries and
 * backups the group's record places here, the leader if it is this host, and
 * this host's part in a recovery. DESIGN.md "Messages inside a group" and
 * "Failure handling"; the protocol is the one src/group/ models sans I/O and
 * checks in its simulator, carried out here over real VMs and TCP.
 *
 * Modes:
 * - group: group messages go out at once; the leader ends epochs on every
 *   member together and commits cut e once every backup staged e; a failure
 *   rolls every member back to one recovery cut (survivors in place, from
 *   their undo logs; members that lost their primary by promoting their
 *   backup), then senders re-send what receivers lack.
 * - vm: each member checkpoints on its own clock (Remus); everything it sends,
 *   peers included, is held until its own checkpoint of that epoch commits. A
 *   failure promotes the lost members' backups; survivors keep their state;
 *   senders re-send what the promoted members lack.
 * - none: no backups, no commits to wait for; messages go out at once, output
 *   is released at local checkpoints. A failure loses the VMs of the dead host.
 */
import type { Logger } from "pino";
import { decodeImage } from "../../checkpoint/format.js";
import { MessageChannel, type MessagePort } from "node:worker_threads";
import type { PathRoute } from "../../vm/message-path.js";
import { DEFAULT_LIMITS, type VmLimits } from "../../vm/machine.js";
import type { CaptureResult, GuestBundle, WorkerVmOptions } from "../../vm/protocol.js";
import { VmWorker } from "../../vm/vm.js";
import type { CoordinationStore } from "../../store/store.js";
import { assert } from "../../util/assert.js";
import { BackupReplica } from "../backup.js";
import type { LogRecordWire } from "../messages.js";
import { OUTPUT_LOG_HISTORY_BYTES_MAX, OutputLog } from "../output-log.js";
import { vmKey, vmName, type VmRecord } from "../records.js";
import { GroupLeader, type CutCommit } from "./leader.js";
import { GroupMember } from "./member.js";
import { MemberClock } from "./member-clock.js";
import { hostsOf, lostRanks, planFailover, protectionKey, type ProtectionRecord } from "./record.js";
import { type BackupReport, type FrameOf, type GroupFrame, type PrimaryReport } from "./wire.js";

/** What a group runtime needs from its host daemon. */
export interface GroupHostApi {
  readonly id: string;
  readonly log: Logger;
  readonly store: CoordinationStore;
  readonly detect_ms: number;
  /** Interface the VMs' message paths listen on (the host's own). */
  readonly listen_host: string;
  /** Best effort, in order per destination; lost only if the connection breaks. */
  send(to: string, frame: GroupFrame, body?: Uint8Array): void;
  /** Hosts alive now (this one included), sorted. */
  liveHosts(): string[];
  guestFor(module: Uint8Array): Promise<GuestBundle>;
}

/** How often a coordinator repeats `recover` to hosts that have not reported. */
const RECOVER_RETRY_MS = 300;

interface Recovery {
  record: ProtectionRecord;
  /** Hosts that take part: every live host the record places a replica on. */
  hosts: string[];
  reports: Map<string, FrameOf<"report">>;
  rolled: Map<string, Record<number, number[]>>;
  /** Where each primary's message path listens, as the hosts reported after the rollback step. */
  routes: Record<number, PathRoute>;
  cut: number | null;
  started_ms: number;
  retry: NodeJS.Timeout | null;
}

export interface GroupStatus {
  group: string;
  mode: string;
  incarnation: number;
  leader: string;
  committed: number | null;
  recovering: boolean;
  primaries: { rank: number; vm: string; state: string; captured: number; committed: number; backup: string | null; released_seq: number; held: number; busy: string | null; sent_before_commit: number; sent_after_commit: number; held_total: number }[];
  backups: { rank: number; vm: string; cut: number; staged: number }[];
}

export class GroupRuntime {
  record: ProtectionRecord;
  readonly members = new Map<number, GroupMember>();
  readonly backups = new Map<number, BackupReplica>();
  private readonly clocks = new Map<number, MemberClock>();
  private leader: GroupLeader | null = null;
  private recovery: Recovery | null = null;
  /** vm mode: newest committed delivered vector of each receiver (index: receiver, then sender). */
  private readonly committedDelivered: number[][];
  private fenced = false;
  /** group mode: the epoch this host last told the leader it has output waiting in. */
  private pendingSentEpoch = 0;
  private stopped = false;
  private recovering = false;

  private constructor(
    private readonly api: GroupHostApi,
    record: ProtectionRecord,
    readonly module: Uint8Array,
    readonly guest: GuestBundle,
  ) {
    this.record = record;
    this.committedDelivered = Array.from({ length: record.size }, () => new Array<number>(record.size).fill(0));
  }

  get name(): string {
    return this.record.group;
  }

  get inc(): number {
    return this.record.incarnation;
  }

  private get log(): Logger {
    return this.api.log;
  }

  /**
   * The deployed group (cut 0) on this host: primaries booted with their
   * timers stopped, backups holding the blank deployed image. `run` starts it.
   */
  static async prepare(api: GroupHostApi, record: ProtectionRecord, module: Uint8Array): Promise<GroupRuntime> {
    const rt = new GroupRuntime(api, record, module, await api.guestFor(module));
    await Promise.all(
      record.placement.map(async (p, rank) => {
        if (p.primary === api.id) {
          const member = rt.addMember(rank, await VmWorker.boot(rt.guest, rt.vmOptions(rank)), new OutputLog(), 0);
          await rt.openPath(member);
        }
        if (p.backup === api.id) {
          const b = rt.newBackup(rank);
          await b.installBlank();
          rt.backups.set(rank, b);
        }
      }),
    );
    return rt;
  }

  /** A host the record names that has nothing of the group yet (a new backup host during a recovery). */
  static async join(api: GroupHostApi, record: ProtectionRecord, module: Uint8Array): Promise<GroupRuntime> {
    return new GroupRuntime(api, record, module, await api.guestFor(module));
  }

  /** Where the message paths of the primaries on this host listen (what `group_prepare` answers). */
  pathRoutes(): Record<number, PathRoute> {
    const out: Record<number, PathRoute> = {};
    for (const [rank, m] of this.members) if (m.route) out[rank] = m.route;
    return out;
  }

  /** Starts the deployed group: routes of every member (from every host's `group_prepare`), guests' timers, epochs. */
  async run(routes: (PathRoute | null)[]): Promise<void> {
    await this.setRoutes(routes);
    await Promise.all([...this.members.values()].map((m) => m.run()));
    this.startClocks(0);
  }

  private openPath(member: GroupMember): Promise<PathRoute> {
    return member.openPath(this.api.listen_host, this.record.mode === "vm");
  }

  /**
   * Gives every member here the routes to its peers: TCP to the ranks on
   * other hosts, a fresh MessageChannel to each rank on this host (the
   * in-process path). Earlier channels are closed by the VM threads.
   */
  private async setRoutes(routes: (PathRoute | null)[]): Promise<void> {
    assert(routes.length === this.record.size, `${routes.length} routes for a group of ${this.record.size}`);
    const locals = new Map<number, { rank: number; port: MessagePort }[]>();
    const ranks = [...this.members.keys()];
    for (const r of ranks) locals.set(r, []);
    for (let i = 0; i < ranks.length; i++) {
      for (let j = i + 1; j < ranks.length; j++) {
        const { port1, port2 } = new MessageChannel();
        locals.get(ranks[i])!.push({ rank: ranks[j], port: port1 });
        locals.get(ranks[j])!.push({ rank: ranks[i], port: port2 });
      }
    }
    await Promise.all([...this.members].map(([rank, m]) => m.setRoutes(routes, locals.get(rank)!)));
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.stopClocks();
    if (this.recovery?.retry) clearInterval(this.recovery.retry);
    await Promise.all([...this.members.values()].map((m) => m.stop()));
    await Promise.all([...this.backups.values()].map((b) => b.stop()));
  }

  // ---- replicas ------------------------------------------------------------------------

  private vmOptions(rank: number): WorkerVmOptions {
    const limits: VmLimits = {
      ...DEFAULT_LIMITS,
      memory_pages_max: Math.floor((this.record.limits.memory_mib * 1024 * 1024) / 65536),
      call_cpu_ms: this.record.limits.call_cpu_ms,
      output_bytes_max: this.record.limits.output_bytes_max,
    };
    // Timers start with `run`/`resume`, so nothing executes before the group is wired up.
    return { rank, size: this.record.size, limits, timers: "manual", consistent_cut: this.record.mode === "group", sender_log: this.record.mode !== "none" };
  }

  /** A VM record for one member (what `cohort status`/`logs` read), mirroring the placement. */
  vmRecord(rank: number): VmRecord {
    const p = this.record.placement[rank];
    return {
      vm: vmName(this.record.group, rank),
      group: this.record.group,
      rank,
      mode: this.record.mode,
      primary: p.primary,
      backup: p.backup,
      incarnation: this.record.incarnation,
      health: p.backup || this.record.mode === "none" ? "healthy" : "degraded",
      interval_ms: this.record.epoch.interval_ms,
      min_interval_ms: this.record.epoch.min_interval_ms,
      max_interval_ms: this.record.epoch.max_interval_ms,
      limits: this.record.limits,
      size: this.record.size,
    };
  }

  private newBackup(rank: number): BackupReplica {
    return new BackupReplica(this.vmRecord(rank), this.guest, this.vmOptions(rank));
  }

  private addMember(rank: number, vm: VmWorker, log: OutputLog, cut: number): GroupMember {
    const member = new GroupMember(rank, vm, log, cut);
    member.on("output_pending", () => this.outputPending(rank));
    member.on("captured", (captured) => this.shipDelta(member, captured));
    member.on("problem", (reason) => this.log.error({ group: this.name, rank, reason }, "member problem"));
    this.members.set(rank, member);
    return member;
  }

  /** The rank of VM `vm` if it belongs to this group (VM names are `<group>-<rank>`). */
  rankOf(vm: string): number | null {
    const prefix = `${this.name}-`;
    if (!vm.startsWith(prefix)) return null;
    const rank = Number(vm.slice(prefix.length));
    return Number.isInteger(rank) && rank >= 0 && rank < this.record.size && vmName(this.name, rank) === vm ? rank : null;
  }

  /** A member's released output, for `cohort logs`; a backup's mirror if the primary is elsewhere. */
  outputLogOf(rank: number): { log: OutputLog; role: "primary" | "backup" } | null {
    const m = this.members.get(rank);
    if (m) return { log: m.log, role: "primary" };
    const b = this.backups.get(rank);
    return b ? { log: b.log, role: "backup" } : null;
  }

  // ---- clocks: group leader, or one per member (vm, none) ---------------------------------

  private startClocks(committed: number): void {
    if (this.stopped || this.fenced) return;
    this.pendingSentEpoch = 0;
    if (this.record.mode === "group") {
      if (this.record.leader !== this.api.id) return;
      this.leader = new GroupLeader(this.record.size, this.record.epoch, committed, {
        endEpoch: (e, commit) => this.broadcast(commit ? hostsOf(this.record) : this.primaryHosts(), { k: "end", e, ...commit }),
        commit: (c, d) => this.broadcast(hostsOf(this.record), { k: "commit", c, d }),
      });
      this.leader.start();
      return;
    }
    for (const [rank, member] of this.members) {
      const clock = new MemberClock(this.record.epoch, member, this.record.mode === "none", {
        backupHost: () => this.record.placement[rank].backup,
        sendDelta: (host, e, delivered, delta) => this.api.send(host, { ...this.base(), k: "delta", rank, e, d: delivered }, delta),
        committed: (e, delivered) => this.afterMemberCommit(member, e, delivered),
        problem: (reason) => this.log.error({ group: this.name, rank, reason }, "member problem"),
      });
      this.clocks.set(rank, clock);
      clock.start();
    }
  }

  private stopClocks(): void {
    this.leader?.stop();
    this.leader = null;
    for (const c of this.clocks.values()) c.stop();
    this.clocks.clear();
  }

  private outputPending(rank: number): void {
    if (this.record.mode === "group") {
      // One `pending` per epoch from this host is all the leader needs, however many members have output.
      const epoch = (this.members.get(rank)?.captured ?? 0) + 1;
      if (epoch <= this.pendingSentEpoch) return;
      this.pendingSentEpoch = epoch;
      if (this.leader) this.leader.outputPending();
      else this.api.send(this.record.leader, { ...this.base(), k: "pending" });
    } else {
      this.clocks.get(rank)?.outputPending();
    }
  }

  private primaryHosts(): string[] {
    return [...new Set(this.record.placement.map((p) => p.primary))].filter((h) => !this.record.failed.includes(h));
  }

  private base(): { g: string; from: string; inc: number } {
    return { g: this.record.group, from: this.api.id, inc: this.record.incarnation };
  }

  /** Sends to every host in `hosts`; this host handles its own copy at once. */
  private broadcast(hosts: string[], frame: Record<string, unknown>, body?: Uint8Array): void {
    const full = { ...this.base(), ...frame } as GroupFrame;
    for (const h of hosts) {
      if (h === this.api.id) this.handle(full, body ?? new Uint8Array(0));
      else this.api.send(h, full, body);
    }
  }

  // ---- frames from other hosts (and this one) -----------------------------------------------

  /** Entry point for every GROUP frame of this group. */
  handle(frame: GroupFrame, body: Uint8Array): void {
    if (this.stopped || this.fenced) return;
    if (frame.k === "recover") {
      if (frame.inc > this.inc) void this.adopt(frame.record, frame.from).catch((error: Error) => this.log.error({ err: error, group: this.name }, "recovery: adopt failed"));
      return;
    }
    if (frame.inc !== this.inc) return; // stale incarnation (or one this host has not adopted yet): dropped
    switch (frame.k) {
      case "end":
        this.endEpoch(frame.e, frame.c !== undefined && frame.d ? { c: frame.c, d: frame.d } : null);
        return;
      case "pending":
        this.leader?.outputPending();
        return;
      case "delta":
        void this.onDelta(frame, body);
        return;
      case "image":
        void this.onImage(frame, body);
        return;
      case "staged":
        if (this.record.mode === "group") this.leader?.onStaged(frame.rank, frame.e, frame.d);
        else this.clocks.get(frame.rank)?.onStaged(frame.e);
        return;
      case "commit":
        this.onCommit(frame.c, frame.d);
        return;
      case "vcommit":
        void this.backups.get(frame.rank)?.commit(frame.e);
        return;
      case "dv":
        this.onDeliveredVector(frame.rank, frame.d);
        return;
      case "report":
        this.onReport(frame);
        return;
      case "rollback":
        void this.onRollback(frame).catch((error: Error) => this.log.error({ err: error, group: this.name }, "recovery: rollback failed"));
        return;
      case "rolled":
        this.onRolled(frame.from, frame.d, frame.routes);
        return;
      case "resume":
        void this.onResume(frame.e, frame.d, frame.routes).catch((error: Error) => this.log.error({ err: error, group: this.name }, "recovery: resume failed"));
        return;
    }
  }

  /** group mode: end epoch `e` of every member here (members a message from epoch e+1 reached ended it already). */
  private endEpoch(e: number, commit: CutCommit | null): void {
    for (const [rank, member] of this.members) {
      // Sender `rank` may drop what each receiver delivered at the committed cut.
      const withCommit = commit ? { epoch: commit.c, trim: commit.d.map((row) => row[rank]) } : undefined;
      member.endEpoch(e, withCommit).catch((error: Error) => this.log.error({ group: this.name, rank, epoch: e, err: error }, "capture failed"));
    }
    if (commit) for (const b of this.backups.values()) void b.commit(commit.c);
  }

  /** group mode: a member's checkpoint, in epoch order: ship its delta to the backup. */
  private shipDelta(member: GroupMember, captured: CaptureResult): void {
    // Frozen: a recovery started; whatever the VM captured since is decided by the recovery cut.
    if (member.state !== "running" || this.record.mode !== "group") return;
    const backup = this.record.placement[member.rank].backup;
    if (backup === null) return; // degraded
    this.api.send(backup, { ...this.base(), k: "delta", rank: member.rank, e: captured.epoch, d: captured.delivered }, captured.delta);
  }

  private async onDelta(frame: FrameOf<"delta">, body: Uint8Array): Promise<void> {
    const backup = this.backups.get(frame.rank);
    if (!backup) return;
    try {
      await backup.stage(frame.e, body.slice());
    } catch (error) {
      this.log.error({ err: error, group: this.name, rank: frame.rank, epoch: frame.e }, "delta refused");
      return;
    }
    if (frame.inc !== this.inc) return;
    const to = this.record.mode === "group" ? this.record.leader : this.record.placement[frame.rank].primary;
    const staged = { ...this.base(), k: "staged" as const, rank: frame.rank, e: frame.e, d: frame.d };
    if (to === this.api.id) this.handle(staged, new Uint8Array(0));
    else this.api.send(to, staged);
  }

  private async onImage(frame: FrameOf<"image">, body: Uint8Array): Promise<void> {
    if (this.record.placement[frame.rank].backup !== this.api.id) return;
    const old = this.backups.get(frame.rank);
    const b = this.newBackup(frame.rank);
    this.backups.set(frame.rank, b);
    await old?.stop();
    const history = Array.isArray(frame.history) ? (frame.history as LogRecordWire[]) : [];
    await b.install(body.slice(), frame.released_seq, history);
    this.log.info({ group: this.name, rank: frame.rank, cut: frame.e, bytes: body.length }, "backup image installed");
  }

  /** group mode: cut `c` committed. */
  private onCommit(c: number, delivered: number[][]): void {
    for (const [rank, member] of this.members) {
      // Sender `rank` may drop what each receiver delivered at the cut.
      const trim = delivered.map((row) => row[rank]);
      void member.commit(c, trim).catch((error: Error) => this.log.error({ group: this.name, rank, err: error }, "commit failed"));
    }
    for (const b of this.backups.values()) void b.commit(c);
  }

  /** vm/none mode: `member`'s checkpoint `e` committed (its backup staged it; none: at once). */
  private afterMemberCommit(member: GroupMember, e: number, delivered: number[]): void {
    const backup = this.record.placement[member.rank].backup;
    if (backup) this.api.send(backup, { ...this.base(), k: "vcommit", rank: member.rank, e });
    if (this.record.mode === "vm") this.broadcast(this.primaryHosts(), { k: "dv", rank: member.rank, e, d: delivered });
  }

  /** vm mode: receiver `rank` committed a checkpoint with `delivered`: local senders trim. */
  private onDeliveredVector(rank: number, delivered: number[]): void {
    const row = this.committedDelivered[rank];
    for (let s = 0; s < row.length; s++) row[s] = Math.max(row[s], delivered[s] ?? 0);
    for (const [s, member] of this.members) member.trim(this.committedDelivered.map((r) => r[s]));
  }

  // ---- failure handling ------------------------------------------------------------------

  /** A peer host stopped heartbeating. If the group has a replica there, start (or join) a recovery. */
  onHostFailed(host: string): void {
    if (this.stopped || this.fenced || !hostsOf(this.record).includes(host) || this.record.failed.includes(host)) return;
    // Survivors all see the failure; the lowest-named live one proposes first, the others only
    // if nothing happened after a while (it may have died too). The CAS decides either way.
    const live = this.api.liveHosts();
    const candidates = hostsOf(this.record).filter((h) => live.includes(h) && !this.record.failed.includes(h));
    const delay = candidates[0] === this.api.id ? 0 : 3 * this.api.detect_ms;
    const inc = this.inc;
    setTimeout(() => {
      if (this.inc === inc) void this.propose().catch((error: Error) => this.log.error({ err: error, group: this.name }, "recovery: proposal failed"));
    }, delay);
  }

  private async propose(): Promise<void> {
    if (this.stopped || this.fenced || this.recovering) return;
    this.recovering = true;
    try {
      const current = await this.api.store.get<ProtectionRecord>(protectionKey(this.name));
      if (!current) return;
      if (current.value.incarnation > this.inc) return; // someone decided already; its `recover` is on its way
      const live = this.api.liveHosts();
      const dead = hostsOf(current.value).filter((h) => !live.includes(h) && !current.value.failed.includes(h));
      if (dead.length === 0) return;
      const lost = lostRanks(current.value, dead);
      if (lost.length) this.log.error({ group: this.name, ranks: lost, dead }, "members lost: no copy survives");
      if (this.record.mode === "none") {
        this.log.error({ group: this.name, dead }, "mode none: the VMs of the failed host are lost (no protection)");
      }
      const next = planFailover(current.value, dead, live.filter((h) => !current.value.failed.includes(h) && !dead.includes(h)), this.api.id);
      if ((await this.api.store.cas(protectionKey(this.name), current.version, next)) === null) return; // another host won
      this.log.warn({ group: this.name, incarnation: next.incarnation, dead, placement: next.placement }, "recovery: decided, coordinating");
      await this.coordinate(next);
    } finally {
      this.recovering = false;
    }
  }

  /** This host won the CAS: it leads the recovery and the group afterwards. */
  private async coordinate(next: ProtectionRecord): Promise<void> {
    const hosts = hostsOf(next).filter((h) => !next.failed.includes(h));
    const recovery: Recovery = { record: next, hosts, reports: new Map(), rolled: new Map(), routes: {}, cut: null, started_ms: Date.now(), retry: null };
    this.recovery = recovery;
    const sendRecover = () => {
      for (const h of hosts) {
        if (h !== this.api.id && !recovery.reports.has(h)) this.api.send(h, { g: next.group, from: this.api.id, inc: next.incarnation, k: "recover", record: next }, this.module);
      }
    };
    sendRecover();
    recovery.retry = setInterval(() => {
      if (this.recovery !== recovery || recovery.reports.size === hosts.length) {
        clearInterval(recovery.retry!);
        return;
      }
      sendRecover();
    }, RECOVER_RETRY_MS);
    await this.adopt(next, this.api.id);
  }

  /** A new incarnation: stop everything here, say what each replica can reach. */
  private async adopt(record: ProtectionRecord, coordinator: string): Promise<void> {
    if (record.incarnation <= this.inc && coordinator !== this.api.id) return;
    if (record.failed.includes(this.api.id)) {
      await this.fence();
      return;
    }
    this.record = record;
    if (this.recovery && this.recovery.record.incarnation !== record.incarnation) {
      if (this.recovery.retry) clearInterval(this.recovery.retry);
      this.recovery = null;
    }
    this.stopClocks();
    await Promise.all([...this.members.values()].map((m) => m.freeze()));
    const primaries: PrimaryReport[] = [...this.members.values()].map((m) => ({ rank: m.rank, hi: m.captured, committed: m.committed }));
    const backups: BackupReport[] = [...this.backups.entries()].map(([rank, b]) => ({ rank, has_image: b.hasImage, lo: b.committedCut, hi: b.newestCut }));
    const report = { ...this.base(), k: "report" as const, primaries, backups };
    if (coordinator === this.api.id) this.onReport(report);
    else this.api.send(coordinator, report);
  }

  private async fence(): Promise<void> {
    this.fenced = true;
    this.stopClocks();
    this.log.warn({ group: this.name }, "fenced: the group's record names this host failed; its replicas stop");
    await Promise.all([...this.members.values()].map((m) => m.stop()));
    await Promise.all([...this.backups.values()].map((b) => b.stop()));
    this.members.clear();
    this.backups.clear();
  }

  /** Coordinator: a host's report. Once all are in, pick the recovery cut. */
  private onReport(report: FrameOf<"report">): void {
    const r = this.recovery;
    if (!r || report.inc !== r.record.incarnation || r.cut !== null) return;
    r.reports.set(report.from, report);
    if (r.reports.size < r.hosts.length) return;
    const plan = this.recoveryPlan(r);
    r.cut = plan.cut ?? -1;
    this.log.warn({ group: this.name, incarnation: r.record.incarnation, cut: plan.cut, targets: plan.targets, images: plan.images }, "recovery: cut chosen");
    this.broadcast(r.hosts, { k: "rollback", cut: plan.cut, targets: plan.targets, images: plan.images });
  }

  /**
   * group mode: the newest cut every member's surviving copies can reach
   * (>= the newest committed cut any replica knows, so nothing released is
   * undone). A copy that cannot reach it (a backup still without an image)
   * is replaced by a new image. vm mode: each promoted member goes to its
   * backup's newest checkpoint; survivors stay where they are.
   */
  private recoveryPlan(r: Recovery): { cut: number | null; targets: Record<number, number>; images: number[] } {
    const primaries = new Map<number, PrimaryReport>();
    const backups = new Map<string, Map<number, BackupReport>>();
    for (const [host, report] of r.reports) {
      for (const p of report.primaries) primaries.set(p.rank, p);
      backups.set(host, new Map(report.backups.filter((b) => b.has_image).map((b) => [b.rank, b])));
    }
    const next = r.record;
    const targets: Record<number, number> = {};
    if (next.mode !== "group") {
      const images: number[] = [];
      next.placement.forEach((p, rank) => {
        if (!primaries.has(rank)) {
          const b = backups.get(p.primary)?.get(rank);
          if (b) targets[rank] = b.hi;
        }
        if (p.backup && !(primaries.has(rank) && backups.get(p.backup)?.has(rank))) images.push(rank);
      });
      return { cut: null, targets, images: next.mode === "none" ? [] : images };
    }
    let committed = 0;
    for (const p of primaries.values()) committed = Math.max(committed, p.committed);
    for (const m of backups.values()) for (const b of m.values()) committed = Math.max(committed, b.lo);
    let cut = Infinity;
    next.placement.forEach((p, rank) => {
      const primary = primaries.get(rank);
      if (primary) cut = Math.min(cut, primary.hi);
      else {
        const b = backups.get(p.primary)?.get(rank);
        if (b) cut = Math.min(cut, b.hi);
      }
      const b = p.backup ? backups.get(p.backup)?.get(rank) : undefined;
      if (b && b.hi >= committed) cut = Math.min(cut, b.hi);
    });
    if (!Number.isFinite(cut)) cut = committed;
    assert(cut >= committed, `recovery cut ${cut} below the committed cut ${committed}`);
    const images: number[] = [];
    next.placement.forEach((p, rank) => {
      const b = p.backup ? backups.get(p.backup)?.get(rank) : undefined;
      if (p.backup && !(b && b.lo <= cut && b.hi >= cut)) images.push(rank);
    });
    return { cut, targets, images };
  }

  /** Every host: go to the recovery cut (group) or promote the lost members (vm). */
  private async onRollback(frame: FrameOf<"rollback">): Promise<void> {
    const started = performance.now();
    const record = this.record;
    const rolledBack: number[] = [];
    const promoted: number[] = [];
    const delivered: Record<number, number[]> = {};
    let rollback_us_max = 0;
    // First, before anything awaits: drop the copies that new images replace and the ones the new
    // placement does not keep here (an image sent by a faster host may arrive during this step).
    for (const [rank, b] of [...this.backups]) {
      const p = record.placement[rank];
      const replaced = p.backup === this.api.id && frame.images.includes(rank);
      if (replaced || (p.backup !== this.api.id && p.primary !== this.api.id)) {
        this.backups.delete(rank);
        void b.stop();
      }
    }
    for (let rank = 0; rank < record.size; rank++) {
      const p = record.placement[rank];
      if (p.primary === this.api.id) {
        let member = this.members.get(rank);
        const cut = frame.cut ?? frame.targets[rank];
        if (member && frame.cut !== null) {
          if (frame.cut === 0) {
            // Cut 0 is the deployed state before boot: start the VM afresh.
            member.replaceVm(await VmWorker.boot(this.guest, this.vmOptions(rank)));
            member.captured = member.committed = 0;
            await this.openPath(member);
          } else {
            const result = await member.rollback(frame.cut);
            rollback_us_max = Math.max(rollback_us_max, result.rollback_us);
          }
          rolledBack.push(rank);
        } else if (!member) {
          const b = this.backups.get(rank);
          if (!b || cut === undefined) {
            this.log.error({ group: this.name, rank }, "recovery: no copy of this member here to promote");
            continue;
          }
          this.backups.delete(rank);
          const { worker } = await b.promoteAt(cut);
          member = this.addMember(rank, worker, b.log, cut);
          await this.openPath(member);
          promoted.push(rank);
        }
        await member.setIncarnation(record.incarnation);
        if (cut !== undefined) await member.releaseAt(cut);
        if (frame.images.includes(rank) && p.backup) {
          // group mode: the VM sits at the recovery cut; vm mode (survivor): a fresh cut.
          const image = cut !== undefined ? await member.imageCurrent() : await member.imageFresh();
          const e = decodeImage(image).epoch;
          member.captured = Math.max(member.captured, e);
          const history = member.log.tail(OUTPUT_LOG_HISTORY_BYTES_MAX);
          this.api.send(p.backup, { ...this.base(), k: "image", rank, e, released_seq: member.log.lastSeq, history }, image);
        }
        delivered[rank] = await member.deliveredVector();
      } else if (p.backup === this.api.id && !frame.images.includes(rank) && frame.cut !== null) {
        await this.backups.get(rank)?.rollbackTo(frame.cut);
      }
    }
    this.log.warn(
      { group: this.name, incarnation: record.incarnation, cut: frame.cut, rolled_back: rolledBack, promoted, rollback_us_max: Number(rollback_us_max.toFixed(1)), step_ms: Number((performance.now() - started).toFixed(1)) },
      "recovery: replicas at the recovery cut",
    );
    const routes = this.pathRoutes();
    const rolled = { ...this.base(), k: "rolled" as const, d: delivered, routes };
    if (frame.from === this.api.id) this.onRolled(this.api.id, delivered, routes);
    else this.api.send(frame.from, rolled);
  }

  /** Coordinator: once every host is at the cut, everyone re-sends and resumes. */
  private onRolled(host: string, delivered: Record<number, number[]>, routes: Record<number, PathRoute>): void {
    const r = this.recovery;
    if (!r || r.cut === null) return;
    r.rolled.set(host, delivered);
    Object.assign(r.routes, routes);
    if (r.rolled.size < r.hosts.length) return;
    const size = r.record.size;
    const matrix = Array.from({ length: size }, () => new Array<number>(size).fill(0));
    for (const d of r.rolled.values()) for (const [rank, vector] of Object.entries(d)) matrix[Number(rank)] = vector;
    if (r.retry) clearInterval(r.retry);
    const table = r.record.placement.map((_, rank) => r.routes[rank] ?? null);
    this.broadcast(r.hosts, { k: "resume", e: r.cut + 1, d: matrix, routes: table });
    const recovery_ms = Date.now() - r.started_ms;
    this.log.warn({ group: this.name, incarnation: r.record.incarnation, cut: r.cut, recovery_ms }, "recovery: group resumed");
    this.recovery = null;
    // The store's per-VM records follow the placement (read by `cohort status` / `logs`).
    void Promise.all(r.record.placement.map((_, rank) => this.api.store.put(vmKey(vmName(r.record.group, rank)), this.vmRecord(rank)))).catch((error: Error) =>
      this.log.warn({ err: error, group: this.name }, "VM records not updated"),
    );
  }

  /** Every host: new routes, re-send what each receiver's restored state lacks, then run. */
  private async onResume(e: number, delivered: number[][], routes: (PathRoute | null)[]): Promise<void> {
    const size = this.record.size;
    // Running from now on (before any await): the leader's first `end` may arrive while the steps
    // below are in progress, and the deltas of the captures it asks for must be shipped.
    for (const member of this.members.values()) member.state = "running";
    await this.setRoutes(routes);
    // Arrivals from hosts that resumed first wait in the VM threads until `run`.
    for (const [s, member] of this.members) {
      await member.resend(delivered.map((row) => row[s]));
      for (let r = 0; r < size; r++) this.committedDelivered[r][s] = Math.max(this.committedDelivered[r][s], delivered[r][s]);
    }
    await Promise.all([...this.members.values()].map((m) => m.run()));
    this.startClocks(e - 1);
  }

  status(): GroupStatus {
    return {
      group: this.name,
      mode: this.record.mode,
      incarnation: this.inc,
      leader: this.record.leader,
      committed: this.leader?.committed ?? null,
      recovering: this.recovery !== null,
      primaries: [...this.members.values()].map((m) => ({
        rank: m.rank,
        vm: vmName(this.name, m.rank),
        state: m.state,
        captured: m.captured,
        committed: m.committed,
        backup: this.record.placement[m.rank].backup,
        released_seq: m.log.lastSeq,
        held: m.counters.held,
        busy: m.busy ? `${m.busy.step} for ${Date.now() - m.busy.since_ms} ms` : null,
        sent_before_commit: m.counters.sent_before_commit,
        sent_after_commit: m.counters.sent_after_commit,
        held_total: m.counters.held_total,
      })),
      backups: [...this.backups.entries()].map(([rank, b]) => ({ rank, vm: vmName(this.name, rank), cut: b.committedCut, staged: b.stagedCount })),
    };
  }
}
