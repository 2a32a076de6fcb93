/**
 * The checkpoint clock of one member in `vm` and `none` mode, where every VM
 * checkpoints on its own (Remus): capture epoch e, ship the delta to the
 * backup, commit e when the backup says it staged e. Epoch boundaries are
 * adaptive (src/host/epoch-clock.ts); held peer messages count as output
 * waiting. In `none` mode a capture commits at once (no backup): it only
 * paces the release of output.
 */
import { EpochClock, type EpochTiming } from "../epoch-clock.js";
import type { GroupMember } from "./member.js";

/** Deltas sent and not yet staged; beyond this the member skips captures (the epoch stretches). */
export const MEMBER_INFLIGHT_MAX = 8;

export interface MemberClockIo {
  backupHost(): string | null;
  sendDelta(host: string, e: number, delivered: number[], delta: Uint8Array): void;
  /** Checkpoint `e` committed (vm mode: the VM thread sent the messages it held for it): `delivered` was the member's vector at it. */
  committed(e: number, delivered: number[]): void;
  problem(reason: string): void;
}

export class MemberClock {
  private readonly clock: EpochClock;
  private capturing = false;
  private stopped = false;
  private readonly inflight: { epoch: number; delivered: number[] }[] = [];

  constructor(
    timing: EpochTiming,
    private readonly member: GroupMember,
    private readonly local: boolean,
    private readonly io: MemberClockIo,
  ) {
    this.clock = new EpochClock(timing, () => this.tick(), () => member.heldCount > 0);
  }

  start(): void {
    this.clock.start();
  }

  stop(): void {
    this.stopped = true;
    this.clock.stop();
  }

  outputPending(): void {
    this.clock.outputPending();
  }

  /** The backup staged checkpoint `e`: commit it (and everything before). */
  onStaged(e: number): void {
    if (this.stopped) return;
    while (this.inflight.length && this.inflight[0].epoch < e) this.inflight.shift();
    const head = this.inflight[0];
    if (!head || head.epoch !== e) return; // a stale ack (an earlier backup)
    this.inflight.shift();
    void this.commit(e, head.delivered);
  }

  private async commit(e: number, delivered: number[]): Promise<void> {
    try {
      await this.member.commit(e);
      if (!this.stopped) this.io.committed(e, delivered);
    } catch (error) {
      this.io.problem(`commit ${e}: ${(error as Error).message}`);
    }
  }

  private async tick(): Promise<void> {
    if (this.stopped || this.capturing || this.member.state !== "running") return;
    const backup = this.io.backupHost();
    if (!this.local && (backup === null || this.inflight.length >= MEMBER_INFLIGHT_MAX)) return;
    this.capturing = true;
    try {
      const captured = await this.member.capture();
      this.clock.ended();
      if (this.stopped) return;
      if (this.local) {
        await this.commit(captured.epoch, captured.delivered);
        return;
      }
      this.inflight.push({ epoch: captured.epoch, delivered: captured.delivered });
      this.io.sendDelta(backup!, captured.epoch, captured.delivered, captured.delta);
    } catch (error) {
      this.io.problem(`capture: ${(error as Error).message}`);
    } finally {
      this.capturing = false;
    }
  }
}
