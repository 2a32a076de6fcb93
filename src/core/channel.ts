/**
 * The channels of one group member: what it sent (stamps, the replicated
 * sender log), what it delivered, and what it received but cannot deliver
 * yet. Sans I/O and deterministic: no clock, no timers, no threads, no guest.
 * VmCore drives it for a real VM (it hands to the guest what this module says
 * to deliver); a model VM can drive the very same code.
 *
 * Sending: send() stamps (incarnation, sender epoch, channel seq), appends
 * the message to the sender log and to the outbox the host drains.
 * Receiving: receive() drops stale incarnations and duplicate seqs, delivers
 * in channel order and only when the sender's epoch s is not after the
 * receiver's epoch r (consistent-cut rule, group mode); everything else waits
 * in a bounded pending queue that is not replicated (after a rollback the
 * senders re-send from their logs). See docs/GUEST_ABI.md and
 * docs/PROTOCOL.md "Messages inside a group".
 *
 * Which vectors travel when (the pure helpers at the end of this file):
 *
 * - **capture** of cut e: each member reports `delivered` (CapturedDelta /
 *   CaptureResult): index = sender rank, the highest seq it delivered from
 *   that sender at cut e.
 * - **commit** of cut e: the leader turns the members' vectors of cut e into
 *   one trim vector per sender (trimVectors) and each sender trims its log
 *   with its own. Only committed cuts may be used: a rollback never goes
 *   below one, so nothing trimmed is ever needed again.
 * - **recovery** to cut c (after every member rolled back in place or was
 *   promoted to c, and set the new incarnation): each member reports
 *   deliveredVector(); the leader checks the cut (checkCut) and each sender s
 *   re-sends resendFor(r, delivered_r[s]) to every receiver r. Then the group
 *   resumes.
 */

/**
 * A group message between two VMs of one group, as the hosts carry it.
 * `(incarnation, epoch, seq)` is docs/PROTOCOL.md's (incarnation, sender
 * epoch s, channel seq). `epoch` is also the sender's cut the message belongs to: in
 * `vm` mode the host holds it until the sender's cut `epoch` commits; in
 * `group` and `none` mode it is sent at once.
 */
export interface GroupMessage {
  from: number;
  to: number;
  incarnation: number;
  /** Sender epoch s: deliverable only by a receiver in epoch r >= s (consistent-cut rule). */
  epoch: number;
  /** Channel (from -> to) sequence number, dense from 1. */
  seq: number;
  /** Shared with the sender log in the VM that sent it: never mutate it, never put its buffer in a transfer list. */
  bytes: Uint8Array;
}

/**
 * One group message in its sender's log: kept (replicated with the sender)
 * until a committed cut shows the receiver delivered it, and re-sent from here
 * after a rollback or promotion.
 */
export interface LoggedMessage {
  /** Receiver rank. */
  to: number;
  /** Sender epoch when the guest sent it (the consistent-cut stamp s). */
  epoch: number;
  /** Channel sequence number (sender -> `to`), dense from 1. */
  seq: number;
  bytes: Uint8Array;
}

/** Bytes a logged message counts against `sender_log_bytes_max` on top of its payload. */
export const SENDER_LOG_ENTRY_OVERHEAD_BYTES = 32;

/**
 * How many epochs a message may be ahead of its receiver and still end them
 * there at once (markerEpoch); the daemon's leader keeps fewer epochs
 * uncommitted than this (EPOCHS_INFLIGHT_MAX, src/core/types.ts), so a message further
 * ahead is malformed or hostile and simply waits (it is held).
 */
export const MARKER_EPOCHS_MAX = 4;

/**
 * The replicated part of a member's channels: it travels in every checkpoint
 * (VmCore's RuntimeState has these very fields), so it fails over with the VM.
 */
export interface ChannelRecord {
  /**
   * The group's generation as last told by the host (setIncarnation). Stamped
   * on every message this VM sends; messages of older incarnations are dropped.
   * Never lowered by a rollback: it is the group's clock, not the guest's.
   */
  incarnation: number;
  /** Index = receiver rank: the last channel sequence number sent to it (0: none yet). */
  sent_seq: number[];
  /** Index = sender rank: the highest channel sequence number delivered from it (in order, so all below too). */
  delivered: number[];
  /** Messages sent and not yet known delivered at a committed cut, in send order. */
  sender_log: LoggedMessage[];
  /** Payload bytes + SENDER_LOG_ENTRY_OVERHEAD_BYTES per entry of `sender_log`. */
  sender_log_bytes: number;
  /** Index = receiver rank: entries with seq <= this were trimmed (delivered at a committed cut). */
  sender_log_trimmed: number[];
}

export function emptyChannelRecord(): ChannelRecord {
  return { incarnation: 0, sent_seq: [], delivered: [], sender_log: [], sender_log_bytes: 0, sender_log_trimmed: [] };
}

/** The limits the channels enforce (a subset of VmLimits, same meaning). */
export interface ChannelLimits {
  /** One group message's payload. */
  message_bytes_max: number;
  /** Messages sent and not yet taken by the host (takeOutbox). */
  outbox_max: number;
  /** Sender log: payload bytes plus SENDER_LOG_ENTRY_OVERHEAD_BYTES per message. */
  sender_log_bytes_max: number;
  /** Received messages held until deliverable. */
  pending_messages_max: number;
  /** Payload bytes of those held messages. */
  pending_bytes_max: number;
}

/** Who this member is and how its channels behave; VmOptions is one. */
export interface ChannelConfig {
  rank: number;
  size: number;
  limits: ChannelLimits;
  /**
   * Apply the consistent-cut rule (true in `group` mode, where members share
   * one epoch clock; false in `vm` and `none` mode). Default true. Also gates
   * the marker rule, which only means something on a shared clock.
   */
  consistent_cut?: boolean;
  /** Keep sent messages in the sender log (default true; false in `none` mode, where nothing is re-sent). */
  sender_log?: boolean;
}

/**
 * Why send() refused (the guest sees E_BAD_RANK, E_TOO_BIG, E_FULL, E_FULL):
 * no such rank; payload over message_bytes_max; outbox_max messages untaken;
 * the sender log would exceed sender_log_bytes_max.
 */
export type SendRefusal = "bad_rank" | "too_big" | "outbox_full" | "log_full";

/**
 * What receive() decided for one message:
 * - "deliver": counted delivered; the caller hands it to the guest now, then
 *   each held successor next() returns;
 * - "held": accepted, delivered later (out of channel order, or s > r: after an epoch change);
 * - "duplicate": its seq was delivered or is held already: dropped;
 * - "stale": older incarnation than the member's: dropped (its sender re-sends it if needed);
 * - "full": NOT accepted, the pending queue is full: offer it again after the next epoch change;
 * - "early": NOT accepted, newer incarnation than the member's: offer it again after setIncarnation.
 */
export type ReceiveDecision = "deliver" | "held" | "duplicate" | "stale" | "full" | "early";

export class Channels {
  private record: ChannelRecord;
  /** Not replicated: after a rollback the senders re-send, so held messages need not survive one. */
  private readonly pending = new PendingQueue();
  /** Sent and not yet taken by the host; not replicated (a rollback forgets what was sent after the cut). */
  private outbox: GroupMessage[] = [];

  /**
   * `record` is adopted, not copied: the channels mutate it from now on (VmCore
   * passes its runtime state, so a capture serializes the channels as they are).
   */
  constructor(
    readonly config: ChannelConfig,
    record: ChannelRecord = emptyChannelRecord(),
  ) {
    this.record = record;
    this.pad();
  }

  /** The group generation this member belongs to (stamped on what it sends). */
  get incarnation(): number {
    return this.record.incarnation;
  }

  /** Received messages held until deliverable (not replicated). */
  get pendingCount(): number {
    return this.pending.count;
  }

  /** Payload bytes of the held messages. */
  get pendingBytes(): number {
    return this.pending.bytes;
  }

  /** Size of the sender log as counted against `sender_log_bytes_max`. */
  get senderLogBytes(): number {
    return this.record.sender_log_bytes;
  }

  /** Entries in the sender log. */
  get senderLogLength(): number {
    return this.record.sender_log.length;
  }

  /** Messages sent and not yet taken (takeOutbox). */
  get outboxLength(): number {
    return this.outbox.length;
  }

  // ---- sending -----------------------------------------------------------

  /**
   * The guest sends `bytes` to rank `to` in sender epoch `epoch`: stamps it,
   * logs it (unless the log is off), queues it in the outbox and returns it;
   * or refuses, changing nothing.
   */
  send(to: number, bytes: Uint8Array, epoch: number): GroupMessage | SendRefusal {
    const { limits, size } = this.config;
    const s = this.record;
    if (to < 0 || to >= size || !Number.isInteger(to)) return "bad_rank";
    if (bytes.length > limits.message_bytes_max) return "too_big";
    if (this.outbox.length >= limits.outbox_max) return "outbox_full";
    const cost = bytes.length + SENDER_LOG_ENTRY_OVERHEAD_BYTES;
    if (s.sender_log_bytes + cost > limits.sender_log_bytes_max) return "log_full";
    const entry: LoggedMessage = { to, epoch, seq: ++s.sent_seq[to], bytes };
    if (this.config.sender_log !== false) {
      s.sender_log.push(entry);
      s.sender_log_bytes += cost;
    }
    const message = this.stamp(entry);
    this.outbox.push(message);
    return message;
  }

  /** Messages sent since the host last took them, in send order; the host routes them. */
  takeOutbox(): GroupMessage[] {
    const out = this.outbox;
    this.outbox = [];
    return out;
  }

  // ---- receiving ---------------------------------------------------------

  /**
   * Throws on a malformed message: the host's bug, not the guest's (an error
   * for the caller, the member carries on). receive() calls it.
   */
  check(message: GroupMessage): void {
    const { from, to, incarnation, epoch, seq, bytes } = message;
    const { rank, size, limits } = this.config;
    const isRank = (n: number) => Number.isInteger(n) && n >= 0 && n < size;
    const count = (n: number, min: number) => Number.isSafeInteger(n) && n >= min;
    if (!isRank(from)) throw new RangeError(`group message from rank ${from}: no such rank in a group of ${size}`);
    if (to !== rank) throw new RangeError(`group message for rank ${to} offered to rank ${rank}`);
    if (!count(incarnation, 0) || !count(epoch, 1) || !count(seq, 1)) throw new RangeError(`group message with bad stamp (incarnation ${incarnation}, epoch ${epoch}, seq ${seq})`);
    if (!(bytes instanceof Uint8Array)) throw new TypeError("group message bytes are not a Uint8Array");
    if (bytes.length > limits.message_bytes_max) {
      throw new RangeError(`group message of ${bytes.length} bytes exceeds message_bytes_max ${limits.message_bytes_max}`);
    }
  }

  /**
   * Offers one message to a member in epoch `epoch` (see ReceiveDecision). On
   * "deliver" the caller hands it to the guest, then drains next(message.from,
   * epoch): the held successors it unblocked.
   */
  receive(message: GroupMessage, epoch: number): ReceiveDecision {
    this.check(message);
    const refused = this.incarnationCheck(message);
    if (refused) return refused;
    const from = message.from;
    const delivered = this.record.delivered;
    if (message.seq <= delivered[from] || this.pending.has(from, message.seq)) return "duplicate";
    if (message.seq === delivered[from] + 1 && this.deliverable(message, epoch)) {
      delivered[from] = message.seq;
      return "deliver";
    }
    const limits = this.config.limits;
    if (this.pending.count >= limits.pending_messages_max || this.pending.bytes + message.bytes.length > limits.pending_bytes_max) return "full";
    this.pending.add(message);
    return "held";
  }

  /**
   * The held message next in channel `from`, if it is deliverable at `epoch`:
   * taken from the queue and counted delivered (hand it to the guest); else null.
   */
  next(from: number, epoch: number): GroupMessage | null {
    const delivered = this.record.delivered;
    const message = this.pending.get(from, delivered[from] + 1);
    if (!message || !this.deliverable(message, epoch)) return null;
    this.pending.remove(message);
    delivered[from] = message.seq;
    return message;
  }

  /**
   * After an epoch change: the next held message deliverable at `epoch`, lowest
   * sender first and in channel order within one (taken and counted delivered,
   * like next()); null when there is none. Call it until null: one message at
   * a time, so a guest that crashes on one leaves the rest held, as receive does.
   */
  deliverPending(epoch: number): GroupMessage | null {
    if (this.pending.count === 0) return null;
    // Lowest deliverable sender each time: at a fixed epoch, delivering on one
    // channel never unblocks another, so this drains channel after channel in
    // sender order (the order the guest sees must not depend on arrival order).
    let best = -1;
    for (const from of this.pending.senders()) {
      if ((best < 0 || from < best) && this.peekDeliverable(from, epoch)) best = from;
    }
    return best < 0 ? null : this.next(best, epoch);
  }

  /**
   * The marker rule (group mode): a message of the member's incarnation from
   * a later epoch e' than the member's epoch `epoch` proves its sender
   * captured e'-1, so the leader ended those epochs: the member captures up
   * to e' (returned) and then delivers, rather than wait for the leader's
   * `end`. null for messages further ahead than MARKER_EPOCHS_MAX, not for
   * this member, of another incarnation, or on an unshared epoch clock.
   */
  markerEpoch(message: GroupMessage, epoch: number): number | null {
    if (this.config.consistent_cut === false) return null;
    if (message.to !== this.config.rank || message.incarnation !== this.record.incarnation) return null;
    const e = message.epoch;
    if (!Number.isSafeInteger(e) || e <= epoch || e > epoch + MARKER_EPOCHS_MAX) return null;
    return e;
  }

  // ---- group generations, trim, recovery ---------------------------------

  /**
   * The host tells the member the group's incarnation (after a failover or a
   * reconfiguration). Never lowers it. Held messages of the old incarnation
   * are dropped (their senders re-send them, stamped anew, if the receiver's
   * state has not delivered them); untaken outbox messages are re-stamped.
   */
  setIncarnation(incarnation: number): void {
    const current = this.record.incarnation;
    if (!Number.isSafeInteger(incarnation) || incarnation < current) {
      throw new RangeError(`incarnation ${incarnation} is not >= the VM's incarnation ${current}`);
    }
    if (incarnation === current) return;
    this.record.incarnation = incarnation;
    this.pending.clear();
    for (const message of this.outbox) message.incarnation = incarnation;
  }

  /**
   * Drops sender-log entries the receivers have delivered at a committed cut.
   * `delivered_by_receiver[r]` = the highest seq receiver r had delivered from
   * this member at that cut (its CapturedDelta.delivered[this rank]).
   * Monotonic: a lower value than an earlier trim changes nothing.
   */
  trim(delivered_by_receiver: readonly number[]): { trimmed: number; sender_log_bytes: number } {
    const { size, rank } = this.config;
    const s = this.record;
    if (delivered_by_receiver.length !== size) throw new RangeError(`trimSenderLog: ${delivered_by_receiver.length} receivers, group size ${size}`);
    // Validate everything before changing anything: a refused trim leaves the floor as it was.
    for (let r = 0; r < size; r++) {
      const d = delivered_by_receiver[r];
      if (!Number.isSafeInteger(d) || d < 0) throw new RangeError(`trimSenderLog: receiver ${r}: bad seq ${d}`);
      if (d > s.sent_seq[r]) {
        throw new RangeError(`trimSenderLog: receiver ${r} delivered seq ${d} from rank ${rank}, which sent only ${s.sent_seq[r]}: not a cut of this VM's history`);
      }
    }
    const floor = s.sender_log_trimmed;
    for (let r = 0; r < size; r++) if (delivered_by_receiver[r] > floor[r]) floor[r] = delivered_by_receiver[r];
    // Compacted in place: the encoded checkpoints hold their own copies.
    const log = s.sender_log;
    const before = log.length;
    let kept = 0;
    let bytes = 0;
    for (let i = 0; i < before; i++) {
      const entry = log[i];
      if (entry.seq > floor[entry.to]) {
        log[kept++] = entry;
        bytes += entry.bytes.length + SENDER_LOG_ENTRY_OVERHEAD_BYTES;
      }
    }
    log.length = kept;
    s.sender_log_bytes = bytes;
    return { trimmed: before - kept, sender_log_bytes: bytes };
  }

  /**
   * The sender-log entries to `receiver` with seq > `delivered`, in seq order,
   * stamped with the current incarnation: what to re-send after a rollback or
   * promotion, given the receiver's restored deliveredVector()[this rank].
   * Throws if the receiver's state cannot be a cut consistent with this one
   * (it delivered more than was sent) or if the log was trimmed past it.
   */
  resendFor(receiver: number, delivered: number): GroupMessage[] {
    const { size, rank } = this.config;
    const s = this.record;
    if (!Number.isInteger(receiver) || receiver < 0 || receiver >= size) throw new RangeError(`resendFor: no rank ${receiver}`);
    if (!Number.isSafeInteger(delivered) || delivered < 0) throw new RangeError(`resendFor: bad seq ${delivered}`);
    if (delivered > s.sent_seq[receiver]) {
      throw new RangeError(`resendFor: rank ${receiver} delivered seq ${delivered} from rank ${rank}, which sent only ${s.sent_seq[receiver]}: the states are not one consistent cut`);
    }
    if (delivered < s.sender_log_trimmed[receiver]) {
      throw new RangeError(
        `resendFor: rank ${receiver} has delivered only seq ${delivered} but the log to it was trimmed to ${s.sender_log_trimmed[receiver]} (rollback below a committed cut?)`,
      );
    }
    const out: GroupMessage[] = [];
    for (const entry of s.sender_log) if (entry.to === receiver && entry.seq > delivered) out.push(this.stamp(entry));
    return out;
  }

  /** Index = sender rank: the highest channel seq delivered from it, in the current state. */
  deliveredVector(): number[] {
    return this.record.delivered.slice();
  }

  /** Index = receiver rank: the last channel seq sent to it, in the current state. */
  sentVector(): number[] {
    return this.record.sent_seq.slice();
  }

  // ---- replicated state --------------------------------------------------

  /** A detached copy of the replicated part (log entries are immutable and shared). */
  snapshot(): ChannelRecord {
    const s = this.record;
    return {
      incarnation: s.incarnation,
      sent_seq: s.sent_seq.slice(),
      delivered: s.delivered.slice(),
      sender_log: s.sender_log.slice(),
      sender_log_bytes: s.sender_log_bytes,
      sender_log_trimmed: s.sender_log_trimmed.slice(),
    };
  }

  /**
   * Continue from `record`, a state this member had at a cut (rollback in
   * place): adopted like the constructor's. What was held or sent after it is
   * forgotten (the senders re-send what the cut lacks; what this member sent
   * after the cut is gone with the epochs that sent it). The incarnation is
   * the group's clock, set by the host: restoring does not lower it.
   */
  restore(record: ChannelRecord): void {
    record.incarnation = Math.max(record.incarnation, this.record.incarnation);
    this.record = record;
    this.pad();
    this.pending.clear();
    this.outbox = [];
  }

  // ---- internals ---------------------------------------------------------

  private stamp(entry: LoggedMessage): GroupMessage {
    return { from: this.config.rank, to: entry.to, incarnation: this.record.incarnation, epoch: entry.epoch, seq: entry.seq, bytes: entry.bytes };
  }

  /** Messages of another incarnation are not this group generation's: older ones are dropped, newer ones refused for now. */
  private incarnationCheck(message: GroupMessage): "stale" | "early" | null {
    if (message.incarnation < this.record.incarnation) return "stale";
    if (message.incarnation > this.record.incarnation) return "early";
    return null;
  }

  /** Consistent-cut rule: a receiver in epoch r delivers a message sent in sender epoch s only if s <= r. */
  private deliverable(message: GroupMessage, epoch: number): boolean {
    return this.config.consistent_cut === false || message.epoch <= epoch;
  }

  private peekDeliverable(from: number, epoch: number): boolean {
    const message = this.pending.get(from, this.record.delivered[from] + 1);
    return message !== undefined && this.deliverable(message, epoch);
  }

  /** States written before a member knew the group size (or before channels existed) carry shorter vectors. */
  private pad(): void {
    const { size } = this.config;
    const s = this.record;
    padTo(s.sent_seq, size);
    padTo(s.delivered, size);
    padTo(s.sender_log_trimmed, size);
  }
}

/** Received group messages waiting for their turn: per sender, by seq. */
class PendingQueue {
  private readonly channels = new Map<number, Map<number, GroupMessage>>();
  count = 0;
  bytes = 0;

  has(from: number, seq: number): boolean {
    return this.channels.get(from)?.has(seq) ?? false;
  }

  get(from: number, seq: number): GroupMessage | undefined {
    return this.channels.get(from)?.get(seq);
  }

  add(message: GroupMessage): void {
    let channel = this.channels.get(message.from);
    if (!channel) this.channels.set(message.from, (channel = new Map()));
    channel.set(message.seq, message);
    this.count++;
    this.bytes += message.bytes.length;
  }

  remove(message: GroupMessage): void {
    const channel = this.channels.get(message.from);
    if (!channel?.delete(message.seq)) return;
    if (channel.size === 0) this.channels.delete(message.from);
    this.count--;
    this.bytes -= message.bytes.length;
  }

  /** Senders with held messages, in no particular order. */
  senders(): IterableIterator<number> {
    return this.channels.keys();
  }

  clear(): void {
    this.channels.clear();
    this.count = 0;
    this.bytes = 0;
  }
}

function padTo(values: number[], length: number): void {
  while (values.length < length) values.push(0);
}

// ---- delivered matrices ------------------------------------------------------

/**
 * `delivered[r][s]` = highest seq receiver r delivered from sender s (at a
 * committed cut, or at a recovery cut). Returns, per receiver, what it
 * delivered from sender `s`: the argument of sender s's trim at a commit and
 * of its re-send after a recovery. The core, the daemon's driver and the
 * tests' harnesses all take it from here.
 */
export function senderColumn(delivered: readonly (readonly number[])[], s: number): number[] {
  return delivered.map((row) => row[s]);
}
