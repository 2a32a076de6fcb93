/**
 * A host's heartbeat thread: beats to every peer and hears theirs on a UDP
 * socket (the host port's number), off the main thread.
 *
 * Heartbeats sent and read by the main thread measured the main thread, not
 * the host: on a machine with more busy threads than cores (a 256-VM group
 * deploying over 4 hosts on 2 cores) a host's main thread waited for a core
 * for 430-750 ms at a time (`cohort bench scale --sizes 256`, `stall_ms_max`), its beats left late, and its peers failed over a
 * live host; the failover's own work then stalled the next one. A thread
 * that does nothing but beat needs a core for microseconds and the
 * scheduler gives it one at once (a sleeper's claim), so a host's beats keep
 * their rhythm whatever its main thread waits for.
 *
 * A host is more than its heartbeats, though: one whose main loop is wedged
 * (a bug, a synchronous step that does not end) must be failed over. The
 * main thread pulses at every tick of its own; a pulse older than
 * `wedged_ms` (mainLoopWedgedMs: 2 s at the default detector) stops the
 * beats, and the peers find the host failed a detection timeout later. A
 * stopped process (SIGSTOP, a VM paused) stops both threads: its beats stop
 * at once.
 */
import { Worker } from "node:worker_threads";
import { fileURLToPath } from "node:url";
import { EventEmitter } from "node:events";
import { assert } from "../util/assert.js";
import { BEAT_PEERS_MAX, BEAT_SLOT_PULSE, slotIndex, type BeatPeer, type BeatThreadInit, type FromBeatThread, type ToBeatThread } from "./beat-protocol.js";

/** Compiled like src/vm/vm.ts's worker: from the sources (tests), the thread still runs dist/'s module. */
const WORKER_URL = import.meta.url.endsWith(".ts") ? new URL("../../dist/src/host/beat-worker.js", import.meta.url) : new URL("./beat-worker.js", import.meta.url);

/** How long a host's main loop may not tick before its heartbeat thread stops beating. */
export function mainLoopWedgedMs(detect_ms: number): number {
  return Math.max(2000, 4 * detect_ms);
}

export interface BeatThreadEvents {
  /** A peer heard for the first time, or again after half a detection timeout of silence (or after `quiet`). */
  heard: [id: string];
  /**
   * A peer heard before has been silent for half a detection timeout (or
   * will reach the timeout before the thread's next beat): said once per
   * silence, at a beat of this thread, so the main thread needs no timer of
   * its own to watch peers that keep beating.
   */
  quiet: [id: string];
  /** Datagrams refused (malformed, a wrong tag): `count` since the last report, the last one's reason. */
  refused: [address: string, reason: string, count: number];
  error: [message: string];
}

export class BeatThread extends EventEmitter<BeatThreadEvents> {
  private readonly shared: BigInt64Array;
  private readonly freeSlots: number[] = [];
  private nextSlot = 0;
  private stopped = false;

  private constructor(
    private readonly worker: Worker,
    buffer: SharedArrayBuffer,
  ) {
    super();
    this.shared = new BigInt64Array(buffer);
    worker.on("message", (m: FromBeatThread) => {
      if (m.kind === "heard") this.emit("heard", m.id);
      else if (m.kind === "quiet") this.emit("quiet", m.id);
      else if (m.kind === "refused") this.emit("refused", m.address, m.reason, m.count);
      else if (m.kind === "error") this.emit("error", m.message);
    });
    worker.on("error", (error) => this.emit("error", `heartbeat thread failed: ${error.message}`));
    worker.on("exit", (code) => {
      if (!this.stopped) this.emit("error", `heartbeat thread exited (code ${code})`);
    });
  }

  /** Binds UDP `bind_host:port` and starts beating (to nobody until setPeers); rejects if the port cannot be bound. */
  static start(options: Omit<BeatThreadInit, "shared">): Promise<BeatThread> {
    const buffer = new SharedArrayBuffer(8 * slotIndex(BEAT_PEERS_MAX));
    const init: BeatThreadInit = { ...options, shared: buffer };
    Atomics.store(new BigInt64Array(buffer), BEAT_SLOT_PULSE, BigInt(Date.now()));
    const worker = new Worker(fileURLToPath(WORKER_URL), { workerData: init });
    return new Promise((resolve, reject) => {
      const onMessage = (m: FromBeatThread) => {
        if (m.kind === "ready") {
          worker.off("message", onMessage);
          resolve(new BeatThread(worker, buffer));
        } else if (m.kind === "error") {
          worker.off("message", onMessage);
          worker.terminate().catch(() => undefined);
          reject(Object.assign(new Error(`heartbeat socket on UDP ${options.bind_host}:${options.port}: ${m.message}`), { code: /EADDRINUSE/.test(m.message) ? "EADDRINUSE" : "BEAT" }));
        }
      };
      worker.on("message", onMessage);
      worker.once("error", reject);
    });
  }

  /** The main loop is alive (see mainLoopWedgedMs). */
  pulse(now_ms: number): void {
    Atomics.store(this.shared, BEAT_SLOT_PULSE, BigInt(now_ms));
  }

  /** When the peer in `slot` was last heard (wall clock ms), 0 if never. */
  lastHeard(slot: number): number {
    return Number(Atomics.load(this.shared, slotIndex(slot)));
  }

  /** A slot for a new peer, never heard. */
  takeSlot(): number {
    // The longest-free slot: a beat the thread counted for its last peer before it learnt of the change is long gone.
    const slot = this.freeSlots.shift() ?? this.nextSlot++;
    assert(slot < BEAT_PEERS_MAX, `at most ${BEAT_PEERS_MAX} peers`);
    Atomics.store(this.shared, slotIndex(slot), 0n);
    return slot;
  }

  giveSlot(slot: number): void {
    this.freeSlots.push(slot);
  }

  /** Whom to beat and hear, with their keys: the whole list, each time it changes. */
  setPeers(peers: BeatPeer[]): void {
    if (!this.stopped) this.worker.postMessage({ kind: "peers", peers } satisfies ToBeatThread);
  }

  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    const exited = new Promise<void>((resolve) => this.worker.once("exit", () => resolve()));
    this.worker.postMessage({ kind: "stop" } satisfies ToBeatThread);
    await Promise.race([exited, new Promise<void>((resolve) => setTimeout(resolve, 1000).unref())]);
    await this.worker.terminate();
  }
}
