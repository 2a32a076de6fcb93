/**
 * Why a module cannot be deployed. `feature` names what is not supported and
 * `where` says where it occurs (function, import, global, ...), so an operator
 * can fix the guest rather than guess.
 */
export class UnsupportedModuleError extends Error {
  override name = "UnsupportedModuleError";
  readonly code = "UnsupportedModule";
  constructor(
    readonly feature: string,
    readonly where: string,
  ) {
    super(`module cannot be protected: ${feature} (${where})`);
  }
}

/** The bytes are not a valid WebAssembly module at all. */
export class InvalidModuleError extends Error {
  override name = "InvalidModuleError";
  readonly code = "InvalidModule";
}

/**
 * Instrumenting failed in a way that is neither of the above: the
 * instrumenter threw something it should not have, or its thread died before
 * answering. A Cohort bug, not the module's fault; the message says what was thrown.
 */
export class InstrumenterError extends Error {
  override name = "InstrumenterError";
  readonly code = "InstrumenterFailed";
}
