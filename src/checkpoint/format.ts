/**
 * Versioned binary formats for checkpoint deltas and images.
 *
 * In the style of Firecracker's snapshot format: every blob starts with a magic
 * number and a format version and ends with a checksum, and loading checks all
 * three, failing with a typed `CheckpointFormatError` (./errors.ts).
 *
 * All integers are little-endian. Offsets are from the start of the blob.
 *
 *   offset  size  field                 notes
 *   ------  ----  --------------------  -----------------------------------------------
 *        0     4  magic                 DELTA_MAGIC ("CDLT") or IMAGE_MAGIC ("CIMG")
 *        4     2  version               FORMAT_VERSION = 1
 *        6     2  header_bytes          H: 48 for a delta, 80 for an image
 *        8     8  epoch                 u64, must be a JS safe integer; delta >= 1, image >= 0
 *       16     4  memory_pages          whole memory in 64 KiB wasm pages, 1..65535
 *       20     4  page_count            N
 *       24     4  globals_bytes         G, a multiple of 16, <= GLOBALS_BYTES
 *       28     4  runtime_state_bytes   R
 *       32     8  total_bytes           u64, whole blob including the trailing crc32
 *       40     4  flags                 must be 0 in version 1
 *       44     4  reserved              must be 0 in version 1
 *       48    32  module_hash           image only: sha-256 of the instrumented module
 *   ------  ----  --------------------  -----------------------------------------------
 *        H  4*N   page_indices          u32 4 KiB page indices (address >> 12), unique,
 *                                       each < memory_pages * 16
 *   H+4N  4096*N  page_data             one 4 KiB page per index, same order
 *          G      globals               mutable-globals save area
 *          R      runtime_state         opaque
 *  total-4     4  crc32                 zlib crc32 of bytes [0, total-4)
 *
 * So total_bytes = H + 4100*N + G + R + 4. It is a u64 because a delta of more
 * than ~1M pages would exceed 4 GiB (memory_pages caps a whole memory just
 * under 4 GiB, but the field costs nothing). H is a multiple of 8 and the page
 * indices start right after it, so they are 4-aligned whenever the blob is.
 *
 * Decoding checks, in order (the first failure wins):
 *   1. length >= 8 (magic + version + header_bytes)        else Truncated
 *   2. magic                                                 else InvalidMagic
 *   3. version in 1..FORMAT_VERSION                          else InvalidFormatVersion
 *   4. length >= H + 4 (fixed header + trailer)              else Truncated
 *   5. declared total_bytes vs length: shorter blob = Truncated, longer = InvalidField
 *   6. crc32                                                 else ChecksumMismatch
 *   7. field consistency (header_bytes, flags, ranges, lengths add up to
 *      total_bytes, page indices in range and unique)        else InvalidField
 * Step 1 only needs the prefix so that a short blob of the wrong kind (a delta
 * fed to decodeImage) still reports InvalidMagic rather than Truncated.
 *
 * Decoders return zero-copy views into the input buffer (except page_indices
 * when the buffer is not 4-aligned, or on a big-endian host: then it's copied).
 *
 * Encoder-side invariant violations (bad parts) are bugs, not format errors,
 * and raise AssertionError.
 */

import { crc32 } from "node:zlib";
import { assert } from "../util/assert.js";
import { GLOBAL_SLOT_BYTES, GLOBALS_BYTES, MEMORY_WASM_PAGES_MAX, PAGE_BYTES, WASM_PAGE_BYTES } from "../vm/layout.js";
import {
  ChecksumMismatchError,
  InvalidFieldError,
  InvalidFormatVersionError,
  InvalidMagicError,
  TruncatedError,
} from "./errors.js";

/** "CDLT" as bytes in the blob. */
export const DELTA_MAGIC = 0x544c4443;
/** "CIMG" as bytes in the blob. */
export const IMAGE_MAGIC = 0x474d4943;
export const FORMAT_VERSION = 1;

export const DELTA_HEADER_BYTES = 48;
export const IMAGE_HEADER_BYTES = 80;
export const MODULE_HASH_BYTES = 32;
const TRAILER_BYTES = 4;
const PREFIX_BYTES = 8;
const PAGES_PER_WASM_PAGE = WASM_PAGE_BYTES / PAGE_BYTES; // 16

// Header field offsets (shared by both kinds).
const OFF_MAGIC = 0;
const OFF_VERSION = 4;
const OFF_HEADER_BYTES = 6;
const OFF_EPOCH = 8;
const OFF_MEMORY_PAGES = 16;
const OFF_PAGE_COUNT = 20;
const OFF_GLOBALS_BYTES = 24;
const OFF_RUNTIME_STATE_BYTES = 28;
const OFF_TOTAL_BYTES = 32;
const OFF_FLAGS = 40;
const OFF_RESERVED = 44;
const OFF_MODULE_HASH = 48;

const TWO_32 = 0x1_0000_0000;

/** Typed arrays use host byte order; the format is little-endian. */
const HOST_LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

export interface DeltaParts {
  epoch: number;
  memory_pages: number;
  page_indices: Uint32Array;
  page_data: Uint8Array;
  globals: Uint8Array;
  runtime_state: Uint8Array;
}

export interface ImageParts {
  epoch: number;
  memory_pages: number;
  module_hash: Uint8Array;
  page_indices: Uint32Array;
  page_data: Uint8Array;
  globals: Uint8Array;
  runtime_state: Uint8Array;
}

export interface DeltaHeader {
  epoch: number;
  memory_pages: number;
  page_count: number;
  globals_bytes: number;
  runtime_state_bytes: number;
}

export interface DeltaRegions {
  page_indices: Uint32Array;
  page_data: Uint8Array;
  globals: Uint8Array;
  runtime_state: Uint8Array;
}

interface Kind {
  name: "delta" | "image";
  magic: number;
  headerBytes: number;
  minEpoch: number;
}

const DELTA: Kind = { name: "delta", magic: DELTA_MAGIC, headerBytes: DELTA_HEADER_BYTES, minEpoch: 1 };
const IMAGE: Kind = { name: "image", magic: IMAGE_MAGIC, headerBytes: IMAGE_HEADER_BYTES, minEpoch: 0 };

// ---------------------------------------------------------------------------
// Sizes and layout

function byteLength(kind: Kind, page_count: number, globals_bytes: number, runtime_state_bytes: number): number {
  assert(isU32(page_count), `page_count must be a u32, got ${page_count}`);
  assert(isU32(globals_bytes), `globals_bytes must be a u32, got ${globals_bytes}`);
  assert(isU32(runtime_state_bytes), `runtime_state_bytes must be a u32, got ${runtime_state_bytes}`);
  // At most ~1.8e13: exact in a double.
  return kind.headerBytes + page_count * (4 + PAGE_BYTES) + globals_bytes + runtime_state_bytes + TRAILER_BYTES;
}

export function deltaByteLength(page_count: number, globals_bytes: number, runtime_state_bytes: number): number {
  return byteLength(DELTA, page_count, globals_bytes, runtime_state_bytes);
}

/** Writes the header into `buf` (whose length must be exactly the blob size) and returns the body regions. */
function layout(kind: Kind, buf: Uint8Array, h: DeltaHeader): DeltaRegions {
  assert(Number.isSafeInteger(h.epoch) && h.epoch >= kind.minEpoch, `${kind.name} epoch must be a safe integer >= ${kind.minEpoch}, got ${h.epoch}`);
  assert(validMemoryPages(h.memory_pages), `memory_pages must be in 1..${MEMORY_WASM_PAGES_MAX}, got ${h.memory_pages}`);
  assert(validGlobalsBytes(h.globals_bytes), `globals_bytes must be a multiple of ${GLOBAL_SLOT_BYTES} <= ${GLOBALS_BYTES}, got ${h.globals_bytes}`);
  assert(h.page_count <= h.memory_pages * PAGES_PER_WASM_PAGE, `page_count ${h.page_count} exceeds the ${h.memory_pages * PAGES_PER_WASM_PAGE} pages of memory`);
  const total = byteLength(kind, h.page_count, h.globals_bytes, h.runtime_state_bytes);
  assert(buf.length === total, `${kind.name} buffer must be exactly ${total} bytes, got ${buf.length}`);
  // The page-index region is returned as a Uint32Array view: needs alignment and a LE host.
  assert(buf.byteOffset % 4 === 0, `${kind.name} buffer byteOffset must be 4-aligned, got ${buf.byteOffset}`);
  assert(HOST_LITTLE_ENDIAN, "layout needs a little-endian host");

  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  dv.setUint32(OFF_MAGIC, kind.magic, true);
  dv.setUint16(OFF_VERSION, FORMAT_VERSION, true);
  dv.setUint16(OFF_HEADER_BYTES, kind.headerBytes, true);
  setU64(dv, OFF_EPOCH, h.epoch);
  dv.setUint32(OFF_MEMORY_PAGES, h.memory_pages, true);
  dv.setUint32(OFF_PAGE_COUNT, h.page_count, true);
  dv.setUint32(OFF_GLOBALS_BYTES, h.globals_bytes, true);
  dv.setUint32(OFF_RUNTIME_STATE_BYTES, h.runtime_state_bytes, true);
  setU64(dv, OFF_TOTAL_BYTES, total);
  dv.setUint32(OFF_FLAGS, 0, true);
  dv.setUint32(OFF_RESERVED, 0, true);
  return regions(buf, kind.headerBytes, h.page_count, h.globals_bytes, h.runtime_state_bytes, true);
}

/** Body region views; `forceView` when the caller already guaranteed alignment + LE. */
function regions(buf: Uint8Array, headerBytes: number, n: number, g: number, r: number, forceView: boolean): DeltaRegions {
  const idxOff = headerBytes;
  const dataOff = idxOff + 4 * n;
  const globalsOff = dataOff + PAGE_BYTES * n;
  const rsOff = globalsOff + g;
  let page_indices: Uint32Array;
  if (forceView || (HOST_LITTLE_ENDIAN && (buf.byteOffset + idxOff) % 4 === 0)) {
    page_indices = new Uint32Array(buf.buffer, buf.byteOffset + idxOff, n);
  } else {
    page_indices = new Uint32Array(n);
    const dv = new DataView(buf.buffer, buf.byteOffset + idxOff, 4 * n);
    for (let i = 0; i < n; i++) page_indices[i] = dv.getUint32(4 * i, true);
  }
  return {
    page_indices,
    page_data: buf.subarray(dataOff, globalsOff),
    globals: buf.subarray(globalsOff, rsOff),
    runtime_state: buf.subarray(rsOff, rsOff + r),
  };
}

/**
 * Lays out a delta in `buf` (exactly `deltaByteLength(...)` bytes, 4-aligned
 * byteOffset) and returns views of the regions the caller must fill entirely:
 * the VM thread copies pages straight into `page_data`. The trailing checksum
 * is left for `sealDelta`, which runs off the VM thread after the VM resumes.
 */
export function layoutDelta(buf: Uint8Array, header: DeltaHeader): DeltaRegions {
  return layout(DELTA, buf, header);
}

function seal(kind: Kind, buf: Uint8Array): void {
  assert(buf.length >= kind.headerBytes + TRAILER_BYTES, `${kind.name} buffer too short to seal: ${buf.length} bytes`);
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  assert(dv.getUint32(OFF_MAGIC, true) === kind.magic, `sealing a buffer that was not laid out as a ${kind.name}`);
  const total = getU64(dv, OFF_TOTAL_BYTES);
  assert(total === buf.length, `${kind.name} header says ${total} bytes but the buffer has ${buf.length}`);
  dv.setUint32(total - TRAILER_BYTES, crc32(buf.subarray(0, total - TRAILER_BYTES)), true);
}

/** Computes and writes the trailing crc32 of a buffer prepared by `layoutDelta`. */
export function sealDelta(buf: Uint8Array): void {
  seal(DELTA, buf);
}

// ---------------------------------------------------------------------------
// Encoding

/** Allocates a blob of `kind`, writes the header and copies the body (not the module hash, not the checksum). */
function copyParts(kind: Kind, p: DeltaParts): Uint8Array {
  const page_count = p.page_indices.length;
  assert(p.page_data.length === page_count * PAGE_BYTES, `page_data must be ${page_count} x ${PAGE_BYTES} bytes, got ${p.page_data.length}`);
  assert(validMemoryPages(p.memory_pages), `memory_pages must be in 1..${MEMORY_WASM_PAGES_MAX}, got ${p.memory_pages}`);
  const problem = pageIndexProblem(p.page_indices, p.memory_pages);
  assert(problem === null, `${kind.name}: ${problem}`);
  const header: DeltaHeader = {
    epoch: p.epoch,
    memory_pages: p.memory_pages,
    page_count,
    globals_bytes: p.globals.length,
    runtime_state_bytes: p.runtime_state.length,
  };
  const buf = new Uint8Array(byteLength(kind, page_count, header.globals_bytes, header.runtime_state_bytes));
  const r = layout(kind, buf, header);
  r.page_indices.set(p.page_indices);
  r.page_data.set(p.page_data);
  r.globals.set(p.globals);
  r.runtime_state.set(p.runtime_state);
  return buf;
}

/** Allocate + layout + copy + seal. The VM path uses layoutDelta/sealDelta directly. */
export function encodeDelta(parts: DeltaParts): Uint8Array {
  const buf = copyParts(DELTA, parts);
  seal(DELTA, buf);
  return buf;
}

export function encodeImage(parts: ImageParts): Uint8Array {
  assert(parts.module_hash.length === MODULE_HASH_BYTES, `module_hash must be ${MODULE_HASH_BYTES} bytes, got ${parts.module_hash.length}`);
  const buf = copyParts(IMAGE, parts);
  buf.set(parts.module_hash, OFF_MODULE_HASH);
  seal(IMAGE, buf);
  return buf;
}

// ---------------------------------------------------------------------------
// Decoding

interface Decoded extends DeltaRegions {
  epoch: number;
  memory_pages: number;
}

export interface DecodeOptions {
  /**
   * The caller checked this very buffer's checksum already (a backup folding
   * deltas it verified when it staged them): skip the crc32 pass. Every other
   * check still runs.
   */
  checksum_verified?: boolean;
}

function decode(kind: Kind, buf: Uint8Array, options: DecodeOptions = {}): Decoded {
  const len = buf.length;
  if (len < PREFIX_BYTES) {
    throw new TruncatedError(`${kind.name} blob is ${len} bytes, shorter than the ${PREFIX_BYTES}-byte magic/version prefix`);
  }
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);

  const magic = dv.getUint32(OFF_MAGIC, true);
  if (magic !== kind.magic) {
    const other = kind === DELTA ? IMAGE : DELTA;
    const hint = magic === other.magic ? ` (this is a Cohort ${other.name}, not ${article(kind)})` : "";
    throw new InvalidMagicError(`expected ${kind.name} magic ${hex32(kind.magic)}, found ${hex32(magic)}${hint}`);
  }

  const version = dv.getUint16(OFF_VERSION, true);
  if (version > FORMAT_VERSION) {
    throw new InvalidFormatVersionError(
      `${kind.name} format version ${version} was written by a newer Cohort; this build reads versions 1..${FORMAT_VERSION}`,
    );
  }
  if (version < 1) {
    throw new InvalidFormatVersionError(`${kind.name} format version ${version} is invalid; expected 1..${FORMAT_VERSION}`);
  }

  if (len < kind.headerBytes + TRAILER_BYTES) {
    throw new TruncatedError(
      `${kind.name} blob is ${len} bytes, shorter than its ${kind.headerBytes}-byte header plus ${TRAILER_BYTES}-byte checksum`,
    );
  }

  // A u64 above 2^53 loses precision here but stays > len, which is all we need.
  const total = getU64(dv, OFF_TOTAL_BYTES);
  if (total > len) {
    throw new TruncatedError(`${kind.name} blob is ${len} bytes but its header declares total_bytes ${total}`);
  }
  if (total < len) {
    throw new InvalidFieldError(`${kind.name} blob is ${len} bytes but its header declares total_bytes ${total} (trailing bytes)`);
  }

  if (!options.checksum_verified) {
    const stored = dv.getUint32(len - TRAILER_BYTES, true);
    const actual = crc32(buf.subarray(0, len - TRAILER_BYTES));
    if (stored !== actual) {
      throw new ChecksumMismatchError(`${kind.name} checksum mismatch: stored crc32 ${hex32(stored)}, computed ${hex32(actual)}`);
    }
  }

  // The bytes are as written; from here on a failure means the writer was buggy (or hostile).
  const headerBytes = dv.getUint16(OFF_HEADER_BYTES, true);
  if (headerBytes !== kind.headerBytes) {
    throw new InvalidFieldError(`${kind.name} header_bytes must be ${kind.headerBytes} in version ${version}, found ${headerBytes}`);
  }
  const flags = dv.getUint32(OFF_FLAGS, true);
  const reserved = dv.getUint32(OFF_RESERVED, true);
  if (flags !== 0 || reserved !== 0) {
    throw new InvalidFieldError(`${kind.name} flags/reserved must be 0 in version ${version}, found ${hex32(flags)}/${hex32(reserved)}`);
  }
  const epochHi = dv.getUint32(OFF_EPOCH + 4, true);
  const epoch = getU64(dv, OFF_EPOCH);
  if (epochHi > 0x1f_ffff || epoch < kind.minEpoch) {
    throw new InvalidFieldError(`${kind.name} epoch must be a safe integer >= ${kind.minEpoch}, found ${epoch}`);
  }
  const memory_pages = dv.getUint32(OFF_MEMORY_PAGES, true);
  if (!validMemoryPages(memory_pages)) {
    throw new InvalidFieldError(`${kind.name} memory_pages must be in 1..${MEMORY_WASM_PAGES_MAX}, found ${memory_pages}`);
  }
  const n = dv.getUint32(OFF_PAGE_COUNT, true);
  const g = dv.getUint32(OFF_GLOBALS_BYTES, true);
  const r = dv.getUint32(OFF_RUNTIME_STATE_BYTES, true);
  if (!validGlobalsBytes(g)) {
    throw new InvalidFieldError(`${kind.name} globals_bytes must be a multiple of ${GLOBAL_SLOT_BYTES} <= ${GLOBALS_BYTES}, found ${g}`);
  }
  const expected = byteLength(kind, n, g, r);
  if (expected !== total) {
    throw new InvalidFieldError(
      `${kind.name} lengths (page_count ${n}, globals_bytes ${g}, runtime_state_bytes ${r}) need ${expected} bytes, but total_bytes is ${total}`,
    );
  }
  if (n > memory_pages * PAGES_PER_WASM_PAGE) {
    throw new InvalidFieldError(`${kind.name} page_count ${n} exceeds the ${memory_pages * PAGES_PER_WASM_PAGE} pages of memory`);
  }

  const body = regions(buf, kind.headerBytes, n, g, r, false);
  const problem = pageIndexProblem(body.page_indices, memory_pages);
  if (problem !== null) throw new InvalidFieldError(`${kind.name}: ${problem}`);
  return { epoch, memory_pages, ...body };
}

/** Validates and returns views into `buf` (page_indices copied only if `buf` is not 4-aligned). */
export function decodeDelta(buf: Uint8Array, options?: DecodeOptions): DeltaParts {
  const d = decode(DELTA, buf, options);
  return {
    epoch: d.epoch,
    memory_pages: d.memory_pages,
    page_indices: d.page_indices,
    page_data: d.page_data,
    globals: d.globals,
    runtime_state: d.runtime_state,
  };
}

export function decodeImage(buf: Uint8Array): ImageParts {
  const d = decode(IMAGE, buf);
  return {
    epoch: d.epoch,
    memory_pages: d.memory_pages,
    module_hash: buf.subarray(OFF_MODULE_HASH, OFF_MODULE_HASH + MODULE_HASH_BYTES),
    page_indices: d.page_indices,
    page_data: d.page_data,
    globals: d.globals,
    runtime_state: d.runtime_state,
  };
}

// ---------------------------------------------------------------------------
// Helpers

/**
 * null if every index is < memory_pages*16 and unique, else a description.
 * O(n) time and space: an open-addressing hash set in a Uint32Array of 2-4n
 * slots (not a bitmap over the whole memory, which would cost 128 KiB even
 * for a one-page delta). Indices are < 2^20, so slot value index+1, 0 = empty.
 */
function pageIndexProblem(indices: Uint32Array, memory_pages: number): string | null {
  const n = indices.length;
  const limit = memory_pages * PAGES_PER_WASM_PAGE;
  for (let i = 0; i < n; i++) {
    if (indices[i] >= limit) {
      return `page index ${indices[i]} at position ${i} is out of range: memory has ${memory_pages} wasm pages = ${limit} 4 KiB pages`;
    }
  }
  if (n < 2) return null;
  let bits = 1;
  while (1 << bits < 2 * n) bits++;
  const mask = (1 << bits) - 1;
  const shift = 32 - bits;
  const table = new Uint32Array(1 << bits);
  for (let i = 0; i < n; i++) {
    const v = indices[i];
    let slot = Math.imul(v, 0x9e3779b1) >>> shift; // Fibonacci hashing
    for (;;) {
      const s = table[slot];
      if (s === 0) {
        table[slot] = v + 1;
        break;
      }
      if (s === v + 1) return `duplicate page index ${v} (second occurrence at position ${i})`;
      slot = (slot + 1) & mask;
    }
  }
  return null;
}

function validMemoryPages(m: number): boolean {
  return Number.isInteger(m) && m >= 1 && m <= MEMORY_WASM_PAGES_MAX;
}

function validGlobalsBytes(g: number): boolean {
  return Number.isInteger(g) && g >= 0 && g <= GLOBALS_BYTES && g % GLOBAL_SLOT_BYTES === 0;
}

function isU32(x: number): boolean {
  return Number.isInteger(x) && x >= 0 && x < TWO_32;
}

function setU64(dv: DataView, off: number, x: number): void {
  dv.setUint32(off, x % TWO_32, true);
  dv.setUint32(off + 4, Math.floor(x / TWO_32), true);
}

function getU64(dv: DataView, off: number): number {
  return dv.getUint32(off + 4, true) * TWO_32 + dv.getUint32(off, true);
}

function article(kind: Kind): string {
  return kind === IMAGE ? "an image" : "a delta";
}

function hex32(x: number): string {
  return "0x" + x.toString(16).padStart(8, "0");
}
