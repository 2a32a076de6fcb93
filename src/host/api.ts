/**
 * The host API: every request the CLI (or another host) sends a host, in one
 * table shared by both sides, like the worker protocol in src/vm/protocol.ts.
 * Each op has an argument schema (zod), checked by the host before anything
 * uses the arguments, and a result type, which the caller's
 * `Connection.request(op, args, body?)` returns.
 *
 * | op | who sends it | arguments | body | result |
 * |---|---|---|---|---|
 * | ping | anyone | none | – | the host's id |
 * | status | CLI | none | – | HostStatus |
 * | deploy | CLI → any host | a validated manifest | the module | the VM records placed |
 * | group_prepare | deploying host → hosts of the group | the group's ProtectionRecord | the module | where its primaries' message paths listen |
 * | group_run | deploying host → hosts of the group | group name, every rank's route | – | the group name |
 * | group_abort | deploying host → hosts of the group | group name, the given-up attempt's incarnation | – | whether prepared replicas were stopped (never a started group's) |
 * | vm_request | CLI → a VM's primary host | VM name, request text | – | the released reply |
 * | logs | CLI → a VM's host | VM name, first seq, follow | – | one page of the records kept (`more` if others follow); with follow, the other pages and then each new record as MSG.LOG pushes |
 * | records | CLI → any host | none | – | the groups, VMs and hosts in the coordination store |
 * | locate | CLI → any host | VM name | – | the VM's record (where its primary is), or null |
 *
 * The CLI learns about the cluster only through these requests: it never
 * opens the coordination store itself, whichever store the hosts use.
 *
 * A request whose arguments do not fit its op's schema is answered with an
 * error of code "BadArguments" naming each field that is off; nothing else
 * happens. An op not in the table is answered with "UnknownRequest".
 *
 * Requests and replies travel as MSG.REQUEST / MSG.REPLY control frames
 * (src/host/messages.ts): a JSON header plus an optional binary body.
 */
import { z } from "zod";
import { manifestSchema, type Manifest, type ProtectionMode } from "../cluster/manifest.js";
import { checkRecord, FrameError, protectionRecordSchema, routeSchema, type ReleasedRecord, type Route } from "../core/frames.js";
import { GROUP_SIZE_MAX, type ProtectionRecord } from "../core/types.js";
import type { GroupStatus } from "./group/driver.js";
import type { HostRecord } from "../cluster/local-cluster.js";
import type { GroupRecord, VmRecord } from "./records.js";
import type { LateSecond } from "../util/lateness-log.js";

/** Longest request text `vm_request` carries to a VM. */
export const VM_REQUEST_TEXT_CHARS_MAX = 64 * 1024;

const count = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);
const name = z.string().min(1).max(256);

const record = protectionRecordSchema.check((ctx) => {
  try {
    checkRecord(ctx.value);
  } catch (error) {
    if (!(error instanceof FrameError)) throw error;
    ctx.issues.push({ code: "custom", message: error.message, input: ctx.value });
  }
});

/** The argument schema of every op. */
export const HOST_OP_ARGS = {
  ping: z.strictObject({}),
  status: z.strictObject({}),
  deploy: z.strictObject({ manifest: manifestSchema }),
  group_prepare: z.strictObject({ record }),
  group_run: z.strictObject({ group: name, routes: z.array(routeSchema.nullable()).min(1).max(GROUP_SIZE_MAX) }),
  group_abort: z.strictObject({ group: name, incarnation: count }),
  vm_request: z.strictObject({ vm: name, text: z.string().max(VM_REQUEST_TEXT_CHARS_MAX) }),
  logs: z.strictObject({ vm: name, from_seq: count.default(1), follow: z.boolean().default(false) }),
  records: z.strictObject({}),
  locate: z.strictObject({ vm: name }),
};

export type HostOp = keyof typeof HOST_OP_ARGS;
/** The ops a host handles the same from a connection or from itself (a deploy it runs); `logs` needs a connection. */
export type LocalOp = Exclude<HostOp, "logs">;

/** What a host answers to each op. */
interface HostOpResults {
  ping: { id: string };
  status: HostStatus;
  deploy: { group: string; vms: VmRecord[] };
  group_prepare: { group: string; routes: Record<number, Route> };
  group_run: { group: string };
  group_abort: { group: string; stopped: boolean };
  vm_request: { vm: string; reply: string; epoch: number };
  /** With `follow`, each record released afterwards comes as a MSG.LOG push on the same connection. */
  /** One page of records (see LOG_PAGE_BYTES_MAX); `more`: records follow it (without follow, ask again from the next seq). */
  logs: { vm: string; role: "primary" | "backup"; first_seq: number; records: ReleasedRecord[]; more: boolean };
  records: { groups: GroupRecord[]; vms: VmRecord[]; hosts: HostRecord[] };
  locate: { vm: VmRecord | null };
}

/**
 * The table: per op, the arguments a caller passes (`args`, defaults
 * optional), the arguments a handler gets once checked (`checked`, defaults
 * filled in), and the result.
 */
export type HostOps = {
  [Op in HostOp]: { args: z.input<(typeof HOST_OP_ARGS)[Op]>; checked: z.output<(typeof HOST_OP_ARGS)[Op]>; result: HostOpResults[Op] };
};

// The checked arguments are the project's own types, not look-alikes.
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
const sameTypes: [Same<HostOps["deploy"]["checked"]["manifest"], Manifest>, Same<HostOps["group_prepare"]["checked"]["record"], ProtectionRecord>] = [true, true];
void sameTypes;

/** The same table, typed per op, so that a generic op picks its own schema. */
const schemas: { [Op in HostOp]: z.ZodType<HostOps[Op]["checked"], HostOps[Op]["args"]> } = HOST_OP_ARGS;

export function isHostOp(op: string): op is HostOp {
  return Object.hasOwn(HOST_OP_ARGS, op);
}

export interface ArgumentIssue {
  /** Dotted path of the field ("manifest.size"); "" for the arguments as a whole. */
  path: string;
  message: string;
}

export class BadArgumentsError extends Error {
  override name = "BadArgumentsError";
  readonly code = "BadArguments";
  constructor(
    readonly op: string,
    readonly issues: ArgumentIssue[],
  ) {
    super(`bad arguments for ${op}: ${issues.map((i) => (i.path ? `${i.path}: ${i.message}` : i.message)).join("; ")}`);
  }
}

/** Checks `args` against `op`'s schema: the arguments with defaults filled in, or BadArgumentsError naming every field that is off. */
export function checkArgs<Op extends HostOp>(op: Op, args: unknown): HostOps[Op]["checked"] {
  const parsed = schemas[op].safeParse(args);
  if (parsed.success) return parsed.data;
  throw new BadArgumentsError(
    op,
    parsed.error.issues.flatMap((issue) => {
      const at = issue.path.map(String);
      if (issue.code === "unrecognized_keys") return issue.keys.map((k) => ({ path: [...at, k].join("."), message: "unknown field" }));
      return [{ path: at.join("."), message: issue.message }];
    }),
  );
}

/** The REPLY of a request that failed: the error's code (BadArguments, UnknownRequest, NoSuchVm, ...) and message. */
export function errorReply(error: unknown): { ok: false; error: { code: string; message: string } } {
  const code = error instanceof Error && "code" in error && typeof error.code === "string" ? error.code : "Error";
  return { ok: false, error: { code, message: error instanceof Error ? error.message : String(error) } };
}

// ---- status ------------------------------------------------------------------------------

export interface PeerStatus {
  id: string;
  /** Heard from within the detection timeout. */
  alive: boolean;
  silent_ms: number | null;
}

/** A primary on this host (a member of a group; a single VM is a group of one). */
export interface PrimaryStatus {
  vm: string;
  group: string;
  mode: ProtectionMode;
  incarnation: number;
  backup: string | null;
  protected: boolean;
  /** The epoch being executed. */
  epoch: number;
  checkpoints: number;
  committed: number;
  released_seq: number;
}

/** A backup on this host. */
export interface BackupStatus {
  vm: string;
  primary: string;
  incarnation: number;
  cut: number;
  staged: number;
}

export interface HostStatus {
  id: string;
  address: string;
  pid: number;
  /** The lease this host's registration lives by (null before it registered; a lapsed one ends the host instance, src/host/lifecycle.ts). */
  lease: { ttl_ms: number; renewed_ms_ago: number } | null;
  peers: PeerStatus[];
  primaries: PrimaryStatus[];
  backups: BackupStatus[];
  groups: GroupStatus[];
  /** Group frames no group here took: a malformed or newer header (its connection closed), for a group with no replica here, in this host's own name, a join the store does not back. */
  group_frames_refused: number;
  /**
   * How late the host's main loop ran its tick since this instance started
   * (every heartbeat interval, 100 ms by default): while it is late, so is
   * everything the host does (commits, group frames, failover steps); its
   * heartbeats leave from a thread of their own and stop only when the loop
   * is wedged (2 s at the default detector, see src/host/beat-thread.ts). `stall_ms_max`: the longest gap between two
   * ticks (a gap longer than the detection timeout is this host's own stall:
   * its detector gives every peer a fresh window). `late_seconds`: for the
   * last ten minutes, each second in which a tick ran 10 ms late or more,
   * with its worst lateness (how late the loop was during a given window).
   */
  main_loop: { delay_ms_p99: number; delay_ms_max: number; stall_ms_max: number; late_seconds: LateSecond[] };
}
