/**
 * One VM protected by a backup replica inside this process: the primary and
 * the backup are two worker threads, the checkpoint stream is a transferred
 * buffer instead of a TCP connection. It runs the whole checkpoint path of
 * DESIGN.md for a single VM (capture → ship → apply → commit → release) and
 * promotes the backup in place when the primary's thread is lost.
 *
 * `cohort run` uses it to show the VM runtime working end to end on one machine.
 */
import { decodeDelta, decodeImage } from "../checkpoint/format.js";
import { VmWorker } from "../vm/vm.js";
import type { GuestBundle, WorkerVmOptions } from "../vm/protocol.js";
import type { OutputRecord } from "../vm/runtime-state.js";
import { assert } from "../util/assert.js";

export interface EpochReport {
  epoch: number;
  dirty_pages: number;
  pause_us: number;
  delta_bytes: number;
  commit_ms: number;
}

export interface LocalPairEvents {
  onRelease: (records: OutputRecord[]) => void;
  onEpoch?: (report: EpochReport) => void;
}

/** The pair could not start: the guest's boot crashed or a VM thread failed; both threads are stopped. */
export class PairStartError extends Error {
  override name = "PairStartError";
  readonly code = "PairStartFailed";
}

function messageOf(reason: unknown): string {
  return reason instanceof Error ? reason.message : String(reason);
}

export class LocalPair {
  private primary: VmWorker;
  private backup: VmWorker;
  /** Highest output sequence released; a promoted primary re-releases its committed cut's output, and this drops it. */
  private releasedSeq = 0;

  private constructor(
    private readonly guest: GuestBundle,
    private readonly options: WorkerVmOptions,
    primary: VmWorker,
    backup: VmWorker,
    private readonly events: LocalPairEvents,
  ) {
    this.primary = primary;
    this.backup = backup;
  }

  /**
   * Boots the primary and starts a blank backup. If either fails (the guest's
   * boot traps, a thread does not start), the other is stopped too: a live
   * worker thread would keep the process running with nothing to do.
   */
  static async start(guest: GuestBundle, options: WorkerVmOptions, events: LocalPairEvents): Promise<LocalPair> {
    const [primary, backup] = await Promise.allSettled([VmWorker.boot(guest, options), VmWorker.backup(guest, options, null)]);
    if (primary.status === "fulfilled" && backup.status === "fulfilled") return new LocalPair(guest, options, primary.value, backup.value, events);
    await Promise.all([primary, backup].map((r) => (r.status === "fulfilled" ? r.value.terminate() : undefined)));
    if (primary.status === "rejected") throw new PairStartError(`the primary failed to boot: ${messageOf(primary.reason)}`);
    throw new PairStartError(`the backup failed to start: ${messageOf((backup as PromiseRejectedResult).reason)}`);
  }

  /** One checkpoint: capture, ship to the backup, commit once it is stored, release the cut's output. */
  async checkpoint(): Promise<EpochReport> {
    const captured = await this.primary.capture();
    const started = performance.now();
    // Checked here, at the receiving end, before the backup folds it in.
    const parts = decodeDelta(captured.delta);
    assert(parts.epoch === captured.epoch, "delta epoch matches the captured epoch");
    await this.backup.request("apply", { delta: captured.delta }, [captured.delta.buffer as ArrayBuffer]);
    const released = await this.primary.request("commit", { epoch: captured.epoch });
    this.release(released);
    const report = {
      epoch: captured.epoch,
      dirty_pages: captured.dirty_pages,
      pause_us: captured.pause_us,
      delta_bytes: parts.page_data.length + parts.globals.length + parts.runtime_state.length,
      commit_ms: performance.now() - started,
    };
    this.events.onEpoch?.(report);
    return report;
  }

  /**
   * The primary is lost (its thread is killed): the backup is promoted in
   * place from the last committed cut, and a fresh backup gets a full copy.
   * Returns the time until the promoted VM runs.
   */
  async failover(): Promise<{ promote_ms: number; cut: number }> {
    const started = performance.now();
    await this.primary.terminate();
    const status = await this.backup.request("promote", {});
    this.primary = this.backup;
    const promote_ms = performance.now() - started;
    const image = await this.primary.request("image", {});
    const cut = decodeImage(image).epoch;
    this.backup = await VmWorker.backup(this.guest, this.options, image);
    this.release(await this.primary.request("commit", { epoch: cut }));
    return { promote_ms, cut: status.committed };
  }

  async stop(): Promise<void> {
    await Promise.all([this.primary.terminate(), this.backup.terminate()]);
  }

  get primaryWorker(): VmWorker {
    return this.primary;
  }

  private release(records: OutputRecord[]): void {
    const fresh = records.filter((r) => r.seq > this.releasedSeq);
    for (const r of fresh) {
      assert(r.seq === this.releasedSeq + 1, `released output is contiguous (expected seq ${this.releasedSeq + 1}, got ${r.seq})`);
      this.releasedSeq = r.seq;
    }
    if (fresh.length) this.events.onRelease(fresh);
  }
}
