/**
 * The simulated network. A connection (host to host for core frames; VM
 * thread to VM thread for group messages) delivers in order, as TCP does;
 * every host pair has its own base delay and every frame some jitter, so
 * different connections reorder freely. When a host crashes, what it had in
 * flight is lost except a random prefix per connection (bytes already in the
 * receiver's kernel); what is sent to a dead host vanishes on arrival.
 */
import type { Rng } from "./rng.js";

export interface Flight {
  arrival: number;
  dropped: boolean;
}

export interface DelayModel {
  /** Base delay of a host pair, uniform in [0.05, baseMax] ms. */
  baseMax: number;
  /** Per-frame jitter, uniform in [0, jitter] ms. */
  jitter: number;
}

/** Frames in flight on one connection; arrivals are FIFO, so this never grows past what the senders sent in one delay. */
const CONNECTION_INFLIGHT_MAX = 1 << 16;

export class SimNetwork {
  private readonly base: number[][];
  /** From host index → connection key → frames in flight, oldest first. */
  private readonly inflight: Map<string, Flight[]>[];

  constructor(
    private readonly rng: Rng,
    hosts: number,
    private readonly delay: DelayModel,
  ) {
    this.base = Array.from({ length: hosts }, (_, a) => Array.from({ length: hosts }, (_, b) => (a === b ? 0.01 : rng.range(0.05, delay.baseMax))));
    this.inflight = Array.from({ length: hosts }, () => new Map());
  }

  /** A new host (a restarted process, under a new identity): its index. */
  addHost(): number {
    const n = this.base.length;
    for (let a = 0; a < n; a++) this.base[a].push(this.rng.range(0.05, this.delay.baseMax));
    this.base.push(Array.from({ length: n + 1 }, (_, b) => (b === n ? 0.01 : this.rng.range(0.05, this.delay.baseMax))));
    this.inflight.push(new Map());
    return n;
  }

  /** A frame leaves host `from` for host `to` on connection `key`: its arrival time, never before the previous frame's on that connection. */
  send(now: number, from: number, to: number, key: string): Flight {
    let queue = this.inflight[from].get(key);
    if (!queue) this.inflight[from].set(key, (queue = []));
    if (queue.length >= CONNECTION_INFLIGHT_MAX) throw new Error(`connection ${key}: more than ${CONNECTION_INFLIGHT_MAX} frames in flight`);
    let arrival = now + this.base[from][to] + (from === to ? 0 : this.rng.range(0, this.delay.jitter));
    const last = queue.length ? queue[queue.length - 1].arrival : -Infinity;
    if (arrival < last) arrival = last;
    const flight: Flight = { arrival, dropped: false };
    queue.push(flight);
    return flight;
  }

  /** The head of connection `key` from `from` arrived (or was dropped): forget it. */
  arrived(from: number, key: string): void {
    const queue = this.inflight[from].get(key);
    queue?.shift();
    if (queue && queue.length === 0) this.inflight[from].delete(key);
  }

  /** Host `from` crashed: each of its connections keeps a random prefix of what is in flight. */
  crash(from: number): number {
    let lost = 0;
    for (const queue of this.inflight[from].values()) {
      const keep = this.rng.int(0, queue.length);
      for (let i = keep; i < queue.length; i++) {
        queue[i].dropped = true;
        lost++;
      }
    }
    return lost;
  }
}
