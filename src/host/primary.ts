/**
 * The executing replica of one VM on this host, and its half of the
 * checkpoint protocol (DESIGN.md "The checkpoint path"):
 *
 *   every interval: capture epoch e (VM resumes at once) → DELTA e to the backup
 *   ACK e from the backup → commit e → release its output → COMMIT e to the backup
 *
 * Captures are pipelined up to INFLIGHT_EPOCHS_MAX unacknowledged deltas. No
 * output is released before its cut commits; without a backup nothing commits
 * (the VM keeps running, its output waits).
 */
import { decodeImage } from "../checkpoint/format.js";
import type { VmWorker } from "../vm/vm.js";
import type { GuestBundle } from "../vm/protocol.js";
import type { OutputRecord } from "../vm/runtime-state.js";
import type { Connection } from "./connection.js";
import { MSG, type VmMessage } from "./messages.js";
import { OutputLog } from "./output-log.js";
import type { VmRecord } from "./records.js";
import { assert } from "../util/assert.js";

/** Deltas sent and not yet acknowledged; beyond this the primary skips captures (the epoch stretches). */
export const INFLIGHT_EPOCHS_MAX = 8;

export interface PrimaryStats {
  epochs: number;
  committed: number;
  pause_us_last: number;
  commit_ms_last: number;
}

export class ProtectedPrimary {
  private timer: NodeJS.Timeout | null = null;
  private backup: Connection | null = null;
  private backupHost: string | null = null;
  private readonly inflight: { epoch: number; sent_ms: number }[] = [];
  private capturing = false;
  private stopped = false;
  /** Serialises the VM requests issued by this replica (captures and commits interleave in order). */
  private chain: Promise<unknown> = Promise.resolve();
  readonly stats: PrimaryStats = { epochs: 0, committed: 0, pause_us_last: 0, commit_ms_last: 0 };

  constructor(
    readonly record: VmRecord,
    readonly guest: GuestBundle,
    readonly vm: VmWorker,
    readonly log: OutputLog,
    private readonly onProblem: (vm: string, reason: string) => void,
  ) {
    vm.on("crashed", (message) => onProblem(record.vm, `VM crashed: ${message}`));
  }

  get backupHostId(): string | null {
    return this.backupHost;
  }

  get protectedNow(): boolean {
    return this.backup !== null && !this.backup.isClosed;
  }

  start(): void {
    this.timer = setInterval(() => void this.tick(), this.record.interval_ms);
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  /**
   * Makes `connection` (to `host`) this VM's backup: sends a full image at a
   * fresh cut, and commits that cut once the backup acknowledges it.
   */
  async attachBackup(host: string, connection: Connection): Promise<void> {
    this.backup = null;
    this.inflight.length = 0;
    const image = await this.enqueue(() => this.vm.request("image", {}));
    const cut = decodeImage(image).epoch;
    this.backupHost = host;
    this.backup = connection;
    this.inflight.push({ epoch: cut, sent_ms: Date.now() });
    connection.send(MSG.IMAGE, { vm: this.record.vm, incarnation: this.record.incarnation, epoch: cut, released_seq: this.log.lastSeq }, image);
  }

  detachBackup(): void {
    this.backup = null;
    this.backupHost = null;
    this.inflight.length = 0;
  }

  /** Handles ACK e from the backup: commit e, release its output, tell the backup. */
  async onAck(message: VmMessage): Promise<void> {
    if (message.incarnation !== this.record.incarnation || this.stopped) return;
    const head = this.inflight[0];
    if (!head || head.epoch !== message.epoch) return; // stale ack from a previous backup attachment
    this.inflight.shift();
    const released = await this.enqueue(() => this.vm.request("commit", { epoch: message.epoch }));
    this.release(released);
    this.stats.committed = message.epoch;
    this.stats.commit_ms_last = performance.now() - head.sent_ms;
    this.backup?.send(MSG.COMMIT, { vm: this.record.vm, incarnation: this.record.incarnation, epoch: message.epoch } satisfies VmMessage);
  }

  /** Output of a cut that is committed by definition (the recovery cut after a promotion). */
  async releaseCommitted(epoch: number): Promise<void> {
    this.release(await this.enqueue(() => this.vm.request("commit", { epoch })));
  }

  private release(records: OutputRecord[]): void {
    this.log.append(records);
  }

  private async tick(): Promise<void> {
    if (this.stopped || this.capturing) return;
    if (this.record.mode === "none") {
      // No protection: checkpoint locally only to release output at a steady pace.
      this.capturing = true;
      try {
        const captured = await this.enqueue(() => this.vm.capture());
        this.release(await this.enqueue(() => this.vm.request("commit", { epoch: captured.epoch })));
      } catch (error) {
        this.onProblem(this.record.vm, (error as Error).message);
      } finally {
        this.capturing = false;
      }
      return;
    }
    const backup = this.backup;
    if (!backup || backup.isClosed || this.inflight.length >= INFLIGHT_EPOCHS_MAX) return;
    this.capturing = true;
    try {
      const captured = await this.enqueue(() => this.vm.capture());
      this.stats.epochs++;
      this.stats.pause_us_last = captured.pause_us;
      if (this.backup !== backup || backup.isClosed) return; // the backup changed while capturing: the next image covers it
      assert(this.inflight.length === 0 || this.inflight[this.inflight.length - 1].epoch < captured.epoch, "epochs are sent in order");
      this.inflight.push({ epoch: captured.epoch, sent_ms: Date.now() });
      backup.send(MSG.DELTA, { vm: this.record.vm, incarnation: this.record.incarnation, epoch: captured.epoch } satisfies VmMessage, captured.delta);
    } catch (error) {
      this.onProblem(this.record.vm, (error as Error).message);
    } finally {
      this.capturing = false;
    }
  }

  private enqueue<T>(job: () => Promise<T>): Promise<T> {
    const next = this.chain.then(job, job);
    this.chain = next.catch(() => undefined);
    return next;
  }
}
