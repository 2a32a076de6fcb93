/**
 * The group message data path of one primary VM, run on the VM's own thread:
 * what the guest sends goes straight from this thread to the receiving VM's
 * thread, over TCP to another host or over a MessageChannel on this host
 * (docs/PROTOCOL.md "Messages inside a group": sent directly, same host in process).
 * The host's main thread is not on this path at all; it only sets the routes
 * and the state (frozen during a recovery, running otherwise).
 *
 * Why on the VM thread: a message relayed by the host thread costs a
 * main⇄worker postMessage round trip at each end of every hop, which together
 * cost more than the loopback TCP round trip itself (`cohort bench pingpong`
 * compares the modes with raw TCP).
 *
 * Policies kept here because they must act per message, at once:
 * - vm mode (`hold_until_commit`): a message leaves only once its sender
 *   epoch committed (release()); until then it is held here.
 * - frozen (recovery): nothing is sent (the sender log re-sends it later);
 *   arrivals wait in a bounded inbox and are offered once running again.
 * - the VM refused a message "full" or "early": offered again after the next
 *   capture or incarnation change (retryRefused()).
 *
 * A connection that breaks loses what was in flight on it; only a recovery
 * re-sends (the sender log has it), as when a host dies.
 */
import { connect, createServer, Socket, type Server } from "node:net";
import type { MessagePort } from "node:worker_threads";
import { randomUUID } from "node:crypto";
import type { Route } from "../core/frames.js";
import { encodeFrame, FrameDecoder } from "../transport/frame.js";
import type { GroupMessage } from "./machine.js";
import { decodeBatch, decodeHello, encodeBatch, encodeHello, PATH_HELLO, PATH_MSGS } from "./message-wire.js";

export type { Route };

export interface PathCounters {
  /** Messages sent while their sender epoch was not committed yet (group, none). */
  sent_before_commit: number;
  /** Messages sent once their sender epoch committed (vm mode: all of them). */
  sent_after_commit: number;
  /** Messages ever held until commit (vm mode). */
  held_total: number;
  /** Held now. */
  held: number;
  /** Not sent: frozen, or no route to the receiver (re-sent after a recovery). */
  dropped: number;
  received: number;
}

export interface PathHooks {
  /**
   * Offers messages to the VM in order; returns those it did not take yet
   * ("full", "early") to offer again later. Throws if a message is malformed.
   */
  offer(messages: GroupMessage[]): GroupMessage[];
  /** The VM's committed epoch (vm mode: messages of later epochs are held). */
  committed(): number;
  problem(reason: string): void;
}

export interface PathOptions {
  rank: number;
  bind_host: string;
  hold_until_commit: boolean;
}

/** Arrivals kept while frozen or refused: beyond this they are dropped (re-sent only by a recovery). */
export const PATH_INBOX_MAX = 65536;
/** Bytes queued for one receiver (connecting, or a slow peer) before the link is dropped. */
export const PATH_SEND_BUFFER_MAX_BYTES = 64 * 1024 * 1024;
/** One frame carries at most this many payload bytes; larger batches are split. */
const FRAME_PAYLOAD_TARGET_BYTES = 4 * 1024 * 1024;
/** Receive limit per frame (a batch plus its headers). */
const FRAME_BYTES_MAX = 64 * 1024 * 1024;
/** After a link failed, sends to that receiver are dropped this long before a new connection is tried. */
const RECONNECT_AFTER_MS = 200;

/** One frame as one buffer: a single write, no cork/writev, for the small frames this path mostly carries. */
function frameBytes(type: number, payload: Uint8Array): Uint8Array {
  return Buffer.concat(encodeFrame(type, payload));
}

/** An outgoing connection to one receiving VM. */
class OutLink {
  private readonly socket: Socket;
  private ready = false;
  private queue: Uint8Array[] = [];
  private queuedBytes = 0;
  closedAt: number | null = null;

  constructor(
    readonly route: Route,
    from: number,
    private readonly problem: (reason: string) => void,
  ) {
    const i = route.address.lastIndexOf(":");
    try {
      this.socket = connect({ host: route.address.slice(0, i), port: Number(route.address.slice(i + 1)) });
    } catch (error) {
      // A route that is no address (the host checks routes, this is the last line): a link that is closed from the start.
      this.socket = new Socket();
      this.close(`cannot connect to ${JSON.stringify(route.address)}: ${(error as Error).message}`);
      return;
    }
    this.socket.setNoDelay(true);
    this.socket.on("connect", () => {
      this.ready = true;
      this.socket.write(frameBytes(PATH_HELLO, encodeHello({ token: route.token, from })));
      for (const f of this.queue) this.socket.write(f);
      this.queue = [];
      this.queuedBytes = 0;
    });
    this.socket.on("data", () => this.close("the receiver wrote to a send-only link"));
    this.socket.on("error", (error) => this.close(error.message));
    this.socket.on("close", () => this.close("closed"));
  }

  write(frame: Uint8Array): boolean {
    if (this.closedAt !== null) return false;
    const buffered = this.ready ? this.socket.writableLength : this.queuedBytes;
    if (buffered + frame.length > PATH_SEND_BUFFER_MAX_BYTES) {
      this.close(`more than ${PATH_SEND_BUFFER_MAX_BYTES} bytes waiting: receiver too slow`);
      return false;
    }
    if (this.ready) this.socket.write(frame);
    else {
      this.queue.push(frame);
      this.queuedBytes += frame.length;
    }
    return true;
  }

  close(reason: string): void {
    if (this.closedAt !== null) return;
    this.closedAt = Date.now();
    this.queue = [];
    this.socket.destroy();
    if (reason !== "closed") this.problem(`link to ${this.route.address}: ${reason}`);
  }
}

export class MessagePath {
  private state: "frozen" | "running" = "frozen";
  readonly token = randomUUID();
  private server: Server | null = null;
  private readonly accepted = new Set<Socket>();
  private routes: (Route | null)[] = [];
  private locals = new Map<number, MessagePort>();
  private links = new Map<number, OutLink>();
  /** Arrived while frozen. */
  private inbox: GroupMessage[] = [];
  /** Refused "full" / "early" by the VM. */
  private refused: GroupMessage[] = [];
  /** vm mode: waiting for their sender epoch to commit. */
  private held: GroupMessage[] = [];
  private readonly stats = { sent_before_commit: 0, sent_after_commit: 0, held_total: 0, dropped: 0, received: 0 };
  private closed = false;

  constructor(
    private readonly options: PathOptions,
    private readonly hooks: PathHooks,
  ) {}

  /** Starts listening for peers' connections; resolves with the port. */
  listen(): Promise<number> {
    const server = createServer((socket) => this.accept(socket));
    this.server = server;
    return new Promise((resolve, reject) => {
      server.once("error", reject);
      server.listen(0, this.options.bind_host, () => {
        const address = server.address();
        resolve(typeof address === "object" && address ? address.port : 0);
      });
    });
  }

  get counters(): PathCounters {
    return { ...this.stats, held: this.held.length };
  }

  get running(): boolean {
    return this.state === "running";
  }

  get heldCount(): number {
    return this.held.length;
  }

  /**
   * Where each rank's primary listens (null: none, or this VM), and the
   * MessageChannel ports to ranks on this host. Replaces earlier routes:
   * links to receivers that moved are closed.
   */
  setRoutes(routes: (Route | null)[], locals: { rank: number; port: MessagePort }[]): void {
    this.routes = routes;
    for (const [rank, link] of this.links) {
      const r = routes[rank];
      if (!r || r.address !== link.route.address || r.token !== link.route.token) {
        link.close("closed");
        this.links.delete(rank);
      }
    }
    for (const port of this.locals.values()) port.close();
    this.locals = new Map();
    for (const { rank, port } of locals) {
      port.on("message", (messages: GroupMessage[]) => this.arrivedSafely(messages, `rank ${rank} on this host`));
      this.locals.set(rank, port);
    }
  }

  freeze(): void {
    this.state = "frozen";
    this.inbox = [];
    this.refused = [];
  }

  /** Running again: what arrived meanwhile is offered now. */
  run(): void {
    this.state = "running";
    const waiting = this.inbox;
    this.inbox = [];
    if (waiting.length) this.arrivedSafely(waiting, "the inbox");
  }

  /** What the guest sent. `force`: also while frozen (the re-sends of a recovery). */
  send(messages: readonly GroupMessage[], force = false): void {
    if (this.closed) return;
    if (this.state === "frozen" && !force) {
      this.stats.dropped += messages.length;
      return;
    }
    const committed = this.hooks.committed();
    const now: GroupMessage[] = [];
    for (const m of messages) {
      if (this.options.hold_until_commit && m.epoch > committed) {
        this.held.push(m);
        this.stats.held_total++;
      } else {
        if (m.epoch > committed) this.stats.sent_before_commit++;
        else this.stats.sent_after_commit++;
        now.push(m);
      }
    }
    this.transmit(now);
  }

  /** vm mode: epoch `committed` committed: held messages of epochs <= it leave now. */
  release(committed: number): void {
    if (!this.held.length) return;
    const free = this.held.filter((m) => m.epoch <= committed);
    if (!free.length) return;
    this.held = this.held.filter((m) => m.epoch > committed);
    this.stats.sent_after_commit += free.length;
    if (this.state === "running") this.transmit(free);
    else this.stats.dropped += free.length;
  }

  /** New incarnation: held messages are stamped with it; refused ones are offered again. */
  restamp(incarnation: number): void {
    for (const m of this.held) m.incarnation = incarnation;
    this.retryRefused();
  }

  /** After a rollback to `epoch`: what was held from later epochs was never sent and is undone. */
  dropHeldAfter(epoch: number): void {
    this.held = this.held.filter((m) => m.epoch <= epoch);
  }

  /** Before re-sending to `receiver` from the sender log: held copies are re-derived from it. */
  dropHeldTo(receiver: number): void {
    this.held = this.held.filter((m) => m.to !== receiver);
  }

  retryRefused(): void {
    if (!this.refused.length || this.state !== "running") return;
    const again = this.refused;
    this.refused = [];
    this.arrivedSafely(again, "the refused queue");
  }

  close(): void {
    this.closed = true;
    this.server?.close();
    for (const s of this.accepted) s.destroy();
    for (const l of this.links.values()) l.close("closed");
    for (const p of this.locals.values()) p.close();
    this.links.clear();
    this.locals.clear();
  }

  private transmit(messages: GroupMessage[]): void {
    if (!messages.length) return;
    const byRank = new Map<number, GroupMessage[]>();
    for (const m of messages) {
      let list = byRank.get(m.to);
      if (!list) byRank.set(m.to, (list = []));
      list.push(m);
    }
    for (const [rank, list] of byRank) {
      const local = this.locals.get(rank);
      if (local) {
        local.postMessage(list);
        continue;
      }
      const link = this.linkTo(rank);
      if (!link) {
        this.stats.dropped += list.length;
        continue;
      }
      for (const chunk of chunks(list)) {
        if (!link.write(frameBytes(PATH_MSGS, encodeBatch(chunk)))) this.stats.dropped += chunk.length;
      }
    }
  }

  private linkTo(rank: number): OutLink | null {
    const route = this.routes[rank];
    if (!route) return null;
    const link = this.links.get(rank);
    if (link && link.closedAt === null) return link;
    if (link && Date.now() - link.closedAt! < RECONNECT_AFTER_MS) return null;
    const fresh = new OutLink(route, this.options.rank, (reason) => this.hooks.problem(reason));
    this.links.set(rank, fresh);
    return fresh;
  }

  private accept(socket: Socket): void {
    if (this.closed) {
      socket.destroy();
      return;
    }
    socket.setNoDelay(true);
    this.accepted.add(socket);
    const decoder = new FrameDecoder({ max_frame_bytes: FRAME_BYTES_MAX });
    let greeted = false;
    const refuse = (reason: string) => {
      this.hooks.problem(`incoming link from ${socket.remoteAddress}:${socket.remotePort} closed: ${reason}`);
      socket.destroy();
    };
    socket.on("data", (chunk: Buffer) => {
      try {
        for (const frame of decoder.push(chunk)) {
          if (socket.destroyed) return;
          if (!greeted) {
            if (frame.type !== PATH_HELLO) return refuse("first frame is not a hello");
            if (decodeHello(frame.payload).token !== this.token) return refuse("hello for another VM (wrong token)");
            greeted = true;
          } else if (frame.type === PATH_MSGS) {
            this.arrived(decodeBatch(frame.payload));
          } else {
            return refuse(`unknown frame type ${frame.type}`);
          }
        }
      } catch (error) {
        refuse((error as Error).message);
      }
    });
    socket.on("error", () => socket.destroy());
    socket.on("close", () => this.accepted.delete(socket));
  }

  private arrivedSafely(messages: GroupMessage[], source: string): void {
    try {
      this.arrived(messages);
    } catch (error) {
      this.hooks.problem(`messages from ${source} refused: ${(error as Error).message}`);
    }
  }

  /** Messages from a peer. Throws (to the link that brought them) if the VM finds one malformed. */
  private arrived(messages: GroupMessage[]): void {
    if (this.closed) return;
    this.stats.received += messages.length;
    if (this.state === "frozen") {
      this.keep(this.inbox, messages);
      return;
    }
    const refused = this.hooks.offer(messages);
    if (refused.length) this.keep(this.refused, refused);
  }

  private keep(queue: GroupMessage[], messages: GroupMessage[]): void {
    if (this.inbox.length + this.refused.length + messages.length > PATH_INBOX_MAX) {
      this.hooks.problem(`rank ${this.options.rank}: ${messages.length} message(s) dropped, ${PATH_INBOX_MAX} already waiting`);
      return;
    }
    for (const m of messages) queue.push(m);
  }
}

/** Splits a batch so that no frame carries much more than FRAME_PAYLOAD_TARGET_BYTES. */
function* chunks(messages: GroupMessage[]): Generator<GroupMessage[]> {
  let chunk: GroupMessage[] = [];
  let bytes = 0;
  for (const m of messages) {
    if (chunk.length && bytes + m.bytes.length > FRAME_PAYLOAD_TARGET_BYTES) {
      yield chunk;
      chunk = [];
      bytes = 0;
    }
    chunk.push(m);
    bytes += m.bytes.length;
  }
  if (chunk.length) yield chunk;
}
