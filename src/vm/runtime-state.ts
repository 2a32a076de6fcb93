/**
 * The part of a VM's machine state that the hypervisor keeps outside linear
 * memory: timers, unreleased external output, sequence numbers, the group
 * channels (sender log, per-destination and per-source sequence numbers). It
 * travels in every checkpoint, so it fails over with the VM.
 *
 * Encoded as numbers and packed records, in one buffer; the checkpoint
 * format around it carries the magic, version and checksum. Layout
 * (little-endian):
 *
 *   u8  STATE_LAYOUT_PACKED (0x44)
 *   u32 length of the output section
 *   output section: the unreleased output records, packed (packOutput)
 *   f64 epoch, output_bytes, output_seq, booted (0/1), incarnation, sender_log_bytes
 *   f64 n, then n f64: sent_seq; the same for delivered, then sender_log_trimmed
 *   f64 t, then t pairs of f64 (timer id, due time), in arming order
 *   the rest: the sender log, packed (packSenderLog)
 *
 * Written by hand rather than with V8's structured serializer, which the
 * layouts before this one used: serializing even the small remaining record
 * was a fixed cost in every checkpoint pause, next to a page copy of tens of
 * microseconds. The output comes first and on its own so that a backup can read what
 * a checkpoint released (decodeOutputRecords) without decoding the rest.
 * States of the earlier layouts (V8 bytes only, first byte 0xFF; output
 * section then V8 bytes, first byte 0x43) still decode.
 */
import { deserialize } from "node:v8";
import { InvalidFieldError } from "../checkpoint/errors.js";
import { assert } from "../util/assert.js";
import type { ChannelRecord, LoggedMessage } from "../core/channel.js";

/**
 * The runtime-state field of a checkpoint does not decode to a runtime state.
 * An InvalidFieldError (code "InvalidField"): the state travels inside deltas
 * and images, and whoever reads one handles a bad state like any other bad
 * field of the blob.
 */
export class MalformedRuntimeStateError extends InvalidFieldError {}

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

/** The channel fields (ChannelRecord) are the group channels' replicated part, kept by Channels (src/core/channel.ts). */
export interface RuntimeState extends ChannelRecord {
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
  // Written out, not spread from emptyChannelRecord(): property order is the order V8 serializes, i.e. part of the format.
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

/**
 * Records of numbers plus one byte payload each, as one byte array: f64
 * count, then per record its numbers and its payload length as f64, then the
 * payloads back to back. The structured serializer spends most of a group
 * member's capture on many small records (one host object per Uint8Array),
 * and the backup as much again reading them back; one array is one object.
 */
function packRecords<T>(records: readonly T[], fields: number, numbersOf: (r: T) => number[], bytesOf: (r: T) => Uint8Array): Uint8Array {
  const out = new Uint8Array(packedSize(records, fields, bytesOf));
  writeRecords(out, 0, records, fields, numbersOf, bytesOf);
  return out;
}

/** Bytes packRecords takes for `records`. */
function packedSize<T>(records: readonly T[], fields: number, bytesOf: (r: T) => Uint8Array): number {
  let payload = 0;
  for (const r of records) payload += bytesOf(r).length;
  return 8 + records.length * 8 * (fields + 1) + payload;
}

/** packRecords laid out into `out` at `start` (which has packedSize bytes there): the capture path writes each section once. */
function writeRecords<T>(out: Uint8Array, start: number, records: readonly T[], fields: number, numbersOf: (r: T) => number[], bytesOf: (r: T) => Uint8Array): void {
  const entry = 8 * (fields + 1);
  const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
  view.setFloat64(start, records.length, true);
  let at = start + 8;
  let body = start + 8 + records.length * entry;
  for (const r of records) {
    const bytes = bytesOf(r);
    const numbers = numbersOf(r);
    assert(numbers.length === fields, "packRecords: field count");
    numbers.forEach((v, i) => view.setFloat64(at + 8 * i, v, true));
    view.setFloat64(at + 8 * fields, bytes.length, true);
    out.set(bytes, body);
    at += entry;
    body += bytes.length;
  }
}

/** Inverse of packRecords; `valid` checks each record's numbers; `what` names the section in errors. Payloads are copies. */
function unpackRecords<T>(packed: Uint8Array, fields: number, valid: (numbers: number[]) => boolean, build: (numbers: number[], bytes: Uint8Array) => T, what: string): T[] {
  const malformed = () => new MalformedRuntimeStateError(`runtime state is malformed (${what})`);
  const entry = 8 * (fields + 1);
  if (packed.length < 8) throw malformed();
  const view = new DataView(packed.buffer, packed.byteOffset, packed.byteLength);
  const count = view.getFloat64(0, true);
  if (!Number.isSafeInteger(count) || count < 0 || 8 + count * entry > packed.length) throw malformed();
  const records: T[] = [];
  let at = 8;
  let body = 8 + count * entry;
  for (let i = 0; i < count; i++) {
    const numbers: number[] = [];
    for (let k = 0; k < fields; k++) numbers.push(view.getFloat64(at + 8 * k, true));
    const length = view.getFloat64(at + 8 * fields, true);
    if (!valid(numbers) || !Number.isSafeInteger(length) || length < 0 || body + length > packed.length) throw malformed();
    // A copy per record: a view into one shared buffer would drag the whole array along whenever one is cloned.
    records.push(build(numbers, packed.slice(body, body + length)));
    at += entry;
    body += length;
  }
  if (body !== packed.length) throw malformed();
  return records;
}

const naturals = (numbers: number[]) => numbers.every((n) => Number.isSafeInteger(n) && n >= 0);

const SENDER_LOG_FIELDS = 3;
const senderLogNumbers = (e: LoggedMessage) => [e.to, e.epoch, e.seq];
const OUTPUT_FIELDS = 6;
const outputNumbers = (r: OutputRecord) => [r.kind, r.epoch, r.seq, r.session, r.request_id, r.produced_ms];
const payloadOf = (r: { bytes: Uint8Array }) => r.bytes;

export function packSenderLog(log: readonly LoggedMessage[]): Uint8Array {
  return packRecords(log, SENDER_LOG_FIELDS, senderLogNumbers, payloadOf);
}

export function unpackSenderLog(packed: Uint8Array): LoggedMessage[] {
  return unpackRecords(packed, SENDER_LOG_FIELDS, naturals, ([to, epoch, seq], bytes) => ({ to, epoch, seq, bytes }), "packed sender log");
}

export function packOutput(records: readonly OutputRecord[]): Uint8Array {
  return packRecords(records, OUTPUT_FIELDS, outputNumbers, payloadOf);
}

/**
 * Output records as packOutput lays them out: how a VM thread hands the
 * records a commit released (and a backup thread those a fold mirrors) to its
 * host thread, one transferred buffer rather than an array of objects. V8's
 * structured clone of hundreds of small records an epoch (an object and a
 * Uint8Array each) was the largest single item of a host main thread's CPU
 * with a group that logs on every step.
 */
export type PackedOutput = Uint8Array;

/** Inverse of packOutput; each record's bytes are a copy (a view would keep the whole batch alive). */
export function unpackOutput(packed: Uint8Array): OutputRecord[] {
  const view = new PackedOutputView(packed);
  const out: OutputRecord[] = [];
  for (let i = 0; i < view.count; i++) out.push(view.record(i));
  return out;
}

const OUTPUT_ENTRY_BYTES = 8 * (OUTPUT_FIELDS + 1);

/**
 * Random access to the records of a PackedOutput without building them: a
 * host keeps released output this way (src/host/output-log.ts), one object
 * per batch, and builds a record only when someone reads it. The layout is
 * checked whole on construction (throws MalformedRuntimeStateError), as
 * unpackOutput, which reads through this, always did.
 */
export class PackedOutputView {
  readonly count: number;
  private readonly view: DataView;
  /** Where record i's payload starts; offsets[count] is the end. */
  private readonly offsets: Uint32Array;

  constructor(readonly packed: PackedOutput) {
    const malformed = () => new MalformedRuntimeStateError("runtime state is malformed (output section)");
    if (packed.length < 8) throw malformed();
    this.view = new DataView(packed.buffer, packed.byteOffset, packed.byteLength);
    const count = this.view.getFloat64(0, true);
    if (!Number.isSafeInteger(count) || count < 0 || 8 + count * OUTPUT_ENTRY_BYTES > packed.length) throw malformed();
    this.count = count;
    this.offsets = new Uint32Array(count + 1);
    let body = 8 + count * OUTPUT_ENTRY_BYTES;
    for (let i = 0; i < count; i++) {
      // Any integers (a guest picks the session it replies to), a finite clock reading.
      for (let k = 0; k < 5; k++) if (!Number.isSafeInteger(this.number(i, k))) throw malformed();
      const length = this.number(i, OUTPUT_FIELDS);
      if (!Number.isFinite(this.number(i, 5)) || !Number.isSafeInteger(length) || length < 0 || body + length > packed.length) throw malformed();
      this.offsets[i] = body;
      body += length;
    }
    if (body !== packed.length) throw malformed();
    this.offsets[count] = body;
  }

  kind(i: number): number {
    return this.number(i, 0);
  }

  epoch(i: number): number {
    return this.number(i, 1);
  }

  seq(i: number): number {
    return this.number(i, 2);
  }

  request_id(i: number): number {
    return this.number(i, 4);
  }

  produced_ms(i: number): number {
    return this.number(i, 5);
  }

  /** Record i's payload: a view into the batch. */
  bytes(i: number): Uint8Array {
    return this.packed.subarray(this.offsets[i], this.offsets[i + 1]);
  }

  /** Record i built, its bytes copied out of the batch. */
  record(i: number): OutputRecord {
    const bytes = this.packed.slice(this.offsets[i], this.offsets[i + 1]);
    return { kind: this.kind(i), epoch: this.epoch(i), seq: this.seq(i), session: this.number(i, 3), request_id: this.request_id(i), produced_ms: this.produced_ms(i), bytes };
  }

  private number(i: number, field: number): number {
    return this.view.getFloat64(8 + i * OUTPUT_ENTRY_BYTES + 8 * field, true);
  }
}

/** First byte of each layout (see the file comment); V8's serializer starts with 0xFF. */
const STATE_LAYOUT_PACKED = 0x44;
const STATE_LAYOUT_SPLIT = 0x43;
const V8_VERSION_TAG = 0xff;

/** What is serialized: the state without its output, its sender log packed (see packSenderLog). */
type EncodedState = Omit<RuntimeState, "sender_log" | "output"> & { output?: OutputRecord[]; sender_log?: LoggedMessage[]; sender_log_packed?: Uint8Array };

export function encodeRuntimeState(state: RuntimeState): Uint8Array {
  const section = packedSize(state.output, OUTPUT_FIELDS, payloadOf);
  const log = packedSize(state.sender_log, SENDER_LOG_FIELDS, payloadOf);
  const lists = [state.sent_seq, state.delivered, state.sender_log_trimmed];
  const numbers = PACKED_COUNTERS + lists.reduce((n, l) => n + 1 + l.length, 0) + 1 + 2 * state.timers.size;
  const out = new Uint8Array(5 + section + 8 * numbers + log);
  const view = new DataView(out.buffer);
  out[0] = STATE_LAYOUT_PACKED;
  view.setUint32(1, section, true);
  writeRecords(out, 5, state.output, OUTPUT_FIELDS, outputNumbers, payloadOf);
  let at = 5 + section;
  const put = (v: number) => {
    view.setFloat64(at, v, true);
    at += 8;
  };
  for (const v of [state.epoch, state.output_bytes, state.output_seq, state.booted ? 1 : 0, state.incarnation, state.sender_log_bytes]) put(v);
  for (const list of lists) {
    put(list.length);
    for (const v of list) put(v);
  }
  put(state.timers.size);
  for (const [id, due] of state.timers) {
    put(id);
    put(due);
  }
  writeRecords(out, at, state.sender_log, SENDER_LOG_FIELDS, senderLogNumbers, payloadOf);
  return out;
}

/** The f64 counters at the head of the packed layout: epoch, output_bytes, output_seq, booted, incarnation, sender_log_bytes. */
const PACKED_COUNTERS = 6;

/** The packed layout after its output section (see the file comment). */
function decodePacked(bytes: Uint8Array, at: number): Omit<RuntimeState, "output"> {
  const malformed = (what: string) => new MalformedRuntimeStateError(`runtime state is malformed (${what})`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const take = (what: string) => {
    if (at + 8 > bytes.length) throw malformed(`${what} overruns the state`);
    const v = view.getFloat64(at, true);
    at += 8;
    return v;
  };
  const [epoch, output_bytes, output_seq, booted, incarnation, sender_log_bytes] = Array.from({ length: PACKED_COUNTERS }, () => take("counters"));
  if (booted !== 0 && booted !== 1) throw malformed("counters");
  const list = (what: string) => {
    const n = take(what);
    if (!Number.isSafeInteger(n) || n < 0 || at + 8 * n > bytes.length) throw malformed(what);
    return Array.from({ length: n }, () => take(what));
  };
  const sent_seq = list("group channels");
  const delivered = list("group channels");
  const sender_log_trimmed = list("group channels");
  const t = take("timers");
  if (!Number.isSafeInteger(t) || t < 0 || at + 16 * t > bytes.length) throw malformed("timers");
  const timers = new Map<number, number>();
  for (let i = 0; i < t; i++) {
    const id = take("timers");
    timers.set(id, take("timers"));
  }
  if (timers.size !== t) throw malformed("timers");
  const sender_log = unpackSenderLog(bytes.subarray(at));
  return { epoch, timers, output_bytes, output_seq, booted: booted === 1, incarnation, sent_seq, delivered, sender_log, sender_log_bytes, sender_log_trimmed };
}


/** The split layout's two parts; a state of V8 bytes only has no output section. */
function splitState(bytes: Uint8Array): { output: Uint8Array | null; tail: Uint8Array } {
  if (bytes[0] === V8_VERSION_TAG) return { output: null, tail: bytes };
  if ((bytes[0] !== STATE_LAYOUT_SPLIT && bytes[0] !== STATE_LAYOUT_PACKED) || bytes.length < 5) throw new MalformedRuntimeStateError("runtime state is malformed (unknown layout)");
  const length = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getUint32(1, true);
  if (5 + length > bytes.length) throw new MalformedRuntimeStateError("runtime state is malformed (output section overruns the state)");
  return { output: bytes.subarray(5, 5 + length), tail: bytes.subarray(5 + length) };
}

/** Only the unreleased output records of a state: what a backup mirrors, without deserializing the rest. */
export function decodeOutputRecords(bytes: Uint8Array): OutputRecord[] {
  const { output } = splitState(bytes);
  return output ? unpackOutput(output) : decodeRuntimeState(bytes).output;
}

export function decodeRuntimeState(bytes: Uint8Array): RuntimeState {
  const split = splitState(bytes);
  if (bytes[0] === STATE_LAYOUT_PACKED) return checkState({ ...decodePacked(bytes, 5 + split.output!.length), output: unpackOutput(split.output!) });
  let encoded: EncodedState;
  try {
    encoded = deserialize(split.tail) as EncodedState;
  } catch (error) {
    // V8's deserializer (and Node's reader of typed arrays inside it) throws plain Errors and TypeErrors on bad bytes.
    throw new MalformedRuntimeStateError(`runtime state is malformed (${(error as Error)?.message ?? String(error)})`);
  }
  const malformed = (what: string) => new MalformedRuntimeStateError(`runtime state is malformed (${what})`);
  if (typeof encoded !== "object" || encoded === null || Array.isArray(encoded)) throw malformed("not a record");
  if (split.output) encoded.output = unpackOutput(split.output);
  const { sender_log_packed, ...rest } = encoded;
  const state = rest as RuntimeState;
  if (sender_log_packed !== undefined) {
    if (!(sender_log_packed instanceof Uint8Array)) throw malformed("packed sender log");
    state.sender_log = unpackSenderLog(sender_log_packed);
  }
  // States written before group messaging existed carry no channel fields: they had sent and delivered nothing.
  state.incarnation ??= 0;
  state.sent_seq ??= [];
  state.delivered ??= [];
  state.sender_log ??= [];
  state.sender_log_bytes ??= 0;
  state.sender_log_trimmed ??= [];
  return checkState(state);
}

/** Every field the VM reads is checked here, so that bad bytes fail in the decoder, by name, not later inside the VM. */
function checkState(state: RuntimeState): RuntimeState {
  const malformed = (what: string) => new MalformedRuntimeStateError(`runtime state is malformed (${what})`);
  const natural = (v: unknown) => Number.isSafeInteger(v) && (v as number) >= 0;
  const naturals = (v: unknown) => Array.isArray(v) && v.every(natural);
  if (!natural(state.epoch) || !natural(state.output_bytes) || !natural(state.output_seq) || typeof state.booted !== "boolean") throw malformed("counters");
  if (!(state.timers instanceof Map) || ![...state.timers].every(([id, due]) => Number.isInteger(id) && typeof due === "number")) throw malformed("timers");
  if (!Array.isArray(state.output)) throw malformed("output");
  if (!natural(state.incarnation) || !naturals(state.sent_seq) || !naturals(state.delivered) || !naturals(state.sender_log_trimmed) || !natural(state.sender_log_bytes)) {
    throw malformed("group channels");
  }
  if (!Array.isArray(state.sender_log)) throw malformed("sender log");
  return state;
}
