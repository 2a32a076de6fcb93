/**
 * The backup replica of one VM on this host: stages each delta and
 * acknowledges it, folds staged deltas into the committed image when the
 * primary says a cut committed, and mirrors the released output stream so a
 * promoted VM continues it without a gap.
 */
import { decodeDelta, decodeImage } from "../checkpoint/format.js";
import { decodeRuntimeState, type OutputRecord } from "../vm/runtime-state.js";
import { VmWorker } from "../vm/vm.js";
import type { GuestBundle, WorkerVmOptions } from "../vm/protocol.js";
import { OutputLog } from "./output-log.js";
import type { LogRecordWire } from "./messages.js";
import type { VmRecord } from "./records.js";
import { assert } from "../util/assert.js";

/** Deltas staged and not yet committed; a primary that runs further ahead than this is refused. */
export const STAGED_DELTAS_MAX = 64;

export class BackupReplica {
  private worker: VmWorker | null = null;
  private staged: { epoch: number; delta: Uint8Array }[] = [];
  private cut = 0;
  private stopped = false;
  private chain: Promise<unknown> = Promise.resolve();
  readonly log = new OutputLog();

  constructor(
    public record: VmRecord,
    readonly guest: GuestBundle,
    private readonly options: WorkerVmOptions,
  ) {}

  get committedCut(): number {
    return this.cut;
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
      assert(cut >= this.cut, `${this.record.vm}: recovery cut ${cut} below the committed image ${this.cut}`);
      await this.foldThrough(cut);
      assert(this.cut === cut, `${this.record.vm}: cannot reach cut ${cut} (image at ${this.cut})`);
      this.staged = [];
    });
  }

  /** Group recovery: promote at exactly cut `cut` (staged deltas after it are dropped). */
  async promoteAt(cut: number): Promise<{ worker: VmWorker; cut: number }> {
    await this.rollbackTo(cut);
    return this.promote();
  }

  /** A full image from the primary: replaces whatever this replica held. Returns the epoch to acknowledge. */
  async install(image: Uint8Array, released_seq: number, history: readonly LogRecordWire[] = []): Promise<number> {
    const epoch = decodeImage(image).epoch;
    await this.enqueue(async () => {
      const previous = this.worker;
      this.worker = await VmWorker.backup(this.guest, this.options, image);
      await previous?.terminate();
      this.staged = [];
      this.cut = epoch;
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
      this.cut = 0;
    });
  }

  /** Stages delta `epoch` (checked now, applied at commit), after whatever install or fold is under way. */
  stage(epoch: number, delta: Uint8Array): Promise<void> {
    return this.enqueue(async () => this.stageNow(epoch, delta));
  }

  private stageNow(epoch: number, delta: Uint8Array): void {
    if (!this.worker) throw new Error(`no image installed for ${this.record.vm}`);
    if (this.staged.length >= STAGED_DELTAS_MAX) throw new Error(`more than ${STAGED_DELTAS_MAX} staged deltas for ${this.record.vm}`);
    const parts = decodeDelta(delta); // magic, version, checksum, fields: a bad delta is refused before it is acknowledged
    assert(parts.epoch === epoch, "delta header epoch matches the message");
    const last = this.staged.length ? this.staged[this.staged.length - 1].epoch : this.cut;
    if (epoch !== last + 1) throw new Error(`delta ${epoch} does not follow ${last}`);
    this.staged.push({ epoch, delta });
  }

  /** Cut `epoch` committed: fold staged deltas up to it, mirror the output it released. */
  commit(epoch: number): Promise<void> {
    return this.enqueue(() => this.foldThrough(epoch));
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
    let newestState: Uint8Array | null = null;
    while (this.staged.length && this.staged[0].epoch <= epoch) {
      const { epoch: e, delta } = this.staged.shift()!;
      newestState = decodeDelta(delta).runtime_state;
      // Copied to the worker, not transferred: the bytes may be a view into a socket chunk.
      await this.worker.request("apply", { delta });
      this.cut = e;
    }
    if (newestState) this.mirror(decodeRuntimeState(newestState).output, epoch);
  }

  /** Output held in the newest folded state with epoch <= the committed cut was released by the primary. */
  private mirror(output: OutputRecord[], committed: number): void {
    this.log.append(output.filter((r) => r.epoch <= committed).sort((a, b) => a.seq - b.seq));
  }

  private enqueue<T>(job: () => Promise<T>): Promise<T> {
    const next = this.chain.then(job, job);
    this.chain = next.catch(() => undefined);
    return next;
  }
}
