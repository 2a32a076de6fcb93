/**
 * Writes a recording of one group core's events and actions on this host
 * (format: src/core/recording.ts) to `<dir>/<host>-<group>.jsonl`, for
 * `cohort sim --replay`. Off unless the host was started with
 * --record-core-events (or COHORT_RECORD_CORE_EVENTS): it costs a JSON line
 * per event on the host's main thread.
 *
 * Each line is written synchronously, before the driver carries out the
 * step's actions: a `kill -9` then never leaves a recording that lacks an
 * action whose effect (a frame sent, output released) other hosts saw. A
 * buffered stream lost the last lines, and the replay took a commit the
 * killed leader had sent for one nobody made.
 */
import { closeSync, mkdirSync, openSync, writeSync } from "node:fs";
import { join } from "node:path";
import type { CoreAction, CoreEvent } from "../../core/events.js";
import type { CoreOptions } from "../../core/node.js";
import { RECORDING_VERSION, recordingText } from "../../core/recording.js";

export class CoreRecorder {
  private fd: number | null;

  constructor(dir: string, host: string, group: string) {
    mkdirSync(dir, { recursive: true });
    this.fd = openSync(join(dir, `${host}-${group}.jsonl`), "a");
  }

  start(made: "deployed" | "joined", options: CoreOptions): void {
    this.write(recordingText({ kind: "start", v: RECORDING_VERSION, made, options }));
  }

  step(event: CoreEvent, actions: CoreAction[]): void {
    this.write(recordingText({ kind: "step", event, actions }));
  }

  close(): void {
    if (this.fd !== null) closeSync(this.fd);
    this.fd = null;
  }

  private write(line: string): void {
    if (this.fd === null) return;
    try {
      writeSync(this.fd, `${line}\n`);
    } catch {
      // A recording that cannot be written stops; the host goes on without it.
      this.close();
    }
  }
}
