/**
 * The `cohort host` daemon: one per machine (several on loopback for a local
 * cluster). It listens for peer frames on one TCP port, heartbeats every other
 * host, and runs one GroupDriver (src/host/group/driver.ts) per protected
 * group with a replica here: the group protocol core decides, the driver
 * carries it out. A single VM is a group of one.
 */
import { createServer, type Server, type Socket } from "node:net";
import { createHistogram, type RecordableHistogram } from "node:perf_hooks";
import { mutualTlsServer, type TlsMaterial } from "../tls/context.js";
import { pino, type Logger } from "pino";
import { join } from "node:path";
import { Connection, splitAddress } from "./connection.js";
import { MSG, type LogPush, type Request } from "./messages.js";
import { BeatThread, mainLoopWedgedMs } from "./beat-thread.js";
import { HOST_ID_RE, hostNameOf } from "./instance.js";
import { BEAT_KEY_BYTES, BEAT_KEY_LABEL } from "./beat-wire.js";
import type { TLSSocket } from "node:tls";
import { BadArgumentsError, checkArgs, errorReply, isHostOp, type HostOps, type HostStatus, type LocalOp } from "./api.js";
import type { ReleasedRecord } from "../core/frames.js";
import { logPages, OutputLog } from "./output-log.js";
import { LogLimit } from "../util/log-limit.js";
import { LatenessLog } from "../util/lateness-log.js";
import { round } from "../util/stats.js";
import { hostKey, vmKey, type GroupRecord, type VmRecord } from "./records.js";
import { deployGroup } from "./deploy.js";
import { StoreError, type CoordinationStore, type Lease, type Versioned, type Watch } from "../store/store.js";
import type { HostRecord } from "../cluster/local-cluster.js";
import { compileGuest, instrumentCached, sha256 } from "../guest/module-cache.js";
import type { GuestBundle } from "../vm/protocol.js";
import { VmWorker } from "../vm/vm.js";
import { GROUP_BACKUP_THREADS_MAX, GROUP_PRIMARY_THREADS_MAX, type GroupHostApi } from "./group/driver.js";
import { GroupTable } from "./group/table.js";
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
  /** Record every group core's events and actions in this directory (`cohort sim --replay`); off when null. */
  record_dir?: string | null;
  /**
   * TTL of the lease `hosts/<id>` lives by (renewed every tenth of it): a
   * dead host's entry goes after this, and a host that could not renew it
   * for this long (the store away, or this host cut off or paused) retires.
   */
  lease_ms?: number;
  /**
   * This host's certificate (naming its id), key and the cluster CA: the host
   * port and its VMs' message paths speak mutual TLS and take only peers the
   * CA certified. null: plain TCP, no authentication (`cohort host --insecure`).
   */
  tls: TlsMaterial | null;
}

/**
 * lease_ms: an outage of the store shorter than this (less one renewal
 * period) stops nothing; a longer one stops every host's replicas. Failover
 * does not wait for it (heartbeats find a dead host); a survivor of more than
 * half of the cluster dying at once does (docs/PROTOCOL.md "Who decides").
 */
export const HOST_DEFAULTS = { heartbeat_ms: 100, detect_ms: 300, lease_ms: 10_000 };
/** A registration's lease is renewed this many times per TTL: a store outage of up to (1 - 1/this) of the TTL stops nothing. */
const LEASE_RENEWALS_PER_TTL = 10;
/** The lowest failure-detection timeout a host accepts: below it, a busy machine's scheduling hiccups read as deaths. */
export const DETECT_MS_MIN = 100;

/**
 * The heartbeat interval for a detection timeout: a third of it (3 beats per
 * window), at most the default 100 ms. An idle host's CPU is mostly these
 * wake-ups (each beat wakes the heartbeat thread for its own and for every
 * peer's datagram): beats every 50 ms, a quarter of the timeout, cost twice
 * as much for one more beat per window.
 */
export function heartbeatFor(detect_ms: number): number {
  return Math.max(10, Math.min(HOST_DEFAULTS.heartbeat_ms, Math.floor(detect_ms / 3)));
}
/**
 * Idle VM threads kept ready, so a deploy or a promotion's new backup does
 * not wait for a thread to start: as many as one group's replicas use on a
 * host (its primaries' pool and its backups'). With one fewer, every host of
 * an 8-VM deploy started a thread during it, 800 ms each with four hosts
 * starting theirs on two cores, and the deploy took that much longer.
 */
export const VM_THREADS_PREWARMED = GROUP_PRIMARY_THREADS_MAX + GROUP_BACKUP_THREADS_MAX;
/** A tick later than this is kept in the per-second lateness log of `status` (main_loop.late_seconds). */
const LATE_LOGGED_MS = 10;

interface Peer {
  id: string;
  address: string;
  out: Connection | null;
  connecting: boolean;
  /** When its heartbeat was last heard, as the heartbeat thread wrote it in `slot` (or a fresh window after a stall). */
  last_seen_ms: number;
  slot: number;
  /** With TLS: the heartbeat key of `out` (see beat-wire.ts). */
  key_out: Uint8Array | null;
  failed: boolean;
  /** Silent for half a detection timeout, as the heartbeat thread said (its `quiet`), and not heard since: the detector watches it. */
  quiet: boolean;
  /** Group frames sent while no connection was open, flushed in order once one is. */
  queue: { header: GroupFrame; body?: Uint8Array; done?: () => void }[];
}

/** Group frames kept per peer while its connection is (re)opening. */
export const PEER_QUEUE_MAX = 10_000;
/** Registrations are re-read this often besides the store's watch (a missed change costs at most this). */
const PEER_RESYNC_MS = 10_000;
/** A peer without a connection (down, or declared failed and perhaps only paused) is dialed again this often. */
const PEER_RECONNECT_MS = 250;

/** How long `vm_request` waits for the VM's reply to be released. */
export const VM_REQUEST_TIMEOUT_MS = 5000;

export class Host {
  private server!: Server;
  private beats!: BeatThread;
  private address = "";
  readonly log: Logger;
  private readonly peers = new Map<string, Peer>();
  /** With TLS: by host id, the heartbeat keys of its connections to this host, newest first (two at most). */
  private readonly keysIn = new Map<string, { connection: Connection; key: Uint8Array }[]>();
  private readonly incoming = new Set<Connection>();
  /** Guest modules by sha-256 of their bytes, instrumented and compiled (or being): one per module for every VM, backup and promotion here. */
  private readonly modules = new Map<string, Promise<GuestBundle>>();
  private timers: NodeJS.Timeout[] = [];
  /** Group frames with a malformed or newer header (their connections were closed); the group table counts the other frames no group took. */
  private groupFramesRefused = 0;
  private stopping = false;
  private readonly closeLog = new LogLimit();
  /** Connections refused for their certificate (or their handshake), and failed dials, logged a bounded share. */
  private readonly tlsLog = new LogLimit();
  private readonly dialLog = new LogLimit(1, 5000);
  private readonly storeLog = new LogLimit(1, 5000);
  private readonly beatLog = new LogLimit(1, 5000);
  private storeDown = false;
  /** The lease `hosts/<id>` lives by, and when it was last renewed. */
  private lease: Lease | null = null;
  /** The hosts registered in the store as last read (this one included), sorted. */
  private registered: string[];
  private leaseRenewed_ms = 0;
  private renewing = false;
  /**
   * Resolves, with the reason, when this host instance must end and its
   * process rejoin the cluster as a fresh host (src/host/lifecycle.ts): its
   * registration's lease lapsed, or every group it held declared it failed.
   */
  readonly retired: Promise<string>;
  private retireWith: (reason: string) => void = () => undefined;
  private retiring = false;
  /**
   * The main loop's lateness (status `main_loop`), in µs: how late each
   * heartbeat tick ran. The ticks are the host's own clock of its loop; a
   * sampler of its own (Node's monitorEventLoopDelay) woke an idle host 100
   * times a second, more than everything else it does when idle.
   */
  private readonly loopLateness_us: RecordableHistogram = createHistogram();
  /** The longest gap between two heartbeat ticks. */
  private stallMax_ms = 0;
  /** The worst lateness of the main loop's tick per second (of at least LATE_LOGGED_MS), for the last ten minutes. */
  private readonly lateSeconds = new LatenessLog(LATE_LOGGED_MS);
  /** When the heartbeat tick last ran: a gap longer than the detection timeout means this host stalled. */
  private lastTick_ms = 0;
  /** heardHosts() as detect() last told the groups. */
  private lastHeard = "";
  /** The detector's next run (see armDetect), and when it is due. */
  private detectTimer: NodeJS.Timeout | null = null;
  private detectDue_ms = Infinity;
  private hostsWatch: Watch | null = null;
  private heartbeatTimer: NodeJS.Timeout | null = null;
  /** Armed while some peer has no connection (see scheduleReconnect). */
  private reconnectTimer: NodeJS.Timeout | null = null;
  /** Protected groups with a replica on this host (a single VM is a group of one). */
  readonly groups: GroupTable;
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
      tls: options.tls,
      record_dir: options.record_dir ?? null,
      send: (to, frame, body, done) => this.sendGroup(to, frame, body, done),
      liveHosts: () => this.liveHosts(),
      heardHosts: () => this.heardHosts(),
      registeredHosts: () => this.registered,
      onNotice: (group, notice) => {
        if (notice.kind === "fenced" && this.groups.allFenced()) this.retire(`declared failed by every group it held (the last: ${group}, incarnation ${notice.inc})`);
      },
      guestFor: (module) => this.guestFor(module),
    };
    this.groups = new GroupTable(this.groupApi);
    this.registered = [this.id];
    this.retired = new Promise((resolve) => (this.retireWith = resolve));
  }

  get id(): string {
    return this.options.id;
  }

  async start(): Promise<void> {
    const tls = this.options.tls;
    this.server = tls ? mutualTlsServer(tls, (socket, peer) => this.accept(socket, peer), (address, reason) => this.refused(address, reason)) : createServer((socket) => this.accept(socket));
    const port = await this.listen();
    this.address = `${this.options.listen_host}:${port}`;
    const record: HostRecord = { id: this.id, address: this.address, pid: process.pid, started_at_ms: Date.now() };
    await this.register(record);
    const lease_ms = this.options.lease_ms ?? HOST_DEFAULTS.lease_ms;
    this.timers.push(
      setInterval(() => {
        // Checked apart from the renewal, which may be waiting on a store that does not answer.
        const since_ms = Date.now() - this.leaseRenewed_ms;
        if (this.lease && since_ms > this.lease.ttl_ms) return this.retire(`its registration's lease lapsed: not renewed for ${since_ms} ms (TTL ${this.lease.ttl_ms} ms)`);
        this.renewLease().catch((error: Error) => this.log.error({ err: error }, "lease renewal failed"));
      }, Math.max(100, Math.floor(lease_ms / LEASE_RENEWALS_PER_TTL))),
    );
    VmWorker.prewarm(VM_THREADS_PREWARMED);
    this.scheduleHeartbeat();
    // Registrations come and go (hosts start, restart, their leases lapse): the store says when (etcd pushes,
    // the file store from the kernel's file notifications); a slow re-read besides catches what a watch missed.
    const refresh = (): void => {
      this.refreshPeers().catch((error: Error) => this.log.error({ err: error }, "peer refresh failed"));
    };
    this.hostsWatch = this.store.watch("hosts/", refresh);
    this.timers.push(setInterval(refresh, PEER_RESYNC_MS));
    await this.refreshPeers();
    this.log.info({ address: this.address, pid: process.pid, tls: tls !== null }, "host listening");
  }

  /**
   * The host port: TCP for peer frames and, with the same number, UDP for
   * heartbeats (the heartbeat thread's socket). With port 0 the kernel picks
   * a TCP port whose UDP twin may be taken; a few picks find a free pair.
   */
  private async listen(): Promise<number> {
    for (let attempt = 1; ; attempt++) {
      await new Promise<void>((resolve, reject) => {
        this.server.once("error", reject);
        this.server.listen(this.options.port, this.options.listen_host, () => resolve());
      });
      const addr = this.server.address();
      if (!addr || typeof addr === "string") throw new Error("server has no TCP address");
      try {
        this.beats = await BeatThread.start({
          id: this.id,
          bind_host: this.options.listen_host,
          port: addr.port,
          heartbeat_ms: this.options.heartbeat_ms,
          detect_ms: this.options.detect_ms,
          wedged_ms: mainLoopWedgedMs(this.options.detect_ms),
          secure: this.options.tls !== null,
        });
      } catch (error) {
        await new Promise<void>((resolve) => this.server.close(() => resolve()));
        if (this.options.port === 0 && (error as NodeJS.ErrnoException).code === "EADDRINUSE" && attempt < 5) continue;
        throw error;
      }
      this.beats.on("heard", (id) => this.onHeard(id));
      this.beats.on("quiet", (id) => this.onQuiet(id));
      this.beats.on("refused", (address, reason, count) => {
        const take = this.beatLog.take(Date.now());
        if (take) this.log.warn({ peer: address, reason, refused: count }, "heartbeats refused");
      });
      this.beats.on("error", (message) => this.log.error({ reason: message }, "heartbeat thread failed"));
      return addr.port;
    }
  }

  /** Puts `hosts/<id>` with a fresh lease. */
  private async register(record: HostRecord): Promise<void> {
    const lease = await this.store.grantLease(this.options.lease_ms ?? HOST_DEFAULTS.lease_ms);
    await this.store.put(hostKey(this.id), record, { lease });
    this.lease = lease;
    this.leaseRenewed_ms = Date.now();
  }

  /**
   * Keeps the registration's lease alive. A lapsed one (the store was away
   * longer than its TTL, or this host was cut off or paused) ends this host
   * instance: the others may have decided it failed meanwhile, and it holds
   * nothing they count on. Safety does not come from the lease (failover
   * decisions come from heartbeats and the group record's incarnation); it
   * frees the replicas of a host nobody can reach, and rejoins it fresh.
   */
  private async renewLease(): Promise<void> {
    if (this.stopping || this.renewing || !this.lease) return;
    this.renewing = true;
    try {
      await this.lease.keepAlive();
      this.leaseRenewed_ms = Date.now();
    } catch (error) {
      if (error instanceof StoreError && error.code === "LeaseLost") this.retire(`its registration's lease ${this.lease.id} lapsed (the store says so)`);
      // StoreUnavailable: refreshPeers reports the store's absence; the next round tries again.
    } finally {
      this.renewing = false;
    }
  }

  /** Ends this host instance (see `retired`); the process stops it and starts a fresh one. */
  private retire(reason: string): void {
    if (this.retiring || this.stopping) return;
    this.retiring = true;
    this.log.warn({ reason }, "this host instance ends: its replicas stop, and the process rejoins as a fresh host");
    this.retireWith(reason);
  }

  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    for (const t of this.timers) clearInterval(t);
    if (this.detectTimer) clearTimeout(this.detectTimer);
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this.hostsWatch?.close();
    // Replicas first: a host that retires because the store is away must not wait on it to stop them.
    await this.groups.stop();
    await this.lease?.revoke().catch(() => undefined); // the registration goes now rather than after its TTL
    for (const peer of this.peers.values()) peer.out?.close("host stopping");
    for (const c of this.incoming) c.close("host stopping");
    await (this.beats as BeatThread | undefined)?.stop(); // none if the host never listened
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    await this.store.close();
    this.log.info("host stopped");
  }

  // ---- peers and failure detection -------------------------------------------------

  /** `peer`: the name in the peer's verified certificate (TLS), or none (plain TCP). */
  private accept(socket: Socket, peer?: string): void {
    const connection = new Connection(socket, `in:${peer !== undefined ? `${peer}@` : ""}${socket.remoteAddress}:${socket.remotePort}`);
    this.incoming.add(connection);
    connection.on("close", (reason) => {
      this.incoming.delete(connection);
      if (this.stopping || reason.startsWith("peer closed")) return;
      // A peer that keeps sending bad frames on new connections gets each closed, and the log a bounded share of it.
      const take = this.closeLog.take(Date.now());
      if (take) this.log.warn({ connection: connection.label, reason, ...(take.skipped ? { closes_not_logged: take.skipped } : {}) }, "connection closed");
    });
    connection.on("message", (type, header, body) => {
      this.onMessage(connection, type, header, body, peer).catch((error: Error) => {
        this.log.error({ err: error, type }, "message handling failed");
      });
    });
  }

  /** A connection refused before it could send anything: no valid certificate, or no TLS handshake. */
  private refused(address: string, reason: string): void {
    if (this.stopping) return;
    const take = this.tlsLog.take(Date.now());
    if (take) this.log.warn({ peer: address, reason, ...(take.skipped ? { refusals_not_logged: take.skipped } : {}) }, "connection refused: not authenticated");
  }

  private async refreshPeers(): Promise<void> {
    if (this.stopping) return;
    let hosts: Versioned<HostRecord>[];
    try {
      hosts = await this.store.list<HostRecord>("hosts/");
    } catch (error) {
      // Asked every 250 ms: one line per 5 s while the store is down, and one when it is back.
      const take = this.storeLog.take(Date.now());
      if (take) this.log.warn({ err: error, ...(take.skipped ? { not_logged: take.skipped } : {}) }, "store unavailable");
      this.storeDown = true;
      return;
    }
    if (this.storeDown) {
      this.storeDown = false;
      this.log.info("store reachable again");
    }
    const registered = [...new Set([this.id, ...hosts.map((h) => h.value.id)])].sort();
    if (registered.join(" ") !== this.registered.join(" ")) {
      this.registered = registered;
      this.groups.hostsChanged(); // a lapsed registration may give a side without a majority one
    }
    for (const { value } of hosts) {
      if (value.id === this.id) continue;
      let peer = this.peers.get(value.id);
      if (!peer || peer.address !== value.address) {
        peer?.out?.close("address changed");
        if (peer) {
          this.dropQueue(peer);
          this.beats.giveSlot(peer.slot);
        }
        peer = { id: value.id, address: value.address, out: null, connecting: false, last_seen_ms: 0, slot: this.beats.takeSlot(), key_out: null, failed: false, quiet: false, queue: [] };
        this.peers.set(value.id, peer);
        this.beatPeersChanged();
      }
      if (!peer.out && !peer.connecting) this.connectInBackground(peer);
    }
  }

  /**
   * Connections to peers that are down are tried again, failed peers too: a
   * paused host comes back and learns we are alive only from our heartbeats
   * (its registration did not change, so the store's watch says nothing).
   */
  private reconnectPeers(): void {
    this.reconnectTimer = null;
    if (this.stopping) return;
    for (const peer of this.peers.values()) if (!peer.out && !peer.connecting) this.connectInBackground(peer);
  }

  /** Dials peers without a connection again in PEER_RECONNECT_MS; a cluster whose connections are all up has no timer for it. */
  private scheduleReconnect(): void {
    if (this.stopping || this.reconnectTimer) return;
    this.reconnectTimer = setTimeout(() => this.reconnectPeers(), PEER_RECONNECT_MS);
  }

  private async connectPeer(peer: Peer): Promise<Connection | null> {
    if (peer.out && !peer.out.isClosed) return peer.out;
    peer.connecting = true;
    try {
      const tls = this.options.tls;
      const connection = await Connection.open(peer.address, `out:${peer.id}`, 1000, tls ? { material: tls, peer: peer.id } : null);
      connection.send(MSG.HELLO, { from: this.id });
      connection.on("close", () => {
        if (peer.out !== connection) return;
        peer.out = null;
        peer.key_out = null;
        this.beatPeersChanged();
        this.scheduleReconnect();
      });
      // Replies to our requests come back on this connection; pushes from the peer come on its own.
      peer.out = connection;
      peer.key_out = tls ? heartbeatKey(connection) : null;
      this.beatPeersChanged();
      const queued = peer.queue;
      peer.queue = [];
      for (const { header, body, done } of queued) connection.send(MSG.GROUP, header, body, done);
      return connection;
    } catch (error) {
      // Unreachable peers are the detector's business; a peer whose certificate does not hold is worth a line.
      const e = error as NodeJS.ErrnoException;
      const take = e.code === "ECONNREFUSED" || /timed out/.test(e.message) ? null : this.dialLog.take(Date.now());
      if (take) this.log.warn({ peer: peer.id, address: peer.address, reason: e.message, ...(take.skipped ? { not_logged: take.skipped } : {}) }, "connecting to a peer failed");
      this.scheduleReconnect();
      return null;
    } finally {
      peer.connecting = false;
    }
  }

  /** Opens a connection to `peer` without waiting for it (connectPeer answers null when the peer is unreachable). */
  private connectInBackground(peer: Peer): void {
    this.connectPeer(peer).catch((error: Error) => this.log.error({ err: error, peer: peer.id }, "connecting to a peer failed"));
  }

  /**
   * The main loop's tick, every heartbeat_ms. An interval timer: Node
   * re-arms it from the moment it runs, so the gap between two runs is the
   * interval plus this one's lateness (heartbeat()).
   */
  private scheduleHeartbeat(): void {
    if (this.stopping) return;
    this.heartbeatTimer = setInterval(() => this.heartbeat(), this.options.heartbeat_ms);
  }

  /**
   * The main loop's tick: its pulse to the heartbeat thread (which beats
   * only while the pulse is fresh, see beat-thread.ts) and the measure of
   * its lateness. A tick that comes more than the detection timeout after
   * the last one means this host stalled (SIGSTOP, a long synchronous step):
   * the heartbeat thread stalled with it if the whole process was stopped,
   * and the silence the detector would measure now is its own. Every peer
   * gets a fresh window; one that is really gone is found a timeout later.
   * (Deciding on that silence made a resumed host declare every live peer
   * failed before their heartbeats, queued in its sockets, were read.) After
   * a stall every expired timer runs in the same timers phase, this one
   * included, before the detector's run in the check phase that follows
   * (armDetect).
   */
  private heartbeat(): void {
    const now = Date.now();
    this.beats.pulse(now);
    const gap_ms = this.lastTick_ms > 0 ? now - this.lastTick_ms : this.options.heartbeat_ms;
    this.lastTick_ms = now;
    this.stallMax_ms = Math.max(this.stallMax_ms, gap_ms);
    this.loopLateness_us.record(Math.max(1, Math.round((gap_ms - this.options.heartbeat_ms) * 1000)));
    this.lateSeconds.record(now, Math.round(gap_ms - this.options.heartbeat_ms));
    if (gap_ms > this.options.detect_ms) {
      for (const peer of this.peers.values()) if (!peer.failed && peer.last_seen_ms > 0) peer.last_seen_ms = now;
      this.log.warn({ stalled_ms: gap_ms }, "this host stalled; its peers get a fresh detection window");
      // The quiet peers' timers measured the old windows: they are armed again from the new ones.
      this.armDetect(now);
    }
  }

  /** Takes what the heartbeat thread heard (a fresh window given after a stall is kept if later). */
  private syncHeard(): void {
    for (const peer of this.peers.values()) {
      const heard_ms = this.beats.lastHeard(peer.slot);
      if (heard_ms > peer.last_seen_ms) peer.last_seen_ms = heard_ms;
    }
  }

  /**
   * A peer heard for the first time, or again after half a timeout of
   * silence (the heartbeat thread says so at once): the detector updates who
   * is heard now, and watches it from here.
   */
  private onHeard(id: string): void {
    const peer = this.peers.get(id);
    if (!peer || this.stopping) return;
    const joined = peer.last_seen_ms === 0;
    const now = Date.now();
    peer.last_seen_ms = Math.max(peer.last_seen_ms, this.beats.lastHeard(peer.slot));
    peer.quiet = false;
    this.armDetect(now);
    if (peer.failed) {
      peer.failed = false;
      this.log.info({ peer: peer.id }, "peer is back");
      this.onLivenessChanged(peer.id);
    } else if (joined) {
      // A host heard from for the first time (started, or restarted as a new participant): groups
      // waiting for a host to place backups on see it now.
      this.log.info({ peer: peer.id }, "peer joined");
      this.onLivenessChanged(peer.id);
    }
  }

  /** A peer silent for half a detection timeout (the heartbeat thread says so): the detector watches it from here. */
  private onQuiet(id: string): void {
    const peer = this.peers.get(id);
    if (!peer || this.stopping) return;
    peer.quiet = true;
    this.armDetect(Date.now());
  }

  /** The heartbeat thread's list of peers: whom to beat (those this host has a connection to), with which keys. */
  private beatPeersChanged(): void {
    this.beats.setPeers(
      [...this.peers.values()].map((p) => {
        const [host, port] = splitAddress(p.address);
        const keys_in = (this.keysIn.get(p.id) ?? []).map((k) => k.key);
        return { id: p.id, slot: p.slot, host, port, send: p.out !== null && (this.options.tls === null || p.key_out !== null), key_out: p.key_out, keys_in };
      }),
    );
  }

  /**
   * Runs the detector at `due_ms` unless it runs sooner already. It runs
   * when the heartbeat thread says a peer went quiet (half a timeout of
   * silence, seen at one of its beats: at most a heartbeat interval late)
   * or was heard again, and then, while some peer is quiet, 1 ms after that
   * peer's timeout: a failure is decided to the millisecond, and peers that
   * keep beating cost this thread no wake-up at all (an idle host's CPU is
   * mostly wake-ups). Judged after the loop's next poll (setImmediate runs
   * in the check phase, timers before poll): heartbeats that reached the
   * socket while this thread waited for the CPU are read before the silence
   * they end is counted against their sender.
   */
  private armDetect(due_ms: number): void {
    if (this.stopping || due_ms >= this.detectDue_ms) return;
    if (this.detectTimer) clearTimeout(this.detectTimer);
    this.detectDue_ms = due_ms;
    this.detectTimer = setTimeout(() => {
      this.detectTimer = null;
      this.detectDue_ms = Infinity;
      setImmediate(() => this.detect());
    }, Math.max(0, due_ms - Date.now()));
  }

  private detect(): void {
    if (this.stopping) return; // an immediate queued by the last tick
    this.syncHeard();
    const now = Date.now();
    // This host's own stall (heartbeat()) refreshed every window; the heartbeat tick, as late, ran first.
    for (const peer of this.peers.values()) {
      if (peer.failed || peer.last_seen_ms === 0) continue;
      if (now - peer.last_seen_ms > this.options.detect_ms) {
        peer.failed = true;
        peer.out?.close("peer failed");
        this.log.warn({ peer: peer.id, silent_ms: now - peer.last_seen_ms }, "peer failed");
        this.onLivenessChanged(peer.id);
      }
    }
    // Who is heard from within half the timeout changes before anyone fails: the groups weigh it when deciding.
    const heard = this.heardHosts().join(" ");
    if (heard !== this.lastHeard) {
      this.lastHeard = heard;
      this.groups.hostsChanged();
    }
    // The first moment a quiet peer's silence crosses the timeout (1 ms past: the tests are strict). A
    // peer past half the timeout that the heartbeat thread has not called quiet yet (it says so at its
    // next beat) is watched already too.
    let next = Infinity;
    for (const peer of this.peers.values()) {
      if (peer.failed || peer.last_seen_ms === 0) continue;
      if (peer.quiet || now - peer.last_seen_ms > this.options.detect_ms / 2) next = Math.min(next, peer.last_seen_ms + this.options.detect_ms + 1);
    }
    if (next < Infinity) this.armDetect(next);
  }

  /** Live peers heard from within half the detection timeout, and this host (the side of a partition it is on; see the core's `hosts` event). */
  heardHosts(): string[] {
    return this.heardWithin(this.options.detect_ms / 2);
  }

  /** Peers that heartbeat within the detection timeout. */
  liveHosts(): string[] {
    return this.heardWithin(this.options.detect_ms);
  }

  /** This host and the peers not failed that were heard from within `window_ms`, sorted. */
  private heardWithin(window_ms: number): string[] {
    this.syncHeard();
    const now = Date.now();
    const heard = [...this.peers.values()].filter((p) => !p.failed && p.last_seen_ms > 0 && now - p.last_seen_ms <= window_ms).map((p) => p.id);
    return [this.id, ...heard].sort();
  }

  async peerConnection(host: string): Promise<Connection> {
    const peer = this.peers.get(host);
    if (!peer) throw new Error(`unknown host ${host}`);
    const connection = peer.out && !peer.out.isClosed ? peer.out : await this.connectPeer(peer);
    if (!connection) throw new Error(`host ${host} is not reachable`);
    return connection;
  }

  /**
   * A group frame to `host`: on the open connection, or queued until one is
   * open. `done` is called once nothing here reads `body` any more (written
   * out, or dropped); see GroupHostApi.send.
   */
  private sendGroup(host: string, header: GroupFrame, body?: Uint8Array, done?: () => void): void {
    const peer = this.peers.get(host);
    if (!peer) {
      this.log.warn({ peer: host, kind: header.k }, "group frame to an unknown host dropped");
      done?.();
      return;
    }
    if (peer.out && !peer.out.isClosed && peer.queue.length === 0) {
      peer.out.send(MSG.GROUP, header, body, done);
      return;
    }
    if (peer.queue.length >= PEER_QUEUE_MAX) {
      this.log.warn({ peer: host }, `more than ${PEER_QUEUE_MAX} group frames queued: dropped`);
      done?.();
      return;
    }
    peer.queue.push({ header, body, done });
    if (!peer.connecting) this.connectInBackground(peer);
  }

  /** The frames queued for `peer` are not going to be sent. */
  private dropQueue(peer: Peer): void {
    const dropped = peer.queue;
    peer.queue = [];
    for (const q of dropped) q.done?.();
  }

  /** The detector's view changed: every group re-evaluates (its core decides whether a failover is due). */
  private onLivenessChanged(host: string): void {
    const peer = this.peers.get(host);
    if (peer?.failed) this.dropQueue(peer);
    this.groups.hostsChanged();
  }

  // ---- messages ------------------------------------------------------------------

  /** `certified`: the host id in the peer's certificate (TLS), undefined on plain TCP. */
  private async onMessage(connection: Connection, type: number, header: Record<string, unknown>, body: Uint8Array, certified?: string): Promise<void> {
    switch (type) {
      case MSG.HELLO:
        return this.onHello(connection, String(header.from), certified);
      case MSG.REQUEST:
        return this.onRequest(connection, header as unknown as Request, body);
      case MSG.GROUP:
        return this.onGroupFrame(connection, header, body);
      default:
        connection.close(`unknown message type ${type}`);
    }
  }

  /**
   * A peer's connection to this host says who it is. With TLS, a host whose
   * certificate names it (or the host it is an instance of) gives the connection's heartbeat key: its beats to
   * this host carry it. The newest two are kept (a beat sent just before the
   * peer reconnected may still arrive); a closed connection's goes.
   */
  private onHello(connection: Connection, from: string, certified: string | undefined): void {
    // A certificate names a host (h1); its instances (h1.2, ...) take part under it.
    if (certified === undefined || !HOST_ID_RE.test(from) || hostNameOf(from) !== certified || this.options.tls === null) return;
    // Kept by host id: a peer may dial this host before this host has read its registration.
    const keys = [{ connection, key: heartbeatKey(connection) }, ...(this.keysIn.get(from) ?? []).filter((k) => !k.connection.isClosed)].slice(0, 2);
    this.keysIn.set(from, keys);
    connection.once("close", () => {
      const left = (this.keysIn.get(from) ?? []).filter((k) => k.connection !== connection);
      if (left.length > 0) this.keysIn.set(from, left);
      else this.keysIn.delete(from);
      this.beatPeersChanged();
    });
    this.beatPeersChanged();
  }

  private onGroupFrame(connection: Connection, header: unknown, body: Uint8Array): void {
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
    this.groups.dispatch(frame, body);
  }

  private async onRequest(connection: Connection, request: Request, body: Uint8Array): Promise<void> {
    const op = request.op;
    if (!isHostOp(op)) {
      connection.reply(request.id, { ok: false, error: { code: "UnknownRequest", message: `unknown request ${op}` } });
      return;
    }
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
    group_prepare: ({ record }, body) => this.groups.prepare(record, body.slice()),
    group_run: ({ group, routes }) => this.runGroup(group, routes),
    group_abort: async ({ group, incarnation }) => ({ group, stopped: await this.groups.abort(group, incarnation) }),
    vm_request: ({ vm, text }) => this.vmRequest(vm, text),
    records: async () => {
      const [groups, vms, hosts] = await Promise.all([this.store.list<GroupRecord>("groups/"), this.store.list<VmRecord>("vms/"), this.store.list<HostRecord>("hosts/")]);
      return { groups: groups.map((g) => g.value), vms: vms.map((v) => v.value), hosts: hosts.map((h) => h.value) };
    },
    locate: async ({ vm }) => ({ vm: (await this.store.get<VmRecord>(vmKey(vm)))?.value ?? null }),
  };

  /**
   * A request of the host API, from a connection or from this host itself (a
   * deploy it runs): `args` are checked against the op's schema (BadArgumentsError
   * naming the fields otherwise) before the op's handler sees them.
   */
  async handleLocal<Op extends LocalOp>(op: Op, args: unknown, body: Uint8Array): Promise<HostOps[Op]["result"]> {
    return this.handlers[op](checkArgs(op, args), body);
  }

  // ---- replicas --------------------------------------------------------------------

  /** Every primary of the group listens: hand its VMs the whole route table and start them. */
  private runGroup(group: string, routes: (Route | null)[]): { group: string } {
    const g = this.groups.get(group);
    if (!g) throw Object.assign(new Error(`group ${group} is not prepared on ${this.id}`), { code: "NoSuchGroup" });
    if (routes.length !== g.record.size) throw new BadArgumentsError("group_run", [{ path: "routes", message: `${routes.length} routes for a group of ${g.record.size}` }]);
    g.run(routes);
    return { group: g.name };
  }

  /** The primary of `vm` on this host, with its released-output log and VM thread. */
  private primaryOf(vm: string): { log: OutputLog; worker: VmWorker; unprotected: () => string | null } | null {
    for (const g of this.groups.values()) {
      const rank = g.rankOf(vm);
      const m = rank === null ? undefined : g.members.get(rank);
      if (m && rank !== null) {
        // Why nothing commits, if that is so: the backup's host is gone and no live host took its place.
        const unprotected = () => {
          const backup = g.record.mode === "none" ? "none" : g.record.placement[rank]?.backup ?? null;
          if (backup === "none" || (backup !== null && this.liveHosts().includes(backup))) return null;
          return backup === null ? "it has no backup" : `its backup's host ${backup} is not answering`;
        };
        return { log: m.log, worker: m.vm, unprotected };
      }
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
        const why = primary.unprotected();
        const hint = why ? `: ${vm} is degraded (${why}), so nothing it outputs is released until a live host takes its backup (see \`cohort status\`)` : "";
        reject(Object.assign(new Error(`${vm}: no reply released within ${VM_REQUEST_TIMEOUT_MS} ms${hint}`), { code: "Timeout" }));
      }, VM_REQUEST_TIMEOUT_MS);
      const onAppend = (records: ReleasedRecord[]) => {
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

  /**
   * The guest of a module, instrumented once on this host (the instrumented-module cache in
   * <state dir>/cache) and compiled once; concurrent requests for it wait for the same one. A
   * failure is not kept: the next request tries again.
   */
  guestFor(bytes: Uint8Array): Promise<GuestBundle> {
    const key = Buffer.from(sha256(bytes)).toString("hex");
    let guest = this.modules.get(key);
    if (!guest) {
      guest = this.loadModule(key, bytes);
      this.modules.set(key, guest);
      guest.catch(() => this.modules.delete(key));
    }
    return guest;
  }

  private async loadModule(key: string, bytes: Uint8Array): Promise<GuestBundle> {
    const instrumented = await instrumentCached(bytes, join(this.options.state_dir, "cache"));
    const { source, timings } = instrumented;
    this.log.info(
      {
        module: key.slice(0, 16),
        bytes: bytes.length,
        instrumented_bytes: instrumented.wasm.length,
        source,
        instrument_ms: round(timings.instrument_ms, 1),
        binaryen_load_ms: round(timings.binaryen_load_ms, 1),
      },
      source === "cache" ? "module read from the instrumented-module cache" : "module instrumented",
    );
    return compileGuest(instrumented);
  }

  /**
   * Replies with the first page of the records kept from `from_seq`; with
   * `follow`, pushes the other pages (yielding between them, so a long log
   * does not hold up this thread's heartbeats) and then every new record, in order.
   */
  private followLogs(connection: Connection, request_id: number, { vm, from_seq, follow }: HostOps["logs"]["checked"]): void {
    let log: OutputLog | undefined;
    let role: "primary" | "backup" = "backup";
    for (const g of this.groups.values()) {
      const rank = g.rankOf(vm);
      const found = log || rank === null ? null : g.outputLogOf(rank);
      if (found) ({ log, role } = found);
    }
    if (!log) throw Object.assign(new Error(`no replica of ${vm} on ${this.id}`), { code: "NoSuchVm" });
    const first = log.page(from_seq);
    const value: HostOps["logs"]["result"] = { vm, role, first_seq: log.firstSeq, records: first.records, more: first.more };
    connection.reply(request_id, { ok: true, value });
    if (!follow) return;
    const source = log;
    // A push that fails closes this follower's connection only.
    const push = (records: ReleasedRecord[]): boolean => {
      if (connection.isClosed) return false;
      try {
        for (const page of logPages(records)) connection.send(MSG.LOG, { vm, records: page } satisfies LogPush);
        return true;
      } catch (error) {
        connection.close(`log push failed: ${(error as Error).message}`);
        return false;
      }
    };
    // Runs inside whatever appends to the log (a commit step).
    const onAppend = (records: ReleasedRecord[]) => {
      if (!push(records)) source.off("append", onAppend);
    };
    let next = first.records.length ? first.records[first.records.length - 1].seq + 1 : Math.max(from_seq, source.firstSeq);
    const backlog = () => {
      if (connection.isClosed) return;
      const { records, more } = source.page(next);
      if (records.length && !push(records)) return;
      if (records.length) next = records[records.length - 1].seq + 1;
      if (more) {
        setImmediate(backlog);
        return;
      }
      // Caught up: from here on every append is pushed as it happens.
      source.on("append", onAppend);
      connection.once("close", () => source.off("append", onAppend));
    };
    backlog();
  }

  status(): HostStatus {
    const now = Date.now();
    const live = new Set(this.liveHosts());
    return {
      id: this.id,
      address: this.address,
      pid: process.pid,
      lease: this.lease ? { ttl_ms: this.lease.ttl_ms, renewed_ms_ago: now - this.leaseRenewed_ms } : null,
      peers: (this.syncHeard(), [...this.peers.values()]).map((p) => ({ id: p.id, alive: !p.failed && p.last_seen_ms > 0 && now - p.last_seen_ms <= this.options.detect_ms, silent_ms: p.last_seen_ms ? now - p.last_seen_ms : null })),
      primaries: [...this.groups.values()].flatMap((g) =>
        g.status().primaries.map((m) => ({
          vm: m.vm,
          group: g.name,
          mode: g.record.mode,
          incarnation: g.record.incarnation,
          backup: m.backup,
          // A backup on a host that stopped answering protects nothing, decided or not (with no spare host the group only waits).
          protected: m.backup !== null && live.has(m.backup),
          epoch: m.captured + 1,
          checkpoints: m.captured,
          committed: m.committed,
          released_seq: m.released_seq,
        })),
      ),
      backups: [...this.groups.values()].flatMap((g) => g.status().backups.map((b) => ({ vm: b.vm, primary: g.record.placement[b.rank].primary, incarnation: g.record.incarnation, cut: b.cut, staged: b.staged }))),
      groups: [...this.groups.values()].map((g) => g.status()),
      group_frames_refused: this.groupFramesRefused + this.groups.refused,
      // The histogram counts in ns and starts at the sampling resolution: what is above it is lateness.
      main_loop: {
        delay_ms_p99: round(this.loopLateness_us.percentile(99) / 1000, 1),
        delay_ms_max: round(this.loopLateness_us.max / 1000, 1),
        stall_ms_max: this.stallMax_ms,
        late_seconds: this.lateSeconds.list(),
      },
    };
  }
}

/** Both ends of a TLS connection export the same key from its session: the heartbeats of the dialing host to the other carry it. */
function heartbeatKey(connection: Connection): Uint8Array {
  return (connection.socket as TLSSocket).exportKeyingMaterial(BEAT_KEY_BYTES, BEAT_KEY_LABEL, Buffer.alloc(0));
}
