/**
 * The backup replica of one VM on this host: stages each delta and
 * acknowledges it, folds committed deltas into its image, and mirrors the
 * released output stream so a promoted VM continues it without a gap.
 *
 * Folding is lazy: committed deltas are folded FOLD_BATCH at a time in one VM
 * request (and all of them before a promotion or a recovery step), because a
 * fold per epoch costs a VM thread round trip per epoch per backup on the host
 * thread, the busiest thread of a host. Until folded, a committed delta is
 * still staged; the image can reach any cut from the folded one to the newest
 * staged. The output mirror follows the folds.
 */
import { decodeDelta, decodeImage, type DecodeOptions } from "../checkpoint/format.js";
import type { PackedOutput } from "../vm/runtime-state.js";
import { VmWorker } from "../vm/vm.js";
import type { GuestBundle, WorkerVmOptions } from "../vm/protocol.js";
import { OutputLog } from "./output-log.js";
import type { ReleasedRecord } from "../core/frames.js";
import type { VmRecord } from "./records.js";
import { assert } from "../util/assert.js";

/** Deltas staged and not yet committed; a primary that runs further ahead than this is refused. */
export const STAGED_DELTAS_MAX = 64;
/** Committed deltas folded together (one VM request). */
export const FOLD_BATCH = 8;

export class BackupReplica {
  private worker: VmWorker | null = null;
  private staged: { epoch: number; delta: Uint8Array }[] = [];
  /** The image's cut (folded). */
  private cut = 0;
  /** Newest cut the primary said committed (>= cut; the deltas between are staged). */
  private committed = 0;
  private stopped = false;
  private chain: Promise<unknown> = Promise.resolve();
  readonly log = new OutputLog();

  constructor(
    public record: VmRecord,
    readonly guest: GuestBundle,
    private readonly options: WorkerVmOptions,
  ) {}

  /** Newest committed cut this copy holds (folded or staged). */
  get committedCut(): number {
    return Math.max(this.cut, this.committed);
  }

  get stagedCount(): number {
    return this.staged.length;
  }

  /** Newest checkpoint this copy can reach (the last staged delta, or the committed image). */
  get newestCut(): number {
    return this.staged.length ? this.staged[this.staged.length - 1].epoch : this.cut;
  }

  /** True once an image is installed (a backup named before its image arrived holds nothing). */
  get hasImage(): boolean {
    return this.worker !== null;
  }

  /**
   * Group recovery: go to cut `cut` (committed by the recovery): fold the staged
   * deltas up to it, forget the ones after it. The primary rolled back to the
   * same cut, so its next delta is `cut + 1`.
   */
  rollbackTo(cut: number): Promise<void> {
    return this.enqueue(async () => {
      // The cut comes from a coordinator's frame: one this copy cannot reach fails the step, it breaks nothing here.
      if (cut < this.cut) throw new Error(`${this.record.vm}: recovery cut ${cut} below the committed image ${this.cut}`);
      await this.foldThrough(cut);
      if (this.cut !== cut) throw new Error(`${this.record.vm}: cannot reach cut ${cut} (image at ${this.cut})`);
      this.staged = [];
      this.committed = cut;
    });
  }

  /** Group recovery: promote at exactly cut `cut` (staged deltas after it are dropped). */
  async promoteAt(cut: number): Promise<{ worker: VmWorker; cut: number }> {
    await this.rollbackTo(cut);
    return this.promote();
  }

  /** A full image from the primary: replaces whatever this replica held. Returns the epoch to acknowledge. */
  async install(image: Uint8Array, released_seq: number, history: readonly ReleasedRecord[] = []): Promise<number> {
    const epoch = decodeImage(image).epoch;
    await this.enqueue(async () => {
      const previous = this.worker;
      this.worker = await VmWorker.backup(this.guest, this.options, image);
      await previous?.terminate();
      this.staged = [];
      this.cut = this.committed = epoch;
      this.log.adopt(history, released_seq);
    });
    return epoch;
  }

  /** The deployed state (cut 0): a blank image, as the primary had before it booted. */
  async installBlank(): Promise<void> {
    await this.enqueue(async () => {
      const previous = this.worker;
      this.worker = await VmWorker.backup(this.guest, this.options, null);
      await previous?.terminate();
      this.staged = [];
      this.cut = this.committed = 0;
    });
  }

  /**
   * Stages delta `epoch` (checked now, applied at commit), after whatever install or fold is under way.
   * `checksum_verified`: the caller verified this buffer's checksum already (the other checks run anyway).
   */
  stage(epoch: number, delta: Uint8Array, options: DecodeOptions = {}): Promise<void> {
    return this.enqueue(async () => this.stageNow(epoch, delta, options));
  }

  private stageNow(epoch: number, delta: Uint8Array, options: DecodeOptions): void {
    if (!this.worker) throw new Error(`no image installed for ${this.record.vm}`);
    if (this.staged.length >= STAGED_DELTAS_MAX) throw new Error(`more than ${STAGED_DELTAS_MAX} staged deltas for ${this.record.vm}`);
    const parts = decodeDelta(delta, options); // magic, version, checksum, fields: a bad delta is refused before it is acknowledged
    // Peer input, not an invariant of this host: refused like any bad delta.
    if (parts.epoch !== epoch) throw new Error(`delta for checkpoint ${epoch} of ${this.record.vm} holds checkpoint ${parts.epoch}`);
    const last = this.staged.length ? this.staged[this.staged.length - 1].epoch : this.cut;
    if (epoch !== last + 1) throw new Error(`delta ${epoch} does not follow ${last}`);
    this.staged.push({ epoch, delta });
  }

  /** Cut `epoch` committed: once FOLD_BATCH committed deltas are staged, fold them and mirror the output released. */
  commit(epoch: number): Promise<void> {
    return this.enqueue(async () => {
      this.committed = Math.max(this.committed, epoch);
      let foldable = 0;
      while (foldable < this.staged.length && this.staged[foldable].epoch <= this.committed) foldable++;
      if (foldable >= FOLD_BATCH) await this.foldThrough(this.committed);
    });
  }

  /**
   * Promotion: every staged delta is complete, so the newest one is a cut this
   * copy can reach; it is >= the last committed cut, so no released output is
   * undone. Folds them all and turns the backup thread into the primary, in place.
   */
  async promote(): Promise<{ worker: VmWorker; cut: number }> {
    return this.enqueue(async () => {
      // Named as backup but the primary died before our image arrived: there is no copy here to promote.
      if (!this.worker) throw new Error(`${this.record.vm}: no image was installed before the primary failed; the VM is lost`);
      const newest = this.staged.length ? this.staged[this.staged.length - 1].epoch : this.cut;
      await this.foldThrough(newest);
      assert(this.worker, "a promoted backup has an image");
      await this.worker.request("promote", {});
      const worker = this.worker;
      this.worker = null;
      return { worker, cut: newest };
    });
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.worker?.terminate();
    this.worker = null;
  }

  private async foldThrough(epoch: number): Promise<void> {
    if (this.stopped) return; // a COMMIT that arrives while the host shuts down or drops this replica
    assert(this.worker, "fold needs an image");
    let n = 0;
    while (n < this.staged.length && this.staged[n].epoch <= epoch) n++;
    if (n === 0) return;
    const batch = this.staged.splice(0, n);
    const deltas = batch.map((b) => b.delta);
    // Handed to the VM thread, not copied, where a delta owns its whole buffer (the driver stages copies,
    // and nothing here reads a delta once folded): a host backing up 64 VMs cloned hundreds of deltas
    // on its main thread at each commit. A view into a larger buffer (a socket chunk) is copied.
    const transfer = [...new Set(deltas.filter((d) => d.byteOffset === 0 && d.byteLength === d.buffer.byteLength).map((d) => d.buffer as ArrayBuffer))];
    const { output } = await this.worker.request("apply_batch", { deltas }, transfer);
    this.cut = batch[n - 1].epoch;
    this.mirror(output, Math.max(this.committed, this.cut));
  }

  /** Output held in the folded states (in seq order) with epoch <= the committed cut was released by the primary. */
  private mirror(output: PackedOutput, committed: number): void {
    this.log.appendPacked(output, committed);
  }

  private enqueue<T>(job: () => Promise<T>): Promise<T> {
    const next = this.chain.then(job, job);
    this.chain = next.catch(() => undefined);
    return next;
  }
}
