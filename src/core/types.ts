/**
 * The vocabulary of the group protocol core (docs/PROTOCOL.md): hosts, ranks,
 * epochs, incarnations, modes, and the one record of a protected group that
 * lives in the coordination store. Pure types and limits; the core imports
 * nothing from Node (lint-enforced), so the daemon and the simulator run the
 * very same code.
 */

/** A host's name (the daemon's `--id`; the simulator's `h0`, `h1`, ...). */
export type HostId = string;
/** A member's index in its group, 0..size-1. */
export type Rank = number;
/** Checkpoint number; cut 0 is the deployed state. */
export type Epoch = number;
/** The group's generation: +1 at every failover decision; stale ones are refused everywhere. */
export type Incarnation = number;

/**
 * `group`: peer messages leave at once; the leader ends epochs on every
 * member together and commits cut e once every backup staged e.
 * `vm`: each member checkpoints on its own clock and every message it sends,
 * peers included, is held until its own checkpoint commits (Remus, the
 * baseline). `none`: no backups; local checkpoints only pace output.
 */
export type Mode = "none" | "vm" | "group";

export interface EpochTiming {
  interval_ms: number;
  min_interval_ms: number;
  max_interval_ms: number;
}

/** Per-VM resource limits a record carries (the manifest's `limits`). */
export interface RecordLimits {
  memory_mib: number;
  call_cpu_ms: number;
  output_bytes_max: number;
}

/** Where one member's replicas live. */
export interface ReplicaPlacement {
  primary: HostId;
  /** null: no backup (mode none, or degraded: no spare host). */
  backup: HostId | null;
}

/**
 * The coordination-store record of a protected group (`protection/<group>`):
 * changed only by compare-and-swap, and every change bumps the incarnation,
 * so the CAS that wins is the failover decision.
 */
export interface ProtectionRecord {
  group: string;
  mode: Mode;
  size: number;
  incarnation: Incarnation;
  /** Host that ends epochs and commits cuts (group mode) and coordinates recovery. */
  leader: HostId;
  /** Indexed by rank. */
  placement: ReplicaPlacement[];
  /** Hosts declared failed: fenced, never placed again in this group. */
  failed: HostId[];
  epoch: EpochTiming;
  limits: RecordLimits;
}

export const protectionKey = (group: string): string => `protection/${group}`;

// ---- limits: every queue of the core is bounded by one of these ----------------------------

/** Members of one group. */
export const GROUP_SIZE_MAX = 256;
/**
 * group mode: epochs ended and not yet committed; beyond this the leader
 * stretches the epoch. One: the next epoch ends once the previous cut
 * committed, so an epoch lasts at least one commit round trip. More in flight
 * shortens epochs under continuous output but multiplies checkpoint work when
 * the hosts are busy (measured with `cohort bench allreduce`: group mode fell
 * to about half of none mode with 4 in flight).
 */
export const EPOCHS_INFLIGHT_MAX = 1;
/** vm mode: a member's deltas sent and not yet staged; beyond this it skips captures (the epoch stretches). */
export const MEMBER_INFLIGHT_MAX = 8;
/** Staged, unacknowledged epochs a leader keeps acks for (one in flight, plus a recovery cut). */
export const ACK_EPOCHS_MAX = EPOCHS_INFLIGHT_MAX + 2;
/** How often a recovery coordinator repeats `recover` to hosts that have not reported. */
export const RECOVER_RETRY_MS = 300;
/** A store read or compare-and-swap that could not reach the store is tried again after this long. */
export const STORE_RETRY_MS = 250;
/** A host declared failed that still sends is told its incarnation is over at most this often. */
export const STALE_TELL_INTERVAL_MS = 1000;
/** A host that is not the first candidate proposes a failover only after this many detection timeouts. */
export const PROPOSE_BACKOFF_DETECTS = 3;
