/**
 * Simulated network: every host pair has a base delay, every message some
 * jitter on top. Messages of one ordering stream (protocol.ts
 * orderingStream) between two hosts arrive in order; different streams are
 * reordered freely. A host that crashes loses a random suffix of what it had
 * in flight on each stream (a prefix may still arrive); messages to a dead
 * host vanish on arrival.
 */
import { orderingStream, type GroupMessage, type HostId } from "../protocol.js";
import type { Rng } from "./rng.js";

export interface InFlight {
  from: HostId;
  to: HostId;
  message: GroupMessage;
  arrival: number;
  dropped: boolean;
}

export interface DelayModel {
  /** Base delay of a host pair is uniform in [0.1, baseMax] ms. */
  baseMax: number;
  /** Per-message jitter is uniform in [0, jitter] ms. */
  jitter: number;
}

export class SimNetwork {
  private readonly base: number[][];
  private readonly streams = new Map<string, InFlight[]>();

  constructor(
    private readonly rng: Rng,
    hosts: number,
    private readonly delay: DelayModel,
  ) {
    this.base = Array.from({ length: hosts }, (_, a) => Array.from({ length: hosts }, (_, b) => (a === b ? 0 : rng.range(0.1, delay.baseMax))));
  }

  /** Upper bound of any message's delay. */
  get maxDelay(): number {
    return this.delay.baseMax + this.delay.jitter;
  }

  send(now: number, from: HostId, to: HostId, message: GroupMessage): InFlight {
    const key = `${from}>${to}|${orderingStream(message)}`;
    let queue = this.streams.get(key);
    if (!queue) {
      queue = [];
      this.streams.set(key, queue);
    }
    const jitter = from === to ? 0 : this.rng.range(0, this.delay.jitter);
    let arrival = now + this.base[from][to] + jitter;
    const last = queue.length ? queue[queue.length - 1].arrival : -Infinity;
    if (arrival < last) arrival = last; // FIFO within the stream (the heap breaks ties by send order)
    const flight: InFlight = { from, to, message, arrival, dropped: false };
    queue.push(flight);
    return flight;
  }

  /** The flight reached its destination (or was dropped): forget it. */
  arrived(flight: InFlight): void {
    const key = `${flight.from}>${flight.to}|${orderingStream(flight.message)}`;
    const queue = this.streams.get(key)!;
    const i = queue.indexOf(flight);
    if (i >= 0) queue.splice(i, 1);
  }

  /** `host` crashed: each of its outgoing streams keeps a random prefix of what is in flight. */
  crash(host: HostId): number {
    let dropped = 0;
    for (const [key, queue] of this.streams) {
      if (!key.startsWith(`${host}>`)) continue;
      const keep = this.rng.int(0, queue.length);
      for (let i = keep; i < queue.length; i++) {
        queue[i].dropped = true;
        dropped++;
      }
    }
    return dropped;
  }
}
