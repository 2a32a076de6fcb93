/**
 * The simulator's model VM: its whole machine state is a map (a counter,
 * what it sent, what it received, what it output). Primaries keep a snapshot
 * per reachable cut (the abstract undo log) and ship deltas of the keys
 * written in each epoch; backups stage deltas and fold them in order.
 *
 * Keys: `counter`; `sent:<id>` = receiver rank; `recv:<id>` = times delivered;
 * `outs` = output count; `out:<k>` = id of the k-th output.
 */
import { assert } from "../../util/assert.js";
import { UNDO_CUTS_MAX } from "../protocol.js";

export type VmState = Map<string, number | string>;

export interface ModelDelta {
  epoch: number;
  entries: [string, number | string][];
}

/** Bytes a state would take on the wire: the unit of "memory moved". */
export function stateBytes(state: VmState): number {
  let bytes = 64;
  for (const [k, v] of state) bytes += k.length + (typeof v === "string" ? v.length : 8);
  return bytes;
}

function deltaBytes(d: ModelDelta): number {
  let bytes = 16;
  for (const [k, v] of d.entries) bytes += k.length + (typeof v === "string" ? v.length : 8);
  return bytes;
}

export class ModelPrimary {
  running: boolean;
  /** Epoch being executed (the driver's own count, independent of the core's). */
  epoch: number;
  private dirty = new Set<string>();
  private readonly snapshots = new Map<number, VmState>();

  constructor(
    public state: VmState,
    cut: number,
    running: boolean,
  ) {
    this.epoch = cut + 1;
    this.running = running;
    this.snapshots.set(cut, new Map(state));
  }

  static boot(): ModelPrimary {
    return new ModelPrimary(new Map<string, number | string>([["counter", 0], ["outs", 0]]), 0, true);
  }

  get(key: string): number | string | undefined {
    return this.state.get(key);
  }

  write(key: string, value: number | string): void {
    this.state.set(key, value);
    this.dirty.add(key);
  }

  /** A group message delivered: applied to the state. */
  deliver(payload: string): void {
    const key = `recv:${payload}`;
    this.write(key, ((this.state.get(key) as number | undefined) ?? 0) + 1);
    this.write("counter", (this.state.get("counter") as number) + 1);
  }

  capture(epoch: number): { payload: ModelDelta; bytes: number } {
    assert(epoch === this.epoch, `model VM: capture ${epoch} in epoch ${this.epoch}`);
    this.snapshots.set(epoch, new Map(this.state));
    assert(this.snapshots.size <= UNDO_CUTS_MAX, `model VM: ${this.snapshots.size} undo cuts`);
    const payload: ModelDelta = { epoch, entries: [...this.dirty].map((k) => [k, this.state.get(k)!]) };
    this.dirty.clear();
    this.epoch = epoch + 1;
    return { payload, bytes: deltaBytes(payload) };
  }

  commit(epoch: number): void {
    assert(this.snapshots.has(epoch), `model VM: commit of ${epoch}, not captured`);
    for (const k of [...this.snapshots.keys()]) if (k < epoch) this.snapshots.delete(k);
  }

  rollback(cut: number): void {
    const at = this.snapshots.get(cut);
    assert(at, `model VM: rollback to ${cut}, not reachable`);
    this.state = new Map(at);
    this.snapshots.clear();
    this.snapshots.set(cut, at);
    this.epoch = cut + 1;
    this.dirty.clear();
  }

  image(cut: number): { payload: VmState; bytes: number } {
    assert(this.epoch === cut + 1 && this.dirty.size === 0 && !this.running, `model VM: image at ${cut} while in epoch ${this.epoch}`);
    const payload = new Map(this.state);
    return { payload, bytes: stateBytes(payload) };
  }

  checkpoint(cut: number): VmState | null {
    return this.snapshots.get(cut) ?? null;
  }
}

export class ModelBackup {
  private readonly staged = new Map<number, ModelDelta>();

  private constructor(
    private image: VmState,
    private folded: number,
  ) {}

  static install(cut: number, image: VmState): ModelBackup {
    return new ModelBackup(new Map(image), cut);
  }

  get hi(): number {
    let hi = this.folded;
    while (this.staged.has(hi + 1)) hi++;
    return hi;
  }

  stage(epoch: number, delta: ModelDelta): void {
    assert(delta.epoch === epoch && epoch === this.hi + 1, `model backup: delta ${epoch} after ${this.hi}`);
    this.staged.set(epoch, delta);
  }

  fold(through: number): void {
    for (let e = this.folded + 1; e <= through; e++) {
      const d = this.staged.get(e);
      assert(d, `model backup: fold through ${through}, ${e} missing`);
      for (const [k, v] of d.entries) this.image.set(k, v);
      this.staged.delete(e);
      this.folded = e;
    }
  }

  discard(after: number): void {
    for (const e of [...this.staged.keys()]) if (e > after) this.staged.delete(e);
  }

  /** Zero-copy promotion: the image becomes the running VM's state. */
  promote(cut: number): ModelPrimary {
    assert(this.folded === cut && this.staged.size === 0, `model backup: promote at ${cut}, folded ${this.folded}, ${this.staged.size} staged`);
    return new ModelPrimary(this.image, cut, false);
  }

  /** The VM's state at checkpoint `cut`, if this backup holds it. */
  checkpointAt(cut: number): VmState | null {
    if (cut < this.folded || cut > this.hi) return null;
    const state = new Map(this.image);
    for (let e = this.folded + 1; e <= cut; e++) for (const [k, v] of this.staged.get(e)!.entries) state.set(k, v);
    return state;
  }
}
