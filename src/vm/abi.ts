/**
 * Guest ABI v1: the `cohort` (and AssemblyScript `env`) imports, as seen from
 * the host. Pointers arrive as guest addresses and are translated by BASE_BYTES
 * here; a range outside the guest's memory is a guest bug and traps.
 * See docs/GUEST_ABI.md.
 */
import { randomFillSync } from "node:crypto";
import { BASE_BYTES } from "./layout.js";

export const E_OK = 0;
export const E_INVALID = -1;
export const E_TOO_BIG = -2;
export const E_BAD_RANK = -3;
export const E_FULL = -4;
export const E_NO_SESSION = -5;

/** A guest did something the ABI forbids; thrown through the guest's frames, it crashes the VM. */
export class GuestFault extends Error {
  override name = "GuestFault";
}

/** What the ABI needs from the machine it runs in. */
export interface AbiHost {
  bytes(): Uint8Array;
  markRange(address: number, length: number): void;
  log(bytes: Uint8Array): number;
  send(rank: number, bytes: Uint8Array): number;
  reply(session: number, request_id: number, bytes: Uint8Array): number;
  timerSet(id: number, delay_ms: number): number;
  timerCancel(id: number): number;
  now(): number;
  rank(): number;
  size(): number;
}

export function abiImports(host: AbiHost): WebAssembly.Imports {
  const range = (fn: string, ptr: number, len: number): Uint8Array => {
    const mem = host.bytes();
    const start = BASE_BYTES + (ptr >>> 0);
    if (len < 0 || start + len > mem.length) throw new GuestFault(`cohort.${fn}: pointer range [${ptr >>> 0}, +${len}) is outside guest memory`);
    return mem.subarray(start, start + len);
  };
  // Copies: the record outlives this call and guest memory keeps changing.
  const copy = (fn: string, ptr: number, len: number) => range(fn, ptr, len).slice();
  return {
    cohort: {
      log: (ptr: number, len: number) => host.log(copy("log", ptr, len)),
      send: (rank: number, ptr: number, len: number) => host.send(rank, copy("send", ptr, len)),
      reply: (session: number, request_id: number, ptr: number, len: number) => host.reply(session, request_id, copy("reply", ptr, len)),
      timer_set: (id: number, delay_ms: number) => host.timerSet(id, delay_ms),
      timer_cancel: (id: number) => host.timerCancel(id),
      clock_ms: () => host.now(),
      random_fill: (ptr: number, len: number) => {
        const target = range("random_fill", ptr, len);
        host.markRange(target.byteOffset, len);
        randomBytesInto(target);
        return E_OK;
      },
      rank: () => host.rank(),
      size: () => host.size(),
    },
    env: {
      abort: (msg: number, file: number, line: number, column: number) => {
        throw new GuestFault(`abort: ${readAsString(host.bytes(), msg)} at ${readAsString(host.bytes(), file)}:${line}:${column}`);
      },
      seed: () => Math.random() * 2 ** 52,
    },
  };
}

/**
 * Bytes from the operating system's CSPRNG, read RANDOM_POOL_BYTES at a time:
 * guests ask for a few bytes per call (the SDK's randomU32 asks for 4), and
 * one randomFillSync per call cost the bank example's VM threads a sixth of
 * their time. Each byte of the pool is handed out once, to one caller.
 */
export const RANDOM_POOL_BYTES = 4096;
const randomPool = new Uint8Array(RANDOM_POOL_BYTES);
let randomPoolUsed = RANDOM_POOL_BYTES;

export function randomBytesInto(target: Uint8Array): void {
  if (target.length >= RANDOM_POOL_BYTES) {
    randomFillSync(target);
    return;
  }
  // Byte by byte: reads are a few bytes, for which a subarray and a copy cost more than the loop.
  for (let i = 0; i < target.length; i++) {
    if (randomPoolUsed === RANDOM_POOL_BYTES) {
      randomFillSync(randomPool);
      randomPoolUsed = 0;
    }
    target[i] = randomPool[randomPoolUsed];
    // Handed out: zeroed, so that no later caller can get the same byte even through a bug here.
    randomPool[randomPoolUsed++] = 0;
  }
}

/** AssemblyScript strings: UTF-16 code units, byte length stored just before the pointer. */
function readAsString(mem: Uint8Array, ptr: number): string {
  if (ptr === 0) return "(null)";
  const start = BASE_BYTES + (ptr >>> 0);
  if (start < 4 || start > mem.length) return "(bad pointer)";
  const len = new DataView(mem.buffer, mem.byteOffset).getUint32(start - 4, true);
  if (start + len > mem.length || len > 4096) return "(bad string)";
  return Buffer.from(mem.subarray(start, start + len)).toString("utf16le");
}
