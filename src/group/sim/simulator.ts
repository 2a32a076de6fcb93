/**
 * Deterministic simulator of a group (src/group/node.ts) on H hosts: a
 * simulated clock, network (src/group/sim/network.ts), coordination store
 * with compare-and-swap (store.ts), model VMs (model-vm.ts) that send group
 * messages and emit output at random, and crash injection. Given the same
 * options (seed included) a run is the same run.
 *
 * A run: traffic for `trafficMs`, crashes as planned, then the guests go
 * quiet and the run continues until the group is quiescent (protected again,
 * every log trimmed, every output released, new cuts committed since the last
 * recovery) or `maxMs`. The checkers (checker.ts) watch throughout and judge
 * the final states.
 */
import { assert } from "../../util/assert.js";
import { GroupNode } from "../node.js";
import {
  protectionKey,
  type Effect,
  type Event,
  type Fault,
  type GroupConfig,
  type GroupMessageKind,
  type GroupMode,
  type GroupRecord,
  type HostId,
  type Notice,
  type Placement,
  type Rank,
  type StoreResult,
  type Timing,
} from "../protocol.js";
import { Checker, type Violation } from "./checker.js";
import { ModelBackup, ModelPrimary, type ModelDelta, type VmState } from "./model-vm.js";
import { SimNetwork, type DelayModel, type InFlight } from "./network.js";
import { Rng } from "./rng.js";
import { SimStore } from "./store.js";

/** Which host a crash hits, resolved when it fires. */
export type CrashTarget = "leader" | "backups-only" | "primaries" | "empty" | "any";

/** When a crash fires, counted from the moment it is armed (the start, or the previous crash). */
export type CrashTrigger =
  | { kind: "time"; afterMs: number }
  /** Right after the leader decided its nth commit (its commit messages partly sent). */
  | { kind: "commit"; nth: number }
  /** Right after some host handled the nth message of this kind (e.g. "rollback": mid-recovery). */
  | { kind: "message"; message: GroupMessageKind; nth: number }
  /** `delayMs` after the group is protected again (re-protection complete). */
  | { kind: "after-reprotect"; delayMs: number };

export interface CrashPlan {
  target: CrashTarget;
  /** Picks among candidate hosts (index modulo their number). */
  index: number;
  trigger: CrashTrigger;
}

export interface SimOptions {
  seed: number;
  size: number;
  hosts: number;
  mode?: GroupMode;
  fault?: Fault;
  /** Guests act during [0, trafficMs). */
  trafficMs?: number;
  /** Per guest step: probability of sending a group message / emitting output. */
  sendRate?: number;
  outputRate?: number;
  /** Crashes, in order; each is armed when the previous one fired. Skipped if fewer than 2 hosts would remain. */
  crashes?: CrashPlan[];
  /** Give up (liveness violation) at this simulated time. */
  maxMs?: number;
  timing?: Partial<Timing>;
  delay?: Partial<DelayModel>;
}

export interface RecoveryRecord {
  inc: number;
  cut: number;
  committed: number;
  promoted: Rank[];
  rolledBack: Rank[];
  images: Rank[];
}

export interface CrashRecord {
  host: HostId;
  atMs: number;
  wasLeader: boolean;
  primaries: Rank[];
  backups: Rank[];
  /** Members whose primary and backup both survived this crash. */
  keptBoth: Rank[];
  committed: number;
}

export interface SimReport {
  violations: Violation[];
  quiescent: boolean;
  /** Members reported lost (a second failure before re-protection), or null. */
  lost: Rank[] | null;
  crashed: HostId[];
  /** What each crashed host held when it crashed. */
  crashes: CrashRecord[];
  recoveries: RecoveryRecord[];
  /** The group record at the end. */
  record: GroupRecord;
  /** Every record written, oldest first. */
  records: GroupRecord[];
  /** Highest committed cut. */
  committed: number;
  commits: number;
  messages: number;
  outputs: number;
  released: number;
  /** Memory moved (images) per member, bytes. */
  imageBytes: number[];
  /** Group messages transmitted again after a rollback (sequence number already transmitted on that channel). */
  resends: number;
  /** Recoveries started (`recovering`), including aborted and stillborn ones. */
  recoveriesStarted: number;
  /** Final incarnation. */
  incarnation: number;
  events: number;
  simMs: number;
  timeline: string[];
}

export const SIM_TIMING: Timing = { heartbeat_ms: 5, detect_ms: 30, epoch_ms: 8 };
const TICK_MS = 1;
const CHECK_MS = 10;
const STORE_DELAY = { min: 0.3, max: 2 };
/** Plans not fired this long after the traffic ended are cancelled. */
const PLAN_GRACE_MS = 400;

interface SimHost {
  id: HostId;
  alive: boolean;
  node: GroupNode;
  vms: Map<Rank, ModelPrimary>;
  backups: Map<Rank, ModelBackup>;
}

type SimEvent =
  | { kind: "tick"; host: HostId }
  | { kind: "step"; host: HostId; rank: Rank; vm: ModelPrimary }
  | { kind: "net"; flight: InFlight }
  | { kind: "store"; host: HostId; effect: Extract<Effect, { type: "store.get" | "store.cas" }> }
  | { kind: "store-reply"; host: HostId; result: StoreResult }
  | { kind: "crash"; plan: number }
  | { kind: "check" };

interface Scheduled {
  t: number;
  seq: number;
  ev: SimEvent;
}

/** Binary min-heap on (t, seq): ties run in scheduling order. */
class EventQueue {
  private readonly items: Scheduled[] = [];
  private seq = 0;

  get size(): number {
    return this.items.length;
  }

  push(t: number, ev: SimEvent): void {
    const items = this.items;
    items.push({ t, seq: this.seq++, ev });
    let i = items.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!this.less(items[i], items[parent])) break;
      [items[i], items[parent]] = [items[parent], items[i]];
      i = parent;
    }
  }

  pop(): Scheduled | undefined {
    const items = this.items;
    if (!items.length) return undefined;
    const top = items[0];
    const last = items.pop()!;
    if (items.length) {
      items[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < items.length && this.less(items[l], items[m])) m = l;
        if (r < items.length && this.less(items[r], items[m])) m = r;
        if (m === i) break;
        [items[i], items[m]] = [items[m], items[i]];
        i = m;
      }
    }
    return top;
  }

  private less(a: Scheduled, b: Scheduled): boolean {
    return a.t < b.t || (a.t === b.t && a.seq < b.seq);
  }
}

export class Simulator {
  private readonly rng: Rng;
  private readonly vmRng: Rng;
  private readonly config: GroupConfig;
  private readonly hosts: SimHost[];
  private readonly store: SimStore;
  private readonly net: SimNetwork;
  private readonly queue = new EventQueue();
  readonly checker: Checker;
  private now = 0;
  private events = 0;
  private ids = 0;
  private readonly trafficMs: number;
  private readonly maxMs: number;
  private readonly sendRate: number;
  private readonly outputRate: number;
  private readonly plans: CrashPlan[];
  /** Index of the armed plan (plans before it fired or were skipped). */
  private armed = 0;
  private armedAt = 0;
  private armedInc = 1;
  private armedCommits = 0;
  private armedMessages = 0;
  private planTimer: number | null = null;
  /** A triggered crash, carried out once the current event's effects are all out. */
  private firePending = false;
  private commits = 0;
  private lastRecoveredCut: number | null = null;
  private readonly crashed: HostId[] = [];
  private readonly crashRecords: CrashRecord[] = [];
  private readonly recoveries: RecoveryRecord[] = [];
  private lost: Rank[] | null = null;
  private done = false;
  private quiescent = false;
  private readonly timeline: string[] = [];
  private readonly transmitted = new Map<string, number>();
  private resends = 0;
  private recoveriesStarted = 0;

  constructor(private readonly options: SimOptions) {
    const { seed, size, hosts } = options;
    assert(size >= 2 && hosts >= 3, "the simulator runs groups of >= 2 members on >= 3 hosts");
    this.rng = new Rng(seed);
    this.vmRng = this.rng.fork();
    this.trafficMs = options.trafficMs ?? 300;
    this.maxMs = options.maxMs ?? this.trafficMs + 4000;
    this.sendRate = options.sendRate ?? 0.3;
    this.outputRate = options.outputRate ?? 0.1;
    this.plans = options.crashes ?? [];
    this.config = {
      group: "sim",
      size,
      hosts,
      mode: options.mode ?? "group",
      timing: { ...SIM_TIMING, ...options.timing },
      fault: options.fault,
    };
    this.net = new SimNetwork(this.rng.fork(), hosts, { baseMax: 2.5, jitter: 2, ...options.delay });
    assert(this.net.maxDelay + this.config.timing.heartbeat_ms + 2 * TICK_MS < this.config.timing.detect_ms, "no false suspicion: detect_ms exceeds the worst heartbeat gap");
    const placement: Placement[] = [];
    for (let rank = 0; rank < size; rank++) {
      const primary = this.rng.int(0, hosts - 1);
      const backup = (primary + this.rng.int(1, hosts - 1)) % hosts;
      placement.push({ primary, backup });
    }
    const record: GroupRecord = { group: this.config.group, incarnation: 1, leader: placement[0].primary, placement, failed: [] };
    this.store = new SimStore(protectionKey(this.config.group), record);
    this.checker = new Checker(size);
    this.hosts = [];
    const initial = ModelPrimary.boot().state;
    for (let h = 0; h < hosts; h++) {
      const host: SimHost = { id: h, alive: true, node: GroupNode.deploy(this.config, h, structuredClone(record), 1), vms: new Map(), backups: new Map() };
      placement.forEach((p, rank) => {
        if (p.primary === h) host.vms.set(rank, ModelPrimary.boot());
        if (p.backup === h) host.backups.set(rank, ModelBackup.install(0, initial));
      });
      this.hosts.push(host);
    }
  }

  run(): SimReport {
    for (const h of this.hosts) {
      this.queue.push(h.id * 0.013, { kind: "tick", host: h.id });
      for (const [rank, vm] of h.vms) this.scheduleStep(h, rank, vm);
    }
    this.queue.push(this.trafficMs, { kind: "check" });
    this.arm(0);
    while (!this.done) {
      const next = this.queue.pop();
      if (!next) break;
      if (next.t > this.maxMs) break;
      this.now = next.t;
      this.events++;
      this.dispatch(next.ev);
      if (this.firePending && !this.done) {
        this.firePending = false;
        this.fire();
      }
    }
    this.finish();
    return {
      violations: this.checker.violations,
      quiescent: this.quiescent,
      lost: this.lost,
      crashed: this.crashed,
      crashes: this.crashRecords,
      record: structuredClone(this.store.current),
      records: [...this.store.history.values()].map((x) => structuredClone(x)),
      recoveries: this.recoveries,
      committed: this.checker.committed,
      commits: this.commits,
      messages: this.checker.messagesSent,
      outputs: this.checker.outputsMade,
      released: this.checker.sinks.reduce((n, s) => n + s.length, 0),
      imageBytes: this.checker.imageBytes,
      resends: this.resends,
      recoveriesStarted: this.recoveriesStarted,
      incarnation: this.store.current.incarnation,
      events: this.events,
      simMs: this.now,
      timeline: this.timeline,
    };
  }

  private dispatch(ev: SimEvent): void {
    switch (ev.kind) {
      case "tick": {
        const h = this.hosts[ev.host];
        if (!h.alive) return;
        this.exec(h, { type: "tick", now: this.now });
        this.queue.push(this.now + TICK_MS, ev);
        return;
      }
      case "step":
        this.step(ev.host, ev.rank, ev.vm);
        return;
      case "net": {
        const f = ev.flight;
        this.net.arrived(f);
        if (f.dropped) return;
        const h = this.hosts[f.to];
        if (!h.alive) return;
        this.exec(h, { type: "message", from: f.from, message: f.message });
        this.countMessage(f.message.kind);
        return;
      }
      case "store": {
        const e = ev.effect;
        const result = e.type === "store.get" ? this.store.get(e.key) : this.store.cas(e.key, e.expected, e.value);
        if (e.type === "store.cas" && result.ok) this.timeline.push(`${this.now.toFixed(1)} host ${ev.host} CAS incarnation ${e.value.incarnation} (leader ${e.value.leader})`);
        this.queue.push(this.now + this.rng.range(STORE_DELAY.min, STORE_DELAY.max), { kind: "store-reply", host: ev.host, result });
        return;
      }
      case "store-reply": {
        const h = this.hosts[ev.host];
        if (h.alive) this.exec(h, ev.result);
        return;
      }
      case "crash":
        if (ev.plan === this.armed && this.planTimer !== null) {
          this.planTimer = null;
          this.firePending = true;
        }
        return;
      case "check":
        this.check();
        return;
    }
  }

  // ---- guests --------------------------------------------------------------------------------

  private scheduleStep(h: SimHost, rank: Rank, vm: ModelPrimary): void {
    if (this.now < this.trafficMs) this.queue.push(this.now + this.vmRng.range(0.5, 3), { kind: "step", host: h.id, rank, vm });
  }

  private step(hostId: HostId, rank: Rank, vm: ModelPrimary): void {
    const h = this.hosts[hostId];
    if (!h.alive || h.vms.get(rank) !== vm || this.now >= this.trafficMs) return;
    if (vm.running && h.node.isRunning(rank)) {
      const x = this.vmRng.next();
      if (x < this.sendRate) {
        let to = this.vmRng.int(0, this.config.size - 2);
        if (to >= rank) to++;
        if (h.node.canSend(rank, to)) {
          const id = `m${rank}.${++this.ids}`;
          vm.write(`sent:${id}`, to);
          this.checker.onSend(id, rank, to, vm.epoch);
          this.exec(h, { type: "vm.send", rank, to, payload: id });
        }
      } else if (x < this.sendRate + this.outputRate) {
        if (h.node.canOutput(rank)) {
          const k = (vm.get("outs") as number) + 1;
          const id = `o${rank}.${++this.ids}`;
          vm.write("outs", k);
          vm.write(`out:${k}`, id);
          this.checker.onOutput(id, rank, vm.epoch);
          this.exec(h, { type: "vm.output", rank, payload: id });
        }
      } else {
        vm.write("counter", (vm.get("counter") as number) + 1);
      }
    }
    this.scheduleStep(h, rank, vm);
  }

  // ---- effects -------------------------------------------------------------------------------

  /** Feeds `first` to the host's node and carries out the effects, including the VM answers they produce. */
  private exec(h: SimHost, first: Event): void {
    const answers: Event[] = [first];
    for (let ev = answers.shift(); ev; ev = answers.shift()) {
      for (const effect of h.node.handle(ev)) this.effect(h, effect, answers);
    }
  }

  private vm(h: SimHost, rank: Rank): ModelPrimary {
    const vm = h.vms.get(rank);
    assert(vm, `host ${h.id}: effect for member ${rank}, whose primary is not here`);
    return vm;
  }

  private backup(h: SimHost, rank: Rank): ModelBackup {
    const b = h.backups.get(rank);
    assert(b, `host ${h.id}: effect for member ${rank}, whose backup is not here`);
    return b;
  }

  private effect(h: SimHost, e: Effect, answers: Event[]): void {
    switch (e.type) {
      case "send": {
        const m = e.message;
        if (m.kind === "image") this.checker.onImage(m.rank, m.bytes);
        if (m.kind === "group") {
          const channel = `${m.from}>${m.to}`;
          if (m.seq <= (this.transmitted.get(channel) ?? 0)) this.resends++;
          else this.transmitted.set(channel, m.seq);
        }
        const flight = this.net.send(this.now, h.id, e.to, e.message);
        this.queue.push(flight.arrival, { kind: "net", flight });
        return;
      }
      case "vm.deliver":
        this.vm(h, e.rank).deliver(e.payload as string);
        return;
      case "vm.capture": {
        const { payload, bytes } = this.vm(h, e.rank).capture(e.epoch);
        answers.push({ type: "vm.captured", rank: e.rank, inc: e.inc, epoch: e.epoch, payload, bytes });
        return;
      }
      case "vm.commit":
        this.vm(h, e.rank).commit(e.epoch);
        return;
      case "vm.rollback":
        this.vm(h, e.rank).rollback(e.epoch);
        return;
      case "vm.image": {
        const { payload, bytes } = this.vm(h, e.rank).image(e.epoch);
        answers.push({ type: "vm.imaged", rank: e.rank, inc: e.inc, epoch: e.epoch, payload, bytes });
        return;
      }
      case "vm.pause":
        this.vm(h, e.rank).running = false;
        return;
      case "vm.resume":
        this.vm(h, e.rank).running = true;
        return;
      case "vm.stop":
        this.vm(h, e.rank).running = false;
        h.vms.delete(e.rank);
        return;
      case "release":
        this.checker.onRelease(e.rank, e.records);
        return;
      case "backup.stage":
        this.backup(h, e.rank).stage(e.epoch, e.payload as ModelDelta);
        return;
      case "backup.install":
        h.backups.set(e.rank, ModelBackup.install(e.epoch, e.payload as VmState));
        return;
      case "backup.fold":
        this.backup(h, e.rank).fold(e.through);
        return;
      case "backup.discard":
        this.backup(h, e.rank).discard(e.after);
        return;
      case "backup.promote": {
        const vm = this.backup(h, e.rank).promote(e.epoch);
        h.backups.delete(e.rank);
        assert(!h.vms.has(e.rank), "one primary per member per host");
        h.vms.set(e.rank, vm);
        this.scheduleStep(h, e.rank, vm);
        return;
      }
      case "backup.drop":
        h.backups.delete(e.rank);
        return;
      case "store.get":
      case "store.cas":
        this.queue.push(this.now + this.rng.range(STORE_DELAY.min, STORE_DELAY.max), { kind: "store", host: h.id, effect: e });
        return;
      case "notify":
        this.notice(h, e.notice);
        return;
    }
  }

  private notice(h: SimHost, n: Notice): void {
    switch (n.kind) {
      case "committed":
        this.commits++;
        this.checkCommit(n.inc, n.cut);
        if (this.planned()?.trigger.kind === "commit") {
          this.armedCommits++;
          this.maybeFire();
        }
        return;
      case "recovered":
        this.lastRecoveredCut = n.cut;
        this.recoveries.push({ inc: n.inc, cut: n.cut, committed: n.committed, promoted: n.promoted, rolledBack: n.rolledBack, images: n.images });
        this.timeline.push(`${this.now.toFixed(1)} recovered inc ${n.inc} at cut ${n.cut} (committed ${n.committed}) promoted [${n.promoted}] images [${n.images}]`);
        return;
      case "reprotected":
        this.checker.onReprotected(n.inc);
        this.timeline.push(`${this.now.toFixed(1)} reprotected inc ${n.inc} cut ${n.cut}`);
        this.maybeFire(n.inc);
        return;
      case "lost":
        this.lost = n.ranks;
        this.timeline.push(`${this.now.toFixed(1)} lost [${n.ranks}] in inc ${n.inc}`);
        this.done = true;
        return;
      case "recovering":
        this.recoveriesStarted++;
        this.timeline.push(`${this.now.toFixed(1)} host ${h.id} recovering inc ${n.inc} (failed [${n.failed}])`);
        return;
      case "fenced":
        this.checker.fail("sanity", `host ${h.id} fenced, but the simulator never suspects a live host`);
        return;
      case "suspected":
      case "degraded":
        return;
    }
  }

  /** Ground truth for a commit: every live backup holds the cut; the cut is consistent. */
  private checkCommit(inc: number, cut: number): void {
    const record = this.store.history.get(inc);
    assert(record, `commit in unknown incarnation ${inc}`);
    const checkpoints: (VmState | null)[] = [];
    const missing: Rank[] = [];
    record.placement.forEach((pl, rank) => {
      let cp: VmState | null = null;
      if (pl.backup !== null && this.hosts[pl.backup].alive) {
        cp = this.hosts[pl.backup].backups.get(rank)?.checkpointAt(cut) ?? null;
        if (!cp) missing.push(rank);
      }
      if (!cp && this.hosts[pl.primary].alive) cp = this.hosts[pl.primary].vms.get(rank)?.checkpoint(cut) ?? null;
      checkpoints.push(cp);
    });
    this.checker.onCommitted(cut, checkpoints, missing);
  }

  // ---- crashes -------------------------------------------------------------------------------

  private planned(): CrashPlan | undefined {
    return this.plans[this.armed];
  }

  private arm(index: number): void {
    this.armed = index;
    this.armedAt = this.now;
    this.armedInc = this.store.current.incarnation;
    this.armedCommits = 0;
    this.armedMessages = 0;
    this.planTimer = null;
    const plan = this.planned();
    if (plan?.trigger.kind === "time") {
      this.planTimer = this.now + plan.trigger.afterMs;
      this.queue.push(this.planTimer, { kind: "crash", plan: index });
    }
  }

  private countMessage(kind: GroupMessageKind): void {
    const plan = this.planned();
    if (plan?.trigger.kind === "message" && plan.trigger.message === kind) {
      this.armedMessages++;
      this.maybeFire();
    }
  }

  private maybeFire(reprotectedInc?: number): void {
    const plan = this.planned();
    if (!plan || this.done) return;
    const t = plan.trigger;
    if (t.kind === "commit" && this.armedCommits >= t.nth) this.firePending = true;
    else if (t.kind === "message" && this.armedMessages >= t.nth) this.firePending = true;
    else if (t.kind === "after-reprotect" && reprotectedInc !== undefined && reprotectedInc > this.armedInc && this.planTimer === null) {
      this.planTimer = this.now + t.delayMs;
      this.queue.push(this.planTimer, { kind: "crash", plan: this.armed });
    }
  }

  private fire(): void {
    const plan = this.planned();
    assert(plan, "a plan to fire");
    const alive = this.hosts.filter((h) => h.alive);
    if (alive.length - 1 < 2) {
      this.timeline.push(`${this.now.toFixed(1)} crash skipped: fewer than 2 hosts would remain`);
      this.armed = this.plans.length;
      return;
    }
    const victim = this.pickVictim(plan, alive);
    this.crash(victim);
    this.arm(this.armed + 1);
  }

  private pickVictim(plan: CrashPlan, alive: SimHost[]): SimHost {
    const leader = this.hosts[this.store.current.leader];
    const holds = (h: SimHost) => ({ p: h.vms.size, b: h.backups.size });
    let candidates: SimHost[] = [];
    switch (plan.target) {
      case "leader":
        candidates = leader.alive ? [leader] : [];
        break;
      case "backups-only":
        candidates = alive.filter((h) => holds(h).b > 0 && holds(h).p === 0);
        if (!candidates.length) candidates = alive.filter((h) => holds(h).b > 0);
        break;
      case "primaries":
        candidates = alive.filter((h) => holds(h).p > 0 && h !== leader);
        if (!candidates.length) candidates = alive.filter((h) => holds(h).p > 0);
        break;
      case "empty":
        candidates = alive.filter((h) => holds(h).p === 0 && holds(h).b === 0);
        break;
      case "any":
        break;
    }
    if (!candidates.length) candidates = alive;
    return candidates[plan.index % candidates.length];
  }

  private crash(h: SimHost): void {
    h.alive = false;
    this.crashed.push(h.id);
    const dropped = this.net.crash(h.id);
    const keptBoth = new Set<Rank>();
    for (let rank = 0; rank < this.config.size; rank++) {
      const p = this.hosts.find((x) => x.alive && x.vms.has(rank));
      const b = this.hosts.find((x) => x.alive && x.backups.has(rank));
      if (p && b && p !== b) keptBoth.add(rank);
    }
    this.checker.onCrash(keptBoth, this.store.current.incarnation);
    this.crashRecords.push({
      host: h.id,
      atMs: this.now,
      wasLeader: this.store.current.leader === h.id,
      primaries: [...h.vms.keys()].sort((a, b) => a - b),
      backups: [...h.backups.keys()].sort((a, b) => a - b),
      keptBoth: [...keptBoth],
      committed: this.checker.committed,
    });
    this.timeline.push(
      `${this.now.toFixed(1)} CRASH host ${h.id} (leader ${this.store.current.leader}, holds primaries [${[...h.vms.keys()]}] backups [${[...h.backups.keys()]}], ${dropped} in-flight messages lost, committed ${this.checker.committed})`,
    );
  }

  // ---- quiescence and the end ----------------------------------------------------------------

  private check(): void {
    if (this.armed < this.plans.length && this.now > this.trafficMs + PLAN_GRACE_MS) {
      this.timeline.push(`${this.now.toFixed(1)} crash plans ${this.armed}.. cancelled (never triggered)`);
      this.armed = this.plans.length;
    }
    if (this.armed >= this.plans.length && this.isQuiescent()) {
      this.quiescent = true;
      this.done = true;
      return;
    }
    this.queue.push(this.now + CHECK_MS, { kind: "check" });
  }

  private isQuiescent(): boolean {
    const record = this.store.current;
    const leaderHost = this.hosts[record.leader];
    if (!leaderHost.alive) return false;
    // A crash not yet handled (still being detected) is not quiescence.
    if (record.placement.some((p) => !this.hosts[p.primary].alive || (p.backup !== null && !this.hosts[p.backup].alive))) return false;
    const leader = leaderHost.node.status().leader;
    if (!leader || leader.phase !== "running" || leader.reprotecting !== null || leader.inc !== record.incarnation) return false;
    if (this.lastRecoveredCut !== null && this.checker.committed < this.lastRecoveredCut + 2) return false;
    for (const h of this.hosts) {
      if (!h.alive) continue;
      const s = h.node.status();
      if (s.inc !== record.incarnation) return false;
      for (const p of s.primaries) if (p.state !== "running" || p.logged || p.pending || p.unreleased) return false;
    }
    return record.placement.every((p) => p.backup !== null);
  }

  private finish(): void {
    const live = this.hosts.filter((h) => h.alive);
    if (this.lost) {
      const noCopy = this.lost.filter((rank) => !live.some((h) => h.vms.has(rank) || h.backups.has(rank)));
      if (!noCopy.length) this.checker.fail("sanity", `members [${this.lost}] reported lost, yet each has a copy on a live host`);
      if (this.crashed.length < 2) this.checker.fail("sanity", `members lost after ${this.crashed.length} crash(es)`);
      return;
    }
    if (!this.quiescent) {
      const status = live.map((h) => JSON.stringify(h.node.status()));
      this.checker.fail("liveness", `not quiescent at ${this.now.toFixed(1)} ms (committed ${this.checker.committed}); record ${JSON.stringify(this.store.current)}; ${status.join(" | ").slice(0, 3000)}`);
      // Still judge the histories: long after the traffic stopped, what is missing is lost.
    }
    const states: VmState[] = [];
    for (let rank = 0; rank < this.config.size; rank++) {
      const holders = live.filter((h) => h.vms.has(rank));
      if (holders.length !== 1) {
        this.checker.fail("sanity", `member ${rank} has ${holders.length} live primaries`);
        return;
      }
      states.push(holders[0].vms.get(rank)!.state);
    }
    this.checker.final(states);
  }
}

export function simulate(options: SimOptions): SimReport {
  return new Simulator(options).run();
}
