/**
 * The typed messages between a host thread and a VM worker thread: the whole
 * sandbox boundary, in one file. Binary payloads (deltas, images, request
 * bodies) cross as Uint8Array and are transferred, never copied through JSON.
 */
import type { MessagePort } from "node:worker_threads";
import type { ModuleInfo } from "../guest/module-info.js";
import type { PathCounters, Route } from "./message-path.js";
import type { PackedOutput } from "./runtime-state.js";
import type { CapturedDelta, GroupMessage, ReceiveStatus, VmLimits } from "./machine.js";
import type { DeltaPoolStats } from "./delta-pool.js";
import type { TlsMaterial } from "../tls/context.js";

export interface GuestBundle {
  module: WebAssembly.Module;
  info: ModuleInfo;
  hash: Uint8Array;
}

export interface WorkerVmOptions {
  rank: number;
  size: number;
  limits: VmLimits;
  /** "auto": the worker fires timers on its own clock. "manual": only on `fire_timers` (tests, benchmarks). */
  timers: "auto" | "manual";
  /** See VmOptions.consistent_cut (default true). */
  consistent_cut?: boolean;
  /** See VmOptions.sender_log (default true). */
  sender_log?: boolean;
  /** Threads this replica may share with others of the same pool (src/vm/vm.ts); absent: a thread of its own. */
  thread?: WorkerThreadPool;
}

/**
 * Replicas that may share VM threads: those of one pool on one host (a
 * group's primaries, or its backups) run on at most `threads_max` threads.
 * A runaway guest call stops its whole thread, so a pool never mixes groups.
 */
export interface WorkerThreadPool {
  name: string;
  threads_max: number;
}

export type ReplicaRole = "primary" | "backup";

export interface VmStatus {
  role: ReplicaRole;
  /** Primary: the epoch being executed. Backup: the committed cut it holds. */
  epoch: number;
  committed: number;
  memory_bytes: number;
  dirty_pages: number;
  pending_output: number;
  crashed: string | null;
  /** Primary: the group incarnation the VM was last told. Backup: 0. */
  incarnation: number;
  /** Received group messages held until deliverable (primary). */
  pending_messages: number;
  /** Sender log size against limits.sender_log_bytes_max (primary). */
  sender_log_bytes: number;
  /** The pool the primary's deltas are laid out in (src/vm/delta-pool.ts); null for a backup. */
  delta_pool: DeltaPoolStats | null;
}

/** A capture as the host thread gets it: the delta (laid out, NOT sealed: the receiving thread calls
 * sealDelta before it leaves the host) plus what the guest sent while handling held messages that the
 * new epoch made deliverable, for the host to route. */
export type CaptureResult = CapturedDelta & {
  outbox: GroupMessage[];
  path: PathCounters | null;
  /**
   * The delta's buffer is lent by the VM thread's pool and was transferred
   * with the result: this loan id goes back with it (VmWorker.recycle) once
   * the host thread is done with the delta. null: not a pooled buffer.
   */
  delta_loan: number | null;
};

export interface ReceiveBatchResult {
  /** One per message offered, same order. "full" and "early" were NOT taken: offer them again later. */
  statuses: ReceiveStatus[];
  /** Guest `message` calls made. */
  delivered: number;
  /** What the guest sent while handling them. */
  outbox: GroupMessage[];
}

/** Every request the host sends, with its arguments and the value it gets back. */
export interface WorkerOps {
  boot: { args: { guest: GuestBundle; options: WorkerVmOptions }; result: VmStatus };
  restore: { args: { guest: GuestBundle; options: WorkerVmOptions; image: Uint8Array }; result: VmStatus };
  backup: { args: { guest: GuestBundle; options: WorkerVmOptions; image: Uint8Array | null }; result: VmStatus };
  apply: { args: { delta: Uint8Array }; result: VmStatus };
  /**
   * Several deltas in epoch order, in one request (a backup folding a batch),
   * each checksum-verified by the caller already (it is not checked again).
   * Returns the output records the folded states held, each once, in seq
   * order (packed, see PackedOutput): the caller mirrors those its committed cut released.
   */
  apply_batch: { args: { deltas: Uint8Array[] }; result: { output: PackedOutput } };
  promote: { args: Record<string, never>; result: VmStatus };
  /** Direct call of the guest's `message` export, bypassing the channels (tests, fixtures). Group messages use `receive`. */
  message: { args: { from_rank: number; payload: Uint8Array }; result: GroupMessage[] };
  request: { args: { session: number; request_id: number; payload: Uint8Array }; result: GroupMessage[] };
  timer: { args: { timer_id: number }; result: GroupMessage[] };
  fire_timers: { args: { now_ms: number }; result: { fired: number; outbox: GroupMessage[] } };
  /**
   * Offers group messages to the VM in order (VmCore.receive each). A crash or a
   * malformed message ends the batch with an error: the messages before it were
   * processed, what the guest sent meanwhile comes with the next outbox.
   */
  receive: { args: { messages: GroupMessage[] }; result: ReceiveBatchResult };
  take_outbox: { args: Record<string, never>; result: GroupMessage[] };
  delivered_vector: { args: Record<string, never>; result: number[] };
  trim_sender_log: { args: { delivered_by_receiver: number[] }; result: { trimmed: number; sender_log_bytes: number } };
  resend_for: { args: { receiver: number; delivered: number }; result: GroupMessage[] };
  set_incarnation: { args: { incarnation: number }; result: VmStatus };
  invoke: { args: { name: string; args: (number | bigint)[] }; result: unknown };
  capture: { args: Record<string, never>; result: CaptureResult };
  /**
   * group mode: end epoch `epoch` (the leader's `end`), unless the VM ended it
   * already on its own (a message from the next epoch arrived first: see the
   * `captured` event); then `captured` is null, else the epoch captured,
   * whose delta was posted as a `captured` event just before this result.
   * With `commit`, first commit as the `commit` op does; `released` is what
   * that released.
   */
  capture_to: {
    args: { epoch: number; commit?: { epoch: number; trim?: number[] } };
    result: { captured: number | null; released: PackedOutput };
  };
  /** Cut `epoch` committed: its output is released (packed, in seq order); with `trim`, the sender log is trimmed in the same step (trimSenderLog). */
  commit: { args: { epoch: number; trim?: number[] }; result: PackedOutput };
  rollback: { args: { epoch: number }; result: { pages_restored: number; rollback_us: number } };
  image: { args: Record<string, never>; result: Uint8Array };
  /** Full image of the cut the primary is at right now, without a new capture (after a rollback, before it runs again). */
  image_current: { args: Record<string, never>; result: Uint8Array };
  status: { args: Record<string, never>; result: VmStatus };
  // ---- the group message data path (src/vm/message-path.ts): a primary sends and receives on its own thread
  /**
   * Listens for peers on `bind_host`; from now on what the guest sends goes out on the path, not in outboxes.
   * `tls`: the host's certificate, key and cluster CA: links are mutual TLS (null: plain TCP). Kept on the
   * VM thread only for its sockets: never in a status, event or error.
   */
  path_open: { args: { bind_host: string; hold_until_commit: boolean; tls: TlsMaterial | null }; result: Route };
  /**
   * Where every rank listens (null: nowhere / this VM); the ranks on other VM
   * threads of this host and the thread each is on; and MessageChannel ports
   * to other VM threads (transferred; one per pair of threads, given through
   * one VM of each: its thread's message endpoint keeps them for every VM on it).
   */
  path_routes: { args: { routes: (Route | null)[]; locals: { rank: number; thread: number }[]; ports: { thread: number; port: MessagePort }[] }; result: null };
  /** Recovery: timers stopped, nothing sent, arrivals kept for later. */
  freeze: { args: Record<string, never>; result: VmStatus };
  /** Timers on, kept arrivals offered, what the guest sent meanwhile (e.g. in `start`) sent. */
  run: { args: Record<string, never>; result: VmStatus };
  /** After a rollback or promotion: re-send from the sender log what each receiver lacks (`delivered[r]` = what r delivered from this VM). */
  resend: { args: { delivered: number[] }; result: { resent: number } };
  path_counters: { args: Record<string, never>; result: PathCounters | null };
  /**
   * One-way: posted with request id 0 and never answered. Pooled delta
   * buffers the host thread is done with, transferred back with their loan
   * ids (VmWorker.recycle); a loan the pool no longer waits for is dropped.
   */
  recycle: { args: { loans: { id: number; buffer: ArrayBuffer }[] }; result: null };
  /** The replica leaves the thread: its timer stops, its message path closes; the thread runs on for the others. */
  drop: { args: Record<string, never>; result: null };
}

export type WorkerOp = keyof WorkerOps;

/**
 * A request to replica `vm` of the thread (boot, restore and backup create
 * it; `drop` removes it). Replica ids start at 1: a request to `vm` 0 is the
 * host's probe that the thread is up, answered null whatever its op.
 */
export type WorkerRequest = { [K in WorkerOp]: { id: number; vm: number; op: K; args: WorkerOps[K]["args"] } }[WorkerOp];

export interface SerializedError {
  name: string;
  code: string;
  message: string;
}

/** Messages the worker sends without being asked. */
export type WorkerEvent =
  | { event: "crashed"; message: string }
  /**
   * First external output of an epoch, and the first urgent output (a reply,
   * a held message) if the first was log output: the host may checkpoint
   * early (adaptive epochs, src/core/epoch-timer.ts).
   */
  | { event: "output_pending"; epoch: number; urgent: boolean }
  /** The VM did something in `epoch` (a guest call ran, a message was accepted): once per epoch, again after a rollback. */
  | { event: "active"; epoch: number }
  /**
   * group mode: a message from epoch e+1 reached this VM in epoch e, so the
   * leader has ended e: the VM captured checkpoint e at once (the message is
   * the marker) instead of holding the message until the leader's `end e`
   * reaches its host. capture_to's checkpoints come the same way. The delta
   * is the host's to ship.
   */
  | { event: "captured"; result: CaptureResult }
  /** Something went wrong on the message path (a link refused or broken); the VM runs on. */
  | { event: "problem"; message: string };

export type WorkerResponse =
  | { kind: "result"; id: number; ok: true; value: unknown }
  | { kind: "result"; id: number; ok: false; error: SerializedError }
  | { kind: "event"; vm: number; body: WorkerEvent }
  /** A guest call began while the host's watchdog was parked (WATCHDOG_PARKED): it watches again. */
  | { kind: "watch" };

/**
 * Shared call watchdog: the worker marks each guest call in a SharedArrayBuffer
 * (word 0: busy flag, word 1: call counter, word 2: the worker thread's kernel
 * id, 0 where unknown, word 3: the replica whose guest runs), so the host
 * thread can stop a call that runs past its CPU budget without a message per
 * call, and say whose call it was. Word 4: 1 while the host does not poll
 * (the thread made no call for a while; polls are wake-ups of an idle
 * host); the call that finds it 1 sets it to 0 and says so (`watch`).
 */
export const WATCHDOG_BUSY = 0;
export const WATCHDOG_SEQ = 1;
export const WATCHDOG_TID = 2;
export const WATCHDOG_VM = 3;
export const WATCHDOG_PARKED = 4;
export const WATCHDOG_WORDS = 5;
