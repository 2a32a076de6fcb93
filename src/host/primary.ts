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
 *
 * Epoch boundaries are adaptive (src/host/epoch-clock.ts).
 */
import { decodeImage } from "../checkpoint/format.js";
import type { VmWorker } from "../vm/vm.js";
import type { GuestBundle } from "../vm/protocol.js";
import type { OutputRecord } from "../vm/runtime-state.js";
import type { Connection } from "./connection.js";
import { MSG, type VmMessage } from "./messages.js";
import { OUTPUT_LOG_HISTORY_BYTES_MAX, OutputLog } from "./output-log.js";
import type { VmRecord } from "./records.js";
import { assert } from "../util/assert.js";
import { EpochClock } from "./epoch-clock.js";

/** Deltas sent and not yet acknowledged; beyond this the primary skips captures (the epoch stretches). */
export const INFLIGHT_EPOCHS_MAX = 8;
/**
 * A backup that has not acknowledged an image or delta for this long is given up on (it may be
 * alive but broken, e.g. its VM thread failed to start): the primary detaches it and the host's
 * upkeep attaches a new one. Its heartbeats alone do not make it a working backup.
 */
export const BACKUP_ACK_TIMEOUT_MS = 5000;

export interface PrimaryStats {
  epochs: number;
  committed: number;
  pause_us_last: number;
  commit_ms_last: number;
}

export class ProtectedPrimary {
  private readonly clock: EpochClock;
  private capturedEpoch = 0;
  /** Cut of the full image sent to a newly attached backup, until that backup acknowledges it. */
  private imageEpoch: number | null = null;
  private ackChain: Promise<unknown> = Promise.resolve();
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
    /** Makes the store name `host` as this VM's backup (true) or says it cannot (false: fenced, raced). */
    private readonly confirmBackup: (host: string) => Promise<boolean>,
  ) {
    vm.on("crashed", (message) => onProblem(record.vm, `VM crashed: ${message}`));
    this.clock = new EpochClock(record, () => this.tick());
    vm.on("output_pending", (epoch) => {
      if (epoch > this.capturedEpoch) this.clock.outputPending(); // else that epoch was captured already
    });
  }

  /** The epoch the VM is executing now (the one after the last capture). */
  get currentEpoch(): number {
    return this.capturedEpoch + 1;
  }

  get backupHostId(): string | null {
    return this.backupHost;
  }

  get protectedNow(): boolean {
    return this.backup !== null && !this.backup.isClosed;
  }

  start(): void {
    this.clock.start();
  }

  stop(): void {
    this.stopped = true;
    this.clock.stop();
  }

  private noteCaptured(epoch: number): void {
    this.capturedEpoch = epoch;
    this.clock.ended();
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
    this.imageEpoch = cut;
    this.inflight.push({ epoch: cut, sent_ms: Date.now() });
    // The released history goes along, so that after a failover to this backup `cohort logs` still shows it.
    const history = this.log.tail(OUTPUT_LOG_HISTORY_BYTES_MAX);
    connection.send(MSG.IMAGE, { vm: this.record.vm, incarnation: this.record.incarnation, epoch: cut, released_seq: this.log.lastSeq, history }, image);
  }

  detachBackup(): void {
    this.backup = null;
    this.backupHost = null;
    this.imageEpoch = null;
    this.inflight.length = 0;
  }

  /** Handles ACK e from the backup: commit e, release its output, tell the backup. */
  onAck(message: VmMessage): Promise<void> {
    // One ack at a time: the first commit with a new backup waits for the store to name it.
    const next = this.ackChain.then(() => this.handleAck(message));
    this.ackChain = next.catch(() => undefined);
    return next;
  }

  private async handleAck(message: VmMessage): Promise<void> {
    if (message.incarnation !== this.record.incarnation || this.stopped) return;
    const head = this.inflight[0];
    if (!head || head.epoch !== message.epoch) return; // stale ack from a previous backup attachment
    this.inflight.shift();
    if (message.epoch === this.imageEpoch) {
      this.imageEpoch = null;
      // Nothing may commit with a backup that the store does not name yet: if this host died
      // after such a commit, the backup the store names (older) would be promoted and undo
      // released output.
      if (!(await this.confirmBackup(this.backupHost!))) {
        this.detachBackup();
        return;
      }
    }
    const released = await this.enqueue(() => this.vm.request("commit", { epoch: message.epoch }));
    this.release(released);
    this.stats.committed = message.epoch;
    this.stats.commit_ms_last = Date.now() - head.sent_ms;
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
        this.noteCaptured(captured.epoch);
        this.release(await this.enqueue(() => this.vm.request("commit", { epoch: captured.epoch })));
      } catch (error) {
        this.onProblem(this.record.vm, (error as Error).message);
      } finally {
        this.capturing = false;
      }
      return;
    }
    const backup = this.backup;
    const oldest = this.inflight[0];
    if (backup && oldest && Date.now() - oldest.sent_ms > BACKUP_ACK_TIMEOUT_MS) {
      this.onProblem(this.record.vm, `backup ${this.backupHost} did not acknowledge epoch ${oldest.epoch} within ${BACKUP_ACK_TIMEOUT_MS} ms: detached`);
      this.detachBackup();
      return;
    }
    if (!backup || backup.isClosed || this.inflight.length >= INFLIGHT_EPOCHS_MAX) return;
    this.capturing = true;
    try {
      const captured = await this.enqueue(() => this.vm.capture());
      this.noteCaptured(captured.epoch);
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
