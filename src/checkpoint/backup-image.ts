/**
 * A backup replica's committed image: the memory of a VM at cut `epoch`,
 * kept in a WebAssembly.Memory so that promotion instantiates the guest
 * against it with no copy (VmCore.resume), plus the globals and runtime state
 * of that cut.
 */
import { PAGE_BYTES, WASM_PAGE_BYTES } from "../vm/layout.js";
import { imageOf, newMemory, VmCore, type GuestModule, type VmOptions } from "../vm/machine.js";
import { assert } from "../util/assert.js";
import type { DeltaParts, ImageParts } from "./format.js";

export class BackupImage {
  private memory: WebAssembly.Memory;
  private globals: Uint8Array;
  private runtime_state: Uint8Array;
  private cut: number;
  private promoted = false;

  private constructor(
    readonly guest: GuestModule,
    private readonly options: VmOptions,
    memory: WebAssembly.Memory,
    epoch: number,
    globals: Uint8Array,
    runtime_state: Uint8Array,
  ) {
    this.memory = memory;
    this.cut = epoch;
    this.globals = globals;
    this.runtime_state = runtime_state;
  }

  /** The image of cut 0: the memory a fresh VM starts with, before it booted. */
  static blank(guest: GuestModule, options: VmOptions, initial_pages: number): BackupImage {
    return new BackupImage(guest, options, newMemory(guest.info, options.limits, initial_pages), 0, new Uint8Array(0), new Uint8Array(0));
  }

  /** A full initial copy (re-protection, or a backup that joins late). */
  static fromImage(guest: GuestModule, options: VmOptions, image: ImageParts): BackupImage {
    const memory = newMemory(guest.info, options.limits, image.memory_pages);
    const bytes = new Uint8Array(memory.buffer);
    for (let i = 0; i < image.page_indices.length; i++) {
      bytes.set(image.page_data.subarray(i * PAGE_BYTES, (i + 1) * PAGE_BYTES), image.page_indices[i] * PAGE_BYTES);
    }
    return new BackupImage(guest, options, memory, image.epoch, image.globals.slice(), image.runtime_state.slice());
  }

  get epoch(): number {
    return this.cut;
  }

  get memoryBytes(): number {
    return this.memory.buffer.byteLength;
  }

  /** Folds checkpoint `epoch` (which must be the next one) into the image. */
  apply(delta: DeltaParts): void {
    assert(!this.promoted, "apply to a promoted backup");
    assert(delta.epoch === this.cut + 1, `delta ${delta.epoch} does not follow cut ${this.cut}`);
    const pages = this.memory.buffer.byteLength / WASM_PAGE_BYTES;
    // Committed cuts only ever grow memory: a primary never rolls back below a committed cut.
    assert(delta.memory_pages >= pages, `delta shrinks memory from ${pages} to ${delta.memory_pages} pages`);
    if (delta.memory_pages > pages) this.memory.grow(delta.memory_pages - pages);
    const bytes = new Uint8Array(this.memory.buffer);
    const { page_indices, page_data } = delta;
    assert(page_data.length === page_indices.length * PAGE_BYTES, "page data matches page count");
    for (let i = 0; i < page_indices.length; i++) {
      const at = page_indices[i] * PAGE_BYTES;
      assert(at + PAGE_BYTES <= bytes.length, `page ${page_indices[i]} inside memory`);
      bytes.set(page_data.subarray(i * PAGE_BYTES, (i + 1) * PAGE_BYTES), at);
    }
    this.globals = delta.globals.slice();
    this.runtime_state = delta.runtime_state.slice();
    this.cut = delta.epoch;
  }

  /** The committed image as a whole (for a full copy to a new backup, and for tests). */
  image(): ImageParts {
    return imageOf(new Uint8Array(this.memory.buffer), this.cut, this.guest.hash, this.globals, this.runtime_state);
  }

  /** Zero-copy promotion: the guest is instantiated against this very memory. */
  promote(): VmCore {
    assert(!this.promoted, "a backup is promoted once");
    this.promoted = true;
    return VmCore.resume(this.guest, this.options, this.memory, this.globals, this.runtime_state, this.cut);
  }
}
