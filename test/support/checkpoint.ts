/** Test helpers for the checkpoint path: ship a primary's delta through the real binary format, compare images. */
import type { BackupImage } from "../../src/checkpoint/backup-image.js";
import { decodeDelta, encodeImage, sealDelta } from "../../src/checkpoint/format.js";
import type { VmCore } from "../../src/vm/machine.js";

/** Captures the primary's current epoch, seals and decodes the delta as a backup would, folds it in; returns the cut. */
export function shipDelta(vm: VmCore, backup: BackupImage): number {
  const captured = vm.capture();
  sealDelta(captured.delta);
  backup.apply(decodeDelta(captured.delta));
  return captured.epoch;
}

/** The encoded image of a primary (as of its last capture) or a backup: equal bytes = equal memory, globals and runtime state. */
export function imageBytes(source: { image(): ReturnType<VmCore["image"]> }): Buffer {
  return Buffer.from(encodeImage(source.image()));
}
