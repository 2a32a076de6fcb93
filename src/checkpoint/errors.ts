/**
 * Typed errors for loading checkpoint blobs (deltas and images).
 *
 * These are *operating* errors: a blob read from disk or the network may be
 * damaged, cut short or written by another Cohort version, and callers are
 * expected to catch them (by class or by `code`) and e.g. fetch the blob from
 * another replica. Encoding a malformed in-memory structure is a bug instead
 * and raises `AssertionError` (src/util/assert.ts).
 */

export type CheckpointFormatErrorCode =
  | "Truncated"
  | "InvalidMagic"
  | "InvalidFormatVersion"
  | "ChecksumMismatch"
  | "InvalidField";

export class CheckpointFormatError extends Error {
  /** Stable, machine-readable; messages may change, codes do not. */
  readonly code: CheckpointFormatErrorCode;

  constructor(code: CheckpointFormatErrorCode, message: string) {
    super(message);
    this.code = code;
    this.name = new.target.name;
  }
}

/** The blob is shorter than its header or its declared total length. */
export class TruncatedError extends CheckpointFormatError {
  constructor(message: string) {
    super("Truncated", message);
  }
}

/** The blob does not start with the magic number of the expected kind. */
export class InvalidMagicError extends CheckpointFormatError {
  constructor(message: string) {
    super("InvalidMagic", message);
  }
}

/** The format version is unknown (0, or newer than this build reads). */
export class InvalidFormatVersionError extends CheckpointFormatError {
  constructor(message: string) {
    super("InvalidFormatVersion", message);
  }
}

/** The trailing crc32 does not match the bytes before it. */
export class ChecksumMismatchError extends CheckpointFormatError {
  constructor(message: string) {
    super("ChecksumMismatch", message);
  }
}

/**
 * A header field or the body is inconsistent: lengths that do not add up to
 * the blob size, a page index out of range, a duplicate page index, etc.
 */
export class InvalidFieldError extends CheckpointFormatError {
  constructor(message: string) {
    super("InvalidField", message);
  }
}
