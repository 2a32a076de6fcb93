/**
 * The format of a recording of one GroupCore's inputs and outputs: one JSON
 * line to start (how the core was made), then one line per event with the
 * actions the core answered. Bytes behind handles (deltas, images, the
 * module) are not kept, only their length: the core never looks inside them,
 * so a replay through the core gives the same actions without them.
 *
 * The daemon writes recordings when asked (src/host/group/recorder.ts);
 * src/sim/replay.ts replays them through the core and checks them.
 */
import type { CoreAction, CoreEvent } from "./events.js";
import type { CoreOptions } from "./node.js";

export const RECORDING_VERSION = 1;

export type RecordingLine =
  | { kind: "start"; v: number; made: "deployed" | "joined"; options: CoreOptions }
  | { kind: "step"; event: CoreEvent; actions: CoreAction[] };

/** A handle's stand-in: the bytes' length. */
export interface BytesStandIn {
  bytes: number;
}

/** One recording line as text: byte arrays become their length, everything else stays JSON. */
export function recordingText(line: RecordingLine): string {
  return JSON.stringify(line, (_key, value: unknown) => (value instanceof Uint8Array ? ({ bytes: value.length } satisfies BytesStandIn) : value));
}
