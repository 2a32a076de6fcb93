/**
 * What hosts send each other about a protected group, in MSG.GROUP frames
 * (JSON header + binary body). Every header names the group, the sending host
 * and the incarnation; a host drops anything older than the incarnation it
 * adopted. One TCP connection per host pair keeps each sender's frames in
 * order, which the protocol relies on (a backup gets an image before the
 * deltas that follow it; a receiver gets a channel's messages in seq order).
 *
 * | kind | from → to | meaning |
 * |---|---|---|
 * | msgs | primary host → primary host | group messages (body: payloads back to back) |
 * | end | leader → primary hosts | end epoch `e`: capture checkpoint `e` of every member |
 * | pending | primary host → leader | a member has external output waiting: end the epoch soon |
 * | delta | primary host → backup host | checkpoint `e` of `rank` (body: sealed delta) |
 * | image | primary host → backup host | full image of `rank` at cut `e` (body), the new backup starts from it |
 * | staged | backup host → leader (group) / primary host (vm) | `rank`'s checkpoint `e` is stored here |
 * | commit | leader → every host | cut `c` committed; `d[r]` = receiver r's delivered vector at the cut |
 * | vcommit | primary host → backup host | vm mode: `rank`'s checkpoint `e` committed, fold it |
 * | dv | primary host → every host | vm mode: `rank` delivered `d` at its committed checkpoint: senders trim |
 * | recover | coordinator → live hosts | adopt `record` (new incarnation), stop, report |
 * | report | host → coordinator | what each replica here can reach |
 * | rollback | coordinator → live hosts | go to the recovery cut; ship `images` to new backups |
 * | rolled | host → coordinator | done; `d` = delivered vectors of the primaries here |
 * | resume | coordinator → live hosts | re-send what receivers lack (`d`), run epoch `e` |
 */
import type { GroupMessage } from "../../vm/machine.js";
import type { ProtectionRecord } from "./record.js";

export interface Base {
  g: string;
  from: string;
  inc: number;
}

export interface PrimaryReport {
  rank: number;
  /** Newest checkpoint captured. */
  hi: number;
  committed: number;
}

export interface BackupReport {
  rank: number;
  has_image: boolean;
  /** Committed image. */
  lo: number;
  /** Newest staged checkpoint. */
  hi: number;
}

export type GroupFrame =
  | (Base & { k: "msgs"; m: [from: number, to: number, inc: number, epoch: number, seq: number, bytes: number][] })
  | (Base & { k: "end"; e: number })
  | (Base & { k: "pending" })
  | (Base & { k: "delta"; rank: number; e: number; d: number[] })
  | (Base & { k: "image"; rank: number; e: number; released_seq: number; history: unknown[] })
  | (Base & { k: "staged"; rank: number; e: number; d: number[] })
  | (Base & { k: "commit"; c: number; d: number[][] })
  | (Base & { k: "vcommit"; rank: number; e: number })
  | (Base & { k: "dv"; rank: number; e: number; d: number[] })
  | (Base & { k: "recover"; record: ProtectionRecord })
  | (Base & { k: "report"; primaries: PrimaryReport[]; backups: BackupReport[] })
  | (Base & { k: "rollback"; cut: number | null; targets: Record<number, number>; images: number[] })
  | (Base & { k: "rolled"; d: Record<number, number[]> })
  | (Base & { k: "resume"; e: number; d: number[][] });

export type FrameKind = GroupFrame["k"];
export type FrameOf<K extends FrameKind> = Extract<GroupFrame, { k: K }>;

/** Group messages → header entries + one body (payloads back to back). */
export function encodeMessages(messages: readonly GroupMessage[]): { m: FrameOf<"msgs">["m"]; body: Uint8Array } {
  let total = 0;
  for (const message of messages) total += message.bytes.length;
  const body = new Uint8Array(total);
  let at = 0;
  const m: FrameOf<"msgs">["m"] = [];
  for (const message of messages) {
    body.set(message.bytes, at);
    at += message.bytes.length;
    m.push([message.from, message.to, message.incarnation, message.epoch, message.seq, message.bytes.length]);
  }
  return { m, body };
}

export class MalformedGroupFrameError extends Error {
  override name = "MalformedGroupFrameError";
  readonly code = "MalformedGroupFrame";
}

/** Inverse of encodeMessages; refuses entries that do not fit the body or the group. */
export function decodeMessages(m: unknown, body: Uint8Array, size: number): GroupMessage[] {
  if (!Array.isArray(m)) throw new MalformedGroupFrameError("msgs: m is not a list");
  const out: GroupMessage[] = [];
  let at = 0;
  for (const entry of m as unknown[]) {
    if (!Array.isArray(entry) || entry.length !== 6 || !entry.every((v) => Number.isSafeInteger(v) && (v as number) >= 0)) {
      throw new MalformedGroupFrameError("msgs: an entry is not six non-negative integers");
    }
    const [from, to, incarnation, epoch, seq, bytes] = entry as number[];
    if (from >= size || to >= size || from === to) throw new MalformedGroupFrameError(`msgs: channel ${from}->${to} in a group of ${size}`);
    if (at + bytes > body.length) throw new MalformedGroupFrameError("msgs: payloads overrun the body");
    out.push({ from, to, incarnation, epoch, seq, bytes: body.slice(at, at + bytes) });
    at += bytes;
  }
  if (at !== body.length) throw new MalformedGroupFrameError("msgs: body longer than its payloads");
  return out;
}
