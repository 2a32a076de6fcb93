/** Helpers shared by the coordination store tests. */
import { expect } from "vitest";
import { type CoordinationStore, StoreError, type StoreErrorCode } from "../../src/store/store.js";

/** Awaits `p`, which must fail with a StoreError of `code`; returns that error. */
export async function rejectsWith(p: Promise<unknown>, code: StoreErrorCode): Promise<StoreError> {
  const e = await p.then(
    () => null,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(StoreError);
  expect((e as StoreError).code).toBe(code);
  return e as StoreError;
}

/** Adds one to the number under `key` by read + compare-and-swap, retrying until its swap wins. */
export async function casIncrement(s: CoordinationStore, key: string): Promise<void> {
  for (;;) {
    const cur = await s.get<number>(key);
    if ((await s.cas(key, cur?.version ?? 0, (cur?.value ?? 0) + 1)) !== null) return;
  }
}
