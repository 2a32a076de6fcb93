/**
 * The typed messages between a host thread and a VM worker thread: the whole
 * sandbox boundary, in one file. Binary payloads (deltas, images, request
 * bodies) cross as Uint8Array and are transferred, never copied through JSON.
 */
import type { ModuleInfo } from "../guest/module-info.js";
import type { OutputRecord } from "./runtime-state.js";
import type { OutboxMessage, VmLimits } from "./machine.js";

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
}

export interface CaptureResult {
  epoch: number;
  /** Laid out, NOT sealed: the receiving thread calls sealDelta before it leaves the host. */
  delta: Uint8Array;
  dirty_pages: number;
  pause_us: number;
}

/** Every request the host sends, with its arguments and the value it gets back. */
export interface WorkerOps {
  boot: { args: { guest: GuestBundle; options: WorkerVmOptions }; result: VmStatus };
  restore: { args: { guest: GuestBundle; options: WorkerVmOptions; image: Uint8Array }; result: VmStatus };
  backup: { args: { guest: GuestBundle; options: WorkerVmOptions; image: Uint8Array | null }; result: VmStatus };
  apply: { args: { delta: Uint8Array }; result: VmStatus };
  promote: { args: Record<string, never>; result: VmStatus };
  message: { args: { from_rank: number; payload: Uint8Array }; result: OutboxMessage[] };
  request: { args: { session: number; request_id: number; payload: Uint8Array }; result: OutboxMessage[] };
  timer: { args: { timer_id: number }; result: OutboxMessage[] };
  fire_timers: { args: { now_ms: number }; result: { fired: number; outbox: OutboxMessage[] } };
  invoke: { args: { name: string; args: (number | bigint)[] }; result: unknown };
  capture: { args: Record<string, never>; result: CaptureResult };
  commit: { args: { epoch: number }; result: OutputRecord[] };
  rollback: { args: { epoch: number }; result: { pages_restored: number; rollback_us: number } };
  image: { args: Record<string, never>; result: Uint8Array };
  status: { args: Record<string, never>; result: VmStatus };
}

export type WorkerOp = keyof WorkerOps;

export type WorkerRequest = { [K in WorkerOp]: { id: number; op: K; args: WorkerOps[K]["args"] } }[WorkerOp];

export interface SerializedError {
  name: string;
  code: string;
  message: string;
}

/** Messages the worker sends without being asked. */
export type WorkerEvent =
  | { event: "crashed"; message: string }
  /** Messages sent by timer-driven guest calls (auto timers), for the host to route. */
  | { event: "outbox"; messages: OutboxMessage[] }
  /** First external output of an epoch: the host may checkpoint early (adaptive epochs). */
  | { event: "output_pending"; epoch: number };

export type WorkerResponse =
  | { kind: "result"; id: number; ok: true; value: unknown }
  | { kind: "result"; id: number; ok: false; error: SerializedError }
  | { kind: "event"; body: WorkerEvent };

/**
 * Shared call watchdog: the worker marks each guest call in a SharedArrayBuffer
 * (slot 0: busy flag, slot 1: call counter), so the host thread can stop a call
 * that runs past its CPU budget without a message per call.
 */
export const WATCHDOG_BUSY = 0;
export const WATCHDOG_SEQ = 1;
export const WATCHDOG_SLOTS = 2;
