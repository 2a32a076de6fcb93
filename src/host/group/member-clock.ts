/**
 * The checkpoint clock of one member in `vm` and `none` mode, where every VM
 * checkpoints on its own (Remus): capture epoch e, ship the delta to the
 * backup, commit e when the backup says it staged e. Adaptive epochs as
 * for a single VM: something waiting to leave (output, or in vm mode a peer
 * message) → the epoch ends min_interval_ms after the previous capture; idle →
 * interval_ms, doubling up to max_interval_ms. In `none` mode a capture commits
 * at once (no backup): it only paces the release of output.
 */
import type { Manifest } from "../../cluster/manifest.js";
import type { GroupMessage } from "../../vm/machine.js";
import type { GroupMember } from "./member.js";

/** Deltas sent and not yet staged; beyond this the member skips captures (the epoch stretches). */
export const MEMBER_INFLIGHT_MAX = 8;

export interface MemberClockIo {
  backupHost(): string | null;
  sendDelta(host: string, e: number, delivered: number[], delta: Uint8Array): void;
  /** Checkpoint `e` committed: `delivered` was the member's vector at it, `free` the held messages it releases. */
  committed(e: number, delivered: number[], free: GroupMessage[]): void;
  problem(reason: string): void;
}

export class MemberClock {
  private timer: NodeJS.Timeout | null = null;
  private dueAt = Infinity;
  private lastCaptureMs = 0;
  private idleMs: number;
  private waiting = false;
  private capturing = false;
  private stopped = false;
  private readonly inflight: { epoch: number; delivered: number[] }[] = [];

  constructor(
    private readonly timing: Manifest["epoch"],
    private readonly member: GroupMember,
    private readonly local: boolean,
    private readonly io: MemberClockIo,
  ) {
    this.idleMs = timing.interval_ms;
  }

  start(): void {
    this.lastCaptureMs = Date.now();
    this.scheduleNext();
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  outputPending(): void {
    this.waiting = true;
    this.scheduleAt(Math.max(Date.now(), this.lastCaptureMs + this.timing.min_interval_ms));
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
      const free = await this.member.commit(e);
      if (!this.stopped) this.io.committed(e, delivered, free);
    } catch (error) {
      this.io.problem(`commit ${e}: ${(error as Error).message}`);
    }
  }

  private scheduleAt(at_ms: number): void {
    if (this.stopped || (this.timer && this.dueAt <= at_ms)) return;
    if (this.timer) clearTimeout(this.timer);
    this.dueAt = at_ms;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.dueAt = Infinity;
      void this.tick().finally(() => this.scheduleNext());
    }, Math.max(0, at_ms - Date.now()));
  }

  private scheduleNext(): void {
    const wait = this.waiting || this.member.heldCount > 0 ? this.timing.min_interval_ms : this.idleMs;
    this.scheduleAt(this.lastCaptureMs + Math.max(wait, this.timing.min_interval_ms));
  }

  private async tick(): Promise<void> {
    if (this.stopped || this.capturing || this.member.state !== "running") return;
    const backup = this.io.backupHost();
    if (!this.local && (backup === null || this.inflight.length >= MEMBER_INFLIGHT_MAX)) return;
    this.capturing = true;
    try {
      const captured = await this.member.capture();
      this.lastCaptureMs = Date.now();
      this.idleMs = this.waiting ? this.timing.interval_ms : Math.min(this.timing.max_interval_ms, this.idleMs * 2);
      this.waiting = false;
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
