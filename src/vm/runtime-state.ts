/**
 * The part of a VM's machine state that the hypervisor keeps outside linear
 * memory: timers, unreleased external output, sequence numbers. It travels in
 * every checkpoint, so it fails over with the VM.
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
}

export function initialRuntimeState(): RuntimeState {
  return { epoch: 1, timers: new Map(), output: [], output_bytes: 0, output_seq: 1, booted: false };
}

export function encodeRuntimeState(state: RuntimeState): Uint8Array {
  return serialize(state);
}

export function decodeRuntimeState(bytes: Uint8Array): RuntimeState {
  const state = deserialize(bytes) as RuntimeState;
  if (typeof state?.epoch !== "number" || !(state.timers instanceof Map) || !Array.isArray(state.output)) {
    throw new TypeError("runtime state is malformed");
  }
  return state;
}
