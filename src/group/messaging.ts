/**
 * Group messaging, the host's side of the bookkeeping the VMs keep (see
 * VmCore: send/receive, sender log, delivered vectors). Pure functions over
 * plain vectors, so the leader, the hosts and the tests compute the same
 * thing. Which vectors travel when:
 *
 * - **capture** of cut e: each member reports `delivered` (CapturedDelta /
 *   CaptureResult): index = sender rank, the highest seq it delivered from
 *   that sender at cut e.
 * - **commit** of cut e: the leader turns the members' vectors of cut e into
 *   one trim vector per sender (trimVectors) and each sender calls
 *   trimSenderLog with its own. Only committed cuts may be used: a rollback
 *   never goes below one, so nothing trimmed is ever needed again.
 * - **recovery** to cut c (after every member rolled back in place or was
 *   promoted to c, and set the new incarnation): each member reports
 *   deliveredVector(); the leader checks the cut (checkCut) and each sender s
 *   re-sends resendFor(r, delivered_r[s]) to every receiver r. Then the group
 *   resumes.
 */
import type { GroupMessage } from "../vm/machine.js";

/**
 * `delivered_at_cut[r][s]` = highest seq receiver r delivered from sender s at
 * one committed cut. Returns `trim[s][r]`: the argument of sender s's
 * trimSenderLog.
 */
export function trimVectors(delivered_at_cut: readonly (readonly number[])[]): number[][] {
  const n = delivered_at_cut.length;
  for (const row of delivered_at_cut) if (row.length !== n) throw new RangeError(`delivered vector of length ${row.length} in a group of ${n}`);
  return Array.from({ length: n }, (_, s) => Array.from({ length: n }, (_, r) => delivered_at_cut[r][s]));
}

/**
 * The problems that make a set of member states not one consistent cut: a
 * receiver that delivered a seq its sender (in its own state) never sent is an
 * orphan. `sent[s][r]` = sentVector of s, `delivered[r][s]` = deliveredVector
 * of r. Empty when consistent.
 */
export function checkCut(sent: readonly (readonly number[])[], delivered: readonly (readonly number[])[]): string[] {
  const problems: string[] = [];
  const n = sent.length;
  for (let r = 0; r < n; r++) {
    for (let s = 0; s < n; s++) {
      if (delivered[r][s] > sent[s][r]) problems.push(`rank ${r} delivered seq ${delivered[r][s]} from rank ${s}, which sent ${sent[s][r]}`);
    }
  }
  return problems;
}

/** What recovery needs from a member, whatever runs it (VmCore in process, or a worker via its ops). */
export interface RecoveringMember {
  deliveredVector(): number[];
  resendFor(receiver: number, delivered: number): GroupMessage[];
}

/**
 * The re-sends of a recovery, for members that are all at the recovery cut
 * (in place or promoted) and in the new incarnation: every message some
 * sender's log holds that its receiver's restored state lacks, per channel in
 * seq order.
 */
export function recoveryResends(members: readonly RecoveringMember[]): GroupMessage[] {
  const delivered = members.map((m) => m.deliveredVector());
  const out: GroupMessage[] = [];
  members.forEach((sender, s) => {
    for (let r = 0; r < members.length; r++) out.push(...sender.resendFor(r, delivered[r][s]));
  });
  return out;
}
