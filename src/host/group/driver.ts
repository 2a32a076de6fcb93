/**
 * The host daemon's driver of the group protocol core (src/core/node.ts):
 * one `GroupDriver` per protected group with a replica on this host. The
 * core decides; the driver carries out its actions with real VM threads
 * (GroupMember, BackupReplica), peer frames over TCP, the coordination
 * store and timers, and feeds back what happened as events. There is no
 * protocol logic here: the simulator (src/sim/) drives the very same core.
 *
 * Steps of one rank run one at a time, in the order the core asked for
 * them (a promotion before the member's restore, a backup's install before
 * the deltas staged after it); steps of different ranks overlap.
 */
import type { TlsMaterial } from "../../tls/context.js";
import type { Logger } from "pino";
import { MessageChannel, type MessagePort } from "node:worker_threads";
import { availableParallelism } from "node:os";
import { decodeDelta, decodeImage } from "../../checkpoint/format.js";
import { GroupCore, type CoreStatus } from "../../core/node.js";
import { senderColumn } from "../../core/channel.js";
import { FRAME_VERSION, type GroupFrame, type OutgoingFrame, type Route } from "../../core/frames.js";
import type { BackupStep, CoreAction, CoreEvent, MembersStep, Notice, StepValue, VmStep } from "../../core/events.js";
import { protectionKey, type ProtectionRecord } from "../../core/types.js";
import { DEFAULT_LIMITS, type VmLimits } from "../../vm/machine.js";
import type { GuestBundle, WorkerVmOptions } from "../../vm/protocol.js";
import { VmWorker } from "../../vm/vm.js";
import type { CoordinationStore } from "../../store/store.js";
import { BackupReplica } from "../backup.js";
import { OUTPUT_LOG_HISTORY_BYTES_MAX, OutputLog } from "../output-log.js";
import { vmKey, vmName, type VmRecord } from "../records.js";
import { GroupMember } from "./member.js";
import { LogLimit } from "../../util/log-limit.js";
import { assert } from "../../util/assert.js";
import { CoreRecorder } from "./recorder.js";

/** What a group driver needs from its host daemon. */
export interface GroupHostApi {
  readonly id: string;
  readonly log: Logger;
  readonly store: CoordinationStore;
  readonly detect_ms: number;
  /** Interface the VMs' message paths listen on (the host's own). */
  readonly listen_host: string;
  /** The host's TLS identity, for its VMs' message paths (mutual TLS between VM threads); null or absent: plain TCP. */
  readonly tls?: TlsMaterial | null;
  /**
   * Best effort, in order per destination; lost only if the connection breaks.
   * `done`, if given, is called once nothing reads `body` any more (written
   * out, copied, or dropped); a body never let go of is only a buffer not reused.
   */
  send(to: string, frame: GroupFrame, body?: Uint8Array, done?: () => void): void;
  /** Hosts alive now (this one included), sorted. */
  liveHosts(): string[];
  /** Live hosts heard from within half the detection timeout (this one included), sorted: the side of a partition this host is on. */
  heardHosts(): string[];
  /** Hosts registered in the store as last read (this one included), sorted: the cluster a failover decision needs a majority of. */
  registeredHosts(): string[];
  guestFor(module: Uint8Array): Promise<GuestBundle>;
  /** If set, each group's core events and actions are recorded here (src/host/group/recorder.ts). */
  readonly record_dir?: string | null;
  /** Every notice of the group's core, after it was logged (status pages, in-process observers). */
  onNotice?(group: string, notice: Notice): void;
}

/** The core's clock is brought up to date before an event once it is this far behind. */
const TIME_STEP_MS = 1;

export interface GroupStatus {
  group: string;
  mode: string;
  incarnation: number;
  leader: string;
  committed: number | null;
  recovering: boolean;
  state: CoreStatus["state"];
  lost: number[];
  /** Frames of this group refused (malformed for the group, stale steps, hostile values) and replica steps that failed. */
  refused: number;
  steps_failed: number;
  /** Deltas this host shipped to backups of the group since it joined, and their bytes (`cohort bench idle` reads them). */
  deltas_shipped: number;
  delta_bytes_shipped: number;
  primaries: {
    rank: number;
    vm: string;
    state: string;
    captured: number;
    committed: number;
    backup: string | null;
    released_seq: number;
    held: number;
    busy: string | null;
    sent_before_commit: number;
    sent_after_commit: number;
    held_total: number;
  }[];
  backups: { rank: number; vm: string; cut: number; staged: number }[];
}

/**
 * VM threads of one group on one host: its primaries share up to one per
 * core (at least 2), its backups one (they run no guest code until promoted:
 * a promotion runs the VM in place on the backups' thread). A Node worker
 * costs 60-100 ms of CPU and about 10 MiB to start; with a thread per
 * replica, a 64-VM group over 4 hosts started 128 of them.
 */
export const GROUP_PRIMARY_THREADS_MAX = Math.max(2, availableParallelism());
export const GROUP_BACKUP_THREADS_MAX = 1;

/** `recover`/`halt` frames of newer incarnations checked against the store at once, per group. */
const CONFIRMING_MAX = 4;

export class GroupDriver {
  readonly members = new Map<number, GroupMember>();
  readonly backups = new Map<number, BackupReplica>();
  private readonly core: GroupCore;
  /** Tail of each rank's steps on this host. */
  private readonly chains = new Map<number, Promise<unknown>>();
  private timer: NodeJS.Timeout | null = null;
  private timerDue = Infinity;
  private stopped = false;
  private started: boolean;
  /** Events being handled (an action may feed an event back synchronously): handled after, in order. */
  private readonly queue: CoreEvent[] = [];
  private feeding = false;
  private lastNow_ms = 0;
  private lastTick_ms = 0;
  /** Frames this driver refused before the core saw them (a corrupt delta or image body, a newer incarnation the store does not hold). */
  private refusedHere = 0;
  private readonly refusalLog = new LogLimit();
  /** Hash of the group's instrumented module (once compiled): an image of another module is refused on arrival. */
  private moduleHash: Uint8Array | null = null;
  /** `recover`/`halt` frames of a newer incarnation waiting for the store to confirm it. */
  private readonly confirming = new Set<string>();
  /** Events the core failed on and actions that threw: contained to this group (a bug; each is logged). */
  private failedHere = 0;
  private deltasShipped = 0;
  private deltaBytesShipped = 0;
  private readonly recorder: CoreRecorder | null;

  private constructor(
    private readonly api: GroupHostApi,
    record: ProtectionRecord,
    readonly module: Uint8Array,
    /** The instrumented, compiled module; a joining host compiles it while the recovery goes on. */
    private readonly guestReady: Promise<GuestBundle>,
    joined: boolean,
  ) {
    this.started = joined;
    const options = { host: api.id, record, now_ms: 0, detect_ms: api.detect_ms, live: api.liveHosts(), registered: api.registeredHosts() };
    this.core = joined ? GroupCore.joined(options) : GroupCore.deployed(options);
    this.recorder = api.record_dir ? new CoreRecorder(api.record_dir, api.id, record.group) : null;
    this.recorder?.start(joined ? "joined" : "deployed", options);
    // A joining host's module may fail to load: that is logged where it is compiled (join); images are then checked without the hash.
    guestReady.then(
      (guest) => (this.moduleHash = guest.hash),
      () => undefined,
    );
  }

  get name(): string {
    return this.core.currentRecord.group;
  }

  get record(): ProtectionRecord {
    return this.core.currentRecord;
  }

  private get log(): Logger {
    return this.api.log;
  }

  /**
   * The deployed group (cut 0) on this host: primaries booted with their
   * timers stopped and their message paths open, backups holding the blank
   * deployed image. `run` starts it.
   */
  static async prepare(api: GroupHostApi, record: ProtectionRecord, module: Uint8Array): Promise<GroupDriver> {
    const guest = await api.guestFor(module);
    const d = new GroupDriver(api, record, module, Promise.resolve(guest), false);
    const steps = await Promise.allSettled(
      record.placement.map(async (p, rank) => {
        if (p.primary === api.id) {
          let vm: VmWorker;
          try {
            vm = await VmWorker.boot(guest, d.vmOptions(rank, "primary"));
          } catch (error) {
            throw new Error(`${vmName(record.group, rank)}: the guest failed to boot: ${(error as Error).message}`, { cause: error });
          }
          const member = d.addMember(rank, vm, new OutputLog(), 0);
          await d.openPath(member);
        }
        if (p.backup === api.id) {
          const b = d.newBackup(rank, guest);
          d.backups.set(rank, b);
          await b.installBlank();
        }
      }),
    );
    const failed = steps.find((s): s is PromiseRejectedResult => s.status === "rejected");
    if (failed) {
      // Nothing of a group that cannot start stays behind: its threads would keep running for nobody.
      await d.stop();
      throw failed.reason;
    }
    return d;
  }

  /**
   * A host the record names that has nothing of the group yet (a new backup
   * host during a recovery). It takes part at once (its report is empty); the
   * module compiles meanwhile, and the image it will install waits for it.
   */
  static join(api: GroupHostApi, record: ProtectionRecord, module: Uint8Array): GroupDriver {
    const guest = api.guestFor(module);
    guest.catch((error: Error) => api.log.error({ err: error, group: record.group }, "the group's module does not load on this host"));
    return new GroupDriver(api, record, module, guest, true);
  }

  /** Where the message paths of the primaries on this host listen (what `group_prepare` answers). */
  pathRoutes(): Record<number, Route> {
    const out: Record<number, Route> = {};
    for (const [rank, m] of this.members) if (m.route) out[rank] = m.route;
    return out;
  }

  /** Starts the deployed group with every member's route (from every host's `group_prepare`). */
  run(routes: (Route | null)[]): void {
    this.started = true;
    this.feed({ type: "start", routes });
    // A host that failed while the group was only prepared (the core decided nothing then): the core weighs it now.
    this.onHostsChanged();
  }

  /** Whether this group was started here (`run`, or it joined a running group); false while a deploy has it prepared only. */
  get hasStarted(): boolean {
    return this.started;
  }

  /**
   * A GROUP frame of this group from another host, its header validated. A
   * delta or image whose body does not decode (damaged, truncated, another
   * checkpoint than the header says) is refused here, before the core counts
   * the checkpoint as arrived: the real one may still come, and a backup is
   * never replaced by bytes it cannot install.
   */
  handleFrame(from: string, frame: GroupFrame, body: Uint8Array): void {
    const problem = bodyProblem(frame, body, this.moduleHash);
    if (problem !== null) return this.refuseHere(from, frame, problem);
    if ((frame.k === "recover" || frame.k === "halt") && frame.inc > this.core.incarnation) return this.feedOnceStored(from, frame, body);
    this.feed({ type: "frame", from, frame, body });
  }

  private refuseHere(from: string, frame: GroupFrame, reason: string): void {
    this.refusedHere++;
    this.logRefusal({ group: this.name, event: "refused", from, kind: frame.k, reason });
  }

  /** Every refusal is counted; a flood of them is not logged line by line (LogLimit). */
  private logRefusal(fields: Record<string, unknown>): void {
    const take = this.refusalLog.take(Date.now());
    if (take) this.log.warn(take.skipped ? { ...fields, refusals_not_logged: take.skipped } : fields, "group frame refused");
  }

  /**
   * A `recover` or `halt` of a newer incarnation stops this group's work
   * here: it reaches the core only once the store holds that incarnation,
   * led by the frame's sender (the compare-and-swap that decided it). A
   * repeated one while the store is asked is dropped; the coordinator
   * repeats `recover` until this host reports.
   */
  private feedOnceStored(from: string, frame: GroupFrame, body: Uint8Array): void {
    const key = `${frame.k} ${frame.inc}`;
    if (this.confirming.has(key)) return;
    // Legitimately one or two at a time; a flood of made-up incarnations must not become a flood of store reads.
    if (this.confirming.size >= CONFIRMING_MAX) return this.refuseHere(from, frame, `${frame.k} frame of incarnation ${frame.inc}: ${CONFIRMING_MAX} newer incarnations are being checked already`);
    this.confirming.add(key);
    this.api.store.get<ProtectionRecord>(protectionKey(this.name)).then(
      (stored) => {
        this.confirming.delete(key);
        const r = stored?.value;
        if (r?.incarnation === frame.inc && r.leader === from) return this.feed({ type: "frame", from, frame, body });
        this.refuseHere(from, frame, `${frame.k} frame of incarnation ${frame.inc} from ${from}; the store holds ${r ? `incarnation ${r.incarnation} led by ${r.leader}` : "no record"}`);
      },
      (error: Error) => {
        this.confirming.delete(key);
        this.refuseHere(from, frame, `${frame.k} frame of incarnation ${frame.inc}: the store could not be read (${error.message})`);
      },
    );
  }

  /** The failure detector's view changed (a peer failed or came back), or the registrations did. */
  onHostsChanged(): void {
    this.feed({ type: "hosts", live: this.api.liveHosts(), heard: this.api.heardHosts(), registered: this.api.registeredHosts() });
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.recorder?.close();
    await Promise.all([...this.members.values()].map((m) => m.stop()));
    await Promise.all([...this.backups.values()].map((b) => b.stop()));
  }

  // ---- feeding the core ----------------------------------------------------------------------

  /** Monotonic milliseconds (performance.now() may be seen slightly behind a timer's due time). */
  private now(): number {
    this.lastNow_ms = Math.max(this.lastNow_ms, performance.now());
    return this.lastNow_ms;
  }

  private feed(event: CoreEvent): void {
    if (this.stopped) return;
    this.queue.push(event);
    if (this.feeding) return;
    this.feeding = true;
    try {
      while (this.queue.length) {
        const next = this.queue.shift()!;
        // The core learns the time before each event, to the millisecond, so what it measures and
        // schedules is current without a tick per event on the per-epoch path (a queued tick is
        // taken now, never with the time it was queued at).
        const now = this.now();
        if (next.type === "tick") this.tick(now);
        else {
          if (now - this.lastTick_ms >= TIME_STEP_MS) this.tick(now);
          this.handle(next);
        }
        // Something became due at once (a commit made room for the next epoch): tick now, not a timer later.
        if (this.core.deadline() <= this.now()) this.tick(this.now());
      }
    } finally {
      this.feeding = false;
    }
    this.schedule();
  }

  private tick(now_ms: number): void {
    this.lastTick_ms = now_ms;
    this.handle({ type: "tick", now_ms });
  }

  /**
   * One event through the core, its actions carried out. Whatever throws
   * here is contained to this group and this event: logged, counted in
   * `steps_failed`, and the group's next events are handled as usual. Events
   * come from timers, sockets, VM threads and store answers, where an
   * exception would end the host process and every other group with it.
   * A recording (--record-core-events) lacks such an event, so it may not replay past it.
   */
  private handle(event: CoreEvent): void {
    // A delta of a VM thread here is held while the event is handled; the actions that take it hold it longer.
    const loan = DeltaLoan.of(event);
    try {
      let actions: CoreAction[];
      try {
        actions = this.core.handle(event);
      } catch (error) {
        this.failedHere++;
        this.log.error({ err: error, group: this.name, event: event.type, frame: event.type === "frame" ? event.frame.k : undefined }, "the group core failed on an event; the event is dropped");
        return;
      }
      this.recorder?.step(event, actions);
      this.execute(actions, loan);
    } finally {
      loan?.letGo();
    }
  }

  private schedule(): void {
    if (this.stopped) return;
    const due = this.core.deadline();
    if (due === this.timerDue && this.timer) return;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.timerDue = due;
    if (!Number.isFinite(due)) return;
    this.timer = setTimeout(
      () => {
        this.timer = null;
        this.timerDue = Infinity;
        this.feed({ type: "tick", now_ms: this.now() });
      },
      Math.max(0, Math.ceil(due - performance.now())),
    );
  }

  private execute(actions: CoreAction[], loan: DeltaLoan | null): void {
    for (const a of actions) {
      try {
        this.carryOut(a, loan);
      } catch (error) {
        // E.g. a frame whose header would not encode: that action fails, the others go ahead.
        this.failedHere++;
        this.log.error({ err: error, group: this.name, action: a.type }, "a core action failed");
      }
    }
  }

  private carryOut(a: CoreAction, loan: DeltaLoan | null): void {
    switch (a.type) {
      case "send": {
        const body = a.body === "module" ? this.module : (a.body as Uint8Array | undefined);
        if (a.frame.k === "delta") {
          this.deltasShipped++;
          this.deltaBytesShipped += body?.byteLength ?? 0;
        }
        // Held until written to the socket (or dropped). If sending throws, it is never let go of.
        this.send(a.to, a.frame, body, loan?.takenBy(body));
        break;
      }
      case "vm":
        this.step(a.rank, a.id, () => this.vmStep(a.rank, a.step));
        break;
      case "backup": {
        const step = a.step;
        // Staged here: held until the stage step copied it.
        const copied = step.op === "stage" ? loan?.takenBy(step.delta) : undefined;
        // An image is never a delta; one that were would be held for good (never reused, never overwritten).
        if (step.op === "install") loan?.takenBy(step.image);
        this.step(a.rank, a.id, () => this.backupStep(a.rank, step, copied));
        break;
      }
      case "members":
        this.membersStep(a.id, a.step);
        break;
      case "store_get":
        this.storeGet(a.key);
        break;
      case "store_cas":
        this.storeCas(a.key, a.expected, a.value);
        break;
      case "notify":
        this.onNotice(a.notice);
        break;
    }
  }

  private send(to: string, frame: OutgoingFrame, body?: Uint8Array, done?: () => void): void {
    this.api.send(to, { ...frame, v: FRAME_VERSION, g: this.name, from: this.api.id } as GroupFrame, body, done);
  }

  /** Runs a replica step after the rank's earlier ones and answers the core with its result (a failed step is a `done` with its error). */
  private step(rank: number, id: number, job: () => Promise<StepValue>): void {
    const run = async () => {
      let done: CoreEvent;
      try {
        done = { type: "done", id, ok: true, value: await job() };
      } catch (error) {
        done = { type: "done", id, ok: false, error: errorText(error) };
      }
      this.feed(done);
    };
    const tail = (this.chains.get(rank) ?? Promise.resolve()).then(run, run);
    this.chains.set(rank, tail);
  }

  private member(rank: number): GroupMember {
    const m = this.members.get(rank);
    if (!m) throw new Error(`no primary of ${vmName(this.name, rank)} on this host`);
    return m;
  }

  private backupOf(rank: number): BackupReplica {
    const b = this.backups.get(rank);
    if (!b) throw new Error(`no backup of ${vmName(this.name, rank)} on this host`);
    return b;
  }

  private async vmStep(rank: number, step: VmStep): Promise<StepValue> {
    const m = this.member(rank);
    switch (step.op) {
      case "capture_to":
        await m.endEpoch(step.epoch, step.commit);
        return {};
      case "capture": {
        const captured = await m.capture();
        return { epoch: captured.epoch, delivered: captured.delivered, delta: captured.delta, held: m.heldCount };
      }
      case "commit":
        await m.commit(step.epoch, step.trim);
        return {};
      case "trim":
        await m.trim(step.delivered_by_receiver);
        return {};
      case "freeze":
        await m.freeze();
        return {};
      case "restore":
        return this.restore(m, step);
      case "stop":
        this.members.delete(rank);
        await m.stop();
        return {};
    }
  }

  /** Recovery on this host for one primary: to the cut, the new incarnation, its output, an image for a new backup. */
  private async restore(m: GroupMember, step: Extract<VmStep, { op: "restore" }>): Promise<StepValue> {
    if (step.how === "rollback") {
      const result = await m.rollback(step.cut!);
      this.log.info({ group: this.name, rank: m.rank, cut: step.cut, pages_restored: result.pages_restored, rollback_us: Number(result.rollback_us.toFixed(1)) }, "rolled back in place");
    }
    await m.setIncarnation(step.inc);
    if (step.cut !== null) await m.releaseAt(step.cut);
    if (step.image_to !== null) {
      const image = step.fresh_image ? await m.imageFresh() : await m.imageCurrent();
      const e = decodeImage(image).epoch;
      m.captured = Math.max(m.captured, e);
      const history = m.log.tail(OUTPUT_LOG_HISTORY_BYTES_MAX);
      this.send(step.image_to, { k: "image", inc: step.inc, rank: m.rank, e, released_seq: m.log.lastSeq, history }, image);
    }
    const delivered = await m.deliveredVector();
    return { delivered, route: m.route ?? undefined };
  }

  /** `copied`: called once a staged delta's bytes were copied (a pooled delta of a VM thread here goes back then). */
  private async backupStep(rank: number, step: BackupStep, copied?: () => void): Promise<StepValue> {
    switch (step.op) {
      case "stage": {
        // Copied: the bytes may be a view into a socket chunk, or a VM thread's pooled buffer. Its checksum
        // was verified on arrival (handleFrame), or on this host when it was sealed.
        let delta: Uint8Array;
        try {
          delta = (step.delta as Uint8Array).slice();
        } finally {
          copied?.();
        }
        await this.backupOf(rank).stage(step.epoch, delta, { checksum_verified: true });
        return {};
      }
      case "commit":
        await this.backupOf(rank).commit(step.cut);
        return {};
      case "install": {
        // The copy held so far goes only once the new one is installed; if the install fails the core drops this backup.
        const old = this.backups.get(rank);
        const b = this.newBackup(rank, await this.guestReady);
        this.backups.set(rank, b);
        try {
          await b.install((step.image as Uint8Array).slice(), step.released_seq, step.history);
        } catch (error) {
          if (this.backups.get(rank) === b) this.backups.delete(rank);
          await b.stop();
          throw error;
        } finally {
          await old?.stop();
        }
        this.log.info({ group: this.name, rank, cut: step.epoch, bytes: (step.image as Uint8Array).length }, "backup image installed");
        return {};
      }
      case "rollback_to":
        await this.backupOf(rank).rollbackTo(step.cut);
        return {};
      case "promote": {
        const b = this.backupOf(rank);
        this.backups.delete(rank);
        const { worker, cut } = step.cut === null ? await b.promote() : await b.promoteAt(step.cut);
        const member = this.addMember(rank, worker, b.log, cut);
        await this.openPath(member);
        return {};
      }
      case "drop": {
        const b = this.backups.get(rank);
        this.backups.delete(rank);
        await b?.stop();
        return {};
      }
    }
  }

  /** Routes for every member here (MessageChannels pair the local ones), re-sends, run: after every rank's earlier steps. */
  private membersStep(id: number, step: MembersStep): void {
    // Settled, not resolved: a rank whose earlier step failed does not keep the others from running.
    const before = Promise.allSettled([...this.chains.values()]);
    const run = async () => {
      await before;
      try {
        await this.setRoutes(step.routes);
        if (step.delivered) {
          const delivered = step.delivered;
          // Arrivals from hosts that resumed first wait in the VM threads until `run`.
          for (const [s, m] of this.members) await m.resend(senderColumn(delivered, s));
        }
        await Promise.all([...this.members.values()].map((m) => m.run()));
      } catch (error) {
        this.feed({ type: "done", id, ok: false, error: errorText(error) });
        return;
      }
      this.feed({ type: "done", id, ok: true, value: {} });
    };
    const done = run();
    for (const rank of new Set([...this.chains.keys(), ...this.members.keys()])) this.chains.set(rank, done);
  }

  /**
   * Gives every member here the routes to its peers: TCP to the ranks on
   * other hosts; to the ranks on this host, the VM thread each runs on, with
   * one fresh MessageChannel per pair of VM threads (the in-process path),
   * handed to one member of each thread; ranks on the same VM thread reach
   * each other through the thread itself (src/vm/message-path.ts). A
   * channel per pair of ranks held the main loop 100-270 ms at 64 primaries
   * a host. Earlier channels are closed by the VM threads.
   */
  private async setRoutes(routes: (Route | null)[]): Promise<void> {
    const members = [...this.members];
    const locals = members.map(([rank, m]) => ({ rank, thread: m.vm.thread_id }));
    const threads = [...new Set(locals.map((l) => l.thread))];
    // The member that carries its thread's ports: the first one on it.
    const carrier = new Map<number, number>();
    for (const { rank, thread } of locals) if (!carrier.has(thread)) carrier.set(thread, rank);
    const ports = new Map<number, { thread: number; port: MessagePort }[]>();
    for (let i = 0; i < threads.length; i++) {
      for (let j = i + 1; j < threads.length; j++) {
        const { port1, port2 } = new MessageChannel();
        const a = carrier.get(threads[i])!;
        const b = carrier.get(threads[j])!;
        ports.set(a, [...(ports.get(a) ?? []), { thread: threads[j], port: port1 }]);
        ports.set(b, [...(ports.get(b) ?? []), { thread: threads[i], port: port2 }]);
      }
    }
    await Promise.all(members.map(([rank, m]) => m.setRoutes(routes, locals.filter((l) => l.thread !== m.vm.thread_id), ports.get(rank) ?? [])));
  }

  /** Store failures repeat every STORE_RETRY_MS while the store is down: one log line per 5 s, saying how many were left out. */
  private readonly storeTroubleLimit = new LogLimit(1, 5000);
  private storeTrouble(error: Error, msg: string): void {
    const take = this.storeTroubleLimit.take(Date.now());
    if (take) this.log.warn({ err: error, group: this.name, ...(take.skipped ? { not_logged: take.skipped } : {}) }, msg);
  }

  private storeGet(key: string): void {
    this.api.store.get<ProtectionRecord>(key).then(
      (current) => this.feed({ type: "store", op: "get", ok: true, record: current?.value ?? null, version: current?.version ?? 0 }),
      (error: Error) => {
        this.storeTrouble(error, "store read failed; the group asks again until the store answers");
        this.feed({ type: "store", op: "get", ok: false, record: null, version: 0, unavailable: true });
      },
    );
  }

  private storeCas(key: string, expected: number, value: ProtectionRecord): void {
    const cas = async () => {
      const version = await this.api.store.cas(key, expected, value);
      if (version !== null) return this.feed({ type: "store", op: "cas", ok: true, record: value, version });
      const current = await this.api.store.get<ProtectionRecord>(key);
      this.feed({ type: "store", op: "cas", ok: false, record: current?.value ?? null, version: current?.version ?? 0 });
    };
    cas().catch((error: Error) => {
      this.storeTrouble(error, "store compare-and-swap failed; the group reads the store again until it answers");
      this.feed({ type: "store", op: "cas", ok: false, record: null, version: 0, unavailable: true });
    });
  }

  private onNotice(n: Notice): void {
    this.logNotice(n);
    this.api.onNotice?.(this.name, n);
  }

  private logNotice(n: Notice): void {
    const group = this.name;
    switch (n.kind) {
      case "suspected":
        return this.log.warn({ group, event: "suspected", peer: n.host }, "host suspected");
      case "decided":
        return this.log.warn({ group, event: "decided", incarnation: n.inc, dead: n.dead, placement: n.record.placement }, "recovery: decided, coordinating");
      case "cut_chosen":
        return this.log.warn({ group, event: "cut_chosen", incarnation: n.inc, cut: n.cut, images: n.images, committed: n.committed }, "recovery: cut chosen");
      case "rolled_back":
        return this.log.warn({ group, event: "rolled_back", incarnation: n.inc, cut: n.cut, rolled_back: n.rolled_back, promoted: n.promoted }, "recovery: replicas going to the recovery cut");
      case "resumed":
        this.log.warn({ group, event: "resumed", incarnation: n.inc, cut: n.cut, recovery_ms: Math.round(n.recovery_ms) }, "recovery: group resumed");
        return this.writeVmRecords();
      case "committed":
        return;
      case "degraded":
        return this.log.warn({ group, event: "degraded", ranks: n.ranks }, "members without a backup: nothing commits until the group has one");
      case "lost":
        return this.log.error({ group, event: "lost", incarnation: n.inc, vms: n.ranks.map((r) => vmName(group, r)) }, "no copy of these VMs survived: the group is stopped");
      case "fenced":
        return this.log.warn({ group, event: "fenced", incarnation: n.inc }, "fenced: the group's record names this host failed; its replicas stop");
      case "no_quorum":
        return this.log.warn({ group, event: "no_quorum", heard: n.heard, registered: n.registered }, "a failure to decide, but this host sees no majority of the cluster: it waits (the majority decides; this host reads the record)");
      case "refused":
        return this.logRefusal({ group, event: "refused", reason: n.reason });
      case "step_failed":
        return this.log.error({ group, event: "step_failed", rank: n.rank, step: n.step, error: n.error }, "replica step failed");
    }
  }

  /** The store's per-VM records follow the placement (read by `cohort status` / `logs`). */
  private writeVmRecords(): void {
    const record = this.record;
    Promise.all(record.placement.map((_, rank) => this.api.store.put(vmKey(vmName(record.group, rank)), this.vmRecord(rank)))).catch((error: Error) =>
      this.log.warn({ err: error, group: this.name }, "VM records not updated"),
    );
  }

  // ---- replicas ------------------------------------------------------------------------

  private vmOptions(rank: number, role: "primary" | "backup"): WorkerVmOptions {
    const record = this.record;
    const limits: VmLimits = {
      ...DEFAULT_LIMITS,
      memory_pages_max: Math.floor((record.limits.memory_mib * 1024 * 1024) / 65536),
      call_cpu_ms: record.limits.call_cpu_ms,
      output_bytes_max: record.limits.output_bytes_max,
    };
    // Timers start with `run`, so nothing executes before the group is wired up.
    return {
      rank,
      size: record.size,
      limits,
      timers: "manual",
      consistent_cut: record.mode === "group",
      sender_log: record.mode !== "none",
      // The group's replicas on this host share a few threads (a runaway guest stops its thread: only this
      // group's replicas on this host are on it). The host's id is in the name for in-process clusters,
      // whose hosts share one process: a VM's primary and backup never share a thread.
      thread:
        role === "primary"
          ? { name: `${this.api.id}/${record.group}/primaries`, threads_max: GROUP_PRIMARY_THREADS_MAX }
          : { name: `${this.api.id}/${record.group}/backups`, threads_max: GROUP_BACKUP_THREADS_MAX },
    };
  }

  /** A VM record for one member (what `cohort status`/`logs` read), mirroring the placement. */
  vmRecord(rank: number): VmRecord {
    const record = this.record;
    const p = record.placement[rank];
    return {
      vm: vmName(record.group, rank),
      group: record.group,
      rank,
      mode: record.mode,
      primary: p.primary,
      backup: p.backup,
      incarnation: record.incarnation,
      health: p.backup || record.mode === "none" ? "healthy" : "degraded",
      interval_ms: record.epoch.interval_ms,
      min_interval_ms: record.epoch.min_interval_ms,
      max_interval_ms: record.epoch.max_interval_ms,
      limits: record.limits,
      size: record.size,
    };
  }

  private newBackup(rank: number, guest: GuestBundle): BackupReplica {
    return new BackupReplica(this.vmRecord(rank), guest, this.vmOptions(rank, "backup"));
  }

  private openPath(member: GroupMember): Promise<Route> {
    return member.openPath(this.api.listen_host, this.record.mode === "vm", this.api.tls ?? null);
  }

  private addMember(rank: number, vm: VmWorker, log: OutputLog, cut: number): GroupMember {
    const member = new GroupMember(rank, vm, log, cut);
    member.on("output_pending", (epoch, urgent) => this.feed({ type: "output_pending", rank, epoch, urgent }));
    member.on("active", (epoch) => this.feed({ type: "active", rank, epoch }));
    member.on("captured", (c) => this.feed({ type: "captured", rank, epoch: c.epoch, delivered: c.delivered, delta: c.delta }));
    // Problems include links refused on the member's message path: a flood of bad connections is not a flood of log lines.
    const problems = new LogLimit();
    member.on("problem", (reason) => {
      const take = problems.take(Date.now());
      if (take) this.log.error({ group: this.name, rank, reason, ...(take.skipped ? { problems_not_logged: take.skipped } : {}) }, "member problem");
    });
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

  status(): GroupStatus {
    const core = this.core.status();
    const record = this.record;
    return {
      group: this.name,
      mode: record.mode,
      incarnation: core.incarnation,
      leader: core.leader,
      committed: core.committed,
      recovering: core.recovering,
      state: core.state,
      lost: core.lost,
      refused: core.refused + this.refusedHere,
      steps_failed: core.steps_failed + this.failedHere,
      deltas_shipped: this.deltasShipped,
      delta_bytes_shipped: this.deltaBytesShipped,
      primaries: core.primaries.flatMap((p) => {
        const m = this.members.get(p.rank);
        if (!m) return [];
        return [
          {
            rank: p.rank,
            vm: vmName(this.name, p.rank),
            state: p.state,
            captured: p.captured,
            committed: p.committed,
            backup: record.placement[p.rank].backup,
            released_seq: m.log.lastSeq,
            held: m.counters.held,
            busy: m.busy ? `${m.busy.step} for ${Date.now() - m.busy.since_ms} ms` : null,
            sent_before_commit: m.counters.sent_before_commit,
            sent_after_commit: m.counters.sent_after_commit,
            held_total: m.counters.held_total,
          },
        ];
      }),
      backups: core.backups.map((b) => ({ rank: b.rank, vm: vmName(this.name, b.rank), cut: b.cut, staged: b.staged })),
    };
  }
}


function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/**
 * Why the body of a delta or image frame cannot be what its header says
 * (null: it can): it does not decode, holds another checkpoint, (an image)
 * comes with an output history that is not the released records in order,
 * or was taken of another module than `moduleHash` (when known).
 */
export function bodyProblem(frame: GroupFrame, body: Uint8Array, moduleHash: Uint8Array | null = null): string | null {
  if (frame.k !== "delta" && frame.k !== "image") return null;
  let epoch: number;
  let hash: Uint8Array | null = null;
  try {
    if (frame.k === "delta") epoch = decodeDelta(body).epoch;
    else ({ epoch, module_hash: hash } = decodeImage(body));
  } catch (error) {
    return `${frame.k} of member ${frame.rank} at ${frame.e}: body refused: ${errorText(error)}`;
  }
  if (epoch !== frame.e) return `${frame.k} frame says checkpoint ${frame.e} of member ${frame.rank}, its body holds ${epoch}`;
  if (frame.k === "image") {
    // The new backup's output log starts from this history: it must be the records up to released_seq, dense and in order.
    const first = frame.released_seq - frame.history.length + 1;
    if (first < 1 || frame.history.some((r, i) => r.seq !== first + i)) return `image of member ${frame.rank}: its output history is not the records up to ${frame.released_seq} in order`;
    if (moduleHash && hash && Buffer.compare(moduleHash, hash) !== 0) return `image of member ${frame.rank} was taken of another module`;
  }
  return null;
}

/**
 * A delta laid out in a VM thread's pooled buffer (src/vm/delta-pool.ts) on
 * its way through the core: the event that brought it (a `captured` event, a
 * capture step's `done`) holds it while it is handled, and each action that
 * took it holds it until it is done with the bytes: a frame until the socket
 * wrote it, a stage step until it copied them. When the last hold goes, the
 * buffer goes back to its VM thread (VmWorker.recycle). A hold never let go
 * of (a use nobody foresaw, a send that threw) keeps the buffer out of the
 * pool for good: it becomes garbage, never reused while read.
 */
class DeltaLoan {
  private holds = 1;

  private constructor(private readonly delta: Uint8Array) {}

  static of(event: CoreEvent): DeltaLoan | null {
    const delta = event.type === "captured" ? event.delta : event.type === "done" && event.ok ? event.value.delta : undefined;
    return delta instanceof Uint8Array ? new DeltaLoan(delta) : null;
  }

  /** If `handle` is this delta, a new hold on it and the function that lets go of it (once). */
  takenBy(handle: unknown): (() => void) | undefined {
    if (handle !== this.delta) return undefined;
    this.holds++;
    let held = true;
    return () => {
      if (!held) return;
      held = false;
      this.letGo();
    };
  }

  letGo(): void {
    assert(this.holds > 0, "a delta let go of more often than held");
    // After the code running now: the member's other `captured` listeners, called after the driver's, may read the result.
    if (--this.holds === 0) queueMicrotask(() => VmWorker.recycle(this.delta));
  }
}
