/**
 * The deterministic simulator of the group protocol core (docs/PROTOCOL.md):
 * one GroupCore (src/core/node.ts) per simulated host, driven the way the
 * daemon drives it, with a simulated clock, network (network.ts), store with
 * compare-and-swap (store.ts), failure detector, and model VMs and backups
 * (model-vm.ts) whose group messages go VM to VM over the network. Guests
 * send and emit output at random; hosts crash or pause as the schedule says,
 * including second failures at each kind of recovery step; the checkers
 * (checker.ts) watch every step. Same schedule, same run: no Date, no
 * Math.random, no timers.
 */
import { FRAME_VERSION, type GroupFrame, type Route } from "../core/frames.js";
import type { BackupStep, CoreAction, CoreEvent, MembersStep, Notice, VmStep } from "../core/events.js";
import { GroupCore } from "../core/node.js";
import { hostsOf } from "../core/record.js";
import { protectionKey, type Epoch, type HostId, type Mode, type ProtectionRecord, type Rank } from "../core/types.js";
import type { GroupMessage } from "../core/channel.js";
import { Checker, type CheckpointView, type Violation } from "./checker.js";
import { emptyMemory, imageBytes, ModelBackup, ModelVm, type GuestMemory, type ModelDelta, type ModelImage, type VmHost } from "./model-vm.js";
import { SimNetwork, type Flight } from "./network.js";
import { EventQueue } from "./queue.js";
import { Rng } from "./rng.js";
import { SimStore } from "./store.js";
import { assert } from "../util/assert.js";

/** The recovery steps a second failure is injected at (docs/PROTOCOL.md "Failures during a recovery"). */
export const STEP_KINDS = ["before_cas", "after_cas", "after_report", "during_rollback", "after_rolled", "after_resume", "vm_promotion"] as const;
export type StepKind = (typeof STEP_KINDS)[number];

/** Deliberately broken variants: each must be caught by its checker (test/sim.test.ts). */
export const MUTATIONS = ["release_at_capture", "skip_resend", "image_all", "ignore_cut_rule"] as const;
export type Mutation = (typeof MUTATIONS)[number];

export interface FailurePlan {
  kind: "crash" | "pause";
  /** Fires at this time (a first failure) ... */
  at_ms?: number;
  /** ... or at the nth step of this kind after an earlier failure (a second failure). */
  step?: StepKind;
  nth?: number;
  /** Which host: the one where the step happened, another one, or any (index into the candidates). */
  target: "self" | "other" | "any";
  index: number;
  /** Pauses: how long the host is stopped (SIGSTOP .. SIGCONT). */
  pause_ms?: number;
  /**
   * Crashes: the host's process starts again this long after, as a fresh
   * instance (`h1` comes back as `h1.2`, src/host/instance.ts): empty, it
   * registers and heartbeats, takes part in the group only once a `recover`
   * the store backs names it (as the daemon's group table joins), and the
   * group's leader places missing backups on it (healing).
   */
  restart_ms?: number;
}

export interface Schedule {
  seed: number;
  hosts: number;
  size: number;
  mode: Mode;
  /** Guests act during [0, traffic_ms). */
  traffic_ms: number;
  /** Per guest action: probability of a group message, of an external output (else it computes). */
  send_rate: number;
  output_rate: number;
  failures: FailurePlan[];
  /**
   * The store cannot be reached during [from_ms, until_ms): each operation
   * fails (`unavailable`); half of the compare-and-swaps take effect anyway,
   * their answer lost on the way back (the ambiguous outcome a real store
   * client sees when a connection breaks after the write).
   */
  store_outage?: { from_ms: number; until_ms: number };
  mutation?: Mutation;
}

export interface RunResult {
  violations: Violation[];
  violation_count: number;
  /** Events handled by GroupCores. */
  steps: number;
  commits: number;
  recoveries: number;
  crashes: number;
  /** Crashed hosts whose process started again as a fresh instance. */
  rejoins: number;
  pauses: number;
  second_failures_by_step: Record<StepKind, number>;
  /** Members named lost when the group halted, or null. */
  halted: Rank[] | null;
  quiescent: boolean;
  sim_ms: number;
  messages: number;
  outputs: number;
  released: number;
  image_bytes: number[];
  timeline: string[];
}

/** Failure detector timeout: a host silent this long is suspected (the daemon's detect_ms, scaled down). */
export const DETECT_MS = 30;
/** A registration's lease (the daemon's default is ten detection timeouts and more): what a survivor without a majority waits for. */
const SIM_LEASE_MS = 10 * DETECT_MS;
const TIMING = { interval_ms: 10, min_interval_ms: 3, max_interval_ms: 40 };
const LIMITS = { memory_mib: 16, call_cpu_ms: 100, output_bytes_max: 1 << 20 };
const GUEST_STEP_MS = [0.4, 2.5] as const;
const REPLICA_STEP_MS = [0.02, 0.4] as const;
const STORE_MS = [0.3, 2] as const;
const CHECK_EVERY_MS = 5;
/** After the traffic, the group has this long to become quiescent (or halt) before liveness fails. */
const SETTLE_MS = 3000;
/** A step-triggered failure not fired this long after the traffic is cancelled. */
const ARM_GRACE_MS = 500;
const TIMELINE_MAX = 300;
const AGENDA_MAX = 1 << 20;
/** Events that reach a paused host wait for it (its sockets' buffers); bounded like them. */
const DEFERRED_MAX = 1 << 16;
/** Replica steps queued per rank on a host (the daemon's per-VM request queue). */
const STEP_QUEUE_MAX = 256;

type Job = { kind: "vm"; id: number; rank: Rank; step: VmStep } | { kind: "backup"; id: number; rank: Rank; step: BackupStep } | { kind: "members"; id: number; step: MembersStep };

type SimEvent =
  | { k: "tick"; h: number; t: number }
  | { k: "frame"; h: number; from: number; key: string; flight: Flight; landed: boolean; frame: GroupFrame; body: unknown }
  | { k: "msg"; h: number; from: number; key: string; flight: Flight; landed: boolean; token: string; message: GroupMessage }
  | { k: "step"; h: number; queue: number }
  | { k: "store"; h: number; action: Extract<CoreAction, { type: "store_get" | "store_cas" }> }
  | { k: "store_reply"; h: number; op: "get" | "cas"; ok: boolean; record: ProtectionRecord | null; version: number; unavailable?: boolean }
  | { k: "see"; h: number; target: HostId; up: boolean }
  | { k: "guest"; h: number; vm: ModelVm }
  | { k: "resume"; h: number }
  | { k: "restart"; h: number }
  /** A crashed host's registration lease lapsed: host `h` hears the registrations changed. */
  | { k: "registry"; h: number }
  | { k: "fail"; plan: number }
  | { k: "check" };

interface SimHost {
  idx: number;
  id: HostId;
  alive: boolean;
  paused: boolean;
  /** Until when its registration lives in the store (Infinity while alive: its lease is renewed; a crash leaves SIM_LEASE_MS). */
  registeredUntil: number;
  /** A restarted instance holds no core for the group until a `recover` naming it arrives: `core` is a placeholder meanwhile. */
  dormant: boolean;
  core: GroupCore;
  vms: Map<Rank, ModelVm>;
  backups: Map<Rank, ModelBackup>;
  /** Replica steps per rank (index rank), and host-level member steps (index size). */
  queues: Job[][];
  view: Set<HostId>;
  tickAt: number;
  /** Time of the last tick fed to the core. */
  lastTick: number;
  deferred: SimEvent[];
  vmHost: VmHost;
}

const MEMBERS_QUEUE = -1;

/** A plain JSON value copied, so no two cores ever share a frame's arrays (as the wire guarantees). */
function copyJson<T>(x: T): T {
  if (Array.isArray(x)) return x.map(copyJson) as T;
  if (x !== null && typeof x === "object") {
    const o: Record<string, unknown> = {};
    for (const k of Object.keys(x)) o[k] = copyJson((x as Record<string, unknown>)[k]);
    return o as T;
  }
  return x;
}

export class Simulator {
  readonly checker: Checker;
  private readonly rng: Rng;
  private readonly guestRng: Rng;
  private readonly net: SimNetwork;
  private readonly store: SimStore;
  private readonly history = new Map<number, ProtectionRecord>();
  private readonly hosts: SimHost[];
  private readonly byId = new Map<HostId, SimHost>();
  private readonly agenda = new EventQueue<SimEvent>(AGENDA_MAX);
  private now = 0;
  private steps = 0;
  private ids = 0;
  private tokens = 0;
  private commits = 0;
  private recoveries = 0;
  private crashes = 0;
  private rejoins = 0;
  private pauses = 0;
  private messages = 0;
  private outputs = 0;
  private readonly secondByStep = Object.fromEntries(STEP_KINDS.map((k) => [k, 0])) as Record<StepKind, number>;
  private readonly stepSeen = Object.fromEntries(STEP_KINDS.map((k) => [k, 0])) as Record<StepKind, number>;
  private readonly fired: boolean[];
  /** Failures that took a host out (crashes, pauses long enough to be suspected). */
  private failuresFired = 0;
  private pendingFire: { plan: number; at: SimHost | null }[] = [];
  private readonly imagesPending = new Set<string>();
  private halted: Rank[] | null = null;
  private quiescent = false;
  private done = false;
  private readonly timeline: string[] = [];

  constructor(private readonly schedule: Schedule) {
    const { seed, hosts, size, mode } = schedule;
    if (hosts < 2 || size < 1) throw new RangeError("the simulator runs groups of >= 1 member on >= 2 hosts");
    this.rng = new Rng(seed);
    this.guestRng = this.rng.fork();
    const placeRng = this.rng.fork();
    this.net = new SimNetwork(this.rng.fork(), hosts, { baseMax: 1.5, jitter: 1 });
    this.fired = schedule.failures.map(() => false);
    const ids = Array.from({ length: hosts }, (_, i) => `h${i}`);
    const placement = Array.from({ length: size }, () => {
      const p = placeRng.int(0, hosts - 1);
      return { primary: ids[p], backup: mode === "none" ? null : ids[(p + placeRng.int(1, hosts - 1)) % hosts] };
    });
    const record: ProtectionRecord = { group: "sim", mode, size, incarnation: 1, leader: placement[0].primary, placement, failed: [], epoch: TIMING, limits: LIMITS };
    this.store = new SimStore(protectionKey(record.group), record);
    this.history.set(1, structuredClone(record));
    this.checker = new Checker(size, mode);
    const faults = { releaseAtCapture: schedule.mutation === "release_at_capture", ignoreCutRule: schedule.mutation === "ignore_cut_rule" };
    const named = new Set(hostsOf(record));
    this.hosts = ids.map((id, idx) => {
      const options = { host: id, record: structuredClone(record), now_ms: 0, detect_ms: DETECT_MS, live: ids, registered: ids };
      // Hosts outside the record hold nothing yet; a recovery may place backups on them.
      return this.newHost(idx, id, named.has(id) ? GroupCore.deployed(options) : GroupCore.joined(options), new Set(ids), false);
    });
    for (const h of this.hosts) this.byId.set(h.id, h);
    placement.forEach((p, rank) => {
      const h = this.byId.get(p.primary)!;
      const vm = new ModelVm(rank, size, mode, this.newRoute(h, rank), emptyMemory(size), emptyRecordAt(1), 0, 0, h.vmHost, faults);
      h.vms.set(rank, vm);
      if (p.backup !== null) this.byId.get(p.backup)!.backups.set(rank, new ModelBackup(rank, emptyMemory(size), emptyRecordAt(1), 0, 0));
    });
    this.faults = faults;
  }

  private readonly faults: { releaseAtCapture: boolean; ignoreCutRule: boolean };

  private newRoute(h: SimHost, rank: Rank): Route {
    return { address: h.id, token: `${rank}.${++this.tokens}` };
  }

  private log(line: string): void {
    if (this.timeline.length < TIMELINE_MAX) this.timeline.push(`${this.now.toFixed(2)} ${line}`);
  }

  // ---- the run --------------------------------------------------------------------------------

  run(): RunResult {
    const { size } = this.schedule;
    const routes: (Route | null)[] = new Array<Route | null>(size).fill(null);
    for (const h of this.hosts) for (const [rank, vm] of h.vms) routes[rank] = vm.route;
    for (const h of this.hosts) {
      this.feed(h, { type: "start", routes });
      for (const vm of h.vms.values()) this.scheduleGuest(h, vm);
      this.afterHost(h);
    }
    this.schedule.failures.forEach((f, i) => {
      if (f.at_ms !== undefined) this.agenda.push(f.at_ms, { k: "fail", plan: i });
    });
    this.agenda.push(this.schedule.traffic_ms, { k: "check" });
    const end = this.schedule.traffic_ms + SETTLE_MS;
    while (!this.done) {
      const t = this.agenda.peekTime();
      if (t === Infinity || t > end) break;
      const ev = this.agenda.pop()!;
      this.now = t;
      this.checker.now_ms = t;
      this.dispatch(ev);
      if (this.pendingFire.length) this.firePending();
    }
    this.finish();
    return {
      violations: this.checker.violations,
      violation_count: this.checker.count,
      steps: this.steps,
      commits: this.commits,
      recoveries: this.recoveries,
      crashes: this.crashes,
      rejoins: this.rejoins,
      pauses: this.pauses,
      second_failures_by_step: { ...this.secondByStep },
      halted: this.halted,
      quiescent: this.quiescent,
      sim_ms: Math.round(this.now * 1000) / 1000,
      messages: this.messages,
      outputs: this.outputs,
      released: this.checker.sinks.reduce((n, s) => n + s.length, 0),
      image_bytes: [...this.checker.imageBytes],
      timeline: this.timeline,
    };
  }

  private dispatch(ev: SimEvent): void {
    switch (ev.k) {
      case "fail":
        this.pendingFire.push({ plan: ev.plan, at: null });
        return;
      case "check":
        this.check();
        return;
      case "restart":
        if (!this.done) this.restart(this.hosts[ev.h]);
        return;
      case "store": {
        // The request left its host: it takes effect even if that host dies meanwhile.
        const a = ev.action;
        const outage = this.schedule.store_outage;
        if (outage && this.now >= outage.from_ms && this.now < outage.until_ms) {
          const applied = a.type === "store_cas" && this.rng.chance(0.5) ? this.store.cas(a.key, a.expected, a.value) : null;
          if (applied?.ok && a.type === "store_cas") {
            this.history.set(a.value.incarnation, structuredClone(a.value));
            this.log(`${this.hosts[ev.h].id} CAS incarnation ${a.value.incarnation} took effect; its answer is lost (store outage)`);
          }
          this.agenda.push(this.now + this.rng.range(...STORE_MS), { k: "store_reply", h: ev.h, op: a.type === "store_get" ? "get" : "cas", ok: false, record: null, version: 0, unavailable: true });
          return;
        }
        const result = a.type === "store_get" ? this.store.get(a.key) : this.store.cas(a.key, a.expected, a.value);
        if (a.type === "store_cas" && result.ok) {
          this.history.set(a.value.incarnation, structuredClone(a.value));
          this.log(`${this.hosts[ev.h].id} CAS incarnation ${a.value.incarnation}: leader ${a.value.leader}, failed [${a.value.failed}]`);
        }
        this.agenda.push(this.now + this.rng.range(...STORE_MS), { k: "store_reply", h: ev.h, op: a.type === "store_get" ? "get" : "cas", ...result });
        return;
      }
      case "frame":
      case "msg":
        if (!ev.landed) {
          ev.landed = true;
          this.net.arrived(ev.from, ev.key);
          if (ev.flight.dropped) return;
        }
        break;
      default:
        break;
    }
    const h = this.hosts[ev.h];
    if (!h.alive) return;
    if (ev.k === "resume") return this.resume(h);
    if (h.paused) {
      if (h.deferred.length >= DEFERRED_MAX) throw new Error(`host ${h.id}: more than ${DEFERRED_MAX} events while paused`);
      h.deferred.push(ev);
      return;
    }
    if (ev.k === "tick") {
      if (ev.t !== h.tickAt) return; // superseded
      h.tickAt = Infinity;
    }
    // The core measures every delay from the last tick it saw: time that passed is told before the event.
    if (this.now > h.lastTick || ev.k === "tick") {
      h.lastTick = this.now;
      this.feed(h, { type: "tick", now_ms: this.now });
    }
    switch (ev.k) {
      case "tick":
        break;
      case "frame":
        this.feed(h, { type: "frame", from: this.hosts[ev.from].id, frame: ev.frame, body: ev.body });
        break;
      case "msg": {
        const vm = h.vms.get(ev.message.to);
        // A path that is gone (stopped, or another VM listens there now) refuses the link: lost in flight.
        if (vm && vm.route.token === ev.token) {
          this.withVmEvents(h, () => vm.arrive(ev.message));
          this.checkOverflow(vm);
        }
        break;
      }
      case "step":
        this.runStep(h, ev.queue);
        break;
      case "store_reply":
        this.feed(h, { type: "store", op: ev.op, ok: ev.ok, record: ev.record, version: ev.version, ...(ev.unavailable ? { unavailable: true } : {}) });
        break;
      case "see": {
        const had = h.view.has(ev.target);
        if (ev.up === had) return;
        if (ev.up) h.view.add(ev.target);
        else h.view.delete(ev.target);
        this.feed(h, { type: "hosts", live: [...h.view].sort(), heard: [...h.view].sort(), registered: this.registered() });
        break;
      }
      case "registry":
        this.feed(h, { type: "hosts", live: [...h.view].sort(), heard: [...h.view].sort(), registered: this.registered() });
        break;
      case "guest":
        this.guest(h, ev.vm);
        break;
    }
    this.afterHost(h);
  }

  /** The core's next deadline becomes a tick event (a superseded one is ignored when it comes). */
  private afterHost(h: SimHost): void {
    if (!h.alive) return;
    const due = h.core.deadline();
    if (due === Infinity || due >= h.tickAt) return;
    // A deadline in the past is due now; a core asking again at the same instant would spin, so nudge it.
    const t = Math.max(due, this.now);
    h.tickAt = t;
    this.agenda.push(t, { k: "tick", h: h.idx, t });
  }

  private feed(h: SimHost, event: CoreEvent): void {
    if (h.dormant) {
      // As the daemon's group table: only a `recover` whose decision the store holds makes it join.
      if (event.type !== "frame" || event.frame.k !== "recover") return;
      const stored = this.store.current;
      if (stored.incarnation !== event.frame.inc || stored.leader !== event.from) return;
      h.core = GroupCore.joined({ host: h.id, record: structuredClone(event.frame.record), now_ms: this.now, detect_ms: DETECT_MS, live: [...h.view].sort(), registered: this.registered() });
      h.dormant = false;
      this.log(`${h.id} joins the group (recover of incarnation ${event.frame.inc})`);
    }
    this.steps++;
    const actions = h.core.handle(event);
    for (const a of actions) this.perform(h, a);
  }

  // ---- actions --------------------------------------------------------------------------------

  private perform(h: SimHost, a: CoreAction): void {
    switch (a.type) {
      case "send": {
        const frame = copyJson({ ...a.frame, v: FRAME_VERSION, g: "sim", from: h.id }) as GroupFrame;
        if (frame.k === "rollback" && this.schedule.mutation === "image_all") {
          frame.images = h.core.currentRecord.placement.flatMap((p, r) => (p.backup !== null ? [r] : []));
        }
        this.sendFrame(h, a.to, frame, a.body === "module" ? undefined : a.body);
        if (frame.k === "report") this.trigger("after_report", h);
        if (frame.k === "rolled") this.trigger("after_rolled", h);
        return;
      }
      case "vm":
        return this.enqueue(h, a.rank, { kind: "vm", id: a.id, rank: a.rank, step: a.step });
      case "backup":
        if (a.step.op === "promote" && this.schedule.mode === "vm") this.trigger("vm_promotion", h);
        return this.enqueue(h, a.rank, { kind: "backup", id: a.id, rank: a.rank, step: a.step });
      case "members":
        return this.enqueue(h, MEMBERS_QUEUE, { kind: "members", id: a.id, step: a.step });
      case "store_get":
      case "store_cas":
        if (a.type === "store_cas") this.trigger("before_cas", h);
        this.agenda.push(this.now + this.rng.range(...STORE_MS), { k: "store", h: h.idx, action: a });
        return;
      case "notify":
        return this.notice(h, a.notice);
    }
  }

  private sendFrame(h: SimHost, to: HostId, frame: GroupFrame, body: unknown): void {
    const dest = this.byId.get(to);
    if (!dest) throw new Error(`frame to unknown host ${to}`);
    const key = `${h.id}>${to}`;
    const flight = this.net.send(this.now, h.idx, dest.idx, key);
    this.agenda.push(flight.arrival, { k: "frame", h: dest.idx, from: h.idx, key, flight, landed: false, frame, body });
  }

  private enqueue(h: SimHost, rank: Rank, job: Job): void {
    const qi = rank === MEMBERS_QUEUE ? this.schedule.size : rank;
    const q = h.queues[qi];
    if (q.length >= STEP_QUEUE_MAX) throw new Error(`host ${h.id}: more than ${STEP_QUEUE_MAX} steps queued for ${rank === MEMBERS_QUEUE ? "the members" : `rank ${rank}`}`);
    q.push(job);
    if (q.length === 1) this.agenda.push(this.now + this.rng.range(...REPLICA_STEP_MS), { k: "step", h: h.idx, queue: qi });
  }

  /** The step at the head of a queue finishes now: carried out on the models, answered with `done`. */
  private runStep(h: SimHost, qi: number): void {
    const q = h.queues[qi];
    const job = q.shift();
    if (!job) return;
    const events: CoreEvent[] = [];
    this.vmEvents = events;
    let done: CoreEvent;
    try {
      const value = job.kind === "vm" ? this.vmStep(h, job.rank, job.step) : job.kind === "backup" ? this.backupStep(h, job.rank, job.step) : this.membersStep(h, job.step);
      done = { type: "done", id: job.id, ok: true, value };
    } catch (error) {
      done = { type: "done", id: job.id, ok: false, error: (error as Error).message };
      this.log(`${h.id} step ${job.kind} ${"step" in job ? job.step.op : ""} failed: ${(error as Error).message}`);
    }
    this.vmEvents = null;
    for (const e of events) this.feed(h, e);
    this.feed(h, done);
    if (q.length && h.alive) this.agenda.push(this.now + this.rng.range(...REPLICA_STEP_MS), { k: "step", h: h.idx, queue: qi });
  }

  /** Events the model VMs post to their host's core during one operation, fed after it (as a VM thread's messages are). */
  private vmEvents: CoreEvent[] | null = null;

  private withVmEvents(h: SimHost, op: () => void): void {
    const events: CoreEvent[] = [];
    this.vmEvents = events;
    try {
      op();
    } finally {
      this.vmEvents = null;
    }
    for (const e of events) this.feed(h, e);
  }

  private vmHostFor(h: SimHost): VmHost {
    return {
      transmit: (vm, messages) => {
        for (const m of messages) {
          const route = vm.routes[m.to];
          if (!route) continue; // no path to it yet: the sender log re-sends in the next recovery
          const dest = this.byId.get(route.address);
          if (!dest) continue;
          const key = `${vm.route.token}>${route.token}`;
          const flight = this.net.send(this.now, h.idx, dest.idx, key);
          this.agenda.push(flight.arrival, { k: "msg", h: dest.idx, from: h.idx, key, flight, landed: false, token: route.token, message: { ...m } });
        }
      },
      captured: (vm, delta, delivered) => this.vmEvents?.push({ type: "captured", rank: vm.rank, epoch: delta.epoch, delivered, delta }),
      outputPending: (vm, epoch, urgent) => this.vmEvents?.push({ type: "output_pending", rank: vm.rank, epoch, urgent }),
      active: (vm, epoch) => this.vmEvents?.push({ type: "active", rank: vm.rank, epoch }),
      release: (vm, records) => this.checker.onRelease(h.id, vm.rank, records),
      delivered: () => {},
    };
  }

  private vmStep(h: SimHost, rank: Rank, step: VmStep): Record<string, unknown> {
    const vm = h.vms.get(rank);
    if (!vm || vm.stopped) throw new Error(`no primary of rank ${rank} on ${h.id}`);
    switch (step.op) {
      case "capture_to":
        vm.captureTo(step.epoch, step.commit);
        return {};
      case "capture": {
        const c = vm.capture();
        return { epoch: c.epoch, delivered: c.delivered, delta: c.delta, held: c.held };
      }
      case "commit":
        vm.commit(step.epoch, step.trim);
        if (this.schedule.mode !== "group") this.commits++; // vm, none mode: each member commits on its own
        return {};
      case "trim":
        vm.trim(step.delivered_by_receiver);
        return {};
      case "freeze":
        vm.freeze();
        return {};
      case "restore": {
        const { delivered, image } = vm.restore(step.how, step.cut, step.inc, step.image_to !== null, step.fresh_image);
        if (image && step.image_to !== null) this.shipImage(h, vm, step.inc, step.image_to, image);
        return step.fresh_image && image ? { delivered, route: vm.route, epoch: image.epoch } : { delivered, route: vm.route };
      }
      case "stop":
        vm.stop();
        h.vms.delete(rank);
        return {};
    }
  }

  private shipImage(h: SimHost, vm: ModelVm, inc: number, to: HostId, image: ModelImage): void {
    this.checker.onImage(inc, vm.rank, imageBytes(image));
    this.imagesPending.add(`${inc}:${vm.rank}`);
    this.log(`${h.id} ships image of ${vm.rank} at ${image.epoch} to ${to}`);
    this.sendFrame(h, to, { v: FRAME_VERSION, g: "sim", from: h.id, inc, k: "image", rank: vm.rank, e: image.epoch, released_seq: vm.released, history: [] }, image);
  }

  private backupStep(h: SimHost, rank: Rank, step: BackupStep): Record<string, unknown> {
    if (step.op === "install") {
      h.backups.set(rank, ModelBackup.fromImage(rank, step.image as ModelImage));
      // An installed image holds its checkpoint as a staged delta would (vm mode commits on it).
      if (this.schedule.mode === "vm") this.checker.onStaged(rank, step.epoch);
      this.log(`${h.id} installed image of ${rank} at ${step.epoch}`);
      for (const k of this.imagesPending) if (k.endsWith(`:${rank}`)) this.imagesPending.delete(k);
      return {};
    }
    const b = h.backups.get(rank);
    if (!b) throw new Error(`no backup of rank ${rank} on ${h.id}`);
    switch (step.op) {
      case "stage":
        b.stage(step.epoch, step.delta as ModelDelta);
        if (this.schedule.mode === "vm") this.checker.onStaged(rank, step.epoch);
        return {};
      case "commit":
        b.commit(step.cut);
        return {};
      case "rollback_to":
        b.rollbackTo(step.cut);
        return {};
      case "promote": {
        if (h.vms.has(rank)) throw new Error(`rank ${rank} has a primary on ${h.id} already`);
        const vm = b.promote(step.cut, this.newRoute(h, rank), this.schedule.mode, this.schedule.size, h.vmHost, this.faults);
        h.backups.delete(rank);
        h.vms.set(rank, vm);
        this.scheduleGuest(h, vm);
        return { route: vm.route };
      }
      case "drop":
        h.backups.delete(rank);
        return {};
    }
  }

  private membersStep(h: SimHost, step: MembersStep): Record<string, unknown> {
    const errors: string[] = [];
    for (const vm of h.vms.values()) {
      if (vm.stopped) continue;
      try {
        vm.run(step.routes, step.delivered, this.schedule.mutation === "skip_resend");
      } catch (error) {
        // resendFor refuses states that are not one consistent cut, or a log trimmed past a receiver.
        const message = (error as Error).message;
        this.checker.fail(/consistent cut/.test(message) ? "inv2" : "inv3", `host ${h.id} rank ${vm.rank}: ${message}`);
        errors.push(message);
      }
      this.checkOverflow(vm);
      const inc = vm.channels.incarnation;
      const others = this.hosts.filter((o) => o !== h && o.alive && [...o.vms.values()].some((x) => x.rank === vm.rank && x.running && !x.stopped && x.channels.incarnation === inc));
      this.checker.onRunning(vm.rank, inc, h.id, others.map((o) => o.id));
    }
    if (errors.length) throw new Error(errors.join("; "));
    return {};
  }

  private checkOverflow(vm: ModelVm): void {
    if (vm.overflow) {
      this.checker.fail("sanity", vm.overflow);
      vm.overflow = null;
    }
  }

  // ---- guests ---------------------------------------------------------------------------------

  private scheduleGuest(h: SimHost, vm: ModelVm): void {
    if (this.now < this.schedule.traffic_ms) this.agenda.push(this.now + this.guestRng.range(...GUEST_STEP_MS), { k: "guest", h: h.idx, vm });
  }

  private guest(h: SimHost, vm: ModelVm): void {
    if (vm.stopped || h.vms.get(vm.rank) !== vm || this.now >= this.schedule.traffic_ms) return;
    if (vm.running) {
      const { size, send_rate, output_rate } = this.schedule;
      const x = this.guestRng.next();
      this.withVmEvents(h, () => {
        if (x < send_rate && size > 1) {
          let to = this.guestRng.int(0, size - 2);
          if (to >= vm.rank) to++;
          const id = ++this.ids;
          const epoch = vm.epoch;
          if (vm.send(to, id)) {
            this.checker.onSend(id, epoch);
            this.messages++;
          }
        } else if (x < send_rate + output_rate) {
          // The first half of the output band is a reply someone waits for, the rest log lines.
          vm.output(++this.ids, x < send_rate + output_rate / 2);
          this.outputs++;
        } else {
          vm.compute();
        }
      });
    }
    this.scheduleGuest(h, vm);
  }

  // ---- notices: ground truth for the checkers, and the step triggers ---------------------------

  private notice(h: SimHost, n: Notice): void {
    switch (n.kind) {
      case "committed":
        this.commits++;
        if (n.inc < this.store.current.incarnation) return this.zombieCommit(n.inc, n.cut);
        return this.checkCommit(h, n.cut);
      case "decided": {
        const prev = this.history.get(n.inc - 1);
        const kept = new Set<Rank>();
        if (prev) {
          n.record.placement.forEach((p, r) => {
            const q = prev.placement[r];
            if (p.backup === null || p.primary !== q.primary || p.backup !== q.backup || n.record.failed.includes(p.primary) || n.record.failed.includes(p.backup)) return;
            // Both replicas survive and hold the member (not a backup still waiting for its image).
            if (this.byId.get(p.primary)!.vms.has(r) && this.byId.get(p.backup)!.backups.has(r)) kept.add(r);
          });
        }
        this.checker.onDecided(n.inc, kept);
        for (const d of n.dead) this.checker.onDeclaredFailed(d);
        this.log(`${h.id} decided incarnation ${n.inc}: dead [${n.dead}], kept both [${[...kept]}]`);
        this.trigger("after_cas", h);
        return;
      }
      case "cut_chosen":
        this.checker.onRecoveryCut(n.cut);
        if (n.cut !== null && n.cut < this.zombieCut) this.checker.fail("inv1", `incarnation ${n.inc} recovers to cut ${n.cut}, below cut ${this.zombieCut} a leader of an older incarnation committed`);
        this.zombieCut = 0;
        this.lastCut = { inc: n.inc, cut: n.cut ?? 0 };
        this.log(`${h.id} chose cut ${n.cut} (committed ${n.committed}) images [${n.images}] in incarnation ${n.inc}`);
        return;
      case "rolled_back":
        this.trigger("during_rollback", h);
        return;
      case "resumed":
        this.recoveries++;
        this.log(`${h.id} resumed incarnation ${n.inc} at cut ${n.cut} after ${n.recovery_ms.toFixed(1)} ms`);
        if (this.imagesPending.size) this.trigger("after_resume", h);
        return;
      case "lost":
        if (this.halted === null) this.onHalt(n.ranks);
        return;
      case "fenced":
        this.checker.onFenced(h.id);
        this.log(`${h.id} fenced`);
        return;
      case "step_failed":
        this.checker.fail("sanity", `host ${h.id}: step ${n.step} of rank ${n.rank} failed: ${n.error}`);
        return;
      case "refused":
        this.log(`${h.id} refused: ${n.reason}`);
        return;
      case "suspected":
      case "degraded":
        return;
    }
  }

  /** Newest recovery cut chosen, and the newest cut a stale leader committed since (checked against the next recovery cut). */
  private lastCut: { inc: number; cut: Epoch } | null = null;
  private zombieCut: Epoch = 0;

  /**
   * A leader that was paused past its own failover commits, on its return,
   * a cut whose acks reached it before (they were sent in its incarnation).
   * Safe only if the recovered group goes at least as far: its output is
   * released by this stale host.
   */
  private zombieCommit(inc: number, cut: Epoch): void {
    this.log(`stale leader of incarnation ${inc} committed cut ${cut}`);
    this.checker.onStaleCommit(cut);
    if (this.lastCut && this.lastCut.inc > inc) {
      if (this.lastCut.cut < cut) this.checker.fail("inv1", `a leader of incarnation ${inc} committed cut ${cut}; incarnation ${this.lastCut.inc} recovered to cut ${this.lastCut.cut}`);
    } else if (cut > this.zombieCut) this.zombieCut = cut;
  }

  /** Ground truth of a commit: every member's backup holds the cut; the cut is consistent; committed output is final. */
  private checkCommit(leader: SimHost, cut: Epoch): void {
    const record = leader.core.currentRecord;
    const views: (CheckpointView | null)[] = [];
    const memories: (GuestMemory | null)[] = [];
    const missing: string[] = [];
    record.placement.forEach((p, r) => {
      const b = p.backup === null ? null : this.byId.get(p.backup)!;
      if (b === null) missing.push(`member ${r} has no backup`);
      else if (b.alive && !b.backups.get(r)?.holds(cut)) missing.push(`member ${r}'s backup on ${b.id} does not hold it`);
      const ph = this.byId.get(p.primary)!;
      const vm = ph.alive ? ph.vms.get(r) : undefined;
      const view = vm?.checkpointAt(cut) ?? null;
      views.push(view);
      memories.push(view && vm ? vm.memory : null);
    });
    this.checker.onCommitted(cut, views, memories, missing);
  }

  private onHalt(lost: Rank[]): void {
    this.halted = [...lost].sort((a, b) => a - b);
    // Judged against the decision that halted: a host it does not declare failed counts as up
    // (a crash it has not seen yet is the next decision's), and its copies as copies.
    const failed = new Set(this.store.current.failed);
    const truth: Rank[] = [];
    for (let r = 0; r < this.schedule.size; r++) {
      const copy = this.hosts.some((h) => !failed.has(h.id) && (h.vms.has(r) || h.backups.has(r) || h.queues[r].some((j) => j.kind === "backup" && j.step.op === "install")));
      if (!copy) truth.push(r);
    }
    this.log(`halted: lost [${this.halted}], no copy of [${truth}]`);
    if (truth.join() !== this.halted.join()) this.checker.fail("liveness", `the group halted naming [${this.halted}] lost; members without a copy: [${truth}]`);
    if (this.failuresFired <= 1 && this.schedule.mode !== "none") this.checker.fail("inv4", `members [${this.halted}] lost after a single failure`);
    this.done = true;
  }

  // ---- failures -------------------------------------------------------------------------------

  /** A recovery step of `kind` just happened on `h`: arm the second failures waiting for it. */
  private trigger(kind: StepKind, h: SimHost): void {
    if (this.failuresFired === 0) return;
    const seen = ++this.stepSeen[kind];
    this.schedule.failures.forEach((f, i) => {
      if (!this.fired[i] && f.step === kind && seen >= (f.nth ?? 1) && !this.pendingFire.some((p) => p.plan === i)) this.pendingFire.push({ plan: i, at: h });
    });
  }

  private firePending(): void {
    const pending = this.pendingFire;
    this.pendingFire = [];
    for (const { plan, at } of pending) this.fire(plan, at);
  }

  private fire(index: number, at: SimHost | null): void {
    if (this.fired[index] || this.done) return;
    this.fired[index] = true;
    const plan = this.schedule.failures[index];
    const failed = new Set(this.store.current.failed);
    const candidates = this.hosts.filter((h) => h.alive && !h.paused && !failed.has(h.id));
    // Keep two hosts: below that no group can be protected at all.
    if (candidates.length <= 2) {
      this.log(`failure ${index} skipped: ${candidates.length} hosts left`);
      return;
    }
    let victim: SimHost;
    if (plan.target === "self" && at && candidates.includes(at)) victim = at;
    else {
      const pool = plan.target === "any" || !at ? candidates : candidates.filter((h) => h !== at);
      victim = pool[plan.index % pool.length];
    }
    if (plan.step) this.secondByStep[plan.step]++;
    if (plan.kind === "crash") this.crash(victim, plan.step ?? "time", plan.restart_ms);
    else this.pause(victim, plan.pause_ms ?? 2 * DETECT_MS, plan.step ?? "time");
  }

  /** The hosts registered in the store now (paused hosts keep theirs: the pauses drawn are shorter than a lease). */
  private registered(): HostId[] {
    return this.hosts.filter((h) => this.now < h.registeredUntil).map((h) => h.id);
  }

  /** A live host with nothing of the group yet but what `core` holds; `dormant`: it has no core for the group until a `recover` names it. */
  private newHost(idx: number, id: HostId, core: GroupCore, view: Set<HostId>, dormant: boolean): SimHost {
    const h: SimHost = {
      idx,
      id,
      alive: true,
      paused: false,
      registeredUntil: Infinity,
      dormant,
      core,
      vms: new Map(),
      backups: new Map(),
      queues: Array.from({ length: this.schedule.size + 1 }, () => []),
      view,
      tickAt: Infinity,
      lastTick: this.now,
      deferred: [],
      vmHost: null as unknown as VmHost,
    };
    h.vmHost = this.vmHostFor(h);
    return h;
  }

  /** A crashed host's process starts again as a fresh instance (FailurePlan.restart_ms). */
  private restart(old: SimHost): void {
    const name = old.id.split(".")[0];
    const generation = this.hosts.filter((h) => h.id.split(".")[0] === name).length + 1;
    const id = `${name}.${generation}`;
    const idx = this.net.addHost();
    assert(idx === this.hosts.length, "network and host indexes agree");
    const view = new Set([id, ...this.hosts.filter((h) => h.alive).map((h) => h.id)]);
    const placeholder = GroupCore.joined({ host: id, record: structuredClone(this.store.current), now_ms: this.now, detect_ms: DETECT_MS, live: [...view].sort(), registered: this.registered() });
    const h = this.newHost(idx, id, placeholder, view, true);
    this.hosts.push(h);
    this.byId.set(id, h);
    this.rejoins++;
    this.log(`RESTART ${old.id} as ${id}`);
    // Its heartbeats reach the others a moment later: they see it up (and a degraded group's leader heals onto it).
    for (const o of this.hosts) if (o !== h && o.alive) this.agenda.push(this.now + this.rng.range(0.3, 2), { k: "see", h: o.idx, target: id, up: true });
  }

  private crash(h: SimHost, why: string, restart_ms?: number): void {
    if (restart_ms !== undefined) this.agenda.push(this.now + restart_ms, { k: "restart", h: h.idx });
    h.alive = false;
    h.paused = false;
    h.registeredUntil = this.now + SIM_LEASE_MS;
    for (const o of this.hosts) if (o !== h) this.agenda.push(h.registeredUntil, { k: "registry", h: o.idx });
    h.deferred = [];
    this.crashes++;
    this.failuresFired++;
    const lost = this.net.crash(h.idx);
    this.log(`CRASH ${h.id} (${why}): primaries [${[...h.vms.keys()]}] backups [${[...h.backups.keys()]}], ${lost} frames lost in flight`);
    for (const o of this.hosts) {
      if (o.alive && o !== h) this.agenda.push(this.now + DETECT_MS * (1 + 0.3 * this.rng.next()), { k: "see", h: o.idx, target: h.id, up: false });
    }
  }

  /**
   * SIGSTOP for `ms`. Long pauses are suspected by every peer (and the host
   * declared failed, unless the decision waits: a host holding only backups
   * is decided on after max(detect, RECOVER_RETRY_MS)). When it resumes, its
   * detector sees that it stalled itself and gives every peer a fresh window
   * (the daemon's detector does the same, src/host/host.ts): a peer that
   * died meanwhile is found a detection period later. A host declared failed
   * meanwhile learns it from its peers (`stale`, or a `recover` naming it
   * failed) and reads the store, which fences it. Short pauses go unnoticed.
   */
  private pause(h: SimHost, ms: number, why: string): void {
    h.paused = true;
    this.pauses++;
    const long = ms >= 2 * DETECT_MS;
    if (long) this.failuresFired++;
    const until = this.now + ms;
    this.log(`PAUSE ${h.id} (${why}) for ${ms.toFixed(1)} ms: primaries [${[...h.vms.keys()]}] backups [${[...h.backups.keys()]}]`);
    this.agenda.push(until, { k: "resume", h: h.idx });
    if (!long) return;
    for (const o of this.hosts) {
      if (!o.alive || o === h) continue;
      this.agenda.push(this.now + DETECT_MS * (1 + 0.3 * this.rng.next()), { k: "see", h: o.idx, target: h.id, up: false });
      this.agenda.push(until + this.rng.range(0.3, 2), { k: "see", h: o.idx, target: h.id, up: true });
    }
    this.resumeLong.add(h.idx);
  }

  private readonly resumeLong = new Set<number>();

  private resume(h: SimHost): void {
    if (!h.paused) return;
    h.paused = false;
    this.log(`RESUME ${h.id}`);
    h.lastTick = this.now;
    this.feed(h, { type: "tick", now_ms: this.now });
    if (this.resumeLong.delete(h.idx)) {
      // A fresh window for every peer: those that crashed during the pause are seen down one period later.
      for (const o of this.hosts) if (o !== h && !o.alive && h.view.has(o.id)) this.agenda.push(this.now + DETECT_MS * (1 + 0.3 * this.rng.next()), { k: "see", h: h.idx, target: o.id, up: false });
    }
    const deferred = h.deferred;
    h.deferred = [];
    for (const ev of deferred) this.agenda.push(this.now, ev);
    h.tickAt = Infinity;
    this.afterHost(h);
  }

  // ---- the end --------------------------------------------------------------------------------

  private check(): void {
    if (this.done) return;
    const allFired = this.schedule.failures.every((f, i) => this.fired[i] || (f.at_ms === undefined && this.now > this.schedule.traffic_ms + ARM_GRACE_MS));
    if (allFired && this.isQuiescent()) {
      this.quiescent = true;
      this.done = true;
      return;
    }
    this.agenda.push(this.now + CHECK_EVERY_MS, { k: "check" });
  }

  /** The members' primaries when the group is settled (everything delivered, released, re-protected), else null. */
  private settled(allDelivered: boolean): ModelVm[] | null {
    const record = this.store.current;
    const failed = new Set(record.failed);
    for (const id of [...hostsOf(record), record.leader]) {
      const h = this.byId.get(id)!;
      if (!failed.has(id) && (!h.alive || h.paused)) return null;
    }
    if (this.hosts.some((h) => h.paused)) return null;
    const vms: ModelVm[] = [];
    for (let r = 0; r < this.schedule.size; r++) {
      const p = record.placement[r];
      const vm = this.byId.get(p.primary)!.vms.get(r);
      if (!vm || !vm.running) return null;
      if (vm.released !== vm.memory.outs.length) return null;
      if (record.mode !== "none" && (p.backup === null || !this.byId.get(p.backup)!.backups.has(r))) return null;
      vms.push(vm);
    }
    // Hosts the group does not use (spares) keep whatever incarnation they last heard of.
    const used = new Set([...hostsOf(record), record.leader]);
    for (const h of this.hosts) {
      if (!h.alive || failed.has(h.id) || !used.has(h.id)) continue;
      const s = h.core.status();
      if (s.state !== "running" || s.recovering || s.incarnation !== record.incarnation) return null;
    }
    // Every epoch a member did something in has committed (idle epochs are not ended, so there may be no cut past the recovery's).
    if (record.mode === "group" && vms.some((vm) => vm.lastActive > this.checker.committed)) return null;
    if (!allDelivered) return vms;
    for (const r of vms) for (const s of vms) if (r !== s && r.channels.deliveredVector()[s.rank] !== s.channels.sentVector()[r.rank]) return null;
    return vms;
  }

  private isQuiescent(): boolean {
    return this.settled(true) !== null;
  }

  private finish(): void {
    if (this.halted !== null) return;
    if (!this.quiescent) {
      // Settled but for messages that never arrived: that is exactly-once failing, judged below (inv3).
      const vms = this.settled(false);
      if (vms) {
        this.checker.final(
          vms.map((vm) => vm.memory),
          this.failuresFired,
        );
        return;
      }
    }
    const vms = this.settled(true);
    if (!vms) {
      const status = this.hosts.filter((h) => h.alive).map((h) => `${h.id}${h.paused ? " (paused)" : ""}: ${JSON.stringify(h.core.status())}`);
      this.checker.fail("liveness", `not settled ${SETTLE_MS} ms after the traffic (committed ${this.checker.committed}); record ${JSON.stringify(this.store.current)}; ${status.join(" | ").slice(0, 2000)}`);
      return;
    }
    this.checker.final(
      vms.map((vm) => vm.memory),
      this.failuresFired,
    );
  }
}

function emptyRecordAt(incarnation: number) {
  return { incarnation, sent_seq: [], delivered: [], sender_log: [], sender_log_bytes: 0, sender_log_trimmed: [] };
}

export function simulate(schedule: Schedule): RunResult {
  return new Simulator(schedule).run();
}
