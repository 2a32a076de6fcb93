/**
 * The core's interface: events in, actions out (docs/PROTOCOL.md). A driver
 * (the host daemon, src/host/group/driver.ts; the simulator, src/sim/)
 * feeds `GroupCore.handle(event)` and carries out the actions it returns, in
 * order. Bytes (deltas, images, the module) stay with the driver behind
 * `Handle`s: the core only routes them.
 *
 * Replica steps (`vm`, `backup`, `members`) are asynchronous in a driver: it
 * runs the steps of one rank on this host in the order they were asked for,
 * one at a time, and answers each with a `done` event carrying the step's
 * `id`. Steps of different ranks may finish in any order.
 */
import type { GroupFrame, OutgoingFrame, ReleasedRecord, Route } from "./frames.js";
import type { Epoch, HostId, Incarnation, ProtectionRecord, Rank } from "./types.js";

/** Bytes or a reference to them, owned by the driver. */
export type Handle = unknown;

export type CoreEvent =
  /** Time passed; `now_ms` is monotonic. Call at `GroupCore.deadline()` at the latest. */
  | { type: "tick"; now_ms: number }
  /** A validated frame of this group from host `from` (this host's own frames are handled inside). */
  | { type: "frame"; from: HostId; frame: GroupFrame; body: Handle }
  /**
   * The hosts alive now as the failure detector sees them; those of them
   * heard from within half its timeout (the side of a partition this host is
   * on: when a link is cut, peers fall silent at once, but the detector
   * times each out on its own, a few ms apart); and the hosts registered in
   * the store as the driver last read it (a registration lives by its host's
   * lease). This host is in all three. Only a side that hears from half of
   * the cluster or more decides a failover (GroupCore.quorate).
   */
  | { type: "hosts"; live: HostId[]; heard: HostId[]; registered: HostId[] }
  /**
   * Answer to a `store_get` / `store_cas`: the key's value afterwards (null:
   * absent). `unavailable`: the store could not be reached (ok false, record
   * null): the core asks again after STORE_RETRY_MS, for as long as its
   * reason stands (a failure to decide waits for the store, it is not dropped).
   */
  | { type: "store"; op: "get" | "cas"; ok: boolean; record: ProtectionRecord | null; version: number; unavailable?: boolean }
  /** Deploy finished on every host: the members' routes; run the group. */
  | { type: "start"; routes: (Route | null)[] }
  /**
   * group mode: member `rank` took checkpoint `epoch` (asked by `capture_to`,
   * or on its own by the marker rule), in epoch order; `delta` is sealed.
   */
  | { type: "captured"; rank: Rank; epoch: Epoch; delivered: number[]; delta: Handle }
  /**
   * Member `rank` has external output (vm mode: or a held message) waiting in
   * epoch `epoch`. `urgent`: someone blocks on it (a reply to a request, a held
   * message); otherwise only log output waits, which does not hurry the epoch
   * below interval_ms (src/core/epoch-timer.ts). Sent once per epoch, and once
   * more if output that was not urgent becomes urgent.
   */
  | { type: "output_pending"; rank: Rank; epoch: Epoch; urgent: boolean }
  /**
   * Member `rank` did something in epoch `epoch`: a guest call ran (a
   * request, a delivered message, a timer) or a message was accepted. Sent
   * once per epoch (again after a rollback). An epoch in which no member of
   * the group did anything is not ended: its checkpoint would equal the
   * previous one (docs/PROTOCOL.md "Idle epochs").
   */
  | { type: "active"; rank: Rank; epoch: Epoch }
  /** A replica step finished (`ok: false`: it failed; `error` says why). */
  | { type: "done"; id: number; ok: true; value: StepValue }
  | { type: "done"; id: number; ok: false; error: string };

/** What a finished step reports (the fields its kind has). */
export interface StepValue {
  /** capture (vm/none): the checkpoint taken, its delivered vector, the sealed delta, messages held (vm mode); restore with a fresh image: the image's checkpoint. */
  epoch?: Epoch;
  delivered?: number[];
  delta?: Handle;
  held?: number;
  /** restore, promote: where the member's message path listens now. */
  route?: Route;
}

export type VmStep =
  /** group mode: capture checkpoint `epoch` unless the marker rule did (the delta comes as a `captured` event); with `commit`, first commit it. */
  | { op: "capture_to"; epoch: Epoch; commit?: { epoch: Epoch; trim: number[] } }
  /** vm, none mode: checkpoint now on the member's own clock (answer: epoch, delivered, delta, held). */
  | { op: "capture" }
  /** Cut `epoch` committed: release its output; trim the sender log to `trim` in the same step. */
  | { op: "commit"; epoch: Epoch; trim?: number[] }
  | { op: "trim"; delivered_by_receiver: number[] }
  /** Recovery: stop timers and deliveries, keep arrivals. */
  | { op: "freeze" }
  /**
   * Recovery: go to cut `cut` (`rollback` in place; cut 0 is the booted
   * deployed state) or `keep` the state as it is, adopt incarnation `inc`, release the cut's
   * output (if `cut` is not null), ship an image to `image_to` (at the cut;
   * `fresh`: at a new cut, vm mode), and answer the delivered vector and route.
   */
  | { op: "restore"; how: "rollback" | "keep"; cut: Epoch | null; inc: Incarnation; image_to: HostId | null; fresh_image: boolean }
  /** This host was declared failed, or the group stopped: terminate; nothing more is released. */
  | { op: "stop" };

export type BackupStep =
  /** Keep (verify) delta `epoch`, not applied yet. */
  | { op: "stage"; epoch: Epoch; delta: Handle }
  /** Cut `cut` committed: fold staged deltas <= cut (lazily, in batches). */
  | { op: "commit"; cut: Epoch }
  /** Replace this backup by the full image (body of an `image` frame). */
  | { op: "install"; epoch: Epoch; image: Handle; released_seq: number; history: ReleasedRecord[] }
  /** Recovery: fold to `cut`, drop staged deltas above it. */
  | { op: "rollback_to"; cut: Epoch }
  /** Recovery: fold to `cut` (group) or to the newest staged checkpoint (vm: `cut` null), become the primary in place (paused). */
  | { op: "promote"; cut: Epoch | null }
  | { op: "drop" };

/** Host-level steps over every member of the group here at once (routes pair the local members). */
export type MembersStep =
  /** New routes for every member here; re-send what each receiver lacks (`delivered[r][s]`), if given; then run. */
  { op: "run"; routes: (Route | null)[]; delivered: number[][] | null };

export type CoreAction =
  /** To host `to` (never this host). `body`: a handle from an event, or "module" (the group's module). */
  | { type: "send"; to: HostId; frame: OutgoingFrame; body?: Handle | "module" }
  | { type: "vm"; id: number; rank: Rank; step: VmStep }
  | { type: "backup"; id: number; rank: Rank; step: BackupStep }
  | { type: "members"; id: number; step: MembersStep }
  | { type: "store_get"; key: string }
  | { type: "store_cas"; key: string; expected: number; value: ProtectionRecord }
  | { type: "notify"; notice: Notice };

/** What happened, for logs, status and checkers; the core never needs an answer. */
export type Notice =
  | { kind: "suspected"; host: HostId }
  | { kind: "decided"; inc: Incarnation; dead: HostId[]; record: ProtectionRecord }
  | { kind: "cut_chosen"; inc: Incarnation; cut: Epoch | null; images: Rank[]; committed: Epoch }
  | { kind: "rolled_back"; inc: Incarnation; cut: Epoch | null; rolled_back: Rank[]; promoted: Rank[] }
  | { kind: "resumed"; inc: Incarnation; cut: Epoch | null; recovery_ms: number }
  | { kind: "committed"; inc: Incarnation; cut: Epoch }
  | { kind: "degraded"; inc: Incarnation; ranks: Rank[] }
  | { kind: "lost"; inc: Incarnation; ranks: Rank[] }
  | { kind: "fenced"; inc: Incarnation }
  /** A failure to decide, but this host sees no majority of the cluster (GroupCore.quorate): it only reads the record until it does. */
  | { kind: "no_quorum"; heard: HostId[]; registered: HostId[] }
  | { kind: "refused"; reason: string }
  | { kind: "step_failed"; rank: Rank | null; step: string; error: string };
