/**
 * The frames hosts exchange about a protected group: one versioned format,
 * validated on arrival (a malformed, stale or out-of-range frame is refused
 * with a reason and never reaches the protocol). Carried in MSG.GROUP peer
 * frames as a JSON header plus an optional binary body (a delta, an image, a
 * module), which the core never looks into: drivers keep bodies behind
 * handles.
 *
 * | kind | from → to | meaning |
 * |---|---|---|
 * | end | leader → hosts | end epoch `e`: capture checkpoint `e` of every member; with `c`, `d`: also cut `c` committed |
 * | pending | primary host → leader | a member has external output waiting (in epoch `e`): end the epoch soon |
 * | active | primary host → leader | a member did something in epoch `e`: the leader ends `e` (an epoch nobody did anything in is not ended) |
 * | delta | primary host → backup host | checkpoint `e` of `rank` (body: sealed delta); `d` = its delivered vector |
 * | image | primary host → backup host | full image of `rank` at cut `e` (body): a new backup starts from it |
 * | staged | backup host → leader (group) / primary host (vm) | `rank`'s checkpoint `e` is stored here |
 * | commit | leader → hosts | cut `c` committed; `d[r]` = receiver r's delivered vector at the cut |
 * | vcommit | primary host → backup host | vm mode: `rank`'s checkpoint `e` committed, fold it |
 * | dv | primary host → hosts | vm mode: `rank` delivered `d` at its committed checkpoint `e`: senders trim |
 * | recover | coordinator → hosts | adopt `record` (new incarnation), stop, report (body: the module) |
 * | report | host → coordinator | what each replica here can reach |
 * | rollback | coordinator → hosts | go to the recovery cut; ship `images` to new backups |
 * | rolled | host → coordinator | done; `d` = delivered vectors of the primaries here, `routes` = their message paths |
 * | resume | coordinator → hosts | routes (index: rank), re-send what receivers lack (`d`), run epoch `e` |
 * | halt | coordinator → hosts | members `lost` have no surviving copy: the group stops |
 * | stale | host → a host the record declares failed that still sends | your incarnation is over: read the store (and stop) |
 */
import { z } from "zod";
import { GROUP_SIZE_MAX, type ProtectionRecord } from "./types.js";

/** Version of this frame format; a frame of a newer one is refused by name. */
export const FRAME_VERSION = 1;

/** Where a primary's message path listens; the token proves the port still belongs to that VM (opaque to the core). */
export interface Route {
  address: string;
  token: string;
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
  /** Committed cut of the image. */
  lo: number;
  /** Newest staged checkpoint. */
  hi: number;
}

/** One released output record, as log followers and a new backup's history get it. */
export interface ReleasedRecord {
  seq: number;
  epoch: number;
  kind: number;
  /** UTF-8 text of the record. */
  text: string;
  produced_ms: number;
  /** When the host released it (its cut committed). */
  released_ms: number;
  /** Replies (kind 1): the client request they answer. */
  request_id?: number;
}

interface Base {
  v: number;
  g: string;
  from: string;
  inc: number;
}

export type GroupFrame =
  | (Base & { k: "end"; e: number; c?: number; d?: number[][] })
  /** Output waits on the sender's members (`u`: someone blocks on it; see the `output_pending` event). */
  | (Base & { k: "pending"; u: boolean; e?: number })
  /** A member on the sender's host did something in epoch `e` (see the `active` event). */
  | (Base & { k: "active"; e: number })
  | (Base & { k: "delta"; rank: number; e: number; d: number[] })
  | (Base & { k: "image"; rank: number; e: number; released_seq: number; history: ReleasedRecord[] })
  | (Base & { k: "staged"; rank: number; e: number; d: number[] })
  | (Base & { k: "commit"; c: number; d: number[][] })
  | (Base & { k: "vcommit"; rank: number; e: number })
  | (Base & { k: "dv"; rank: number; e: number; d: number[] })
  | (Base & { k: "recover"; record: ProtectionRecord })
  | (Base & { k: "report"; primaries: PrimaryReport[]; backups: BackupReport[] })
  | (Base & { k: "rollback"; cut: number | null; targets: Record<string, number>; images: number[] })
  | (Base & { k: "rolled"; d: Record<string, number[]>; routes: Record<string, Route> })
  | (Base & { k: "resume"; e: number; d: number[][]; routes: (Route | null)[] })
  | (Base & { k: "halt"; lost: number[] })
  | (Base & { k: "stale" });

export type FrameKind = GroupFrame["k"];
export type FrameOf<K extends FrameKind> = Extract<GroupFrame, { k: K }>;
/** A frame as the core sends it: the driver stamps v, g and from. */
export type OutgoingFrame = { [K in FrameKind]: Omit<FrameOf<K>, "v" | "g" | "from"> }[FrameKind];

// ---- validation ----------------------------------------------------------------------------

const count = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);
const name = z.string().min(1).max(256);
/**
 * Delivered vectors and matrices are the bulk of a big group's frames (a
 * commit of 256 members carries 65,536 counts). Checked by one loop each
 * rather than a schema per element: zod's per-number checks cost a host's
 * main thread more than a tenth of its time at that size.
 */
const isCount = (x: unknown): boolean => typeof x === "number" && Number.isSafeInteger(x) && x >= 0;
const isVector = (x: unknown): x is number[] => Array.isArray(x) && x.length <= GROUP_SIZE_MAX && x.every(isCount);
const vector = z.custom<number[]>(isVector, { message: `expected an array of at most ${GROUP_SIZE_MAX} counts (integers 0..2^53-1)` });
const matrix = z.custom<number[][]>((x) => Array.isArray(x) && x.length <= GROUP_SIZE_MAX && x.every(isVector), {
  message: `expected an array of at most ${GROUP_SIZE_MAX} arrays of at most ${GROUP_SIZE_MAX} counts`,
});
const rankKey = z.string().regex(/^(0|[1-9][0-9]{0,3})$/);
/** host:port with a port a socket can connect to (a VM thread connects to it as it stands). */
const address = z
  .string()
  .max(512)
  .refine((a) => {
    const i = a.lastIndexOf(":");
    const port = a.slice(i + 1);
    return i > 0 && /^[0-9]{1,5}$/.test(port) && Number(port) >= 1 && Number(port) <= 65535;
  }, "not host:port");
const route = z.strictObject({ address, token: z.string().max(256) });
const epochTiming = z.strictObject({ interval_ms: z.number().positive(), min_interval_ms: z.number().positive(), max_interval_ms: z.number().positive() });
const limits = z.strictObject({ memory_mib: z.number().positive(), call_cpu_ms: z.number().positive(), output_bytes_max: count });
const record = z.strictObject({
  group: name,
  mode: z.enum(["none", "vm", "group"]),
  size: z.number().int().min(1).max(GROUP_SIZE_MAX),
  incarnation: count,
  leader: name,
  placement: z.array(z.strictObject({ primary: name, backup: name.nullable() })).max(GROUP_SIZE_MAX),
  failed: z.array(name).max(1024),
  epoch: epochTiming,
  limits,
});
const base = { v: z.literal(FRAME_VERSION), g: name, from: name, inc: count };
/** The shapes of a protection record and a route, for host requests that carry them (src/host/api.ts); `checkRecord` completes the record's. */
export { record as protectionRecordSchema, route as routeSchema };

const frameSchema = z.discriminatedUnion("k", [
  z.strictObject({ ...base, k: z.literal("end"), e: count, c: count.optional(), d: matrix.optional() }),
  z.strictObject({ ...base, k: z.literal("pending"), u: z.boolean(), e: count.optional() }),
  z.strictObject({ ...base, k: z.literal("active"), e: count }),
  z.strictObject({ ...base, k: z.literal("delta"), rank: count, e: count, d: vector }),
  z.strictObject({
    ...base,
    k: z.literal("image"),
    rank: count,
    e: count,
    released_seq: count,
    history: z
      .array(z.strictObject({ seq: count, epoch: count, kind: count, text: z.string(), produced_ms: z.number(), released_ms: z.number(), request_id: count.optional() }))
      .max(1 << 20),
  }),
  z.strictObject({ ...base, k: z.literal("staged"), rank: count, e: count, d: vector }),
  z.strictObject({ ...base, k: z.literal("commit"), c: count, d: matrix }),
  z.strictObject({ ...base, k: z.literal("vcommit"), rank: count, e: count }),
  z.strictObject({ ...base, k: z.literal("dv"), rank: count, e: count, d: vector }),
  z.strictObject({ ...base, k: z.literal("recover"), record }),
  z.strictObject({
    ...base,
    k: z.literal("report"),
    primaries: z.array(z.strictObject({ rank: count, hi: count, committed: count })).max(GROUP_SIZE_MAX),
    backups: z.array(z.strictObject({ rank: count, has_image: z.boolean(), lo: count, hi: count })).max(GROUP_SIZE_MAX),
  }),
  z.strictObject({ ...base, k: z.literal("rollback"), cut: count.nullable(), targets: z.record(rankKey, count), images: z.array(count).max(GROUP_SIZE_MAX) }),
  z.strictObject({ ...base, k: z.literal("rolled"), d: z.record(rankKey, vector), routes: z.record(rankKey, route) }),
  z.strictObject({ ...base, k: z.literal("resume"), e: count, d: matrix, routes: z.array(route.nullable()).max(GROUP_SIZE_MAX) }),
  z.strictObject({ ...base, k: z.literal("halt"), lost: z.array(count).max(GROUP_SIZE_MAX) }),
  z.strictObject({ ...base, k: z.literal("stale") }),
]);

export class FrameError extends Error {
  override name = "FrameError";
  constructor(
    readonly code: "FrameVersion" | "FrameMalformed" | "FrameOutOfRange",
    message: string,
  ) {
    super(message);
  }
}

/**
 * Checks a decoded JSON header: shape and version (FrameError otherwise).
 * Fields that depend on the group (ranks, vector lengths) are checked by
 * `checkFrameRanges` once the group is known.
 */
export function parseFrame(header: unknown): GroupFrame {
  if (typeof header === "object" && header !== null && "v" in header) {
    const v = (header as { v: unknown }).v;
    if (typeof v === "number" && v > FRAME_VERSION) throw new FrameError("FrameVersion", `group frame version ${v} is newer than this host's ${FRAME_VERSION}`);
  }
  const parsed = frameSchema.safeParse(header);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new FrameError("FrameMalformed", `malformed group frame: ${issue.path.join(".") || "(frame)"}: ${issue.message}`);
  }
  const frame = parsed.data as GroupFrame;
  if (frame.k === "recover") checkRecord(frame.record);
  return frame;
}

/** Checks what the record schema cannot: placement against size, distinct hosts per member, epoch timing (FrameError otherwise). */
export function checkRecord(r: ProtectionRecord): void {
  if (r.placement.length !== r.size) throw new FrameError("FrameOutOfRange", `record places ${r.placement.length} members of a group of ${r.size}`);
  r.placement.forEach((p, rank) => {
    if (p.primary === p.backup) throw new FrameError("FrameOutOfRange", `record places member ${rank}'s primary and backup on one host`);
  });
  if (!(r.epoch.min_interval_ms <= r.epoch.interval_ms && r.epoch.interval_ms <= r.epoch.max_interval_ms)) {
    throw new FrameError("FrameOutOfRange", "record epoch timing is not min <= interval <= max");
  }
}

/** Checks every rank and vector of `frame` against a group of `size` members (FrameError otherwise). */
export function checkFrameRanges(frame: GroupFrame, size: number): void {
  const rank = (r: number, what: string) => {
    if (r >= size) throw new FrameError("FrameOutOfRange", `${frame.k} frame: ${what} ${r} is not a rank of a group of ${size}`);
  };
  const vec = (v: readonly number[], what: string) => {
    if (v.length !== size) throw new FrameError("FrameOutOfRange", `${frame.k} frame: ${what} has ${v.length} entries for a group of ${size}`);
  };
  const mat = (m: readonly (readonly number[])[], what: string) => {
    vec(
      m.map(() => 0),
      what,
    );
    m.forEach((row, i) => vec(row, `${what}[${i}]`));
  };
  switch (frame.k) {
    case "end":
      if ((frame.c === undefined) !== (frame.d === undefined)) throw new FrameError("FrameMalformed", "end frame: c and d go together");
      if (frame.d) mat(frame.d, "d");
      if (frame.c !== undefined && frame.c >= frame.e) throw new FrameError("FrameOutOfRange", `end frame: commit ${frame.c} is not below epoch ${frame.e}`);
      return;
    case "delta":
    case "staged":
    case "dv":
      rank(frame.rank, "rank");
      vec(frame.d, "d");
      return;
    case "image":
    case "vcommit":
      rank(frame.rank, "rank");
      return;
    case "commit":
      mat(frame.d, "d");
      return;
    case "recover":
      if (frame.record.size !== size) throw new FrameError("FrameOutOfRange", `recover frame: record of ${frame.record.size} members for a group of ${size}`);
      return;
    case "report":
      for (const p of frame.primaries) {
        rank(p.rank, "primary rank");
        if (p.committed > p.hi) throw new FrameError("FrameOutOfRange", `report frame: primary ${p.rank} committed ${p.committed} but captured only ${p.hi}`);
      }
      for (const b of frame.backups) {
        rank(b.rank, "backup rank");
        if (b.lo > b.hi) throw new FrameError("FrameOutOfRange", `report frame: backup ${b.rank} reaches ${b.lo}..${b.hi}`);
      }
      return;
    case "rollback":
      for (const r of Object.keys(frame.targets)) rank(Number(r), "target rank");
      for (const r of frame.images) rank(r, "image rank");
      return;
    case "rolled":
      for (const [r, v] of Object.entries(frame.d)) {
        rank(Number(r), "rank");
        vec(v, `d[${r}]`);
      }
      for (const r of Object.keys(frame.routes)) rank(Number(r), "route rank");
      return;
    case "resume":
      mat(frame.d, "d");
      vec(frame.routes.map(() => 0), "routes");
      if (frame.e < 1) throw new FrameError("FrameOutOfRange", "resume frame: epoch below 1");
      return;
    case "halt":
      for (const r of frame.lost) rank(r, "lost rank");
      return;
    case "pending":
    case "active":
    case "stale":
      return;
  }
}
