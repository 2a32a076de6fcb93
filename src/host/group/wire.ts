/**
 * What hosts send each other about a protected group, in MSG.GROUP frames
 * (JSON header + binary body). Every header names the group, the sending host
 * and the incarnation; a host drops anything older than the incarnation it
 * adopted. One TCP connection per host pair keeps each sender's frames in
 * order, which the protocol relies on (a backup gets an image before the
 * deltas that follow it).
 *
 * | kind | from → to | meaning |
 * |---|---|---|
 * | end | leader → every host | end epoch `e`: capture checkpoint `e` of every member; with `c`, `d`: also a commit (below) |
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
 * | rolled | host → coordinator | done; `d` = delivered vectors of the primaries here, `routes` = where their message paths listen |
 * | resume | coordinator → live hosts | new `routes` (index: rank), re-send what receivers lack (`d`), run epoch `e` |
 *
 * Group messages themselves do not travel in these frames: each VM thread
 * sends them to its peers' VM threads directly (src/vm/message-path.ts).
 */
import type { PathRoute } from "../../vm/message-path.js";
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
  | (Base & { k: "end"; e: number; c?: number; d?: number[][] })
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
  | (Base & { k: "rolled"; d: Record<number, number[]>; routes: Record<number, PathRoute> })
  | (Base & { k: "resume"; e: number; d: number[][]; routes: (PathRoute | null)[] });

export type FrameKind = GroupFrame["k"];
export type FrameOf<K extends FrameKind> = Extract<GroupFrame, { k: K }>;
