/**
 * Writes a recording of one group core's events and actions on this host
 * (format: src/core/recording.ts) to `<dir>/<host>-<group>.jsonl`, for
 * `cohort sim --replay`. Off unless the host was started with
 * --record-core-events (or COHORT_RECORD_CORE_EVENTS): it costs a JSON line
 * per event on the host's main thread.
 */
import { createWriteStream, mkdirSync, type WriteStream } from "node:fs";
import { join } from "node:path";
import type { CoreAction, CoreEvent } from "../../core/events.js";
import type { CoreOptions } from "../../core/node.js";
import { RECORDING_VERSION, recordingText } from "../../core/recording.js";

export class CoreRecorder {
  private readonly out: WriteStream;
  private failed = false;

  constructor(dir: string, host: string, group: string) {
    mkdirSync(dir, { recursive: true });
    this.out = createWriteStream(join(dir, `${host}-${group}.jsonl`), { flags: "a" });
    // A recording that cannot be written stops; the host goes on without it.
    this.out.on("error", () => (this.failed = true));
  }

  start(made: "deployed" | "joined", options: CoreOptions): void {
    this.write(recordingText({ kind: "start", v: RECORDING_VERSION, made, options }));
  }

  step(event: CoreEvent, actions: CoreAction[]): void {
    this.write(recordingText({ kind: "step", event, actions }));
  }

  close(): void {
    this.out.end();
  }

  private write(line: string): void {
    if (!this.failed) this.out.write(`${line}\n`);
  }
}
