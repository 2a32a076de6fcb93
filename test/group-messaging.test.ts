/**
 * Group messaging inside the VM runtime, in process: N VmCores (bank,
 * allreduce, ring guests) wired by a test router that moves their outboxes to
 * the receivers with random delays, reorderings (across and within channels)
 * and duplicates, while members capture at different times (epochs skew),
 * cuts commit, sender logs are trimmed, and the group rolls back to a cut (in
 * place or by promoting backups) and re-sends from the sender logs.
 *
 * Checked on every schedule:
 *  (a) consistent cut: every delivery has sender epoch s <= receiver epoch r;
 *  (b) exactly once: every (from, to, seq) of the surviving history is
 *      delivered once, in seq order, with the bytes that were sent;
 *  (c) bank (bulk-synchronous rounds, an Allreduce per round): every logged
 *      line and every audit has total == size * 8000, recv == (size - 1) *
 *      round and dup == 0; rounds are contiguous per rank, each channel
 *      carries one transfer per round, a rank's balance moves by exactly its
 *      round's transfers, a round's balances sum to the total, and the ranks
 *      are at most one round apart (at every recovery cut and once quiet);
 *      after the schedule the rounds go on;
 *  (d) rollback + resend: (b) and (c) across rollbacks, stale messages of
 *      rolled-back epochs are never delivered;
 *  (e) allreduce sums are right for every logged round and rounds are
 *      contiguous; ring laps are contiguous; both keep making progress.
 * Mutation tests show the checks fail when the runtime breaks a rule.
 */
import { afterEach, describe, expect, it, vi } from "vitest";
import fc from "fast-check";
import { BackupImage } from "../src/checkpoint/backup-image.js";
import { decodeDelta, decodeImage, encodeImage, sealDelta, type DeltaParts } from "../src/checkpoint/format.js";
import { Channels } from "../src/core/channel.js";
import { checkCut, recoveryResends, trimVectors } from "./support/channels.js";
import { E_BAD_RANK, E_FULL, E_TOO_BIG } from "../src/vm/abi.js";
import { RESERVED_WASM_PAGES } from "../src/vm/layout.js";
import { DEFAULT_LIMITS, VmCore, type GroupMessage, type GuestModule, type VmLimits, type VmOptions } from "../src/vm/machine.js";
import { OUTPUT_LOG, OUTPUT_REPLY, unpackOutput } from "../src/vm/runtime-state.js";
import { VmWorker } from "../src/vm/vm.js";
import type { WorkerVmOptions } from "../src/vm/protocol.js";
import { builtBytes, guestOf, options, watBytes } from "./support/guests.js";

/** COHORT_PROPERTY_SCALE=10 runs every property ten times as often (soak). */
const SCALE = Math.max(1, Number(process.env.COHORT_PROPERTY_SCALE ?? 1));
/**
 * The schedule properties also assert coverage (each path seen at least once: rollbacks, queues
 * filled, ...). The schedules use a fixed seed in CI (COHORT_PROPERTY_SEED explores others); the
 * bank guest's own randomness still varies the counts, hence "at least once", not "at least N".
 */
const SEED = Number(process.env.COHORT_PROPERTY_SEED ?? 20261124);

const hex = (bytes: Uint8Array) => Buffer.from(bytes).toString("hex");
const key = (from: number, to: number, seq: number) => `${from}>${to}#${seq}`;

// ---------------------------------------------------------------------------
// The simulated group

/** What the schedules of one property exercised, summed over its runs: a property that never rolls back proves little. */
interface Coverage {
  runs: number;
  delivered: number;
  /** Received with s > r or out of channel order. */
  held: number;
  duplicate: number;
  stale: number;
  full: number;
  held_for_epoch: number;
  rollbacks: number;
  promotions: number;
  resends: number;
  commits: number;
}

const newCoverage = (): Coverage => ({ runs: 0, delivered: 0, held: 0, duplicate: 0, stale: 0, full: 0, held_for_epoch: 0, rollbacks: 0, promotions: 0, resends: 0, commits: 0 });
let coverage = newCoverage();

interface Delivery {
  from: number;
  to: number;
  seq: number;
  s: number;
  r: number;
  bytes: string;
}

interface Sent {
  from: number;
  to: number;
  seq: number;
  epoch: number;
  bytes: string;
}

interface Member {
  vm: VmCore;
  options: VmOptions;
  backup: BackupImage;
  /** Deltas the backup holds but has not folded (cut not committed yet). */
  staged: DeltaParts[];
  /** Released output, by output seq (a sink drops seqs it has). */
  released: Map<number, string>;
}

interface GroupConfig {
  size: number;
  /** How many epochs a member may run ahead of the slowest one. */
  skew: number;
  /** Resend after recovery (false: a broken recovery, for mutation tests). */
  resend: boolean;
  limits: Partial<VmLimits>;
  /** Seeds the group's own choices (quiesce, drain), so a failing schedule replays. */
  seed: number;
  /**
   * "group": messages go out at once, cuts are group-wide, the whole group rolls back.
   * "vm": each message is held until its sender's cut `epoch` commits; members commit
   * and roll back (to their own committed cut) alone, Remus-style.
   */
  mode: "group" | "vm";
}

class Group {
  readonly members: Member[] = [];
  /** The router: messages on their way, in no particular order. */
  inflight: GroupMessage[] = [];
  now = 0;
  incarnation = 0;
  committed = 0;
  /** Receiver -> deliveries of the surviving history, in delivery order. */
  deliveries: Delivery[][];
  /** Sends of the surviving history. */
  readonly sends = new Map<string, Sent>();
  /** Epoch -> rank -> CapturedDelta.delivered at that cut. */
  readonly capturedDelivered = new Map<number, number[][]>();
  readonly violations: string[] = [];
  rollbacks = 0;
  /** Re-sent at the last recovery (for the bank's conservation check). */
  lastResends: GroupMessage[] = [];
  /** vm mode: messages the host holds until their sender's cut commits. */
  held: GroupMessage[] = [];
  /** vm mode: rank -> its CapturedDelta.delivered at its committed cut. */
  committedDelivered: number[][];
  private rng: number;

  constructor(
    readonly guest: GuestModule,
    readonly config: GroupConfig,
  ) {
    this.rng = config.seed >>> 0 || 1;
    const n = config.size;
    this.deliveries = Array.from({ length: n }, () => []);
    this.committedDelivered = Array.from({ length: n }, () => new Array<number>(n).fill(0));
    for (let rank = 0; rank < n; rank++) {
      const opts: VmOptions = {
        ...options({ rank, size: n, now: () => this.now }),
        limits: { ...DEFAULT_LIMITS, ...config.limits },
        on_deliver: (message, r) => this.onDeliver(message, r),
      };
      const backup = BackupImage.blank(guest, opts, RESERVED_WASM_PAGES + guest.info.guest_initial_pages);
      // Members boot one by one: rank 0 may send before rank 1 exists; the router holds it.
      const member: Member = { vm: undefined as unknown as VmCore, options: opts, backup, staged: [], released: new Map() };
      this.members.push(member);
      member.vm = VmCore.boot(guest, opts);
      this.collect(rank);
    }
  }

  get size(): number {
    return this.config.size;
  }

  /** xorshift32: a non-negative integer. */
  random(): number {
    let x = this.rng;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.rng = x >>> 0;
    return this.rng;
  }

  vm(rank: number): VmCore {
    return this.members[rank].vm;
  }

  minEpoch(): number {
    return Math.min(...this.members.map((m) => m.vm.epoch));
  }

  private onDeliver(message: GroupMessage, r: number): void {
    if (message.epoch > r) this.violations.push(`consistent cut: ${key(message.from, message.to, message.seq)} sent in epoch ${message.epoch} delivered in epoch ${r}`);
    if (message.incarnation !== this.incarnation) this.violations.push(`incarnation: ${key(message.from, message.to, message.seq)} of incarnation ${message.incarnation} delivered in ${this.incarnation}`);
    this.deliveries[message.to].push({ from: message.from, to: message.to, seq: message.seq, s: message.epoch, r, bytes: hex(message.bytes) });
  }

  /** Takes a member's outbox into the router and the history. */
  collect(rank: number): void {
    for (const message of this.vm(rank).takeOutbox()) {
      expect(message.from).toBe(rank);
      expect(message.incarnation).toBe(this.incarnation);
      const k = key(message.from, message.to, message.seq);
      if (this.sends.has(k)) this.violations.push(`seq reused without a rollback: ${k}`);
      this.sends.set(k, { from: message.from, to: message.to, seq: message.seq, epoch: message.epoch, bytes: hex(message.bytes) });
      this.route(message);
    }
  }

  /** The host's choice: out at once, or (vm mode) held until the sender's cut `message.epoch` commits. */
  private route(message: GroupMessage): void {
    if (this.config.mode === "vm" && this.vm(message.from).committedEpoch < message.epoch) this.held.push(message);
    else this.inflight.push(message);
  }

  private releaseHeld(): void {
    const held = this.held;
    this.held = [];
    for (const message of held) this.route(message);
  }

  /** Moves message `pick` (any of them: reorders across and within channels) to its receiver. */
  deliver(pick: number): void {
    if (this.inflight.length === 0) return;
    const [message] = this.inflight.splice(pick % this.inflight.length, 1);
    const vm = this.vm(message.to);
    const result = vm.receive(message);
    if (result.status === "full" || result.status === "early") this.inflight.push(message);
    if (result.status === "held" && message.epoch > vm.epoch) coverage.held_for_epoch++;
    if (result.status !== "delivered" && result.status !== "early") coverage[result.status]++;
    coverage.delivered += result.delivered;
    this.collect(message.to);
  }

  duplicate(pick: number): void {
    if (this.inflight.length === 0) return;
    this.inflight.push({ ...this.inflight[pick % this.inflight.length] });
  }

  tick(rank: number, ms = 5): void {
    this.now += ms;
    this.vm(rank).fireDueTimers(this.now);
    this.collect(rank);
  }

  /** Member `rank` ends its epoch (if the skew allows), the delta goes to its backup, held messages become deliverable. */
  capture(rank: number): boolean {
    const member = this.members[rank];
    if (member.vm.epoch > this.minEpoch() + this.config.skew) return false;
    const captured = member.vm.capture();
    sealDelta(captured.delta);
    member.staged.push(decodeDelta(captured.delta));
    let row = this.capturedDelivered.get(captured.epoch);
    if (!row) this.capturedDelivered.set(captured.epoch, (row = []));
    row[rank] = captured.delivered;
    this.collect(rank);
    return true;
  }

  captureAll(): void {
    const target = Math.max(...this.members.map((m) => m.vm.epoch));
    // Slowest first, so the skew bound never stops a capture.
    while (this.minEpoch() <= target) {
      const rank = this.members.findIndex((m) => m.vm.epoch === this.minEpoch());
      expect(this.capture(rank)).toBe(true);
    }
  }

  /** Commits a complete cut above the committed one (the newest without `pick`): release output, fold backups, trim sender logs. */
  commit(pick?: number): void {
    if (this.config.mode === "vm") {
      if (pick === undefined) for (let rank = 0; rank < this.size; rank++) this.commitOne(rank);
      else this.commitOne(pick % this.size);
      return;
    }
    const newest = this.minEpoch() - 1;
    if (newest <= this.committed) return;
    const cut = pick === undefined ? newest : this.committed + 1 + (pick % (newest - this.committed));
    for (const member of this.members) {
      this.release(member, member.vm.commit(cut));
      this.fold(member, cut);
    }
    const delivered = this.capturedDelivered.get(cut)!;
    const trims = trimVectors(delivered);
    this.members.forEach((m, s) => m.vm.trimSenderLog(trims[s]));
    coverage.commits++;
    for (const epoch of this.capturedDelivered.keys()) if (epoch < cut) this.capturedDelivered.delete(epoch);
    this.committed = cut;
  }

  /** vm mode: one member commits its newest captured epoch; every sender trims by the receivers' committed cuts. */
  private commitOne(rank: number): void {
    const member = this.members[rank];
    const cut = member.vm.epoch - 1;
    if (cut <= member.vm.committedEpoch) return;
    this.release(member, member.vm.commit(cut));
    this.fold(member, cut);
    this.committedDelivered[rank] = this.capturedDelivered.get(cut)![rank];
    const trims = trimVectors(this.committedDelivered);
    this.members.forEach((m, s) => m.vm.trimSenderLog(trims[s]));
    coverage.commits++;
    this.releaseHeld();
  }

  /**
   * vm mode: one member fails alone and goes back to its own committed cut
   * (in place or by promotion). Its held, uncommitted messages are dropped by
   * the host; the others did not roll back, so no incarnation change: its
   * peers re-send what its restored state has not delivered.
   */
  private rollbackOne(rank: number, promote: boolean): boolean {
    const member = this.members[rank];
    const cut = member.vm.committedEpoch;
    if (cut < 1) return false;
    this.rollbacks++;
    coverage.rollbacks++;
    this.fold(member, cut);
    member.staged = [];
    if (promote) {
      this.promoteAt(member, cut);
    } else {
      member.vm.rollback(cut);
    }
    expect(member.vm.epoch).toBe(cut + 1);
    this.held = this.held.filter((m) => m.from !== rank);
    for (const [k, sent] of this.sends) if (sent.from === rank && sent.epoch > cut) this.sends.delete(k);
    this.deliveries[rank] = this.deliveries[rank].filter((d) => d.r <= cut);
    const problems = checkCut(
      this.members.map((m) => m.vm.sentVector()),
      this.members.map((m) => m.vm.deliveredVector()),
    );
    expect(problems, `states consistent after rank ${rank} went back to ${cut}: ${problems.join("; ")}`).toEqual([]);
    const delivered = member.vm.deliveredVector();
    for (let s = 0; s < this.size; s++) {
      for (const message of this.vm(s).resendFor(rank, delivered[s])) {
        expect(hex(message.bytes)).toBe(this.sends.get(key(message.from, message.to, message.seq))?.bytes);
        coverage.resends++;
        this.route(message);
      }
    }
    return true;
  }

  private release(member: Member, records: { seq: number; kind: number; bytes: Uint8Array }[]): void {
    for (const r of records) {
      const text = `${r.kind === OUTPUT_LOG ? "log" : "reply"}:${Buffer.from(r.bytes).toString()}`;
      const had = member.released.get(r.seq);
      if (had !== undefined && had !== text) this.violations.push(`output seq ${r.seq} released twice with different content`);
      member.released.set(r.seq, text);
    }
  }

  /** The backup, folded to `cut`, becomes the primary; re-protection: a new backup from a full image of it. */
  private promoteAt(member: Member, cut: number): void {
    expect(member.backup.epoch).toBe(cut);
    member.vm = member.backup.promote();
    coverage.promotions++;
    member.backup = BackupImage.fromImage(this.guest, member.options, decodeImage(encodeImage(member.vm.image())));
  }

  private fold(member: Member, cut: number): void {
    while (member.staged.length && member.staged[0].epoch <= cut) member.backup.apply(member.staged.shift()!);
  }

  /**
   * Failure handling: every member goes back to cut `pick` (a complete cut at
   * or above the committed one): those in `promote` by promoting their backup,
   * the others in place. Then the new incarnation, the delivered vectors, and
   * the re-sends. In-flight messages stay in the router: they are stale now.
   */
  rollback(pick: number, promote: number): boolean {
    if (this.config.mode === "vm") return this.rollbackOne(pick % this.size, (promote & 1) === 1);
    const low = Math.max(this.committed, 1);
    const high = this.minEpoch() - 1;
    if (high < low) return false;
    const cut = low + (pick % (high - low + 1));
    this.rollbacks++;
    coverage.rollbacks++;
    this.incarnation++;
    this.members.forEach((member, rank) => {
      if ((promote >> rank) & 1) {
        this.fold(member, cut);
        member.staged = [];
        this.promoteAt(member, cut);
      } else {
        member.vm.rollback(cut);
        this.fold(member, cut);
        member.staged = [];
      }
      expect(member.vm.epoch).toBe(cut + 1);
      member.vm.setIncarnation(this.incarnation);
      this.release(member, member.vm.commit(cut));
      expect(member.vm.pendingMessages).toBe(0);
      expect(member.vm.takeOutbox()).toEqual([]);
    });
    this.committed = cut;
    for (const epoch of this.capturedDelivered.keys()) if (epoch > cut) this.capturedDelivered.delete(epoch);
    // The history after the cut is gone: sends of later epochs, deliveries in later epochs.
    for (const [k, sent] of this.sends) if (sent.epoch > cut) this.sends.delete(k);
    this.deliveries = this.deliveries.map((list) => list.filter((d) => d.r <= cut));
    // The restored vectors agree with the surviving history.
    const sentVectors = this.members.map((m) => m.vm.sentVector());
    const deliveredVectors = this.members.map((m) => m.vm.deliveredVector());
    const problems = checkCut(sentVectors, deliveredVectors);
    expect(problems, `recovery cut ${cut} is consistent: ${problems.join("; ")}`).toEqual([]);
    for (let r = 0; r < this.size; r++) {
      for (let s = 0; s < this.size; s++) {
        const last = this.deliveries[r].filter((d) => d.from === s).reduce((m, d) => Math.max(m, d.seq), 0);
        expect(deliveredVectors[r][s], `delivered[${r}][${s}] after rollback to ${cut}`).toBe(last);
        const sentLast = [...this.sends.values()].filter((x) => x.from === s && x.to === r).reduce((m, x) => Math.max(m, x.seq), 0);
        expect(sentVectors[s][r], `sent[${s}][${r}] after rollback to ${cut}`).toBe(sentLast);
      }
    }
    // Recovery: each sender re-sends what its receivers' restored states lack.
    const resends = this.config.resend ? recoveryResends(this.members.map((m) => m.vm)) : [];
    for (const message of resends) {
      expect(message.incarnation).toBe(this.incarnation);
      const sent = this.sends.get(key(message.from, message.to, message.seq));
      expect(sent, `re-sent ${key(message.from, message.to, message.seq)} is in the history`).toBeDefined();
      expect(hex(message.bytes)).toBe(sent!.bytes);
      expect(message.epoch).toBe(sent!.epoch);
      this.inflight.push(message);
    }
    this.lastResends = resends;
    coverage.resends += resends.length;
    return true;
  }

  /** Delivers everything and captures until nothing is in flight or held. Timers do not fire: the bank goes quiet. */
  quiesce(): void {
    // Held messages become deliverable within skew + 1 captures; a gap that never fills is a lost message.
    for (let round = 0; round < 50; round++) {
      // A refused ("full") message goes back to the router: bounded attempts, then a capture makes room.
      for (let n = 3 * this.inflight.length + 10; n > 0 && this.inflight.length; n--) this.deliver(this.random());
      if (this.inflight.length === 0 && this.held.length === 0 && this.members.every((m) => m.vm.pendingMessages === 0)) return;
      this.captureAll();
      this.commit();
    }
    throw new Error("group does not quiesce");
  }

  /** Releases everything: capture all, commit the newest cut. */
  flush(): void {
    this.captureAll();
    this.commit();
  }

  /** (a) and (b): nothing delivered twice or out of order, nothing delivered that was not sent like that. */
  checkHistory(complete: boolean): void {
    expect(this.violations, this.violations.slice(0, 3).join("; ")).toEqual([]);
    const seen = new Set<string>();
    for (let r = 0; r < this.size; r++) {
      const next = new Array<number>(this.size).fill(1);
      for (const d of this.deliveries[r]) {
        const k = key(d.from, d.to, d.seq);
        expect(seen.has(k), `${k} delivered twice`).toBe(false);
        seen.add(k);
        expect(d.seq, `${k} delivered in channel order`).toBe(next[d.from]++);
        expect(d.s).toBeLessThanOrEqual(d.r);
        const sent = this.sends.get(k);
        expect(sent, `${k} was sent (in the surviving history)`).toBeDefined();
        expect(d.bytes, `${k} delivered with the bytes sent`).toBe(sent!.bytes);
        expect(d.s).toBe(sent!.epoch);
      }
    }
    if (complete) for (const k of this.sends.keys()) expect(seen.has(k), `${k} delivered`).toBe(true);
  }

  /** Released log lines of a member, in output order. */
  logLines(rank: number): string[] {
    const member = this.members[rank];
    return [...member.released.entries()]
      .sort((a, b) => a[0] - b[0])
      .map(([, text]) => text)
      .filter((t) => t.startsWith("log:"))
      .map((t) => t.slice(4));
  }

  /** A client request, answered from the reply left in the VM's pending output. */
  ask(rank: number, text: string): string {
    const vm = this.vm(rank);
    vm.request(1, 1, Buffer.from(text));
    const last = vm.pendingOutput().at(-1)!;
    expect(last.kind).toBe(OUTPUT_REPLY);
    this.collect(rank);
    return Buffer.from(last.bytes).toString();
  }
}

// ---------------------------------------------------------------------------
// Schedules

type Command =
  | { t: "deliver"; pick: number }
  | { t: "tick"; rank: number }
  | { t: "capture"; rank: number }
  | { t: "commit"; pick: number }
  | { t: "dup"; pick: number }
  | { t: "rollback"; pick: number; promote: number };

function commands(opts: { ticks: boolean; rollbacks: boolean; maxLength: number; minLength?: number }): fc.Arbitrary<Command[]> {
  const weighted: { weight: number; arbitrary: fc.Arbitrary<Command> }[] = [
    { weight: 12, arbitrary: fc.nat().map((pick) => ({ t: "deliver" as const, pick })) },
    { weight: 4, arbitrary: fc.nat(63).map((rank) => ({ t: "capture" as const, rank })) },
    { weight: 1, arbitrary: fc.nat().map((pick) => ({ t: "commit" as const, pick })) },
    { weight: 1, arbitrary: fc.nat().map((pick) => ({ t: "dup" as const, pick })) },
  ];
  if (opts.ticks) weighted.push({ weight: 4, arbitrary: fc.nat(63).map((rank) => ({ t: "tick" as const, rank })) });
  if (opts.rollbacks) weighted.push({ weight: 1, arbitrary: fc.record({ t: fc.constant("rollback" as const), pick: fc.nat(), promote: fc.nat() }) });
  // size "max": lengths spread over [1, maxLength] (the default would keep schedules around ten steps).
  return fc.array(fc.oneof(...weighted), { minLength: opts.minLength ?? 1, maxLength: opts.maxLength, size: "max" });
}

function run(group: Group, list: Command[], onRollback?: () => void): void {
  for (const c of list) {
    switch (c.t) {
      case "deliver":
        group.deliver(c.pick);
        break;
      case "tick":
        group.tick(c.rank % group.size);
        break;
      case "capture":
        group.capture(c.rank % group.size);
        break;
      case "commit":
        group.commit(c.pick);
        break;
      case "dup":
        group.duplicate(c.pick);
        break;
      case "rollback":
        if (group.rollback(c.pick, c.promote)) onRollback?.();
        break;
    }
  }
}

const guests = new Map<string, GuestModule>();
async function built(name: string): Promise<GuestModule> {
  let guest = guests.get(name);
  if (!guest) guests.set(name, (guest = await guestOf(builtBytes(name))));
  return guest;
}

// The bank guest (examples/bank): bulk-synchronous rounds. Round k: every rank sends one transfer
// (first byte 0xB4) to every other rank, credits the size - 1 it receives, then an SDK Allreduce
// (messages starting 0xC7) sums the balances; when it completes the rank logs
// "bank round=k rank=r balance=b recv=n dup=d total=t". Exactly once means, on every line:
// t == size * 8000, n == (size - 1) * k, d == 0; and per round the balances sum to the total.
const BANK_TOTAL_PER_RANK = 8 * 1000;
const BANK_ACCOUNTS = 8;
const BANK_MAX_AMOUNT = 100;
const BANK_TRANSFER = 0xb4;
const BANK_TRANSFER_BYTES = 20;
const COLLECTIVES_MAGIC = 0xc7;
const BANK_LINE = /^bank round=(\d+) rank=(\d+) balance=(-?\d+) recv=(\d+) dup=(\d+) total=(-?\d+)$/;

interface BankLine {
  text: string;
  round: number;
  balance: number;
}

/** One bank line (an audit reply, or a log line without its newline), checked against the exactly-once invariants. */
function bankLine(group: Group, rank: number, text: string, what: string): BankLine {
  const m = BANK_LINE.exec(text);
  expect(m, `${what}: a bank line: ${JSON.stringify(text)}`).not.toBeNull();
  const [round, r, balance, recv, dup, total] = m!.slice(1).map(Number);
  expect(r, `${what}: rank`).toBe(rank);
  expect(total, `${what}: bank total (${text})`).toBe(group.size * BANK_TOTAL_PER_RANK);
  if (round > 0) {
    expect(recv, `${what}: bank recv == (size - 1) * round (${text})`).toBe((group.size - 1) * round);
  } else {
    // Before round 1 completes the guest's audit reports the initial balance but the live recv
    // count: the round-1 transfers credited so far, at most one per sender.
    expect(balance, `${what}: bank initial balance`).toBe(BANK_TOTAL_PER_RANK);
    expect(recv, `${what}: bank recv <= size - 1 before round 1 completes (${text})`).toBeLessThanOrEqual(group.size - 1);
  }
  expect(dup, `${what}: bank dup (${text})`).toBe(0);
  return { text, round, balance };
}

/** Every rank's "audit" reply: the line of the last round it completed (round 0 before the first). */
function audit(group: Group): BankLine[] {
  return group.members.map((_, rank) => bankLine(group, rank, group.ask(rank, "audit"), `rank ${rank} audit`));
}

/** Every rank's released log lines: rounds 1, 2, 3, ... with no gap or repeat. */
function bankLog(group: Group): BankLine[][] {
  return group.members.map((_, rank) =>
    group.logLines(rank).map((text, i) => {
      expect(text.endsWith("\n"), `rank ${rank} log line ${i + 1} ends with a newline`).toBe(true);
      const line = bankLine(group, rank, text.slice(0, -1), `rank ${rank} log line ${i + 1}`);
      expect(line.round, `rank ${rank}: bank rounds contiguous`).toBe(i + 1);
      return line;
    }),
  );
}

interface Transfer {
  from: number;
  to: number;
  seq: number;
  round: number;
  amount: number;
}

/** The bank's transfers among the sends of the surviving history (the Allreduce's messages skipped), each well formed. */
function transfers(group: Group): Transfer[] {
  const list: Transfer[] = [];
  for (const sent of group.sends.values()) {
    const bytes = Buffer.from(sent.bytes, "hex");
    const k = key(sent.from, sent.to, sent.seq);
    if (bytes[0] !== BANK_TRANSFER) {
      expect(bytes[0], `${k}: a transfer or a collectives message`).toBe(COLLECTIVES_MAGIC);
      continue;
    }
    expect(bytes.length, `${k}: transfer length`).toBe(BANK_TRANSFER_BYTES);
    expect(bytes.readInt32LE(8), `${k}: transfer from_rank`).toBe(sent.from);
    const account = bytes.readInt32LE(12);
    const amount = bytes.readInt32LE(16);
    expect(account >= 0 && account < BANK_ACCOUNTS, `${k}: transfer account ${account}`).toBe(true);
    expect(amount >= 0 && amount <= BANK_MAX_AMOUNT, `${k}: transfer amount ${amount}`).toBe(true);
    list.push({ from: sent.from, to: sent.to, seq: sent.seq, round: bytes.readUInt32LE(4), amount });
  }
  return list.sort((a, b) => a.seq - b.seq);
}

/**
 * (c) on the released log and the surviving history: every line holds the exactly-once
 * invariants, rounds are contiguous per rank; every channel carries one transfer per round, in
 * round order; a rank's balance at round k is its balance at round k - 1 minus the round-k
 * transfers it sent plus those it received; the balances of a round every rank logged sum to
 * the total. Returns the log and the number of rounds every rank logged.
 */
function checkBankLog(group: Group): { log: BankLine[][]; completed: number } {
  const n = group.size;
  const log = bankLog(group);
  const next = new Map<string, number>();
  /** `${rank}@${round}` -> the round's transfers: sent, received, net amount. */
  const moved = new Map<string, { out: number; in: number; net: number }>();
  const at = (rank: number, round: number) => {
    let m = moved.get(`${rank}@${round}`);
    if (!m) moved.set(`${rank}@${round}`, (m = { out: 0, in: 0, net: 0 }));
    return m;
  };
  for (const t of transfers(group)) {
    const channel = `${t.from}>${t.to}`;
    const round = next.get(channel) ?? 1;
    expect(t.round, `${key(t.from, t.to, t.seq)}: transfer rounds contiguous on the channel`).toBe(round);
    next.set(channel, round + 1);
    const out = at(t.from, t.round);
    out.out++;
    out.net -= t.amount;
    const inn = at(t.to, t.round);
    inn.in++;
    inn.net += t.amount;
  }
  log.forEach((lines, rank) => {
    let balance = BANK_TOTAL_PER_RANK;
    for (const line of lines) {
      // A logged round's transfers were all sent and credited before the line, so they are in the history.
      const m = at(rank, line.round);
      expect([m.out, m.in], `rank ${rank} round ${line.round}: bank transfers sent and received`).toEqual([n - 1, n - 1]);
      balance += m.net;
      expect(line.balance, `rank ${rank} round ${line.round}: bank balance moved by the transfers`).toBe(balance);
    }
  });
  const completed = Math.min(...log.map((lines) => lines.length));
  for (let round = 1; round <= completed; round++) {
    const sum = log.reduce((s, lines) => s + lines[round - 1].balance, 0);
    expect(sum, `bank round ${round}: balances of all ranks sum to the total`).toBe(n * BANK_TOTAL_PER_RANK);
  }
  return { log, completed };
}

/** Audits every rank against its released log; the ranks are at most one round apart (the Allreduce's root completes first). */
function checkBankAudit(group: Group, log: BankLine[][], what: string): BankLine[] {
  const audits = audit(group);
  audits.forEach((a, rank) => {
    const lines = log[rank];
    expect(a.round, `rank ${rank} audit: not behind its released log`).toBeGreaterThanOrEqual(lines.length);
    if (a.round > 0 && a.round === lines.length) expect(a.text, `rank ${rank} audit: its last logged line`).toBe(lines.at(-1)!.text);
  });
  const rounds = audits.map((a) => a.round);
  expect(Math.max(...rounds) - Math.min(...rounds), `bank rounds ${what}: ${rounds.join(" ")}`).toBeLessThanOrEqual(1);
  if (rounds.every((r) => r === rounds[0])) {
    expect(
      audits.reduce((s, a) => s + a.balance, 0),
      `money ${what}`,
    ).toBe(group.size * BANK_TOTAL_PER_RANK);
  }
  return audits;
}

/** (c) at a recovery cut (group mode: the whole group is back at one consistent cut). */
function checkBankAtCut(group: Group): void {
  checkBankAudit(group, checkBankLog(group).log, "at the recovery cut");
}

/** Runs the bank on: timers fire (next rounds, queued sends), everything in flight is delivered, cuts commit. */
function runBank(group: Group, steps: number): void {
  for (let i = 0; i < steps; i++) {
    for (let rank = 0; rank < group.size; rank++) group.tick(rank, 2);
    for (let n = 4 * group.inflight.length + 10; n > 0 && group.inflight.length; n--) group.deliver(group.random());
    group.captureAll();
    group.commit();
  }
}

/** (c) once quiet (timers did not fire), then liveness: with timers, every rank completes more rounds. */
function checkBankQuiet(group: Group): void {
  const before = checkBankAudit(group, checkBankLog(group).log, "once quiet");
  const lowest = Math.min(...before.map((a) => a.round));
  runBank(group, 8);
  group.checkHistory(false);
  const after = checkBankAudit(group, checkBankLog(group).log, "after running on");
  expect(Math.min(...after.map((a) => a.round)), "bank progress after the schedule").toBeGreaterThan(lowest);
}

const CONFIG: GroupConfig = { size: 4, skew: 2, resend: true, limits: {}, seed: 1, mode: "group" };

async function bankProperty(config: Partial<GroupConfig>, runs: number, opts: { rollbacks: boolean; maxLength?: number } = { rollbacks: true }): Promise<Coverage> {
  const guest = await built("bank");
  coverage = newCoverage();
  await fc.assert(
    fc.property(fc.integer({ min: 2, max: 6 }), fc.nat(), commands({ ticks: true, rollbacks: opts.rollbacks, maxLength: opts.maxLength ?? 400 }), (size, seed, list) => {
      coverage.runs++;
      const group = new Group(guest, { ...CONFIG, size, seed, ...config });
      // A vm-mode rollback of one member is not a group cut: conservation is checked once quiet.
      run(group, list, () => group.config.mode === "group" && checkBankAtCut(group));
      group.checkHistory(false);
      group.quiesce();
      group.checkHistory(true);
      checkBankQuiet(group);
    }),
    { numRuns: runs * SCALE, endOnFailure: true, seed: SEED },
  );
  return coverage;
}

function checkAllreduce(group: Group): number {
  const n = group.size;
  let completed = Infinity;
  for (let rank = 0; rank < n; rank++) {
    const lines = group.logLines(rank);
    lines.forEach((line, i) => {
      const k = i + 1;
      expect(line, `rank ${rank} line ${k}`).toBe(`round ${k} sum ${(k * n * (n + 1)) / 2}\n`);
    });
    completed = Math.min(completed, lines.length);
  }
  return completed;
}

function checkRing(group: Group): number {
  const n = group.size;
  const lines = group.logLines(0);
  lines.forEach((line, i) => expect(line, `lap ${i + 1}`).toBe(`lap ${i + 1} token ${(i + 1) * n}\n`));
  for (let rank = 1; rank < n; rank++) expect(group.logLines(rank)).toEqual([]);
  return lines.length;
}

/** Phases: contiguous on every rank, and every rank logged the same value for the same phase. */
function checkPhases(group: Group): number {
  const values = new Map<number, string>();
  let completed = Infinity;
  for (let rank = 0; rank < group.size; rank++) {
    const lines = group.logLines(rank);
    lines.forEach((line, i) => {
      const m = /^phase (\d+) value (\d+)\n$/.exec(line);
      expect(m, `rank ${rank}: ${line}`).not.toBeNull();
      expect(Number(m![1]), `rank ${rank} phases contiguous`).toBe(i + 1);
      const had = values.get(i + 1);
      if (had === undefined) values.set(i + 1, m![2]);
      else expect(m![2], `phase ${i + 1}: same value on every rank`).toBe(had);
    });
    completed = Math.min(completed, lines.length);
  }
  return completed;
}

/** Perpetual guests never go quiet: deliver for a while (capturing and committing) and check they advanced. */
function drain(group: Group, steps: number): void {
  for (let i = 0; i < steps; i++) {
    if (i % 5 === 0) group.tick(i % group.size, 1); // a group of one runs its allreduce rounds from a timer
    if (group.inflight.length) group.deliver(group.random());
    if (i % 7 === 6 || group.inflight.length === 0) {
      group.captureAll();
      group.commit();
    }
  }
  group.flush();
}

async function perpetualProperty(name: "allreduce" | "ring" | "phases", check: (g: Group) => number, runs: number, config: Partial<GroupConfig> = {}): Promise<Coverage> {
  const guest = await built(name);
  coverage = newCoverage();
  await fc.assert(
    fc.property(fc.integer({ min: 1, max: 7 }), fc.nat(), commands({ ticks: true, rollbacks: true, maxLength: 120 }), (size, seed, list) => {
      coverage.runs++;
      const group = new Group(guest, { ...CONFIG, size, seed, ...config });
      run(group, list);
      group.flush();
      group.checkHistory(false);
      const before = check(group);
      drain(group, 40 * size);
      group.checkHistory(false);
      const after = check(group);
      // Liveness: a lost or stuck message would stop the rounds / the token.
      expect(after, "progress after the schedule").toBeGreaterThan(before);
    }),
    { numRuns: runs * SCALE, endOnFailure: true, seed: SEED },
  );
  return coverage;
}

// ---------------------------------------------------------------------------

describe("group messaging: VmCore unit behaviour", () => {
  // Rank 0 sends what it is told; every rank records what it got (as log output).
  const ECHO = watBytes(`(module
    (import "cohort" "send" (func $send (param i32 i32 i32) (result i32)))
    (import "cohort" "log" (func $log (param i32 i32) (result i32)))
    (memory 2)
    (func (export "cohort_inbox") (param i32) (result i32) (i32.const 1024))
    (func (export "message") (param $from i32) (param $ptr i32) (param $len i32)
      (drop (call $log (local.get $ptr) (local.get $len))))
    (func (export "send") (param $to i32) (param $byte i32) (param $len i32) (result i32)
      (i32.store8 (i32.const 64) (local.get $byte))
      (call $send (local.get $to) (i32.const 64) (local.get $len))))`);

  const pair = async (limits: Partial<VmLimits> = {}) => {
    const guest = await guestOf(ECHO);
    const mk = (rank: number) => VmCore.boot(guest, { ...options({ rank, size: 2 }), limits: { ...DEFAULT_LIMITS, ...limits } });
    return [mk(0), mk(1)] as const;
  };
  const logged = (vm: VmCore) => vm.pendingOutput().map((r) => Buffer.from(r.bytes)[0]);

  it("send stamps incarnation, sender epoch and a dense per-destination seq, logs it and bounds the log", async () => {
    const [a] = await pair({ sender_log_bytes_max: 3 * (32 + 1) });
    a.setIncarnation(4);
    expect(a.invoke("send", [1, 10, 1])).toBe(0);
    expect(a.invoke("send", [0, 11, 1])).toBe(0);
    a.capture();
    expect(a.invoke("send", [1, 12, 1])).toBe(0);
    expect(a.invoke("send", [1, 13, 1])).toBe(E_FULL);
    expect(a.invoke("send", [2, 13, 1])).toBe(E_BAD_RANK);
    expect(a.invoke("send", [1, 13, 64 * 1024 + 1])).toBe(E_TOO_BIG);
    const out = a.takeOutbox();
    expect(out.map(({ from, to, incarnation, epoch, seq }) => [from, to, incarnation, epoch, seq])).toEqual([
      [0, 1, 4, 1, 1],
      [0, 0, 4, 1, 1],
      [0, 1, 4, 2, 2],
    ]);
    expect(a.takeOutbox()).toEqual([]);
    expect(a.senderLogBytes).toBe(3 * 33);
    expect(a.sentVector()).toEqual([1, 2]);
    // Trimming frees room; the log keeps what receivers have not delivered at a committed cut.
    expect(a.trimSenderLog([0, 1])).toEqual({ trimmed: 1, sender_log_bytes: 2 * 33 });
    expect(a.resendFor(1, 1).map((m) => m.seq)).toEqual([2]);
    expect(a.invoke("send", [1, 13, 1])).toBe(0);
    expect(() => a.trimSenderLog([0, 9])).toThrow(/sent only 3/);
    expect(() => a.resendFor(1, 0)).toThrow(/trimmed to 1/);
    expect(() => a.resendFor(1, 4)).toThrow(/not one consistent cut/);
  });

  it("outputWaiting: log output, a reply (which stays known until its epoch commits), nothing once released", async () => {
    const [a] = await pair();
    const bytes = new Uint8Array([1]);
    expect(a.outputWaiting()).toBeNull();
    a.log(bytes);
    expect(a.outputWaiting()).toBe("log");
    a.reply(1, 1, bytes);
    expect(a.outputWaiting()).toBe("reply");
    a.capture(); // epoch 1 captured, the VM runs epoch 2
    a.log(bytes);
    expect(a.outputWaiting()).toBe("reply"); // epoch 1's reply is not released yet
    a.commit(1);
    expect(a.outputWaiting()).toBe("log");
    a.capture();
    a.commit(2);
    expect(a.outputWaiting()).toBeNull();
  });

  it("outbox_max bounds what the host has not taken", async () => {
    const [a] = await pair({ outbox_max: 2 });
    expect(a.invoke("send", [1, 1, 1])).toBe(0);
    expect(a.invoke("send", [1, 2, 1])).toBe(0);
    expect(a.invoke("send", [1, 3, 1])).toBe(E_FULL);
    a.takeOutbox();
    expect(a.invoke("send", [1, 3, 1])).toBe(0);
  });

  it("receive: channel order, duplicates, stale and early incarnations, s > r held until the capture that reaches s", async () => {
    const [a, b] = await pair();
    for (let i = 1; i <= 4; i++) a.invoke("send", [1, i, 1]);
    a.capture();
    a.capture();
    a.invoke("send", [1, 5, 1]); // sent in epoch 3
    const [m1, m2, m3, m4, m5] = a.takeOutbox();
    expect(b.receive(m3)).toEqual({ status: "held", delivered: 0 });
    expect(b.receive(m3)).toEqual({ status: "duplicate", delivered: 0 });
    expect(b.receive(m5)).toEqual({ status: "held", delivered: 0 });
    expect(b.receive(m2)).toEqual({ status: "held", delivered: 0 });
    expect(b.receive(m1)).toEqual({ status: "delivered", delivered: 3 });
    expect(b.receive(m1)).toEqual({ status: "duplicate", delivered: 0 });
    expect(logged(b)).toEqual([1, 2, 3]);
    expect(b.receive(m4)).toEqual({ status: "delivered", delivered: 1 });
    expect(b.pendingMessages).toBe(1); // m5: s = 3 > r = 1
    expect(b.capture().delivered_after).toBe(0); // r = 2
    const captured = b.capture(); // r = 3
    expect(captured.delivered).toEqual([4, 0]); // at the cut, before the held message
    expect(captured.delivered_after).toBe(1);
    expect(logged(b)).toEqual([1, 2, 3, 4, 5]);
    expect(b.deliveredVector()).toEqual([5, 0]);
    // Incarnations.
    b.setIncarnation(2);
    expect(b.receive({ ...m5, seq: 6 })).toEqual({ status: "stale", delivered: 0 });
    expect(b.receive({ ...m5, seq: 6, incarnation: 3 })).toEqual({ status: "early", delivered: 0 });
    expect(b.receive({ ...m5, seq: 6, incarnation: 2 }).status).toBe("delivered");
    // Malformed messages are the host's bug: an error, and the VM carries on.
    expect(() => b.receive({ ...m5, to: 0 })).toThrow(/offered to rank 1/);
    expect(() => b.receive({ ...m5, from: 7 })).toThrow(/no such rank/);
    expect(() => b.receive({ ...m5, seq: 0 })).toThrow(/bad stamp/);
    expect(b.crashed).toBeNull();
  });

  it("the pending queue is bounded: full messages are refused, not lost", async () => {
    const [a, b] = await pair({ pending_messages_max: 2 });
    for (let i = 1; i <= 4; i++) a.invoke("send", [1, i, 1]);
    const [m1, m2, m3, m4] = a.takeOutbox();
    expect(b.receive(m4).status).toBe("held");
    expect(b.receive(m3).status).toBe("held");
    expect(b.receive(m2).status).toBe("full");
    expect(b.receive(m1)).toEqual({ status: "delivered", delivered: 1 });
    expect(b.receive(m2)).toEqual({ status: "delivered", delivered: 3 });
    expect(logged(b)).toEqual([1, 2, 3, 4]);
  });

  it("rollback restores the sender log and delivered vector of the cut, clears held and untaken messages, keeps the incarnation", async () => {
    const [a, b] = await pair();
    a.invoke("send", [1, 1, 1]);
    b.receive(a.takeOutbox()[0]);
    a.capture();
    b.capture();
    a.invoke("send", [1, 2, 1]);
    a.invoke("send", [1, 3, 1]);
    const [, m3] = a.takeOutbox();
    a.invoke("send", [1, 4, 1]); // not taken
    b.receive(m3); // held: m2 missing
    b.setIncarnation(1);
    expect(b.pendingMessages).toBe(0); // stale now
    a.setIncarnation(1);
    a.rollback(1);
    b.rollback(1);
    expect(a.incarnation).toBe(1);
    expect(b.incarnation).toBe(1);
    expect(a.takeOutbox()).toEqual([]);
    expect(a.sentVector()).toEqual([0, 1]);
    expect(a.senderLogLength).toBe(1);
    expect(b.deliveredVector()).toEqual([1, 0]);
    expect(a.resendFor(1, b.deliveredVector()[0])).toEqual([]);
    // The rolled-back sender reuses seq 2 for whatever it sends next; the old seq 3 is stale.
    expect(b.receive(m3).status).toBe("stale");
    a.invoke("send", [1, 9, 1]);
    const [n2] = a.takeOutbox();
    expect([n2.seq, n2.incarnation]).toEqual([2, 1]);
    expect(b.receive(n2).status).toBe("delivered");
    expect(logged(b)).toEqual([1, 9]); // 1 was delivered in epoch 1, inside the cut
  });

  it("a restored or promoted VM carries the cut's sender log and delivered vector", async () => {
    const guest = await guestOf(ECHO);
    const opts = (rank: number) => options({ rank, size: 2 });
    const a = VmCore.boot(guest, opts(0));
    const b = VmCore.boot(guest, opts(1));
    const backup = BackupImage.blank(guest, opts(0), RESERVED_WASM_PAGES + guest.info.guest_initial_pages);
    a.invoke("send", [1, 1, 1]);
    a.invoke("send", [1, 2, 1]);
    const [m1] = a.takeOutbox();
    b.receive(m1);
    const captured = a.capture();
    sealDelta(captured.delta);
    backup.apply(decodeDelta(captured.delta));
    const restored = VmCore.restore(guest, decodeImage(encodeImage(backup.image())), opts(0));
    const promoted = backup.promote();
    for (const vm of [restored, promoted]) {
      expect(vm.sentVector()).toEqual([0, 2]);
      expect(vm.resendFor(1, b.deliveredVector()[0]).map((m) => [m.seq, Buffer.from(m.bytes)[0]])).toEqual([[2, 2]]);
    }
  });
});

describe("group messaging: random schedules (fast-check)", () => {
  it("bank, no failures: consistent cut, exactly once, conservation", async () => {
    const c = await bankProperty({}, 40, { rollbacks: false });
    expect(c.held_for_epoch, "messages with s > r were held").toBeGreaterThan(0);
    expect(c.held - c.held_for_epoch, "messages out of channel order were held").toBeGreaterThan(0);
    expect(c.duplicate).toBeGreaterThan(0);
    expect(c.commits).toBeGreaterThan(0);
  });

  it("bank with rollbacks (in place and by promotion) and re-sends", async () => {
    const c = await bankProperty({}, 60);
    expect(c.rollbacks).toBeGreaterThan(0);
    expect(c.promotions).toBeGreaterThan(0);
    expect(c.resends, "rollbacks with messages in flight at the cut").toBeGreaterThan(0);
    expect(c.stale, "stale messages of rolled-back epochs offered").toBeGreaterThan(0);
  });

  it("bank with tiny limits: sender logs fill (E_FULL), pending queues refuse", async () => {
    const send = vi.spyOn(VmCore.prototype, "send");
    try {
      // One round is size - 1 transfers plus the Allreduce's few messages per rank, so the limits
      // are tight: room for 4 logged 20-byte transfers, and one held message per receiver (a second
      // message out of channel order or with s > r is refused until a capture delivers the first).
      const c = await bankProperty({ limits: { sender_log_bytes_max: 4 * (32 + 20), pending_messages_max: 1 } }, 30);
      expect(c.full, "receivers refused messages").toBeGreaterThan(0);
      expect(send.mock.results.filter((r) => r.value === E_FULL).length, "senders got E_FULL").toBeGreaterThan(0);
    } finally {
      send.mockRestore();
    }
  });

  it("vm mode (Remus baseline), same runtime: messages held until the sender's cut commits, members roll back alone", async () => {
    const c = await bankProperty({ mode: "vm" }, 50);
    expect(c.rollbacks).toBeGreaterThan(0);
    expect(c.promotions).toBeGreaterThan(0);
    expect(c.resends).toBeGreaterThan(0);
  });

  it("allreduce: every logged round has the right sum, rounds contiguous, progress after rollbacks", async () => {
    const c = await perpetualProperty("allreduce", checkAllreduce, 40);
    expect(c.rollbacks).toBeGreaterThan(0);
    expect(c.resends).toBeGreaterThan(0);
  });

  it("allreduce under back-pressure: the SDK queues E_FULL sends and flushes them from a timer", async () => {
    const send = vi.spyOn(VmCore.prototype, "send");
    try {
      await perpetualProperty("allreduce", checkAllreduce, 20, { limits: { sender_log_bytes_max: 3 * (32 + 16) } });
      expect(send.mock.results.filter((r) => r.value === E_FULL).length, "senders got E_FULL").toBeGreaterThan(0);
    } finally {
      send.mockRestore();
    }
  });

  it("ring: laps contiguous, token = lap * size, progress after rollbacks", async () => {
    const c = await perpetualProperty("ring", checkRing, 40);
    expect(c.rollbacks).toBeGreaterThan(0);
    expect(c.resends).toBeGreaterThan(0);
  });

  it("phases (SDK Barrier + Broadcast): contiguous phases, one value per phase on every rank", async () => {
    const c = await perpetualProperty("phases", checkPhases, 30);
    expect(c.rollbacks).toBeGreaterThan(0);
  });

  it("16 bank VMs, one long schedule with rollbacks", async () => {
    const guest = await built("bank");
    coverage = newCoverage();
    await fc.assert(
      fc.property(commands({ ticks: true, rollbacks: true, minLength: 400, maxLength: 800 }), (list) => {
        const group = new Group(guest, { ...CONFIG, size: 16 });
        run(group, list, () => checkBankAtCut(group));
        group.quiesce();
        group.checkHistory(true);
        checkBankQuiet(group);
      }),
      { numRuns: 4 * SCALE, endOnFailure: true, seed: SEED },
    );
    expect(coverage.rollbacks).toBeGreaterThan(0);
  });

  it("16 allreduce, ring and phases VMs", async () => {
    for (const [name, check] of [["allreduce", checkAllreduce], ["ring", checkRing], ["phases", checkPhases]] as const) {
      const group = new Group(await built(name), { ...CONFIG, size: 16 });
      const list = fc.sample(commands({ ticks: false, rollbacks: true, maxLength: 400 }), { numRuns: 1, seed: 7 })[0];
      run(group, list);
      group.flush();
      const before = check(group);
      drain(group, 2000);
      group.checkHistory(false);
      expect(check(group)).toBeGreaterThan(before);
    }
  });
});

describe("group messaging: the checks catch a broken runtime (mutation tests)", () => {
  const proto = VmCore.prototype as unknown as Record<string, unknown>;
  // The consistent-cut and incarnation rules live in the channels (src/core/channel.ts) that VmCore drives.
  const channelProto = Channels.prototype as unknown as Record<string, unknown>;
  const saved = new Map<string, unknown>();
  const savedChannel = new Map<string, unknown>();
  const mutate = (name: string, replacement: unknown) => {
    saved.set(name, proto[name]);
    proto[name] = replacement;
  };
  const mutateChannel = (name: string, replacement: unknown) => {
    expect(typeof channelProto[name], `Channels.${name}`).toBe("function");
    savedChannel.set(name, channelProto[name]);
    channelProto[name] = replacement;
  };
  afterEach(() => {
    for (const [name, fn] of saved) proto[name] = fn;
    for (const [name, fn] of savedChannel) channelProto[name] = fn;
    saved.clear();
    savedChannel.clear();
  });

  /** The message of the property's failure and of its cause (the first failing check). */
  const failure = async (property: Promise<unknown>): Promise<string> => {
    try {
      await property;
    } catch (error) {
      const cause = (error as Error & { cause?: unknown }).cause;
      return `${(error as Error).message}\n${cause instanceof Error ? cause.message : String(cause)}`;
    }
    return "(the property held)";
  };

  it("the property holds on the real runtime with the same settings", async () => {
    expect(await failure(bankProperty({}, 30))).toBe("(the property held)");
  });

  it("delivering s > r at once (no consistent-cut rule) is caught", async () => {
    mutateChannel("deliverable", () => true);
    expect(await failure(bankProperty({}, 100, { rollbacks: false }))).toMatch(/consistent cut: \d+>\d+#\d+ sent in epoch (\d+) delivered in epoch/);
  });

  it("accepting messages of any incarnation (stale ones after a rollback) is caught", async () => {
    mutateChannel("incarnationCheck", () => null);
    // Whichever check trips first: the delivery hook, the runtime's own cut checks, conservation, or a stuck channel.
    expect(await failure(bankProperty({}, 300))).toMatch(
      /incarnation: \d+>\d+#\d+ of incarnation \d+ delivered in \d+|not a cut of this VM's history|is consistent|money at the recovery cut|bank (dup|recv)|bank: transfer|does not quiesce/,
    );
  });

  it("not re-sending after a rollback is caught (messages lost, money lost)", async () => {
    expect(await failure(bankProperty({ resend: false }, 300))).toMatch(/money at the recovery cut|delivered: expected false to be true|does not quiesce|bank progress/);
  });

  // The router's history sees these deliveries as right: only the bank's own lines can tell.
  const transfer = (payload: Uint8Array) => payload[0] === BANK_TRANSFER;
  const deliverToGuest = (vm: VmCore, from: number, payload: Uint8Array) => (saved.get("message") as VmCore["message"]).call(vm, from, payload);

  it("handing a transfer to the guest twice (a duplicate reaches the application) is caught by the bank's lines", async () => {
    mutate("message", function (this: VmCore, from: number, payload: Uint8Array) {
      deliverToGuest(this, from, payload);
      if (transfer(payload)) deliverToGuest(this, from, payload);
    });
    expect(await failure(bankProperty({}, 100, { rollbacks: false }))).toMatch(/bank dup \(bank round=\d+ .* dup=[1-9]/);
  });

  it("a transfer delivered but never handed to the guest is caught: its round never completes", async () => {
    mutate("message", function (this: VmCore, from: number, payload: Uint8Array) {
      if (from === 0 && transfer(payload) && Buffer.from(payload).readUInt32LE(4) === 2) return; // rank 0's round-2 transfers
      deliverToGuest(this, from, payload);
    });
    expect(await failure(bankProperty({}, 100, { rollbacks: false }))).toMatch(/bank progress after the schedule/);
  });

  it("a router that loses one message is caught", async () => {
    mutate("receive", function (this: VmCore, message: GroupMessage) {
      if (message.seq === 2 && message.from === 0) return { status: "duplicate", delivered: 0 };
      return (saved.get("receive") as VmCore["receive"]).call(this, message);
    });
    expect(await failure(bankProperty({}, 100, { rollbacks: false }))).toMatch(/group does not quiesce|0>\d+#2 delivered/);
  });
});

describe("group messaging over the worker boundary", () => {
  const workers: VmWorker[] = [];
  afterEach(async () => {
    await Promise.all(workers.splice(0).map((w) => w.terminate()));
  });

  it("a ring of 3 worker VMs: receive, capture, trim, rollback, set_incarnation, resend_for", async () => {
    const guest = await built("ring");
    const n = 3;
    const opts = (rank: number): WorkerVmOptions => ({ rank, size: n, limits: { ...DEFAULT_LIMITS }, timers: "manual" });
    const vms: VmWorker[] = [];
    for (let rank = 0; rank < n; rank++) {
      const vm = await VmWorker.boot(guest, opts(rank));
      workers.push(vm);
      vms.push(vm);
    }
    const inflight: GroupMessage[] = await vms[0].request("take_outbox", {});
    expect(inflight).toHaveLength(1);
    const step = async () => {
      const message = inflight.shift()!;
      const result = await vms[message.to].request("receive", { messages: [message] });
      expect(result.statuses).toEqual(["delivered"]);
      inflight.push(...result.outbox);
    };
    const captureAll = async () => {
      const cuts = [];
      for (const vm of vms) {
        const c = await vm.capture();
        inflight.push(...c.outbox);
        cuts.push(c);
      }
      return cuts;
    };
    for (let i = 0; i < 2 * n; i++) await step(); // two laps
    const cut = await captureAll();
    const epoch = cut[0].epoch;
    for (const vm of vms) await vm.request("commit", { epoch });
    const trims = trimVectors(cut.map((c) => c.delivered));
    for (let s = 0; s < n; s++) expect((await vms[s].request("trim_sender_log", { delivered_by_receiver: trims[s] })).trimmed).toBe(2);
    for (let i = 0; i < n + 1; i++) await step(); // one more lap and a hop, then fail
    for (const vm of vms) {
      await vm.request("rollback", { epoch });
      expect((await vm.request("set_incarnation", { incarnation: 1 })).incarnation).toBe(1);
    }
    // The in-flight token is stale now; the one in rank 0's log is re-sent.
    const stale = inflight.splice(0);
    expect((await vms[stale[0].to].request("receive", { messages: stale })).statuses).toEqual(["stale"]);
    const delivered = await Promise.all(vms.map((vm) => vm.request("delivered_vector", {})));
    for (let s = 0; s < n; s++) for (let r = 0; r < n; r++) inflight.push(...(await vms[s].request("resend_for", { receiver: r, delivered: delivered[r][s] })));
    expect(inflight.map((m) => [m.from, m.to, m.seq, m.incarnation])).toEqual([[0, 1, 3, 1]]);
    for (let i = 0; i < 2 * n; i++) await step();
    await captureAll();
    const released = await vms[0].request("commit", { epoch: epoch + 1 });
    const laps = unpackOutput(released).map((r) => Buffer.from(r.bytes).toString());
    expect(laps).toEqual(["lap 3 token 9\n", "lap 4 token 12\n"]);
    const status = await vms[1].status();
    expect(status).toMatchObject({ incarnation: 1, pending_messages: 0 });
  });
});
