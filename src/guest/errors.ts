/**
 * Why a module cannot be deployed. `feature` names what is not supported and
 * `where` says where it occurs (function, import, global, ...), so an operator
 * can fix the guest rather than guess.
 */
export class UnsupportedModuleError extends Error {
  override name = "UnsupportedModuleError";
  readonly code: string = "UnsupportedModule";
  constructor(
    readonly feature: string,
    readonly where: string,
  ) {
    super(`module cannot be protected: ${feature} (${where})`);
  }
}

/** What ModuleLimitError says of each limit (src/guest/limits.ts). */
const LIMIT_TEXT = {
  bytes_max: (max: number) => [`module larger than ${max} bytes`, "bytes"],
  functions_max: (max: number) => [`more than ${max} functions`, "functions"],
  nesting_max: (max: number) => [`blocks, loops, ifs or trys nested deeper than ${max} levels`, "levels"],
} as const;

/**
 * The module is past one of the instrumenter's limits (MODULE_LIMITS in
 * src/guest/limits.ts): `limit` names it, `value` is the module's figure and
 * `max` the limit's. Checked before Binaryen reads the module.
 */
export class ModuleLimitError extends UnsupportedModuleError {
  override name = "ModuleLimitError";
  override readonly code = "ModuleLimit";
  constructor(
    readonly limit: keyof typeof LIMIT_TEXT,
    readonly value: number,
    readonly max: number,
    where: string,
  ) {
    const [what, unit] = LIMIT_TEXT[limit](max);
    super(`${what} (${limit}): ${value} ${unit}`, where);
  }
}

/** The bytes are not a valid WebAssembly module at all. */
export class InvalidModuleError extends Error {
  override name = "InvalidModuleError";
  readonly code = "InvalidModule";
}

/** A module argument names neither a file nor a built guest. */
export class GuestNotFoundError extends Error {
  override name = "GuestNotFoundError";
  readonly code = "GuestNotFound";
}

/**
 * Instrumenting failed in a way that is neither of the above: Binaryen failed
 * on a module the engine accepts (it reports internal errors as thrown
 * non-Error objects), the instrumenter threw something it should not have, or
 * its thread died before answering. A Cohort or Binaryen limitation, not the
 * module's fault; the message says what was thrown.
 */
export class InstrumenterError extends Error {
  override name = "InstrumenterError";
  readonly code = "InstrumenterFailed";
}

/** A message for anything thrown, Error or not (Binaryen throws bare objects, wasm exceptions have no message). */
export function describeThrown(thrown: unknown): string {
  if (thrown instanceof Error) return thrown.message || thrown.name;
  // Node 20 has WebAssembly.Exception; TypeScript's DOM-less lib does not declare it.
  const WasmException = (WebAssembly as unknown as { Exception?: abstract new (...args: never[]) => object }).Exception;
  if (WasmException && thrown instanceof WasmException) return "uncaught wasm exception (thrown by the guest, caught by no handler)";
  if (typeof thrown === "object" && thrown !== null) {
    const message = (thrown as { message?: unknown }).message;
    if (typeof message === "string" && message) return message;
    return `${thrown.constructor?.name ?? "object"} thrown (no message)`;
  }
  return String(thrown);
}
