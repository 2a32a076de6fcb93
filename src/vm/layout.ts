/**
 * Memory layout of an instrumented guest.
 *
 * Node 20 has no multi-memory, so the hypervisor's per-VM bookkeeping lives in
 * the guest's own linear memory, in a low region the guest cannot address:
 * deploy-time instrumentation shifts every guest address up by `BASE_BYTES`
 * (folded into load/store offset immediates, added to bulk-memory operands),
 * so a guest address can only reach [BASE_BYTES, memory size).
 *
 *   [0, DIRTY_MAP_BYTES)                 dirty map: one byte per 4 KiB page
 *   [GLOBALS_OFFSET, +GLOBALS_BYTES)     mutable-globals save area (16 B a slot)
 *   [BASE_BYTES, size)                   the guest's own memory (guest address 0 = BASE_BYTES)
 *
 * Page numbers everywhere in Cohort are 4 KiB page indices of the *whole*
 * memory (address >> 12), hypervisor region included, so a delta applies to
 * an image without translation.
 */

export const PAGE_BYTES = 4096;
export const PAGE_SHIFT = 12;
export const WASM_PAGE_BYTES = 65536;

/** One byte per 4 KiB page of a 4 GiB space. */
export const DIRTY_MAP_OFFSET = 0;
export const DIRTY_MAP_BYTES = 1 << 20;

/** 16-byte slots so that a v128 global fits; 4096 mutable globals at most. */
export const GLOBALS_OFFSET = DIRTY_MAP_BYTES;
export const GLOBAL_SLOT_BYTES = 16;
export const GLOBALS_BYTES = 65536;
export const GLOBALS_MAX = GLOBALS_BYTES / GLOBAL_SLOT_BYTES;

export const RESERVED_WASM_PAGES = (DIRTY_MAP_BYTES + GLOBALS_BYTES) / WASM_PAGE_BYTES; // 17
export const BASE_BYTES = RESERVED_WASM_PAGES * WASM_PAGE_BYTES;
/** First 4 KiB page index that belongs to the guest. */
export const FIRST_GUEST_PAGE = BASE_BYTES / PAGE_BYTES;

/**
 * Whole-memory ceiling in wasm pages. One short of 4 GiB so that an access at
 * offset immediate 0xFFFFFFFF always traps (used to encode "always traps" when a
 * shifted offset would overflow u32).
 */
export const MEMORY_WASM_PAGES_MAX = 65535;
export const GUEST_WASM_PAGES_MAX = MEMORY_WASM_PAGES_MAX - RESERVED_WASM_PAGES;
