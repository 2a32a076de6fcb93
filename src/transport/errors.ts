/**
 * Typed errors for decoding peer frames (src/transport/frame.ts).
 *
 * These are *operating* errors: bytes from a peer may be damaged, cut short,
 * or sent by another Cohort version (or by something that is not Cohort at
 * all). The connection that produced one is closed; no other connection or VM
 * is affected. Callers match on the class or on the stable `code`. Encoding a
 * frame with out-of-range arguments is a bug instead and raises
 * `AssertionError` (src/util/assert.ts).
 */

export type FrameErrorCode =
  | "InvalidMagic"
  | "InvalidFormatVersion"
  | "ChecksumMismatch"
  | "FrameTooLarge"
  | "Truncated"
  | "TrailingBytes";

export class FrameError extends Error {
  /** Stable, machine-readable; messages may change, codes do not. */
  readonly code: FrameErrorCode;

  constructor(code: FrameErrorCode, message: string) {
    super(message);
    this.code = code;
    this.name = new.target.name;
  }
}

/** The header does not start with the frame magic ("CHFR"). */
export class InvalidMagicError extends FrameError {
  constructor(message: string) {
    super("InvalidMagic", message);
  }
}

/** The frame format version is unknown (0, or newer than this build reads). */
export class InvalidFormatVersionError extends FrameError {
  constructor(message: string) {
    super("InvalidFormatVersion", message);
  }
}

/** The trailing crc32 does not match header + payload. */
export class ChecksumMismatchError extends FrameError {
  constructor(message: string) {
    super("ChecksumMismatch", message);
  }
}

/**
 * The header declares a payload larger than the receiver accepts. Raised from
 * the header alone, before any of the payload is buffered.
 */
export class FrameTooLargeError extends FrameError {
  constructor(
    readonly payload_bytes: number,
    readonly max_frame_bytes: number,
  ) {
    super("FrameTooLarge", `frame declares ${payload_bytes} payload bytes, limit is ${max_frame_bytes}`);
  }
}

/** A one-shot decode (or a stream that ended) holds only part of a frame. */
export class TruncatedError extends FrameError {
  constructor(message: string) {
    super("Truncated", message);
  }
}

/** A one-shot decode was given more bytes than the one frame they start with. */
export class TrailingBytesError extends FrameError {
  constructor(message: string) {
    super("TrailingBytes", message);
  }
}
