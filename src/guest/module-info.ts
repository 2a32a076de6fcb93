/**
 * What an instrumented module looks like from the outside: the names it
 * imports and exports and the ModuleInfo the instrumenter records. Kept apart
 * from instrument.ts so that VM threads, which only run instrumented modules,
 * never load Binaryen.
 */
/** Bump when the output of instrument() changes, so cached modules are rebuilt. */
export const INSTRUMENTER_VERSION = 8;

export const HV_MODULE = "cohort_hv";
export const EXPORT_BOOT = "__cohort_boot";
export const EXPORT_SAVE_GLOBALS = "__cohort_save_globals";
export const EXPORT_LOAD_GLOBALS = "__cohort_load_globals";

export type ValueTypeName = "i32" | "i64" | "f32" | "f64" | "v128";

export interface ModuleInfo {
  abi_version: 1;
  instrumenter_version: number;
  /** Guest's own memory, in 64 KiB pages (hypervisor region excluded). */
  guest_initial_pages: number;
  guest_maximum_pages: number;
  /** Saved in this order, one 16-byte slot each, at GLOBALS_OFFSET. */
  mutable_globals: { name: string; type: ValueTypeName }[];
  /**
   * Indices into mutable_globals of the i32 flags the instrumenter adds to
   * remember a `data.drop` (1 = that segment is dropped). A rollback to a cut
   * whose flag is 0 while the running instance has it at 1 must revive the
   * segment, which only a new instance can (wasm has no "undrop").
   */
  data_drop_flags: number[];
  /** Function exports of the guest (start, message, request, timer, cohort_inbox, ...). */
  exports: string[];
  /** "module.name" of every function import. */
  imports: string[];
}

export interface InstrumentedModule {
  wasm: Uint8Array;
  info: ModuleInfo;
}
