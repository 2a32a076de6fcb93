/**
 * The group protocol core, sans I/O (DESIGN.md "Messages inside a group",
 * "Failure handling", "Invariants").
 *
 * One `GroupNode` (src/group/node.ts) per host per group holds every group
 * role that host plays: the primaries and backups of members placed on it
 * (src/group/member.ts, src/group/backup.ts), the failure detector, and, on
 * the leader's host, the leader (src/group/leader.ts) with its recovery
 * coordinator (src/group/recovery.ts). It does no I/O and reads no clock: a
 * driver feeds it `Event`s and carries out the `Effect`s it returns, in order.
 * The deterministic simulator (src/group/sim/) is one driver; the host daemon
 * (real TCP, real VMs, the real coordination store) is meant to be the other.
 *
 *   node.handle(event: Event): Effect[]
 *
 * ## Events (driver → core)
 *
 * | event | when |
 * |---|---|
 * | `message {from, message}` | a `GroupMessage` arrived from host `from` (possibly this host) |
 * | `tick {now}` | timer; `now` in ms, monotonic. Drives heartbeats, failure detection and epoch ends. Call every few ms. |
 * | `suspect {host}` | an out-of-band crash notification (connection reset, orchestrator). Same as a missed-heartbeat timeout. |
 * | `vm.send {rank, to, payload}` | the guest of the primary `rank` on this host sent `payload` to peer `to`. Only while `canSend(rank, to)`. |
 * | `vm.output {rank, payload}` | the guest emitted external output. Only while `canOutput(rank)`. |
 * | `vm.captured {rank, inc, epoch, payload, bytes}` | result of a `vm.capture` effect: the delta of checkpoint `epoch` |
 * | `vm.imaged {rank, inc, epoch, payload, bytes}` | result of a `vm.image` effect: a full image at cut `epoch` |
 * | `store.result {op, ok, record, version}` | result of a `store.get` / `store.cas` effect; `record`/`version` = the key's current value |
 *
 * ## Effects (core → driver), carried out in the order returned
 *
 * | effect | meaning |
 * |---|---|
 * | `send {to, message}` | send to host `to` (may be this host). Ordering: see `orderingStream`. Loss is allowed only when a host crashes. |
 * | `vm.deliver {rank, from, seq, payload}` | call the guest's `message` export (rank's primary) |
 * | `vm.capture {rank, inc, epoch}` | pause at a safe point, take checkpoint `epoch` (delta since `epoch-1`), keep the undo log of the epochs after it, resume; answer with `vm.captured` |
 * | `vm.commit {rank, epoch}` | cut `epoch` committed: drop undo logs of epochs <= `epoch` (the VM never rolls back below it) |
 * | `vm.rollback {rank, epoch}` | roll back in place to cut `epoch` (undo the epochs after it, including the running one); no rollback below `epoch` is ever asked afterwards |
 * | `vm.image {rank, inc, epoch}` | full image of the VM, which is at cut `epoch` and paused; answer with `vm.imaged` |
 * | `vm.pause {rank}` / `vm.resume {rank}` | stop / restart calling the guest (recovery) |
 * | `vm.stop {rank}` | this host was declared failed (fenced): terminate the primary; it releases nothing more |
 * | `release {rank, records}` | external output whose cut committed may leave the host; sinks drop sequence numbers they already have |
 * | `backup.stage {rank, epoch, payload}` | keep (verify) delta `epoch` of `rank` on this backup, not applied yet |
 * | `backup.install {rank, epoch, payload}` | replace this host's backup of `rank` by a full image at cut `epoch` |
 * | `backup.fold {rank, through}` | apply staged deltas <= `through` to the committed image, in epoch order |
 * | `backup.discard {rank, after}` | forget staged deltas > `after` |
 * | `backup.promote {rank, epoch}` | turn the backup (folded exactly to `epoch`, nothing staged) into the running primary, in place, paused |
 * | `backup.drop {rank}` | this host no longer holds a backup of `rank` |
 * | `store.get {key}` / `store.cas {key, expected, value}` | coordination store; answer with `store.result` |
 * | `notify {notice}` | observability only (status, logs, checkers); the core never needs an answer |
 *
 * Payloads (guest messages, output, deltas, images) are `Opaque`: the core
 * never looks inside, it only routes them.
 *
 * ## Messages and ordering
 *
 * Every message but `heartbeat` carries the incarnation `inc`; a node drops
 * one older than the incarnation it adopted (fencing) and only `recover`
 * may introduce a newer one. The protocol needs FIFO order per
 * `orderingStream(message)` between two hosts (leader → host control, primary
 * → backup replication, one stream per group channel, ...); one TCP
 * connection per host pair satisfies it, the simulator reorders across streams.
 *
 * ## Time and epochs
 *
 * Cut 0 is the deployed state (committed by definition). A member executes
 * epoch e between checkpoint e-1 and checkpoint e; the leader ends epochs
 * (`end-epoch`), commits cut e once every member's backup staged e
 * (`staged` acks), and at most EPOCHS_INFLIGHT_MAX epochs are uncommitted.
 */

export type HostId = number;
export type Rank = number;
export type Epoch = number;
export type Incarnation = number;
/** Bytes or handles the core routes without looking inside. */
export type Opaque = unknown;

/**
 * `group`: peer messages leave at once (this design). `vm`: each message is
 * treated as external output, held until the sender's checkpoint of its
 * epoch committed (Remus-style baseline, for comparison).
 */
export type GroupMode = "group" | "vm";

/**
 * Deliberately broken variants, for tests that show the checkers catch a
 * violation. Never set in production.
 *   deliver-future: a receiver delivers messages with s > r (breaks invariant 2)
 *   release-early:  output leaves at once, before its cut commits (breaks invariant 1)
 *   skip-resend:    senders do not re-send their logs after a rollback (breaks invariant 3)
 *   reimage-all:    recovery ships a full image to every backup (breaks invariant 6)
 */
export type Fault = "deliver-future" | "release-early" | "skip-resend" | "reimage-all";

// ---- limits: every queue of the core is bounded by one of these -------------------------

/** Epochs ended and not yet committed; beyond this the leader stretches the epoch. */
export const EPOCHS_INFLIGHT_MAX = 4;
/** Runtime snapshots (undo) a primary keeps: cuts in [oldest reachable, newest captured]. */
export const UNDO_CUTS_MAX = EPOCHS_INFLIGHT_MAX + 1;
/** Deltas a backup holds staged (not folded). */
export const STAGED_DELTAS_MAX = EPOCHS_INFLIGHT_MAX;
/** Sender-log entries per channel (sent, not yet shown delivered by a committed cut); a full log blocks the guest's send. */
export const SENDER_LOG_PER_CHANNEL_MAX = 32;
/** Received, not yet delivered messages per channel (held s > r, or waiting for a gap to fill). */
export const PENDING_PER_CHANNEL_MAX = SENDER_LOG_PER_CHANNEL_MAX;
/** Unreleased external output records per member; a full queue blocks the guest's output. */
export const OUTPUT_PENDING_MAX = 128;
/** `delivered` announcements a node keeps for a member whose primary has not rolled back yet. */
export const DELIVERED_STASH_MAX = 64;
export const GROUP_SIZE_MAX = 64;
export const HOSTS_MAX = 64;

export interface Timing {
  /** Interval between heartbeats to each peer host. */
  heartbeat_ms: number;
  /** A host silent for this long is suspected (crash-stop). */
  detect_ms: number;
  /** Interval between epoch ends (the leader). */
  epoch_ms: number;
}

export interface GroupConfig {
  group: string;
  /** N members, ranks 0..N-1. */
  size: number;
  /** H hosts, ids 0..H-1 (the daemon maps its host names to these numbers). */
  hosts: number;
  mode: GroupMode;
  timing: Timing;
  fault?: Fault;
}

export function validateConfig(config: GroupConfig): void {
  const { size, hosts, timing } = config;
  if (!Number.isInteger(size) || size < 1 || size > GROUP_SIZE_MAX) throw new RangeError(`group size must be 1..${GROUP_SIZE_MAX}, got ${size}`);
  if (!Number.isInteger(hosts) || hosts < 2 || hosts > HOSTS_MAX) throw new RangeError(`hosts must be 2..${HOSTS_MAX}, got ${hosts}`);
  for (const [k, v] of Object.entries(timing)) {
    if (!(typeof v === "number" && v > 0 && Number.isFinite(v))) throw new RangeError(`timing.${k} must be > 0`);
  }
  if (timing.detect_ms <= timing.heartbeat_ms) throw new RangeError("timing.detect_ms must exceed timing.heartbeat_ms");
}

// ---- placement and the coordination store ------------------------------------------------

export interface Placement {
  primary: HostId;
  /** null: the member has no backup host (degraded, nothing commits). */
  backup: HostId | null;
}

/** The group's record in the coordination store, changed only by compare-and-swap. */
export interface GroupRecord {
  group: string;
  incarnation: Incarnation;
  /** Host that drives epochs and coordinates recovery in this incarnation. */
  leader: HostId;
  /** Indexed by rank. */
  placement: Placement[];
  /** Hosts declared failed: fenced for good, never placed again. */
  failed: HostId[];
}

export const protectionKey = (group: string) => `protection/${group}`;

// ---- the runtime state a member's checkpoint carries ------------------------------------

/** A group message kept in its sender's log until a committed cut shows it delivered. */
export interface LogEntry {
  readonly to: Rank;
  readonly seq: number;
  /** Sender epoch. */
  readonly s: Epoch;
  readonly payload: Opaque;
}

/** External output, held until the cut of its epoch commits. */
export interface OutputRecord {
  /** Per-member sequence number, dense from 1. */
  readonly seq: number;
  readonly epoch: Epoch;
  readonly payload: Opaque;
}

/**
 * The member's protocol state at cut `cut`: part of the checkpoint (it travels
 * with every delta, next to the VM's own bytes), so it fails over with the VM.
 * Immutable once taken.
 */
export interface RuntimeCheckpoint {
  readonly cut: Epoch;
  /** Last channel sequence number sent, per receiver. */
  readonly sendSeq: readonly number[];
  /** Sender log, per receiver, in sequence order. */
  readonly log: readonly (readonly LogEntry[])[];
  /** Last sequence number delivered, per sender. */
  readonly delivered: readonly number[];
  /** Unreleased output, oldest first (may include records released after the capture). */
  readonly output: readonly OutputRecord[];
  readonly outputSeq: number;
}

export function initialCheckpoint(size: number): RuntimeCheckpoint {
  return {
    cut: 0,
    sendSeq: new Array<number>(size).fill(0),
    log: Array.from({ length: size }, () => []),
    delivered: new Array<number>(size).fill(0),
    output: [],
    outputSeq: 0,
  };
}

// ---- recovery reports --------------------------------------------------------------------

/** Inclusive range of cuts a copy can reach without receiving anything. */
export interface Reach {
  lo: Epoch;
  hi: Epoch;
}

export interface ReplicaReport {
  rank: Rank;
  role: "primary" | "backup";
  reach: Reach;
  /** Highest committed cut this replica has heard of. */
  committed: Epoch;
}

// ---- messages ----------------------------------------------------------------------------

export type GroupMessage =
  | { kind: "heartbeat"; from: HostId }
  /** leader → primary hosts: end epoch `epoch` (capture checkpoint `epoch`). */
  | { kind: "end-epoch"; inc: Incarnation; epoch: Epoch }
  /** leader → primary hosts: cut committed; `delivered[j]` = receiver j's delivered vector at the cut. */
  | { kind: "commit"; inc: Incarnation; cut: Epoch; delivered: readonly (readonly number[])[] }
  /** primary → its backup: cut committed, fold through it. */
  | { kind: "backup-commit"; inc: Incarnation; rank: Rank; cut: Epoch }
  | { kind: "delta"; inc: Incarnation; rank: Rank; epoch: Epoch; runtime: RuntimeCheckpoint; payload: Opaque; bytes: number }
  | { kind: "image"; inc: Incarnation; rank: Rank; epoch: Epoch; runtime: RuntimeCheckpoint; payload: Opaque; bytes: number }
  /** backup → leader: this backup holds checkpoint `epoch` (staged, installed, or rolled back to). */
  | { kind: "staged"; inc: Incarnation; rank: Rank; epoch: Epoch; delivered: readonly number[] }
  /** group message on channel from → to. */
  | { kind: "group"; inc: Incarnation; from: Rank; to: Rank; s: Epoch; seq: number; payload: Opaque }
  /** receiver → sender after a rollback: what the receiver's restored state delivered; re-send above it. */
  | { kind: "delivered"; inc: Incarnation; receiver: Rank; sender: Rank; seq: number }
  /** coordinator → every live host: adopt this incarnation, stop, report your replicas. */
  | { kind: "recover"; inc: Incarnation; record: GroupRecord; version: number }
  | { kind: "report"; inc: Incarnation; host: HostId; replicas: ReplicaReport[] }
  /** coordinator → every live host: go to cut `cut`; primaries of `image` ranks ship a full image to their new backup. */
  | { kind: "rollback"; inc: Incarnation; cut: Epoch; image: Rank[] }
  | { kind: "rolled-back"; inc: Incarnation; host: HostId }
  /** coordinator → every live host: run epoch `epoch` (= recovery cut + 1). */
  | { kind: "resume"; inc: Incarnation; epoch: Epoch };

export type GroupMessageKind = GroupMessage["kind"];

/**
 * FIFO stream a message belongs to: the driver must deliver the messages of
 * one stream between two hosts in the order they were sent. Streams of one
 * host pair may be reordered freely.
 */
export function orderingStream(message: GroupMessage): string {
  switch (message.kind) {
    case "heartbeat":
      return "hb";
    case "end-epoch":
    case "commit":
    case "recover":
    case "rollback":
    case "resume":
      return "control";
    case "backup-commit":
    case "delta":
    case "image":
      return `replication/${message.rank}`;
    case "staged":
    case "report":
    case "rolled-back":
      return "to-leader";
    case "group":
      return `channel/${message.from}/${message.to}`;
    case "delivered":
      return `delivered/${message.receiver}/${message.sender}`;
  }
}

// ---- events and effects ------------------------------------------------------------------

export interface StoreResult {
  type: "store.result";
  op: "get" | "cas";
  ok: boolean;
  /** The key's current value after the operation (null if absent). */
  record: GroupRecord | null;
  version: number;
}

export type Event =
  | { type: "message"; from: HostId; message: GroupMessage }
  | { type: "tick"; now: number }
  | { type: "suspect"; host: HostId }
  | { type: "vm.send"; rank: Rank; to: Rank; payload: Opaque }
  | { type: "vm.output"; rank: Rank; payload: Opaque }
  | { type: "vm.captured"; rank: Rank; inc: Incarnation; epoch: Epoch; payload: Opaque; bytes: number }
  | { type: "vm.imaged"; rank: Rank; inc: Incarnation; epoch: Epoch; payload: Opaque; bytes: number }
  | StoreResult;

export type Notice =
  | { kind: "suspected"; host: HostId }
  | { kind: "committed"; inc: Incarnation; cut: Epoch }
  | { kind: "recovering"; inc: Incarnation; leader: HostId; failed: HostId[] }
  | { kind: "recovered"; inc: Incarnation; cut: Epoch; committed: Epoch; promoted: Rank[]; rolledBack: Rank[]; images: Rank[] }
  /** Every member's backup holds the recovery cut (which is now committed): the group is protected again. */
  | { kind: "reprotected"; inc: Incarnation; cut: Epoch }
  /** Members without a backup host: nothing commits until hosts come back. */
  | { kind: "degraded"; inc: Incarnation; ranks: Rank[] }
  /** Members with no surviving copy (a second failure before re-protection): the group stops. */
  | { kind: "lost"; inc: Incarnation; ranks: Rank[] }
  /** The store names this host failed (it was suspected, e.g. while paused): it dropped every replica of the group. */
  | { kind: "fenced"; inc: Incarnation };

export type Effect =
  | { type: "send"; to: HostId; message: GroupMessage }
  | { type: "vm.deliver"; rank: Rank; from: Rank; seq: number; payload: Opaque }
  | { type: "vm.capture"; rank: Rank; inc: Incarnation; epoch: Epoch }
  | { type: "vm.commit"; rank: Rank; epoch: Epoch }
  | { type: "vm.rollback"; rank: Rank; epoch: Epoch }
  | { type: "vm.image"; rank: Rank; inc: Incarnation; epoch: Epoch }
  | { type: "vm.pause"; rank: Rank }
  | { type: "vm.resume"; rank: Rank }
  | { type: "vm.stop"; rank: Rank }
  | { type: "release"; rank: Rank; records: OutputRecord[] }
  | { type: "backup.stage"; rank: Rank; epoch: Epoch; payload: Opaque }
  | { type: "backup.install"; rank: Rank; epoch: Epoch; payload: Opaque }
  | { type: "backup.fold"; rank: Rank; through: Epoch }
  | { type: "backup.discard"; rank: Rank; after: Epoch }
  | { type: "backup.promote"; rank: Rank; epoch: Epoch }
  | { type: "backup.drop"; rank: Rank }
  | { type: "store.get"; key: string }
  | { type: "store.cas"; key: string; expected: number; value: GroupRecord }
  | { type: "notify"; notice: Notice };

/** What the roles of one node share: configuration and the incarnation this host adopted. */
export interface CoreContext {
  readonly config: GroupConfig;
  readonly host: HostId;
  /** Adopted incarnation (fencing: older messages are dropped). */
  inc: Incarnation;
  /** The adopted incarnation's record (placement, leader). */
  record: GroupRecord;
}

export function send(out: Effect[], to: HostId, message: GroupMessage): void {
  out.push({ type: "send", to, message });
}
