/**
 * The `cohort host` daemon: one per machine (several on loopback for a local
 * cluster). It listens for peer frames on one TCP port, heartbeats every other
 * host, runs the primaries and backups placed on it, and takes over the VMs
 * whose primary host died: the decision is a compare-and-swap of the VM's
 * record in the coordination store, so exactly one backup is ever promoted.
 */
import { createServer, type Server, type Socket } from "node:net";
import { pino, type Logger } from "pino";
import { join } from "node:path";
import { Connection } from "./connection.js";
import { MSG, type Heartbeat, type LogPush, type LogRecordWire, type Request, type VmMessage } from "./messages.js";
import { argsObject, checkArgs, errorReply, isHostOp, type HostOps, type HostStatus, type LocalOp } from "./api.js";
import { ProtectedPrimary } from "./primary.js";
import { BackupReplica } from "./backup.js";
import { OutputLog } from "./output-log.js";
import { hostKey, vmKey, type VmRecord } from "./records.js";
import { deployGroup } from "./deploy.js";
import type { CoordinationStore, Versioned } from "../store/store.js";
import type { HostRecord } from "../cluster/local-cluster.js";
import { compileGuest, instrumentCached, sha256 } from "../guest/module-cache.js";
import type { GuestBundle, WorkerVmOptions } from "../vm/protocol.js";
import { VmWorker } from "../vm/vm.js";
import { DEFAULT_LIMITS, type VmLimits } from "../vm/machine.js";
import { GroupDriver, type GroupHostApi } from "./group/driver.js";
import type { ProtectionRecord } from "../core/types.js";
import { FrameError, parseFrame, type GroupFrame, type Route } from "../core/frames.js";

export interface HostOptions {
  id: string;
  listen_host: string;
  port: number;
  state_dir: string;
  /** Interval between heartbeats to each peer. */
  heartbeat_ms: number;
  /** A peer silent for this long is considered failed. */
  detect_ms: number;
}

export const HOST_DEFAULTS = { heartbeat_ms: 50, detect_ms: 300 };
/** How long a primary waits for a host to install a new backup before trying again (maybe elsewhere). */
export const INSTALL_BACKUP_TIMEOUT_MS = 5000;
/** Idle VM threads kept ready, so a promotion's new backup or a deploy does not wait for a thread to start. */
export const VM_THREADS_PREWARMED = 2;

interface Peer {
  id: string;
  address: string;
  out: Connection | null;
  connecting: boolean;
  last_seen_ms: number;
  failed: boolean;
  /** Group frames sent while no connection was open, flushed in order once one is. */
  queue: { header: GroupFrame; body?: Uint8Array }[];
}

/** Group frames kept per peer while its connection is (re)opening. */
export const PEER_QUEUE_MAX = 10_000;
/** How long `vm_request` waits for the VM's reply to be released. */
export const VM_REQUEST_TIMEOUT_MS = 5000;

export class Host {
  private server!: Server;
  private address = "";
  readonly log: Logger;
  private readonly peers = new Map<string, Peer>();
  private readonly incoming = new Set<Connection>();
  readonly primaries = new Map<string, ProtectedPrimary>();
  readonly backups = new Map<string, BackupReplica>();
  private readonly modules = new Map<string, { bytes: Uint8Array; guest: GuestBundle }>();
  private timers: NodeJS.Timeout[] = [];
  private maintaining = false;
  /** VMs whose backup is being attached right now. */
  private readonly reprotecting = new Set<string>();
  /** Group frames whose header was malformed or of a newer version (their connections were closed). */
  private groupFramesRefused = 0;
  private stopping = false;
  /** Protected groups (size >= 2) with a replica on this host. */
  readonly groups = new Map<string, GroupDriver>();
  private nextRequestId = (process.pid % 10_000) * 100_000;
  readonly groupApi: GroupHostApi;

  constructor(
    readonly options: HostOptions,
    readonly store: CoordinationStore,
  ) {
    this.log = pino({ base: { host: options.id } });
    this.groupApi = {
      id: options.id,
      log: this.log,
      store,
      detect_ms: options.detect_ms,
      listen_host: options.listen_host,
      send: (to, frame, body) => this.sendGroup(to, frame, body),
      liveHosts: () => this.liveHosts(),
      guestFor: (module) => this.guestFor(module),
    };
  }

  get id(): string {
    return this.options.id;
  }

  async start(): Promise<void> {
    this.server = createServer((socket) => this.accept(socket));
    await new Promise<void>((resolve, reject) => {
      this.server.once("error", reject);
      this.server.listen(this.options.port, this.options.listen_host, () => resolve());
    });
    const addr = this.server.address();
    if (!addr || typeof addr === "string") throw new Error("server has no TCP address");
    this.address = `${this.options.listen_host}:${addr.port}`;
    const record: HostRecord = { id: this.id, address: this.address, pid: process.pid, started_at_ms: Date.now() };
    await this.store.put(hostKey(this.id), record);
    VmWorker.prewarm(VM_THREADS_PREWARMED);
    this.timers.push(setInterval(() => this.heartbeat(), this.options.heartbeat_ms));
    this.timers.push(setInterval(() => void this.refreshPeers(), 250));
    this.timers.push(setInterval(() => void this.maintain(), 250));
    this.timers.push(setInterval(() => this.detect(), Math.max(10, Math.floor(this.options.detect_ms / 10))));
    await this.refreshPeers();
    this.log.info({ address: this.address, pid: process.pid }, "host listening");
  }

  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    for (const t of this.timers) clearInterval(t);
    await Promise.all([...this.groups.values()].map((g) => g.stop()));
    for (const p of this.primaries.values()) p.stop();
    await Promise.all([...this.primaries.values()].map((p) => p.vm.terminate()));
    await Promise.all([...this.backups.values()].map((b) => b.stop()));
    for (const peer of this.peers.values()) peer.out?.close("host stopping");
    for (const c of this.incoming) c.close("host stopping");
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    await this.store.close();
    this.log.info("host stopped");
  }

  // ---- peers and failure detection -------------------------------------------------

  private accept(socket: Socket): void {
    const connection = new Connection(socket, `in:${socket.remoteAddress}:${socket.remotePort}`);
    this.incoming.add(connection);
    connection.on("close", (reason) => {
      this.incoming.delete(connection);
      if (!this.stopping && !reason.startsWith("peer closed")) this.log.warn({ connection: connection.label, reason }, "connection closed");
    });
    connection.on("message", (type, header, body) => {
      this.onMessage(connection, type, header, body).catch((error: Error) => {
        this.log.error({ err: error, type }, "message handling failed");
      });
    });
  }

  private async refreshPeers(): Promise<void> {
    if (this.stopping) return;
    let hosts: Versioned<HostRecord>[];
    try {
      hosts = await this.store.list<HostRecord>("hosts/");
    } catch (error) {
      this.log.warn({ err: error }, "store unavailable");
      return;
    }
    for (const { value } of hosts) {
      if (value.id === this.id) continue;
      let peer = this.peers.get(value.id);
      if (!peer || peer.address !== value.address) {
        peer?.out?.close("address changed");
        peer = { id: value.id, address: value.address, out: null, connecting: false, last_seen_ms: 0, failed: false, queue: [] };
        this.peers.set(value.id, peer);
      }
      // Failed peers too: a paused host comes back, and it learns we are alive from our heartbeats.
      if (!peer.out && !peer.connecting) void this.connectPeer(peer);
    }
  }

  private async connectPeer(peer: Peer): Promise<Connection | null> {
    if (peer.out && !peer.out.isClosed) return peer.out;
    peer.connecting = true;
    try {
      const connection = await Connection.open(peer.address, `out:${peer.id}`, 1000);
      connection.send(MSG.HELLO, { from: this.id });
      connection.on("close", () => {
        if (peer.out === connection) peer.out = null;
      });
      // Replies to our requests come back on this connection; pushes from the peer come on its own.
      peer.out = connection;
      const queued = peer.queue;
      peer.queue = [];
      for (const { header, body } of queued) connection.send(MSG.GROUP, header, body);
      return connection;
    } catch {
      return null;
    } finally {
      peer.connecting = false;
    }
  }

  private heartbeat(): void {
    const beat: Heartbeat = { from: this.id, sent_ms: Date.now() };
    for (const peer of this.peers.values()) peer.out?.send(MSG.HEARTBEAT, beat);
  }

  private detect(): void {
    const now = Date.now();
    for (const peer of this.peers.values()) {
      if (peer.failed || peer.last_seen_ms === 0) continue;
      if (now - peer.last_seen_ms > this.options.detect_ms) {
        peer.failed = true;
        peer.out?.close("peer failed");
        this.log.warn({ peer: peer.id, silent_ms: now - peer.last_seen_ms }, "peer failed");
        void this.onPeerFailed(peer.id);
      }
    }
  }

  /** Peers that heartbeat within the detection timeout. */
  liveHosts(): string[] {
    const now = Date.now();
    const live = [...this.peers.values()].filter((p) => !p.failed && p.last_seen_ms > 0 && now - p.last_seen_ms <= this.options.detect_ms).map((p) => p.id);
    return [this.id, ...live].sort();
  }

  async peerConnection(host: string): Promise<Connection> {
    const peer = this.peers.get(host);
    if (!peer) throw new Error(`unknown host ${host}`);
    const connection = peer.out && !peer.out.isClosed ? peer.out : await this.connectPeer(peer);
    if (!connection) throw new Error(`host ${host} is not reachable`);
    return connection;
  }

  /** A group frame to `host`: on the open connection, or queued until one is open. */
  private sendGroup(host: string, header: GroupFrame, body?: Uint8Array): void {
    const peer = this.peers.get(host);
    if (!peer) {
      this.log.warn({ peer: host, kind: header.k }, "group frame to an unknown host dropped");
      return;
    }
    if (peer.out && !peer.out.isClosed && peer.queue.length === 0) {
      peer.out.send(MSG.GROUP, header, body);
      return;
    }
    if (peer.queue.length >= PEER_QUEUE_MAX) {
      this.log.warn({ peer: host }, `more than ${PEER_QUEUE_MAX} group frames queued: dropped`);
      return;
    }
    peer.queue.push({ header, body });
    if (!peer.connecting) void this.connectPeer(peer);
  }

  private async onPeerFailed(host: string): Promise<void> {
    const peer = this.peers.get(host);
    if (peer) peer.queue = [];
    for (const g of this.groups.values()) g.onHostsChanged();
    for (const backup of [...this.backups.values()]) {
      if (backup.record.primary === host) await this.promote(backup).catch((error: Error) => this.log.error({ err: error, vm: backup.record.vm }, "promotion failed"));
    }
    for (const primary of this.primaries.values()) {
      if (primary.backupHostId === host) {
        primary.detachBackup();
        await this.reprotect(primary).catch((error: Error) => this.log.error({ err: error, vm: primary.record.vm }, "re-protection failed"));
      }
    }
  }

  /**
   * Periodic upkeep: fence primaries that were taken over, retry promotions that a transient
   * error (store busy, peer unreachable) stopped, give degraded primaries a backup when a host
   * is available. Every step re-checks the store, so repeating one is harmless.
   */
  private async maintain(): Promise<void> {
    if (this.stopping || this.maintaining) return;
    this.maintaining = true;
    try {
      await this.maintainOnce();
    } finally {
      this.maintaining = false;
    }
  }

  private async maintainOnce(): Promise<void> {
    await this.checkFenced();
    for (const backup of [...this.backups.values()]) {
      if (this.peers.get(backup.record.primary)?.failed) {
        await this.promote(backup).catch((error: Error) => this.log.error({ err: error, vm: backup.record.vm }, "promotion failed"));
      }
    }
    for (const primary of this.primaries.values()) {
      if (primary.record.mode !== "none" && primary.backupHostId === null) {
        await this.reprotect(primary).catch((error: Error) => this.log.error({ err: error, vm: primary.record.vm }, "re-protection failed"));
      }
    }
  }

  /**
   * A primary whose record names another primary or a newer incarnation was
   * taken over (this host was wrongly suspected, or paused): it stops. It could
   * not have released anything meanwhile, since no backup acknowledges a stale
   * incarnation; stopping frees the VM's resources and its name on this host.
   */
  private async checkFenced(): Promise<void> {
    for (const primary of [...this.primaries.values()]) {
      const current = await this.store.get<VmRecord>(vmKey(primary.record.vm)).catch(() => null);
      if (!current) continue;
      if (current.value.primary !== this.id || current.value.incarnation > primary.record.incarnation) {
        primary.stop();
        this.primaries.delete(primary.record.vm);
        await primary.vm.terminate();
        this.log.warn({ vm: primary.record.vm, incarnation: primary.record.incarnation, now: current.value.incarnation }, "primary fenced: another host took over");
      }
    }
    for (const backup of [...this.backups.values()]) {
      const current = await this.store.get<VmRecord>(vmKey(backup.record.vm)).catch(() => null);
      // Dropped once the VM has moved to another primary or incarnation. (A backup that is being
      // attached is not named in the store yet, so "not named" alone must not drop it; a replaced
      // backup of the same incarnation lingers, harmless: it gets no deltas and may not promote.)
      if (current && (current.value.incarnation > backup.record.incarnation || current.value.primary !== backup.record.primary)) {
        this.backups.delete(backup.record.vm);
        await backup.stop();
        this.log.info({ vm: backup.record.vm }, "backup of an older incarnation: dropped");
      }
    }
  }

  // ---- messages ------------------------------------------------------------------

  private async onMessage(connection: Connection, type: number, header: Record<string, unknown>, body: Uint8Array): Promise<void> {
    switch (type) {
      case MSG.HELLO:
        return;
      case MSG.HEARTBEAT: {
        const peer = this.peers.get(String(header.from));
        // A heartbeat that sat in a socket buffer (this host was paused) says nothing about the present.
        // Compares the sender's clock with ours: fine on one machine, and within NTP skew across machines.
        const age_ms = Date.now() - Number(header.sent_ms);
        if (peer && age_ms < this.options.detect_ms) {
          peer.last_seen_ms = Date.now();
          if (peer.failed) {
            peer.failed = false;
            this.log.info({ peer: peer.id }, "peer is back");
          }
        }
        return;
      }
      case MSG.REQUEST:
        return this.onRequest(connection, header as unknown as Request, body);
      case MSG.IMAGE:
        return this.onImage(header as unknown as VmMessage & { released_seq: number; history?: LogRecordWire[] }, body);
      case MSG.DELTA:
        return this.onDelta(header as unknown as VmMessage, body);
      case MSG.ACK: {
        const m = header as unknown as VmMessage;
        await this.primaries.get(m.vm)?.onAck(m);
        return;
      }
      case MSG.COMMIT: {
        const m = header as unknown as VmMessage;
        const backup = this.backups.get(m.vm);
        if (backup && backup.record.incarnation === m.incarnation) await backup.commit(m.epoch);
        return;
      }
      case MSG.GROUP:
        return this.onGroupFrame(connection, header, body);
      default:
        connection.close(`unknown message type ${type}`);
    }
  }

  private async onGroupFrame(connection: Connection, header: unknown, body: Uint8Array): Promise<void> {
    let frame: GroupFrame;
    try {
      frame = parseFrame(header);
    } catch (error) {
      // Malformed or of a newer version (a bug or a hostile peer): only this connection pays.
      if (!(error instanceof FrameError)) throw error;
      this.groupFramesRefused++;
      connection.close(`group frame refused: ${error.message}`);
      return;
    }
    let driver = this.groups.get(frame.g);
    if (!driver && frame.k === "recover") {
      // A new backup host of a recovering group: it gets the module with the record.
      const record = frame.record;
      if (!record.placement.some((p) => p.primary === this.id || p.backup === this.id)) return;
      const joined = await GroupDriver.join(this.groupApi, record, body.slice());
      if (!this.groups.has(frame.g)) this.groups.set(frame.g, joined);
      driver = this.groups.get(frame.g)!;
    }
    if (!driver) return;
    driver.handleFrame(frame.from, frame, body);
  }

  private async sendTo(host: string, type: number, header: unknown): Promise<void> {
    (await this.peerConnection(host)).send(type, header);
  }

  private async onImage(m: VmMessage & { released_seq: number; history?: LogRecordWire[] }, image: Uint8Array): Promise<void> {
    const backup = this.backups.get(m.vm);
    if (!backup || backup.record.incarnation !== m.incarnation) return;
    const epoch = await backup.install(image.slice(), m.released_seq, Array.isArray(m.history) ? m.history : []);
    await this.sendTo(backup.record.primary, MSG.ACK, { vm: m.vm, incarnation: m.incarnation, epoch } satisfies VmMessage);
  }

  private async onDelta(m: VmMessage, delta: Uint8Array): Promise<void> {
    const backup = this.backups.get(m.vm);
    if (!backup || backup.record.incarnation !== m.incarnation) return; // stale incarnation: dropped
    try {
      await backup.stage(m.epoch, delta.slice());
    } catch (error) {
      this.log.error({ err: error, vm: m.vm, epoch: m.epoch }, "delta refused");
      return;
    }
    await this.sendTo(backup.record.primary, MSG.ACK, { vm: m.vm, incarnation: m.incarnation, epoch: m.epoch } satisfies VmMessage);
  }

  private async onRequest(connection: Connection, request: Request, body: Uint8Array): Promise<void> {
    const op = request.op;
    if (!isHostOp(op)) return this.answer(connection, request.id, () => this.handleSingleVm(op, request.args, body));
    if (op === "logs") {
      // Answered synchronously so that no released record can be pushed before the reply.
      try {
        this.followLogs(connection, request.id, checkArgs(op, request.args));
      } catch (error) {
        connection.reply(request.id, errorReply(error));
      }
      return;
    }
    return this.answer(connection, request.id, () => this.handleLocal(op, request.args, body));
  }

  private async answer(connection: Connection, id: number, work: () => Promise<unknown>): Promise<void> {
    try {
      connection.reply(id, { ok: true, value: await work() });
    } catch (error) {
      connection.reply(id, errorReply(error));
    }
  }

  /** The host API's ops (src/host/api.ts) but `logs` (onRequest answers it), each handed its checked arguments. */
  private readonly handlers: { [Op in LocalOp]: (args: HostOps[Op]["checked"], body: Uint8Array) => HostOps[Op]["result"] | Promise<HostOps[Op]["result"]> } = {
    ping: () => ({ id: this.id }),
    status: () => this.status(),
    deploy: ({ manifest }, body) => deployGroup(this, manifest, body.slice()),
    group_prepare: ({ record }, body) => this.prepareGroup(record, body.slice()),
    group_run: ({ group, routes }) => this.runGroup(group, routes),
    vm_request: ({ vm, text }) => this.vmRequest(vm, text),
  };

  /**
   * A request of the host API, from a connection or from this host itself (a
   * deploy it runs): `args` are checked against the op's schema (BadArgumentsError
   * naming the fields otherwise) before the op's handler sees them.
   */
  async handleLocal<Op extends LocalOp>(op: Op, args: unknown, body: Uint8Array): Promise<HostOps[Op]["result"]> {
    return this.handlers[op](checkArgs(op, args), body);
  }

  /** The single-VM replication requests, dispatched by name outside the host API table. */
  private async handleSingleVm(op: string, request_args: unknown, body: Uint8Array): Promise<unknown> {
    const args = argsObject(op, request_args);
    switch (op) {
      case "start_primary":
        return this.startPrimary(args.record as VmRecord, body.slice());
      case "install_backup":
        return this.installBackup(args.record as VmRecord, body.slice());
      default:
        throw Object.assign(new Error(`unknown request ${op}`), { code: "UnknownRequest" });
    }
  }

  // ---- replicas --------------------------------------------------------------------

  /** Boots this host's replicas of a group (timers stopped); answers where its primaries' message paths listen. */
  private async prepareGroup(record: ProtectionRecord, module: Uint8Array): Promise<{ group: string; routes: Record<number, Route> }> {
    if (this.groups.has(record.group)) throw Object.assign(new Error(`group ${record.group} already has replicas on ${this.id}`), { code: "GroupExists" });
    const runtime = await GroupDriver.prepare(this.groupApi, record, module);
    this.groups.set(record.group, runtime);
    this.log.info({ group: record.group, mode: record.mode, size: record.size }, "group replicas prepared");
    return { group: record.group, routes: runtime.pathRoutes() };
  }

  /** Every primary of the group listens: hand its VMs the whole route table and start them. */
  private runGroup(group: string, routes: (Route | null)[]): { group: string } {
    const g = this.groups.get(group);
    if (!g) throw Object.assign(new Error(`group ${group} is not prepared on ${this.id}`), { code: "NoSuchGroup" });
    g.run(routes);
    return { group: g.name };
  }

  /** The primary of `vm` on this host, with its released-output log and VM thread. */
  private primaryOf(vm: string): { log: OutputLog; worker: VmWorker } | null {
    const p = this.primaries.get(vm);
    if (p) return { log: p.log, worker: p.vm };
    for (const g of this.groups.values()) {
      const rank = g.rankOf(vm);
      const m = rank === null ? undefined : g.members.get(rank);
      if (m) return { log: m.log, worker: m.vm };
    }
    return null;
  }

  /**
   * One client request to a VM, answered once the reply is released (its cut
   * committed). Not a durable session: a request in flight when the primary's
   * host dies is lost and the caller retries.
   */
  private async vmRequest(vm: string, text: string): Promise<{ vm: string; reply: string; epoch: number }> {
    const primary = this.primaryOf(vm);
    if (!primary) throw Object.assign(new Error(`no primary of ${vm} on ${this.id}`), { code: "NoSuchVm" });
    const request_id = (this.nextRequestId = (this.nextRequestId + 1) % 0x7fffffff);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        primary.log.off("append", onAppend);
        reject(Object.assign(new Error(`${vm}: no reply released within ${VM_REQUEST_TIMEOUT_MS} ms`), { code: "Timeout" }));
      }, VM_REQUEST_TIMEOUT_MS);
      const onAppend = (records: LogRecordWire[]) => {
        const reply = records.find((r) => r.kind === 1 && r.request_id === request_id);
        if (!reply) return;
        clearTimeout(timer);
        primary.log.off("append", onAppend);
        resolve({ vm, reply: reply.text, epoch: reply.epoch });
      };
      primary.log.on("append", onAppend);
      primary.worker.request("request", { session: 1, request_id, payload: new TextEncoder().encode(text) }).catch((error: Error) => {
        clearTimeout(timer);
        primary.log.off("append", onAppend);
        reject(error);
      });
    });
  }

  private async guestFor(bytes: Uint8Array): Promise<GuestBundle> {
    const key = Buffer.from(sha256(bytes)).toString("hex");
    let entry = this.modules.get(key);
    if (!entry) {
      const guest = await compileGuest(await instrumentCached(bytes, join(this.options.state_dir, "cache")));
      entry = { bytes, guest };
      this.modules.set(key, entry);
    }
    return entry.guest;
  }

  private moduleBytesOf(guest: GuestBundle): Uint8Array {
    for (const entry of this.modules.values()) if (entry.guest === guest) return entry.bytes;
    throw new Error("module bytes not kept");
  }

  private vmOptions(record: VmRecord): WorkerVmOptions {
    const limits: VmLimits = {
      ...DEFAULT_LIMITS,
      memory_pages_max: Math.floor((record.limits.memory_mib * 1024 * 1024) / 65536),
      call_cpu_ms: record.limits.call_cpu_ms,
      output_bytes_max: record.limits.output_bytes_max,
    };
    return { rank: record.rank, size: record.size, limits, timers: "auto" };
  }

  async startPrimary(record: VmRecord, module: Uint8Array): Promise<{ vm: string; protected: boolean }> {
    if (this.primaries.has(record.vm)) throw new Error(`${record.vm} already runs here`);
    const guest = await this.guestFor(module);
    const worker = await VmWorker.boot(guest, this.vmOptions(record));
    const primary = new ProtectedPrimary(record, guest, worker, new OutputLog(), this.problemReporter, (host) => this.nameBackup(record.vm, host));
    this.primaries.set(record.vm, primary);
    primary.start();
    if (record.backup) {
      // Counted as a re-protection in progress, so maintain() does not attach a second backup meanwhile.
      this.reprotecting.add(record.vm);
      try {
        await this.attachBackup(primary, record.backup);
      } finally {
        this.reprotecting.delete(record.vm);
      }
    }
    this.log.info({ vm: record.vm, backup: record.backup, incarnation: record.incarnation }, "primary started");
    return { vm: record.vm, protected: primary.protectedNow };
  }

  private async attachBackup(primary: ProtectedPrimary, host: string): Promise<void> {
    const connection = await this.peerConnection(host);
    // Bounded: a host that does not answer soon is passed over at the next attempt.
    await connection.request("install_backup", { record: { ...primary.record, backup: host } }, this.moduleBytesOf(primary.guest), INSTALL_BACKUP_TIMEOUT_MS);
    await primary.attachBackup(host, connection);
  }

  private async installBackup(record: VmRecord, module: Uint8Array): Promise<{ vm: string }> {
    const guest = await this.guestFor(module);
    await this.backups.get(record.vm)?.stop();
    this.backups.set(record.vm, new BackupReplica(record, guest, this.vmOptions(record)));
    this.log.info({ vm: record.vm, primary: record.primary, incarnation: record.incarnation }, "backup installed");
    return { vm: record.vm };
  }

  /** The primary of this backup's VM is gone: decide by CAS, then promote in place. */
  private async promote(backup: BackupReplica): Promise<void> {
    const key = vmKey(backup.record.vm);
    const current = await this.store.get<VmRecord>(key);
    // Only the backup the record names may take over: a replaced (stale) backup must not.
    if (!current || current.value.incarnation !== backup.record.incarnation || current.value.primary !== backup.record.primary || current.value.backup !== this.id) {
      return;
    }
    const next: VmRecord = { ...current.value, primary: this.id, backup: null, incarnation: current.value.incarnation + 1, health: "degraded" };
    if ((await this.store.cas(key, current.version, next)) === null) return; // someone else decided
    const started = performance.now();
    this.backups.delete(backup.record.vm);
    const { worker, cut } = await backup.promote();
    const primary = new ProtectedPrimary(next, backup.guest, worker, backup.log, this.problemReporter, (host) => this.nameBackup(next.vm, host));
    this.primaries.set(next.vm, primary);
    // The recovery cut is committed by definition: its output may leave now (sinks drop what they had).
    await primary.releaseCommitted(cut);
    primary.start();
    this.log.warn({ vm: next.vm, cut, incarnation: next.incarnation, promote_ms: Number((performance.now() - started).toFixed(1)) }, "backup promoted");
    await this.reprotect(primary);
  }

  /** Gives a primary that lost its backup a new one on another live host (one attempt at a time per VM). */
  private async reprotect(primary: ProtectedPrimary): Promise<void> {
    if (primary.record.mode === "none" || this.reprotecting.has(primary.record.vm)) return;
    this.reprotecting.add(primary.record.vm);
    try {
      await this.reprotectOnce(primary);
    } finally {
      this.reprotecting.delete(primary.record.vm);
    }
  }

  private async reprotectOnce(primary: ProtectedPrimary): Promise<void> {
    const candidates = this.liveHosts().filter((h) => h !== this.id);
    const current = await this.store.get<VmRecord>(vmKey(primary.record.vm));
    if (!current || current.value.primary !== this.id) return;
    if (candidates.length === 0) return; // degraded until a host is available; maintain() tries again
    // Load is not tracked across hosts yet: take the first live one. The store names it only
    // once it holds the image (nameBackup, called before the first commit with it).
    const host = candidates[0];
    const started = performance.now();
    await this.attachBackup(primary, host);
    this.log.info({ vm: primary.record.vm, backup: host, attach_ms: Number((performance.now() - started).toFixed(1)) }, "new backup attached");
  }

  /** CAS: `host` becomes the VM's named backup (only this host, as primary of this incarnation, may do it). */
  private async nameBackup(vm: string, host: string): Promise<boolean> {
    const key = vmKey(vm);
    const current = await this.store.get<VmRecord>(key);
    const primary = this.primaries.get(vm);
    if (!current || !primary || current.value.primary !== this.id || current.value.incarnation !== primary.record.incarnation) return false;
    if (current.value.backup === host && current.value.health === "healthy") return true;
    const next: VmRecord = { ...current.value, backup: host, health: "healthy" };
    if ((await this.store.cas(key, current.version, next)) === null) return false;
    Object.assign(primary.record, next);
    this.log.info({ vm, backup: host }, "re-protected: backup named in the store");
    return true;
  }

  private readonly problemReporter = (vm: string, reason: string) => this.log.error({ vm, reason }, "primary problem");

  /** Replies with the records kept from `from_seq`, then (with `follow`) pushes every new one, in order. */
  private followLogs(connection: Connection, request_id: number, { vm, from_seq, follow }: HostOps["logs"]["checked"]): void {
    const primary = this.primaries.get(vm);
    let log = primary?.log ?? this.backups.get(vm)?.log;
    let role: "primary" | "backup" = primary ? "primary" : "backup";
    for (const g of this.groups.values()) {
      const rank = g.rankOf(vm);
      const found = log || rank === null ? null : g.outputLogOf(rank);
      if (found) ({ log, role } = found);
    }
    if (!log) throw Object.assign(new Error(`no replica of ${vm} on ${this.id}`), { code: "NoSuchVm" });
    const value: HostOps["logs"]["result"] = { vm, role, first_seq: log.firstSeq, records: log.since(from_seq) };
    connection.reply(request_id, { ok: true, value });
    if (follow) {
      const onAppend = (records: LogRecordWire[]) => {
        if (connection.isClosed) {
          log.off("append", onAppend);
          return;
        }
        connection.send(MSG.LOG, { vm, records } satisfies LogPush);
      };
      log.on("append", onAppend);
      connection.once("close", () => log.off("append", onAppend));
    }
  }

  status(): HostStatus {
    const now = Date.now();
    return {
      id: this.id,
      address: this.address,
      pid: process.pid,
      peers: [...this.peers.values()].map((p) => ({ id: p.id, alive: !p.failed && p.last_seen_ms > 0 && now - p.last_seen_ms <= this.options.detect_ms, silent_ms: p.last_seen_ms ? now - p.last_seen_ms : null })),
      primaries: [
        ...[...this.primaries.values()].map((p) => ({
        vm: p.record.vm,
        group: p.record.group,
        mode: p.record.mode,
        incarnation: p.record.incarnation,
        backup: p.backupHostId,
        protected: p.protectedNow,
        epoch: p.currentEpoch,
        checkpoints: p.stats.epochs,
        committed: p.stats.committed,
        released_seq: p.log.lastSeq,
        pause_us_last: Number(p.stats.pause_us_last.toFixed(1)),
        commit_ms_last: Number(p.stats.commit_ms_last.toFixed(2)),
      })),
      ...[...this.groups.values()].flatMap((g) =>
        g.status().primaries.map((m) => ({
          vm: m.vm,
          group: g.name,
          mode: g.record.mode,
          incarnation: g.record.incarnation,
          backup: m.backup,
          protected: m.backup !== null,
          epoch: m.captured + 1,
          checkpoints: m.captured,
          committed: m.committed,
          released_seq: m.released_seq,
        })),
      ),
      ],
      backups: [...this.backups.values()].map((b) => ({ vm: b.record.vm, primary: b.record.primary, incarnation: b.record.incarnation, cut: b.committedCut, staged: b.stagedCount })),
      groups: [...this.groups.values()].map((g) => g.status()),
      group_frames_refused: this.groupFramesRefused,
    };
  }
}
