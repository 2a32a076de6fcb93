/**
 * Invariant checks. An assertion failure is a bug: it throws AssertionError,
 * which callers never catch as an operating error, so the process fails loudly.
 */
export class AssertionError extends Error {
  override name = "AssertionError";
}

export function assert(condition: unknown, message: string): asserts condition {
  if (!condition) throw new AssertionError(message);
}
