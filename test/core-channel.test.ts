/**
 * The group channels (src/core/channel.ts) on their own: no VM, no guest, no
 * threads. A driver plays N members (each a Channels and an epoch counter), a
 * network that reorders and duplicates, captures at different times, commits
 * with trims, and group rollbacks to a cut with a new incarnation and the
 * re-sends of recoveryResends. The "application" of each member is the list
 * of payloads delivered per sender, rolled back with the channels.
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  Channels,
  MARKER_EPOCHS_MAX,
  SENDER_LOG_ENTRY_OVERHEAD_BYTES,
  emptyChannelRecord,
  type ChannelConfig,
  type ChannelLimits,
  type ChannelRecord,
  type GroupMessage,
  type SendRefusal,
} from "../src/core/channel.js";
import { checkCut, recoveryResends, trimVectors } from "./support/channels.js";

/** COHORT_PROPERTY_SCALE=10 runs every property ten times as often (soak). */
const SCALE = Math.max(1, Number(process.env.COHORT_PROPERTY_SCALE ?? 1));
/** A fixed seed in CI, so the coverage check below cannot flake; COHORT_PROPERTY_SEED explores others. */
const SEED = Number(process.env.COHORT_PROPERTY_SEED ?? 20261124);

const BIG: ChannelLimits = { message_bytes_max: 64, outbox_max: 1 << 20, sender_log_bytes_max: 1 << 30, pending_messages_max: 1 << 20, pending_bytes_max: 1 << 30 };

const config = (rank: number, size: number, limits: Partial<ChannelLimits> = {}, extra: Partial<ChannelConfig> = {}): ChannelConfig => ({
  rank,
  size,
  limits: { ...BIG, ...limits },
  ...extra,
});

/** A record the restored member owns alone (restore adopts what it is given, and a cut may be restored twice). */
function copyRecord(r: ChannelRecord): ChannelRecord {
  return { ...r, sent_seq: r.sent_seq.slice(), delivered: r.delivered.slice(), sender_log: r.sender_log.slice(), sender_log_trimmed: r.sender_log_trimmed.slice() };
}

const text = (bytes: Uint8Array) => new TextDecoder().decode(bytes);
const bytesOf = (s: string) => new TextEncoder().encode(s);

// ---- the group driver -------------------------------------------------------

type Op =
  | { k: "send"; from: number; to: number }
  | { k: "deliver"; pick: number; dup: boolean }
  | { k: "marker"; pick: number }
  | { k: "capture"; who: number }
  | { k: "commit" }
  | { k: "rollback"; back: number };

interface Member {
  ch: Channels;
  epoch: number;
  /** got[s] = payloads delivered from s, in delivery order: the application's state. */
  got: string[][];
  /** State at cut c (taken as epoch c ended, before held messages were delivered in c + 1). */
  cuts: Map<number, { record: ChannelRecord; got: string[][] }>;
}

class Group {
  readonly members: Member[];
  /** sent[s][r][seq - 1] = payload of the current history (rolled back with the senders). */
  readonly sent: string[][][];
  flight: GroupMessage[] = [];
  incarnation = 0;
  committed = 0;
  private counter = 0;
  readonly seen = { held: 0, duplicate: 0, stale: 0, full: 0, log_full: 0, marker: 0, rollbacks: 0, resent: 0, pending_after_capture: 0 };

  constructor(
    readonly n: number,
    limits: Partial<ChannelLimits>,
  ) {
    this.members = Array.from({ length: n }, (_, rank) => ({
      ch: new Channels(config(rank, n, limits)),
      epoch: 1,
      got: Array.from({ length: n }, () => []),
      cuts: new Map(),
    }));
    this.sent = Array.from({ length: n }, () => Array.from({ length: n }, () => []));
    for (const m of this.members) m.cuts.set(0, { record: m.ch.snapshot(), got: m.got.map((g) => g.slice()) });
  }

  run(op: Op): void {
    switch (op.k) {
      case "send":
        return this.send(op.from % this.n, op.to % this.n);
      case "deliver":
        return this.deliver(op.pick, op.dup);
      case "marker":
        return this.marker(op.pick);
      case "capture":
        return this.capture(op.who % this.n);
      case "commit":
        return this.commit();
      case "rollback":
        return this.rollback(op.back);
    }
  }

  send(from: number, to: number): void {
    const m = this.members[from];
    const payload = `${from}>${to} ${++this.counter}`;
    const before = m.ch.snapshot();
    const result = m.ch.send(to, bytesOf(payload), m.epoch);
    if (typeof result === "string") {
      expect(result).toBe("log_full"); // the only limit this driver can reach
      expect(m.ch.snapshot()).toEqual(before); // a refusal changes nothing
      this.seen.log_full++;
      return;
    }
    expect(result).toMatchObject({ from, to, incarnation: this.incarnation, epoch: m.epoch, seq: this.sent[from][to].length + 1 });
    expect(m.ch.takeOutbox()).toEqual([result]);
    this.sent[from][to].push(payload);
    this.flight.push(result);
  }

  /** The application receives `message` at member `r` (the check of every delivery). */
  private apply(r: number, message: GroupMessage): void {
    const m = this.members[r];
    expect(message.to).toBe(r);
    expect(message.incarnation, "never a message of another incarnation").toBe(this.incarnation);
    expect(message.epoch, "consistent cut: s <= r").toBeLessThanOrEqual(m.epoch);
    const got = m.got[message.from];
    expect(message.seq, "exactly once, in channel order").toBe(got.length + 1);
    expect(text(message.bytes), "the bytes of the current history").toBe(this.sent[message.from][r][message.seq - 1]);
    got.push(text(message.bytes));
  }

  private offer(message: GroupMessage): "taken" | "again" {
    const r = message.to;
    const m = this.members[r];
    const decision = m.ch.receive(message, m.epoch);
    switch (decision) {
      case "deliver":
        this.apply(r, message);
        for (let next = m.ch.next(message.from, m.epoch); next; next = m.ch.next(message.from, m.epoch)) this.apply(r, next);
        return "taken";
      case "held":
      case "duplicate":
      case "stale":
        this.seen[decision]++;
        return "taken";
      case "full":
        this.seen.full++;
        return "again";
      case "early":
        throw new Error("every member takes the new incarnation before anything of it is sent");
    }
  }

  deliver(pick: number, dup: boolean): void {
    if (this.flight.length === 0) return;
    const i = pick % this.flight.length;
    const message = this.flight[i];
    if (this.offer(message) === "taken" && !dup) this.flight.splice(i, 1);
  }

  /** The worker's rule: capture up to what markerEpoch says, then offer. */
  marker(pick: number): void {
    if (this.flight.length === 0) return;
    const message = this.flight[pick % this.flight.length];
    const m = this.members[message.to];
    const to = m.ch.markerEpoch(message, m.epoch);
    if (to === null) return;
    expect(to).toBe(message.epoch);
    expect(to).toBeGreaterThan(m.epoch);
    expect(to).toBeLessThanOrEqual(m.epoch + MARKER_EPOCHS_MAX);
    this.seen.marker++;
    while (m.epoch < to) this.capture(message.to);
    this.deliver(pick, false);
  }

  capture(who: number): void {
    const m = this.members[who];
    m.cuts.set(m.epoch, { record: m.ch.snapshot(), got: m.got.map((g) => g.slice()) });
    m.epoch++;
    for (let next = m.ch.deliverPending(m.epoch); next; next = m.ch.deliverPending(m.epoch)) {
      this.seen.pending_after_capture++;
      this.apply(who, next);
    }
  }

  /** Newest cut every member captured. */
  private captured(): number {
    return Math.min(...this.members.map((m) => m.epoch - 1));
  }

  commit(): void {
    const c = this.captured();
    if (c <= this.committed) return;
    const atCut = this.members.map((m) => m.cuts.get(c)!.record);
    expect(checkCut(atCut.map((r) => r.sent_seq), atCut.map((r) => r.delivered))).toEqual([]);
    const trims = trimVectors(atCut.map((r) => r.delivered));
    this.members.forEach((m, s) => m.ch.trim(trims[s]));
    this.committed = c;
    for (const m of this.members) for (const k of [...m.cuts.keys()]) if (k < c) m.cuts.delete(k);
  }

  /** The whole group back to a cut in [committed, captured], a new incarnation, the re-sends. */
  rollback(back: number): void {
    const span = this.captured() - this.committed;
    const c = this.captured() - (back % (span + 1));
    this.incarnation++;
    this.seen.rollbacks++;
    this.members.forEach((m, s) => {
      const at = m.cuts.get(c)!;
      m.ch.restore(copyRecord(at.record));
      m.got = at.got.map((g) => g.slice());
      m.epoch = c + 1;
      for (const k of [...m.cuts.keys()]) if (k > c) m.cuts.delete(k);
      // Held messages may be of epochs after the cut, which the senders roll back too: restore forgets them.
      expect(m.ch.pendingCount).toBe(0);
      expect(m.ch.outboxLength).toBe(0);
      m.ch.setIncarnation(this.incarnation);
      // What this sender sent after the cut is gone: the history continues from its restored seqs.
      const sentSeq = m.ch.sentVector();
      this.sent[s].forEach((payloads, r) => (payloads.length = sentSeq[r]));
    });
    const chs = this.members.map((m) => m.ch);
    const delivered = chs.map((ch) => ch.deliveredVector());
    expect(checkCut(chs.map((ch) => ch.sentVector()), delivered)).toEqual([]);
    const resends = recoveryResends(chs);
    // The logs hold every message a restored receiver lacks (trims only went up to committed cuts).
    for (let s = 0; s < this.n; s++) {
      for (let r = 0; r < this.n; r++) {
        const seqs = resends.filter((m) => m.from === s && m.to === r).map((m) => m.seq);
        const lacking = Array.from({ length: this.sent[s][r].length - delivered[r][s] }, (_, i) => delivered[r][s] + 1 + i);
        expect(seqs, `re-sends ${s}>${r}`).toEqual(lacking);
      }
    }
    for (const m of resends) expect(m.incarnation).toBe(this.incarnation);
    this.seen.resent += resends.length;
    // The messages still in flight are of the old incarnation now: they must come back stale.
    this.flight.push(...resends);
  }

  /** No more faults or duplicates: everyone reaches the last epoch and everything in flight arrives. */
  drain(): void {
    const top = Math.max(...this.members.map((m) => m.epoch));
    this.members.forEach((m, rank) => {
      while (m.epoch < top) this.capture(rank);
    });
    for (let rounds = 0; this.flight.length > 0; rounds++) {
      expect(rounds, "the group quiesces").toBeLessThan(100);
      const flight = this.flight;
      this.flight = [];
      for (const message of flight) if (this.offer(message) === "again") this.flight.push(message);
      // Refused for a full queue: what is held becomes deliverable at the next epoch.
      if (this.flight.length) this.members.forEach((_, rank) => this.capture(rank));
    }
    this.members.forEach((m, r) => {
      expect(m.ch.pendingCount).toBe(0);
      expect(m.ch.deliveredVector()).toEqual(this.sent.map((row) => row[r].length));
      this.sent.forEach((row, s) => expect(m.got[s]).toEqual(row[r]));
    });
  }
}

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ k: fc.constant("send" as const), from: fc.nat(15), to: fc.nat(15) }) },
  { weight: 8, arbitrary: fc.record({ k: fc.constant("deliver" as const), pick: fc.nat(), dup: fc.boolean() }) },
  { weight: 2, arbitrary: fc.record({ k: fc.constant("marker" as const), pick: fc.nat() }) },
  { weight: 2, arbitrary: fc.record({ k: fc.constant("capture" as const), who: fc.nat(15) }) },
  { weight: 1, arbitrary: fc.constant({ k: "commit" as const }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant("rollback" as const), back: fc.nat(3) }) },
);

describe("Channels: a group under reordering, duplication, rollback and re-send (fast-check)", () => {
  it("every message of the surviving history is delivered exactly once, in channel order, in an epoch >= its sender's; stale ones never", () => {
    const total = { held: 0, duplicate: 0, stale: 0, full: 0, log_full: 0, marker: 0, rollbacks: 0, resent: 0, pending_after_capture: 0 };
    fc.assert(
      fc.property(
        fc.integer({ min: 2, max: 4 }),
        fc.record({ pending_messages_max: fc.integer({ min: 1, max: 6 }), sender_log_bytes_max: fc.integer({ min: 200, max: 4000 }) }),
        fc.array(opArb, { minLength: 20, maxLength: 300, size: "max" }),
        (n, limits, ops) => {
          const group = new Group(n, limits);
          for (const op of ops) group.run(op);
          group.drain();
          for (const [k, v] of Object.entries(group.seen)) total[k as keyof typeof total] += v;
        },
      ),
      { numRuns: 200 * SCALE, seed: SEED },
    );
    // The schedules reached every path the checks are about.
    for (const [k, v] of Object.entries(total)) expect(v, k).toBeGreaterThan(0);
  });
});

// ---- single-member properties -----------------------------------------------

const message = (over: Partial<GroupMessage> = {}): GroupMessage => ({ from: 1, to: 0, incarnation: 0, epoch: 1, seq: 1, bytes: new Uint8Array(4), ...over });

describe("Channels: the consistent-cut rule", () => {
  it("in group mode a message of sender epoch s is delivered at receiver epoch r only if s <= r; without the rule, in channel order at once", () => {
    fc.assert(
      fc.property(fc.array(fc.integer({ min: 1, max: 6 }), { minLength: 1, maxLength: 30 }), fc.integer({ min: 1, max: 6 }), fc.boolean(), (epochs, r, rule) => {
        const ch = new Channels(config(0, 2, {}, { consistent_cut: rule }));
        // Sender epochs never go down along a channel.
        const sorted = epochs.slice().sort((a, b) => a - b);
        const delivered: number[] = [];
        sorted.forEach((s, i) => {
          const m = message({ seq: i + 1, epoch: s });
          const decision = ch.receive(m, r);
          if (decision === "deliver") {
            delivered.push(m.epoch);
            for (let next = ch.next(1, r); next; next = ch.next(1, r)) delivered.push(next.epoch);
          } else expect(decision).toBe("held");
        });
        const expected = rule ? sorted.filter((s) => s <= r) : sorted;
        expect(delivered).toEqual(expected);
        // The rest goes once the receiver's epoch reaches the last sender epoch.
        const top = sorted[sorted.length - 1];
        for (let next = ch.deliverPending(top); next; next = ch.deliverPending(top)) delivered.push(next.epoch);
        expect(delivered).toEqual(sorted);
        expect(ch.deliveredVector()).toEqual([0, sorted.length]);
      }),
      { numRuns: 200 * SCALE, seed: SEED },
    );
  });

  it("deliverPending goes sender by sender, each channel in seq order, and stops at the first message of a later epoch", () => {
    const ch = new Channels(config(0, 4));
    // Arrivals in reverse sender order, at receiver epoch 0: every message is of a later epoch, so held.
    for (const [from, seq, epoch] of [[3, 2, 1], [3, 1, 1], [2, 2, 2], [2, 1, 1], [1, 3, 1], [1, 2, 2], [1, 1, 1]] as const) {
      expect(ch.receive(message({ from, seq, epoch }), 0)).toBe("held");
    }
    const order: string[] = [];
    for (let next = ch.deliverPending(1); next; next = ch.deliverPending(1)) order.push(`${next.from}#${next.seq}`);
    expect(order).toEqual(["1#1", "2#1", "3#1", "3#2"]);
    for (let next = ch.deliverPending(2); next; next = ch.deliverPending(2)) order.push(`${next.from}#${next.seq}`);
    expect(order.slice(4)).toEqual(["1#2", "1#3", "2#2"]);
    expect(ch.pendingCount).toBe(0);
  });
});

describe("Channels: the marker decision", () => {
  it("is the message's epoch exactly when it is for this member, of its incarnation, 1..MARKER_EPOCHS_MAX ahead, in group mode; else null", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 20 }),
        fc.oneof(fc.integer({ min: -2, max: 30 }), fc.constantFrom(1.5, Number.NaN, Infinity)),
        fc.integer({ min: 0, max: 2 }),
        fc.integer({ min: 0, max: 2 }),
        fc.boolean(),
        fc.boolean(),
        (epoch, sent_epoch, to, incarnation, rule, setInc) => {
          const ch = new Channels(config(0, 3, {}, { consistent_cut: rule }));
          if (setInc) ch.setIncarnation(1);
          const m = message({ to, incarnation, epoch: sent_epoch });
          const got = ch.markerEpoch(m, epoch);
          const ahead = Number.isInteger(sent_epoch) && sent_epoch > epoch && sent_epoch <= epoch + MARKER_EPOCHS_MAX;
          const expected = rule && to === 0 && incarnation === ch.incarnation && ahead ? sent_epoch : null;
          expect(got).toBe(expected);
          if (got !== null) {
            // Having captured up to it, the member may deliver it: the cut rule no longer holds it.
            expect(got).toBeGreaterThan(epoch);
            expect(got).toBeLessThanOrEqual(epoch + MARKER_EPOCHS_MAX);
            expect(ch.receive(m, got)).toBe("deliver");
          }
        },
      ),
      { numRuns: 500 * SCALE, seed: SEED },
    );
  });
});

describe("Channels: trim", () => {
  it("the floor is the running maximum of the trims, the log holds exactly the entries above it, and a refused trim changes nothing", () => {
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.nat(2), fc.nat(20)), { maxLength: 40 }),
        fc.array(fc.array(fc.nat(12), { minLength: 3, maxLength: 3 }), { maxLength: 8 }),
        (sends, trims) => {
          const ch = new Channels(config(0, 3));
          for (const [to, len] of sends) expect(typeof ch.send(to, new Uint8Array(len), 1)).toBe("object");
          const sent = ch.sentVector();
          const floor = [0, 0, 0];
          for (const t of trims) {
            const before = ch.snapshot();
            if (t.some((d, r) => d > sent[r])) {
              expect(() => ch.trim(t)).toThrow(/not a cut of this VM's history/);
              expect(ch.snapshot()).toEqual(before);
              continue;
            }
            const { trimmed, sender_log_bytes } = ch.trim(t);
            t.forEach((d, r) => (floor[r] = Math.max(floor[r], d)));
            const after = ch.snapshot();
            expect(after.sender_log_trimmed).toEqual(floor);
            const expected = before.sender_log.filter((e) => e.seq > floor[e.to]);
            expect(after.sender_log).toEqual(expected);
            expect(trimmed).toBe(before.sender_log.length - expected.length);
            expect(sender_log_bytes).toBe(expected.reduce((n, e) => n + e.bytes.length + SENDER_LOG_ENTRY_OVERHEAD_BYTES, 0));
            expect(ch.senderLogBytes).toBe(sender_log_bytes);
            // A receiver at or above the floor can always be re-sent what it lacks, none below it.
            for (let r = 0; r < 3; r++) {
              expect(ch.resendFor(r, floor[r]).map((m) => m.seq)).toEqual(Array.from({ length: sent[r] - floor[r] }, (_, i) => floor[r] + 1 + i));
              if (floor[r] > 0) expect(() => ch.resendFor(r, floor[r] - 1)).toThrow(/trimmed to/);
            }
          }
        },
      ),
      { numRuns: 200 * SCALE, seed: SEED },
    );
  });
});

describe("Channels: refusals at the limits", () => {
  it("send refuses bad ranks, oversized payloads, a full outbox and a full sender log, in that order, and a refusal changes nothing", () => {
    fc.assert(
      fc.property(
        fc.record({ message_bytes_max: fc.integer({ min: 0, max: 40 }), outbox_max: fc.integer({ min: 0, max: 6 }), sender_log_bytes_max: fc.integer({ min: 0, max: 300 }) }),
        fc.boolean(),
        fc.array(
          fc.oneof(
            fc.record({ k: fc.constant("send" as const), to: fc.constantFrom(-1, 0, 1, 2, 3, 1.5), len: fc.nat(44) }),
            fc.constant({ k: "take" as const }),
            fc.constant({ k: "trim" as const }),
          ),
          { maxLength: 40 },
        ),
        (limits, log, ops) => {
          const ch = new Channels(config(0, 3, limits, { sender_log: log }));
          let outbox = 0;
          let logBytes = 0;
          for (const op of ops) {
            if (op.k === "take") {
              expect(ch.takeOutbox()).toHaveLength(outbox);
              outbox = 0;
              continue;
            }
            if (op.k === "trim") {
              ch.trim(ch.sentVector()); // every receiver delivered everything
              logBytes = 0;
              continue;
            }
            const cost = op.len + SENDER_LOG_ENTRY_OVERHEAD_BYTES;
            const expected: SendRefusal | null = !(Number.isInteger(op.to) && op.to >= 0 && op.to < 3)
              ? "bad_rank"
              : op.len > limits.message_bytes_max
                ? "too_big"
                : outbox >= limits.outbox_max
                  ? "outbox_full"
                  : logBytes + cost > limits.sender_log_bytes_max
                    ? "log_full"
                    : null;
            const before = ch.snapshot();
            const result = ch.send(op.to, new Uint8Array(op.len), 1);
            if (expected) {
              expect(result).toBe(expected);
              expect(ch.snapshot()).toEqual(before);
              expect(ch.outboxLength).toBe(outbox);
              continue;
            }
            expect(typeof result).toBe("object");
            outbox++;
            if (log) logBytes += cost; // none mode keeps no log: only a message bigger than the whole log is refused
            expect(ch.senderLogBytes).toBe(logBytes);
            expect(ch.senderLogBytes).toBeLessThanOrEqual(limits.sender_log_bytes_max);
          }
        },
      ),
      { numRuns: 300 * SCALE, seed: SEED },
    );
  });

  it("the pending queue never exceeds its limits; a message refused as full changes nothing and is taken when offered again after the epoch moves", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 8 }),
        fc.integer({ min: 1, max: 64 }),
        // One sender's history: per seq (dense from 1) its epoch (never going down) and payload size.
        fc.array(fc.tuple(fc.integer({ min: 1, max: 3 }), fc.nat(12)), { minLength: 1, maxLength: 20 }),
        fc.array(fc.nat(), { maxLength: 40 }),
        (messages_max, bytes_max, history, picks) => {
          const ch = new Channels(config(0, 2, { pending_messages_max: messages_max, pending_bytes_max: bytes_max, message_bytes_max: 12 }));
          const epochs = history.map(([e]) => e).sort((a, b) => a - b);
          const all = history.map(([, len], i) => message({ seq: i + 1, epoch: epochs[i], bytes: new Uint8Array(len) }));
          let epoch = 1;
          let refused: GroupMessage[] = [];
          const offer = (m: GroupMessage) => {
            const decision = ch.receive(m, epoch);
            if (decision === "deliver") for (let next = ch.next(m.from, epoch); next; next = ch.next(m.from, epoch));
            return decision;
          };
          for (const pick of picks) {
            const m = all[pick % all.length];
            const before = ch.snapshot();
            const held = ch.pendingCount;
            const bytes = ch.pendingBytes;
            if (offer(m) === "full") {
              expect(held === messages_max || bytes + m.bytes.length > bytes_max).toBe(true);
              expect(ch.snapshot()).toEqual(before);
              expect([ch.pendingCount, ch.pendingBytes]).toEqual([held, bytes]);
              refused.push(m);
            }
            expect(ch.pendingCount).toBeLessThanOrEqual(messages_max);
            expect(ch.pendingBytes).toBeLessThanOrEqual(bytes_max);
          }
          // The epoch moves, refused messages are offered again, the sender re-sends the next missing seq.
          for (let rounds = 0; ch.deliveredVector()[1] < all.length; rounds++) {
            expect(rounds).toBeLessThan(all.length + 10);
            epoch = Math.min(epoch + 1, 3);
            for (let next = ch.deliverPending(epoch); next; next = ch.deliverPending(epoch));
            const again = refused;
            refused = [];
            for (const m of again) if (offer(m) === "full") refused.push(m);
            const gap = all[ch.deliveredVector()[1]];
            if (gap) offer(gap);
          }
          expect(ch.pendingCount).toBe(0);
        },
      ),
      { numRuns: 300 * SCALE, seed: SEED },
    );
  });

  it("a newer incarnation is refused (early) and taken once the member is in it; an older one is dropped (stale)", () => {
    const ch = new Channels(config(0, 2));
    const m = message({ incarnation: 1 });
    expect(ch.receive(m, 1)).toBe("early");
    expect(ch.deliveredVector()).toEqual([0, 0]);
    ch.setIncarnation(1);
    expect(ch.receive(message({ incarnation: 0, seq: 1 }), 1)).toBe("stale");
    expect(ch.receive(m, 1)).toBe("deliver");
    expect(() => ch.setIncarnation(0)).toThrow(/not >= the VM's incarnation 1/);
  });

  it("setIncarnation drops held messages and re-stamps the untaken outbox; restore keeps the higher incarnation", () => {
    const ch = new Channels(config(0, 2));
    expect(ch.receive(message({ seq: 2 }), 1)).toBe("held");
    expect(ch.send(1, bytesOf("x"), 1)).toMatchObject({ seq: 1, incarnation: 0 });
    const cut = ch.snapshot();
    ch.setIncarnation(3);
    expect(ch.pendingCount).toBe(0);
    expect(ch.takeOutbox().map((m) => [m.seq, m.incarnation])).toEqual([[1, 3]]);
    ch.restore(copyRecord(cut)); // the cut was taken in incarnation 0
    expect(ch.incarnation).toBe(3);
    expect(ch.resendFor(1, 0).map((m) => m.incarnation)).toEqual([3]);
  });

  it("a record of a state written before channels existed (empty vectors) is padded to the group size", () => {
    const record = emptyChannelRecord();
    const ch = new Channels(config(1, 3), record);
    expect(ch.deliveredVector()).toEqual([0, 0, 0]);
    expect(ch.sentVector()).toEqual([0, 0, 0]);
    // Adopted, not copied: what the owner serializes is what the channels hold.
    expect(typeof ch.send(2, bytesOf("y"), 1)).toBe("object");
    expect(record.sent_seq).toEqual([0, 0, 1]);
    expect(record.sender_log).toHaveLength(1);
  });
});
