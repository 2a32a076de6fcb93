/**
 * The part of a VM's machine state that the hypervisor keeps outside linear
 * memory: timers, unreleased external output, sequence numbers, the group
 * channels (sender log, per-destination and per-source sequence numbers). It
 * travels in every checkpoint, so it fails over with the VM.
 *
 * Encoded with V8's structured serializer (`node:v8`): compact, binary, keeps
 * Uint8Array payloads as bytes, and the checkpoint format around it carries
 * the magic, version and checksum.
 */
import { deserialize, serialize } from "node:v8";

export const OUTPUT_LOG = 0;
export const OUTPUT_REPLY = 1;

/** One record of external output: held until the cut of its epoch commits. */
export interface OutputRecord {
  /** OUTPUT_LOG (the VM's output stream) or OUTPUT_REPLY (answer to a client request). */
  kind: number;
  /** Epoch that produced it: released once cut `epoch` commits. */
  epoch: number;
  /** Per-VM sequence number, dense from 1: a sink drops anything at or below what it already has. */
  seq: number;
  session: number;
  request_id: number;
  bytes: Uint8Array;
  /** Wall clock when the guest produced it: release latency = release time - this. */
  produced_ms: number;
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

export interface RuntimeState {
  /** Epoch being executed; checkpoint `epoch` ends it. */
  epoch: number;
  /** Armed timers: id -> due time (wall clock, ms). */
  timers: Map<number, number>;
  /** Unreleased external output, oldest first. */
  output: OutputRecord[];
  output_bytes: number;
  /** Next output sequence number. */
  output_seq: number;
  /** Set when the guest has booted (its `start` ran); a restored VM never boots again. */
  booted: boolean;
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

export function initialRuntimeState(): RuntimeState {
  return {
    epoch: 1,
    timers: new Map(),
    output: [],
    output_bytes: 0,
    output_seq: 1,
    booted: false,
    incarnation: 0,
    sent_seq: [],
    delivered: [],
    sender_log: [],
    sender_log_bytes: 0,
    sender_log_trimmed: [],
  };
}

export function encodeRuntimeState(state: RuntimeState): Uint8Array {
  return serialize(state);
}

export function decodeRuntimeState(bytes: Uint8Array): RuntimeState {
  const state = deserialize(bytes) as RuntimeState;
  if (typeof state?.epoch !== "number" || !(state.timers instanceof Map) || !Array.isArray(state.output)) {
    throw new TypeError("runtime state is malformed");
  }
  // States written before group messaging existed carry no channel fields: they had sent and delivered nothing.
  state.incarnation ??= 0;
  state.sent_seq ??= [];
  state.delivered ??= [];
  state.sender_log ??= [];
  state.sender_log_bytes ??= 0;
  state.sender_log_trimmed ??= [];
  if (
    typeof state.incarnation !== "number" ||
    !Array.isArray(state.sent_seq) ||
    !Array.isArray(state.delivered) ||
    !Array.isArray(state.sender_log) ||
    !Array.isArray(state.sender_log_trimmed) ||
    typeof state.sender_log_bytes !== "number"
  ) {
    throw new TypeError("runtime state is malformed (group channels)");
  }
  return state;
}
