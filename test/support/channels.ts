/**
 * What the group-messaging tests do with whole groups of members, as the
 * hosts would: the trim vectors of a committed cut, the consistency check of
 * a set of states, and the re-sends of a recovery. Built on the core's
 * senderColumn, which the core and the daemon's driver use for the same.
 */
import { senderColumn, type GroupMessage } from "../../src/core/channel.js";

/**
 * `delivered_at_cut[r][s]` = highest seq receiver r delivered from sender s at
 * one committed cut. Returns `trim[s][r]`: the argument of sender s's trim.
 */
export function trimVectors(delivered_at_cut: readonly (readonly number[])[]): number[][] {
  const n = delivered_at_cut.length;
  for (const row of delivered_at_cut) if (row.length !== n) throw new RangeError(`delivered vector of length ${row.length} in a group of ${n}`);
  return Array.from({ length: n }, (_, s) => senderColumn(delivered_at_cut, s));
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

/** What recovery needs from a member (Channels, or VmCore in process). */
export interface RecoveringMember {
  deliveredVector(): number[];
  resendFor(receiver: number, delivered: number): GroupMessage[];
}

/**
 * The re-sends of a recovery, for members that are all at the recovery cut
 * and in the new incarnation: every message some sender's log holds that its
 * receiver's restored state lacks, per channel in seq order (what each VM's
 * `resend` op does with its column of the delivered matrix).
 */
export function recoveryResends(members: readonly RecoveringMember[]): GroupMessage[] {
  const delivered = members.map((m) => m.deliveredVector());
  const out: GroupMessage[] = [];
  members.forEach((sender, s) => {
    const column = senderColumn(delivered, s);
    for (let r = 0; r < members.length; r++) out.push(...sender.resendFor(r, column[r]));
  });
  return out;
}
