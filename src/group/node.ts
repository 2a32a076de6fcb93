/**
 * Everything one host does for one group, sans I/O: the integration surface
 * (see src/group/protocol.ts for the events and effects).
 *
 *   const node = GroupNode.deploy(config, host, record, version);
 *   for each event: for (const effect of node.handle(event)) carry it out, in order
 *
 * Roles: the primaries and backups the record places here, the leader when the
 * record names this host, and the failure detector (heartbeats every
 * heartbeat_ms; a host silent for detect_ms is suspected, for good: crash-stop,
 * fencing by incarnation).
 *
 * Failure handling: on every new suspicion the node re-reads the group record
 * from the coordination store. If the record names a suspected host (as leader
 * or replica host) and this host is its coordinator (the record's leader if it
 * is alive, else the lowest-numbered live host the record places a replica
 * on), it proposes the next record by compare-and-swap; only one proposal per
 * version wins. The winner adopts the new incarnation at once and runs the
 * recovery as the new leader; a loser re-reads and re-evaluates.
 */
import { assert } from "../util/assert.js";
import { MemberBackup, type BackupStatus } from "./backup.js";
import { Leader, type LeaderStatus } from "./leader.js";
import { MemberPrimary, type MemberStatus } from "./member.js";
import {
  DELIVERED_STASH_MAX,
  initialCheckpoint,
  protectionKey,
  send,
  validateConfig,
  type CoreContext,
  type Effect,
  type Event,
  type GroupConfig,
  type GroupMessage,
  type GroupRecord,
  type HostId,
  type Rank,
  type ReplicaReport,
  type StoreResult,
} from "./protocol.js";
import { coordinatorFor, isDirty, planRecovery } from "./recovery.js";

type DeliveredMsg = Extract<GroupMessage, { kind: "delivered" }>;

export interface NodeStatus {
  host: HostId;
  inc: number;
  suspected: HostId[];
  primaries: MemberStatus[];
  backups: BackupStatus[];
  leader: LeaderStatus | null;
}

export class GroupNode {
  private readonly ctx: CoreContext;
  /** Newest record known (from the store or a `recover`), and its store version. */
  private latest: GroupRecord;
  private latestVersion: number;
  private readonly primaries = new Map<Rank, MemberPrimary>();
  private readonly backups = new Map<Rank, MemberBackup>();
  private leader: Leader | null = null;
  private readonly lastSeen: number[];
  private readonly suspected = new Set<HostId>();
  private nextHeartbeatAt = 0;
  private now = 0;
  private storeOp: "get" | "cas" | null = null;
  private storeAgain = false;
  private proposal: GroupRecord | null = null;
  /** `delivered` announcements for a member whose primary here has not rolled back yet. */
  private readonly stash = new Map<Rank, DeliveredMsg[]>();
  private reportedLost = false;
  /** The store declared this host failed: it takes no further part in the group. */
  private fenced = false;

  private constructor(config: GroupConfig, host: HostId, record: GroupRecord, version: number) {
    validateConfig(config);
    assert(record.placement.length === config.size, "record places every member");
    this.ctx = { config, host, inc: record.incarnation, record };
    this.latest = record;
    this.latestVersion = version;
    this.lastSeen = new Array<number>(config.hosts).fill(0);
  }

  /**
   * A node of a freshly deployed group: the driver booted the primaries placed
   * here at cut 0 and installed the initial image on the backups.
   */
  static deploy(config: GroupConfig, host: HostId, record: GroupRecord, version: number): GroupNode {
    const node = new GroupNode(config, host, record, version);
    const at = initialCheckpoint(config.size);
    record.placement.forEach((p, rank) => {
      assert(p.primary !== p.backup, `member ${rank}: primary and backup on one host`);
      if (p.primary === host) node.primaries.set(rank, MemberPrimary.boot(node.ctx, rank, at));
      if (p.backup === host) node.backups.set(rank, MemberBackup.initial(node.ctx, rank, at));
    });
    if (record.leader === host) node.leader = Leader.initial(node.ctx, Array.from({ length: config.hosts }, (_, h) => h));
    return node;
  }

  get host(): HostId {
    return this.ctx.host;
  }

  // ---- queries for the driver (the guest blocks while they say no) --------------------------

  canSend(rank: Rank, to: Rank): boolean {
    return this.primaries.get(rank)?.canSend(to) ?? false;
  }

  canOutput(rank: Rank): boolean {
    return this.primaries.get(rank)?.canOutput() ?? false;
  }

  isRunning(rank: Rank): boolean {
    return this.primaries.get(rank)?.running ?? false;
  }

  status(): NodeStatus {
    return {
      host: this.ctx.host,
      inc: this.ctx.inc,
      suspected: [...this.suspected],
      primaries: [...this.primaries.values()].map((p) => p.status()),
      backups: [...this.backups.values()].map((b) => b.status()),
      leader: this.leader?.status() ?? null,
    };
  }

  // ---- events --------------------------------------------------------------------------------

  handle(event: Event): Effect[] {
    const out: Effect[] = [];
    if (this.fenced) return out;
    switch (event.type) {
      case "tick":
        this.tick(event.now, out);
        break;
      case "suspect":
        this.suspect(event.host, out);
        break;
      case "message":
        this.onMessage(event.from, event.message, out);
        break;
      case "vm.send":
        this.primary(event.rank).onVmSend(event.to, event.payload, out);
        break;
      case "vm.output":
        this.primary(event.rank).onVmOutput(event.payload, out);
        break;
      case "vm.captured":
        this.primaries.get(event.rank)?.onCaptured(event.inc, event.epoch, event.payload, event.bytes, out);
        break;
      case "vm.imaged":
        this.primaries.get(event.rank)?.onImaged(event.inc, event.epoch, event.payload, event.bytes, out);
        break;
      case "store.result":
        this.onStoreResult(event, out);
        break;
    }
    return out;
  }

  private primary(rank: Rank): MemberPrimary {
    const p = this.primaries.get(rank);
    assert(p, `host ${this.ctx.host}: no primary of member ${rank} here`);
    return p;
  }

  // ---- failure detection and the coordination store -------------------------------------------

  private tick(now: number, out: Effect[]): void {
    assert(now >= this.now, "time does not go back");
    this.now = now;
    const { heartbeat_ms, detect_ms } = this.ctx.config.timing;
    if (now >= this.nextHeartbeatAt) {
      this.nextHeartbeatAt = now + heartbeat_ms;
      for (let h = 0; h < this.ctx.config.hosts; h++) {
        if (h !== this.ctx.host && !this.suspected.has(h)) send(out, h, { kind: "heartbeat", from: this.ctx.host });
      }
    }
    for (let h = 0; h < this.ctx.config.hosts; h++) {
      if (h !== this.ctx.host && !this.suspected.has(h) && now - this.lastSeen[h] > detect_ms) this.suspect(h, out);
    }
    this.leader?.tick(now, out);
  }

  private suspect(host: HostId, out: Effect[]): void {
    if (host === this.ctx.host || this.suspected.has(host)) return;
    this.suspected.add(host);
    out.push({ type: "notify", notice: { kind: "suspected", host } });
    this.leader?.hostFailed(host, out);
    this.readStore(out);
  }

  private readStore(out: Effect[]): void {
    if (this.storeOp) {
      this.storeAgain = true;
      return;
    }
    this.storeOp = "get";
    out.push({ type: "store.get", key: protectionKey(this.ctx.config.group) });
  }

  private onStoreResult(r: StoreResult, out: Effect[]): void {
    const op = this.storeOp;
    assert(op === r.op, `store result ${r.op} without a matching request`);
    this.storeOp = null;
    if (r.record && r.version > this.latestVersion) {
      this.latest = r.record;
      this.latestVersion = r.version;
    }
    if (this.latest.failed.includes(this.ctx.host)) {
      this.fence(out);
      return;
    }
    if (op === "cas" && r.ok) {
      const next = this.proposal;
      assert(next && r.record && r.record.incarnation === next.incarnation, "a won CAS returns our proposal");
      this.lead(next, r.version, out);
    }
    this.proposal = null;
    if (this.storeAgain) {
      this.storeAgain = false;
      this.readStore(out);
      return;
    }
    this.evaluate(out);
  }

  /** Must this host start a recovery for the newest record it knows? Then propose the next one. */
  private evaluate(out: Effect[]): void {
    if (this.storeOp) return;
    const record = this.latest;
    if (!isDirty(record, this.suspected)) return;
    const coordinator = coordinatorFor(record, this.suspected);
    if (coordinator === null) {
      // Every host the record places a replica on is down: nobody can recover.
      // The lowest-numbered live host says so, once.
      if (!this.reportedLost && this.lowestLiveHost() === this.ctx.host) {
        this.reportedLost = true;
        const down = (h: HostId | null) => h === null || this.suspected.has(h) || record.failed.includes(h);
        const ranks = record.placement.flatMap((p, rank) => (down(p.primary) && down(p.backup) ? [rank] : []));
        out.push({ type: "notify", notice: { kind: "lost", inc: record.incarnation, ranks } });
      }
      return;
    }
    if (coordinator !== this.ctx.host) return;
    this.proposal = planRecovery(record, this.suspected, this.ctx.config.hosts, this.ctx.host);
    this.storeOp = "cas";
    out.push({ type: "store.cas", key: protectionKey(this.ctx.config.group), expected: this.latestVersion, value: this.proposal });
  }

  private lowestLiveHost(): HostId {
    for (let h = 0; h < this.ctx.config.hosts; h++) if (!this.suspected.has(h) && !this.latest.failed.includes(h)) return h;
    return this.ctx.host;
  }

  /**
   * A newer record lists this host as failed (it was suspected while alive,
   * e.g. paused): others may have promoted its backups, so it stops its
   * primaries and drops its backups. (A daemon whose store lease lapsed does
   * the same on its own, before anyone may promote.)
   */
  private fence(out: Effect[]): void {
    this.fenced = true;
    for (const rank of this.primaries.keys()) out.push({ type: "vm.stop", rank });
    for (const rank of this.backups.keys()) out.push({ type: "backup.drop", rank });
    this.primaries.clear();
    this.backups.clear();
    this.leader = null;
    out.push({ type: "notify", notice: { kind: "fenced", inc: this.latest.incarnation } });
  }

  /** Our CAS won: adopt the incarnation here first, then coordinate the others. */
  private lead(record: GroupRecord, version: number, out: Effect[]): void {
    const previousCommitted = this.leader?.committedCut ?? 0;
    const own = this.adopt(record, out);
    const alive: HostId[] = [];
    for (let h = 0; h < this.ctx.config.hosts; h++) if (!this.suspected.has(h) && !record.failed.includes(h)) alive.push(h);
    this.leader = Leader.recover(this.ctx, alive, version, previousCommitted, own, out);
  }

  /** A newer incarnation: refuse older messages from now on, stop, say what each replica here can reach. */
  private adopt(record: GroupRecord, out: Effect[]): ReplicaReport[] {
    assert(record.incarnation > this.ctx.inc, "incarnations only grow");
    this.ctx.inc = record.incarnation;
    this.ctx.record = record;
    this.stash.clear();
    if (record.leader !== this.ctx.host) this.leader = null;
    const reports: ReplicaReport[] = [];
    for (const [rank, p] of this.primaries) {
      assert(record.placement[rank].primary === this.ctx.host, `member ${rank}: a live primary is never moved`);
      reports.push(p.freeze(out));
    }
    for (const [rank, b] of [...this.backups]) {
      const pl = record.placement[rank];
      if (pl.primary !== this.ctx.host && pl.backup !== this.ctx.host) {
        this.backups.delete(rank);
        out.push({ type: "backup.drop", rank });
        continue;
      }
      reports.push(b.report());
    }
    return reports;
  }

  // ---- messages ------------------------------------------------------------------------------

  private onMessage(from: HostId, m: GroupMessage, out: Effect[]): void {
    if (m.kind === "heartbeat") {
      this.lastSeen[from] = Math.max(this.lastSeen[from], this.now);
      return;
    }
    if (m.inc < this.ctx.inc) return; // fenced: an older incarnation
    if (m.kind === "recover") {
      if (m.inc === this.ctx.inc) return;
      if (m.version > this.latestVersion) {
        this.latest = m.record;
        this.latestVersion = m.version;
      }
      const replicas = this.adopt(m.record, out);
      send(out, m.record.leader, { kind: "report", inc: m.inc, host: this.ctx.host, replicas });
      return;
    }
    assert(m.inc === this.ctx.inc, `host ${this.ctx.host}: ${m.kind} of incarnation ${m.inc} before its recover (at ${this.ctx.inc})`);
    switch (m.kind) {
      case "end-epoch":
        for (const p of this.primaries.values()) p.onEndEpoch(m.epoch, out);
        return;
      case "commit":
        for (const p of this.primaries.values()) p.onCommit(m.cut, m.delivered, out);
        return;
      case "backup-commit":
        this.backupOf(m.rank).onCommit(m.cut, out);
        return;
      case "delta":
        this.backupOf(m.rank).onDelta(m, out);
        return;
      case "image": {
        assert(this.ctx.record.placement[m.rank].backup === this.ctx.host, `image of ${m.rank} sent to a host that is not its backup`);
        if (this.backups.has(m.rank)) out.push({ type: "backup.drop", rank: m.rank });
        this.backups.set(m.rank, MemberBackup.install(this.ctx, m, out));
        return;
      }
      case "staged":
        this.leader?.onStaged(m, out);
        return;
      case "group":
        this.primary(m.to).onGroup(m, out);
        return;
      case "delivered": {
        const p = this.primaries.get(m.sender);
        if (p && p.memberState !== "frozen") {
          p.onDelivered(m.receiver, m.seq, out);
        } else {
          assert(p || this.backups.has(m.sender), `host ${this.ctx.host}: delivered for ${m.sender}, which has no replica here`);
          const list = this.stash.get(m.sender) ?? [];
          assert(list.length < DELIVERED_STASH_MAX, `host ${this.ctx.host}: more than ${DELIVERED_STASH_MAX} stashed announcements`);
          list.push(m);
          this.stash.set(m.sender, list);
        }
        return;
      }
      case "report":
        this.leader?.onReport(m.host, m.replicas, out);
        return;
      case "rolled-back":
        this.leader?.onRolledBack(m.host, out);
        return;
      case "rollback":
        this.rollback(m.cut, m.image, out);
        send(out, this.ctx.record.leader, { kind: "rolled-back", inc: m.inc, host: this.ctx.host });
        return;
      case "resume":
        for (const p of this.primaries.values()) p.resume(m.epoch, out);
        return;
    }
  }

  private backupOf(rank: Rank): MemberBackup {
    const b = this.backups.get(rank);
    assert(b, `host ${this.ctx.host}: no backup of member ${rank} here`);
    return b;
  }

  /** Recovery step 3 on this host: every replica goes to the recovery cut. */
  private rollback(cut: number, image: readonly Rank[], out: Effect[]): void {
    const { placement } = this.ctx.record;
    for (let rank = 0; rank < placement.length; rank++) {
      const pl = placement[rank];
      if (pl.primary === this.ctx.host) {
        let p = this.primaries.get(rank);
        if (p) {
          p.rollback(cut, out);
        } else {
          const b = this.backupOf(rank);
          const { runtime, committed } = b.promote(cut, out);
          this.backups.delete(rank);
          p = MemberPrimary.promoted(this.ctx, rank, runtime, committed, out);
          this.primaries.set(rank, p);
        }
        for (const d of this.stash.get(rank) ?? []) p.onDelivered(d.receiver, d.seq, out);
        this.stash.delete(rank);
        if (image.includes(rank)) p.requestImage(out);
      } else if (pl.backup === this.ctx.host) {
        this.backups.get(rank)?.rollback(cut, out);
      }
    }
  }
}
