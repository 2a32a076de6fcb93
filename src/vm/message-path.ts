/**
 * The group message data path of one primary VM, run on the VM's thread:
 * what the guest sends goes straight from this thread to the receiving VM's
 * thread, over TCP to another host, over the MessageChannel between this
 * thread and another VM thread of this host (one per pair of threads), or
 * handed over on the thread itself to a VM of the same thread (docs/PROTOCOL.md "Messages inside a group": sent directly,
 * same host in process).
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
 * Connections are the VM thread's, not the VM's (PathEndpoint): a thread
 * listens on one port for all its VMs and keeps one connection per thread it
 * talks to, each batch naming its receiving VM by token. A host's VMs of one
 * group share a few threads (src/vm/vm.ts), so two hosts need a few
 * connections per group, however large the group, where a connection per
 * pair of VMs made n² of them (a 64-VM group over 4 hosts started some
 * 1,500 TLS handshakes at once, they timed out, and it exchanged nothing).
 *
 * A connection that breaks loses what was in flight on it; only a recovery
 * re-sends (the sender log has it), as when a host dies.
 *
 * With `tls` (the host's certificate, key and the cluster CA) every link is
 * mutual TLS 1.3 (src/tls/context.ts): the listener takes only peers the CA
 * certified and reports every refusal (peer address and reason) as a problem,
 * which the host logs; a dialer takes only a listener with a host certificate.
 * Each frame is still one write on a socket with Nagle off.
 */
import { connect, createServer, Socket, type Server } from "node:net";
import { connect as tlsConnect } from "node:tls";
import { clientTlsOptions, mutualTlsServer, type TlsMaterial } from "../tls/context.js";
import type { MessagePort } from "node:worker_threads";
import { randomUUID } from "node:crypto";
import type { Route } from "../core/frames.js";
import { encodeFrameBytes, FrameDecoder } from "../transport/frame.js";
import type { GroupMessage } from "./machine.js";
import { decodeBatchFrame, decodeHello, encodeBatchFrame, encodeHello, encodeToken, PATH_HELLO, PATH_MSGS, type PathHello } from "./message-wire.js";

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
  /** Connections this VM's sends dialed (a thread answers on the connection it accepted, see Link; connections are the thread's). */
  links_dialed: number;
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
  /** Mutual TLS on every link, or null: plain TCP. */
  tls: TlsMaterial | null;
}

/** Arrivals kept while frozen or refused: beyond this they are dropped (re-sent only by a recovery). */
export const PATH_INBOX_MAX = 65536;
/** Messages between the VMs of one thread waiting for the next turn of its event loop. */
export const LOCAL_MESSAGES_MAX = 65536;
/** Bytes queued for one receiver (connecting, or a slow peer) before the link is dropped. */
export const PATH_SEND_BUFFER_MAX_BYTES = 64 * 1024 * 1024;
/** One frame carries at most this many payload bytes; larger batches are split. */
const FRAME_PAYLOAD_TARGET_BYTES = 4 * 1024 * 1024;
/** Receive limit per frame (a batch plus its headers). */
const FRAME_BYTES_MAX = 64 * 1024 * 1024;
/** After a link failed, sends to that receiver are dropped this long before a new connection is tried. */
const RECONNECT_AFTER_MS = 200;


/** What a Link reports to its endpoint. */
interface LinkHandlers {
  /** An accepted link's first frame: returns why it is refused, or null. */
  hello(link: Link, hello: PathHello): string | null;
  /** A batch for the VM with token `token`; throws (closing the link) if that VM finds a message malformed. */
  messages(token: string, messages: GroupMessage[]): void;
  problem(reason: string): void;
  closed(link: Link): void;
}

/**
 * One TCP connection between this thread's endpoint and another's, carrying
 * the messages of their VMs both ways: the thread that sends first dials (its
 * hello names a VM token of the receiving thread and where the dialer
 * listens), and the receiver answers on the connection it accepted instead
 * of dialing back. Why one connection, not one per direction: every message
 * then carries the TCP acknowledgement of the previous one the other way,
 * where a one-way link needs a bare ACK segment per message (the receiver's
 * side of the connection never writes). The test "one connection per pair"
 * counts the dials.
 *
 * If both threads dial at once, each sends on the link it dialed and receives
 * on both; messages carry channel sequence numbers, so which connection
 * brought one does not matter (VmCore.receive orders them).
 */
class Link {
  private ready: boolean;
  private queue: Uint8Array[] = [];
  private queuedBytes = 0;
  private readonly decoder = new FrameDecoder({ max_frame_bytes: FRAME_BYTES_MAX });
  /** Accepted links: false until the peer's hello was checked. */
  private greeted: boolean;
  closedAt: number | null = null;

  private constructor(
    private readonly socket: Socket,
    readonly dialed: boolean,
    private readonly describe: string,
    private readonly handlers: LinkHandlers,
  ) {
    this.ready = !dialed;
    this.greeted = dialed;
    socket.setNoDelay(true);
    socket.on("data", (chunk: Buffer) => this.received(chunk));
    // A dialed link reports why it failed (as sending to that member failed); an accepted one closes quietly.
    socket.on("error", (error) => this.close(dialed ? error.message : "closed"));
    socket.on("close", () => this.close("closed"));
  }

  /** Dials the endpoint at `address`; the hello goes out first, whatever is written meanwhile waits. */
  static dial(address: string, hello: PathHello, tls: TlsMaterial | null, handlers: LinkHandlers): Link {
    const i = address.lastIndexOf(":");
    let socket: Socket;
    try {
      const target = { host: address.slice(0, i), port: Number(address.slice(i + 1)) };
      socket = tls ? tlsConnect({ ...target, ...clientTlsOptions({ material: tls }) }) : connect(target);
    } catch (error) {
      // A route that is no address (the host checks routes, this is the last line): a link that is closed from the start.
      const link = new Link(new Socket(), true, `link to ${address}`, handlers);
      link.close(`cannot connect to ${JSON.stringify(address)}: ${(error as Error).message}`);
      return link;
    }
    const link = new Link(socket, true, `link to ${address}`, handlers);
    socket.on(tls ? "secureConnect" : "connect", () => link.connected(encodeHello(hello)));
    return link;
  }

  static accept(socket: Socket, handlers: LinkHandlers): Link {
    return new Link(socket, false, `incoming link from ${socket.remoteAddress}:${socket.remotePort}`, handlers);
  }

  private connected(hello: Uint8Array): void {
    if (this.closedAt !== null) return;
    this.ready = true;
    this.socket.write(encodeFrameBytes(PATH_HELLO, hello));
    for (const f of this.queue) this.socket.write(f);
    this.queue = [];
    this.queuedBytes = 0;
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

  private received(chunk: Buffer): void {
    try {
      for (const frame of this.decoder.push(chunk)) {
        if (this.closedAt !== null) return;
        if (!this.greeted) {
          if (frame.type !== PATH_HELLO) return this.close("first frame is not a hello");
          const refused = this.handlers.hello(this, decodeHello(frame.payload));
          if (refused) return this.close(refused);
          this.greeted = true;
        } else if (frame.type === PATH_MSGS) {
          const { token, messages } = decodeBatchFrame(frame.payload);
          this.handlers.messages(token, messages);
        } else {
          return this.close(`unexpected frame type ${frame.type}`);
        }
      }
    } catch (error) {
      this.close((error as Error).message);
    }
  }

  close(reason: string): void {
    if (this.closedAt !== null) return;
    this.closedAt = Date.now();
    this.queue = [];
    this.socket.destroy();
    if (reason !== "closed") this.handlers.problem(`${this.describe} closed: ${reason}`);
    this.handlers.closed(this);
  }
}

/**
 * The message connections of one VM thread: one listener for every VM on
 * the thread, one connection per thread it exchanges messages with (dialed,
 * or accepted from a thread whose hello said where it listens), and the VMs'
 * paths by token, to hand each batch to its VM. It closes when its last path
 * does. Problems that are no VM's own (a refused connection, a malformed
 * frame) go to the oldest path on it.
 */
export class PathEndpoint {
  private server: Server | null = null;
  private listening: Promise<number> | null = null;
  /** "host:port" once listening: sent in hellos so receivers can answer on the connection. */
  private address: string | null = null;
  private readonly paths = new Map<string, MessagePath>();
  /** Every open link, dialed or accepted. */
  private readonly open = new Set<Link>();
  /** The link to each endpoint by its address (dialed, or accepted from it), also a closed one for a while (RECONNECT_AFTER_MS). */
  private readonly byAddress = new Map<string, Link>();
  /** A MessageChannel port to each other VM thread of this host it exchanges messages with, by thread id. */
  private readonly threadPorts = new Map<number, MessagePort>();
  /** Messages between VMs of this thread waiting for its next turn (deliverHere), and how many. */
  private local: { token: string; messages: GroupMessage[] }[] = [];
  private localCount = 0;
  private readonly handlers: LinkHandlers = {
    hello: (link, hello) => this.greeted(link, hello),
    messages: (token, messages) => this.arrived(token, messages),
    problem: (reason) => this.problem(reason),
    closed: (link) => this.open.delete(link),
  };
  private closed = false;

  constructor(
    readonly bind_host: string,
    /** Mutual TLS on every link, or null: plain TCP. */
    readonly tls: TlsMaterial | null,
  ) {}

  /** Connections open now (dialed and accepted). */
  get connections(): number {
    return this.open.size;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Starts listening (once, for every path); resolves with the port. */
  listen(): Promise<number> {
    this.listening ??= new Promise((resolve, reject) => {
      const tls = this.tls;
      const server = tls
        ? mutualTlsServer(tls, (socket) => this.accept(socket), (address, reason) => this.problem(`refused a connection from ${address}: ${reason}`))
        : createServer((socket) => this.accept(socket));
      this.server = server;
      server.once("error", reject);
      server.listen(0, this.bind_host, () => {
        const address = server.address();
        const port = typeof address === "object" && address ? address.port : 0;
        this.address = `${this.bind_host}:${port}`;
        resolve(port);
      });
    });
    return this.listening;
  }

  register(path: MessagePath): void {
    if (this.closed) throw new Error("the thread's message endpoint is closed");
    this.paths.set(path.token, path);
  }

  /** A path leaves; the last one out closes the listener and every link. */
  unregister(path: MessagePath): void {
    if (this.paths.get(path.token) === path) this.paths.delete(path.token);
    if (this.paths.size > 0 || this.closed) return;
    this.closed = true;
    this.server?.close();
    for (const port of this.threadPorts.values()) port.close();
    this.threadPorts.clear();
    for (const l of [...this.open]) l.close("closed");
    this.byAddress.clear();
  }

  /**
   * The link to the endpoint at `route.address`: the current one, or a new
   * one dialed for `from` (its rank and token go in the hello; it counts the
   * dial), or null while a failed one is recent. Called for every batch sent:
   * the current link costs one map lookup.
   */
  linkTo(route: Route, from: MessagePath): Link | null {
    const current = this.byAddress.get(route.address);
    if (current && current.closedAt === null) return current;
    if (current && Date.now() - current.closedAt! < RECONNECT_AFTER_MS) return null;
    const hello: PathHello = { token: route.token, from: from.rank, sender: from.token };
    if (this.address !== null) hello.address = this.address;
    const fresh = Link.dial(route.address, hello, this.tls, this.handlers);
    from.dialed();
    if (fresh.closedAt === null) this.open.add(fresh);
    this.byAddress.set(route.address, fresh);
    return fresh;
  }

  private accept(socket: Socket): void {
    if (this.closed) {
      socket.destroy();
      return;
    }
    this.open.add(Link.accept(socket, this.handlers));
  }

  /**
   * An accepted link's hello: it must name a VM on this thread (a port reused
   * by another thread is refused). If it says where the dialer listens, VMs
   * there are answered on it, unless a live link to that address exists.
   */
  private greeted(link: Link, hello: PathHello): string | null {
    if (!this.paths.has(hello.token)) return "hello for no VM on this thread (wrong token)";
    if (hello.address === undefined) return null;
    const current = this.byAddress.get(hello.address);
    if (!current || current.closedAt !== null) this.byAddress.set(hello.address, link);
    return null;
  }

  /** A MessageChannel port to another VM thread of this host, for every VM of this one: replaces (closes) the earlier port to that thread. */
  setThreadPort(thread: number, port: MessagePort): void {
    this.threadPorts.get(thread)?.close();
    port.on("message", ({ token, messages }: { token: string; messages: GroupMessage[] }) => this.handOver(token, messages, "another thread of this host"));
    this.threadPorts.set(thread, port);
  }

  /** Messages to the VM with route token `token` on VM thread `thread` of this host; false if this thread has no port to it. */
  toThread(thread: number, token: string, messages: GroupMessage[]): boolean {
    const port = this.threadPorts.get(thread);
    if (!port) return false;
    port.postMessage({ token, messages });
    return true;
  }

  /** Whether the VM with route token `token` is on this thread. */
  hosts(token: string): boolean {
    return this.paths.has(token);
  }

  /**
   * Messages to a VM of this thread: handed over on a later turn of the event
   * loop, as a MessageChannel would, so that a guest's send never runs
   * another guest's handler inside it; in order. Each message is a copy
   * (the sender keeps its own in its log). Bounded by LOCAL_MESSAGES_MAX:
   * past it the batch is dropped and counted, as the receiver's full inbox
   * would drop it.
   */
  deliverHere(token: string, messages: GroupMessage[]): boolean {
    if (this.localCount + messages.length > LOCAL_MESSAGES_MAX) {
      this.problem(`${messages.length} message(s) between VMs of this thread dropped: ${LOCAL_MESSAGES_MAX} already waiting`);
      return false;
    }
    this.local.push({ token, messages: messages.map((m) => ({ ...m })) });
    this.localCount += messages.length;
    if (this.local.length === 1) setImmediate(() => this.handOverLocal());
    return true;
  }

  private handOverLocal(): void {
    const batches = this.local;
    this.local = [];
    this.localCount = 0;
    for (const { token, messages } of batches) this.handOver(token, messages, "this thread");
  }

  /**
   * Messages from a VM of this host (this thread or another) to the VM with
   * `token`; one that left this thread since gets nothing, as a closed
   * channel drops what it still held. A malformed one is reported through its receiver.
   */
  private handOver(token: string, messages: GroupMessage[], from: string): void {
    const path = this.paths.get(token);
    if (!path) return;
    try {
      path.arrived(messages);
    } catch (error) {
      path.reportProblem(`messages from a VM on ${from} refused: ${(error as Error).message}`);
    }
  }

  /** A batch for one VM; a token of no VM here (it left the thread, a stale route) drops the batch, not the link. */
  private arrived(token: string, messages: GroupMessage[]): void {
    const path = this.paths.get(token);
    if (!path) {
      this.problem(`${messages.length} message(s) for a VM not on this thread dropped (its route is stale)`);
      return;
    }
    path.arrived(messages);
  }

  private problem(reason: string): void {
    const oldest = this.paths.values().next();
    if (!oldest.done) oldest.value.reportProblem(reason);
  }
}

export class MessagePath {
  private state: "frozen" | "running" = "frozen";
  readonly token = randomUUID();
  private readonly endpoint: PathEndpoint;
  private routes: (Route | null)[] = [];
  /** Each route's token as batch frames carry it. */
  private tokens: (Uint8Array | null)[] = [];
  /** The VM thread of each rank on another thread of this host. */
  private locals = new Map<number, number>();
  /** Arrived while frozen. */
  private inbox: GroupMessage[] = [];
  /** Refused "full" / "early" by the VM. */
  private refused: GroupMessage[] = [];
  /** vm mode: waiting for their sender epoch to commit. */
  private held: GroupMessage[] = [];
  private readonly stats = { sent_before_commit: 0, sent_after_commit: 0, held_total: 0, dropped: 0, received: 0, links_dialed: 0 };
  private closed = false;

  /**
   * @param endpoint the thread's connections, shared with the other VMs on it
   *   (absent: one of its own, with the options' bind_host and tls).
   */
  constructor(
    private readonly options: PathOptions,
    private readonly hooks: PathHooks,
    endpoint?: PathEndpoint,
  ) {
    this.endpoint = endpoint ?? new PathEndpoint(options.bind_host, options.tls);
    // From now on the endpoint hands this VM the batches that name its token, and may report through it.
    this.endpoint.register(this);
  }

  /** Listens for peers (the endpoint's one listener, shared with the thread's other VMs); resolves with the port. */
  listen(): Promise<number> {
    return this.endpoint.listen();
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
   * Where each rank's primary listens (null: none, or this VM), which ranks
   * run on other VM threads of this host and on which, and (through one VM
   * of each thread) the MessageChannel ports to those threads, which the
   * thread's endpoint keeps for all its VMs. Replaces earlier routes. A
   * receiver that moved is reached at its new address; connections are the
   * thread's and stay for the other VMs (a batch names its VM's token, so one
   * to a VM gone from a thread is dropped there).
   */
  setRoutes(routes: (Route | null)[], locals: { rank: number; thread: number }[], ports: { thread: number; port: MessagePort }[] = []): void {
    this.routes = routes;
    this.tokens = routes.map((r) => (r ? encodeToken(r.token) : null));
    this.locals = new Map(locals.map((l) => [l.rank, l.thread]));
    for (const { thread, port } of ports) this.endpoint.setThreadPort(thread, port);
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
    this.endpoint.unregister(this);
    this.locals.clear();
  }

  /** @internal PathEndpoint: a problem of the thread's connections, reported through this VM. */
  reportProblem(reason: string): void {
    this.hooks.problem(reason);
  }

  private transmit(messages: GroupMessage[]): void {
    if (!messages.length) return;
    // Usually every message goes to one rank (a reply, a ring step): no grouping then.
    const to = messages[0].to;
    if (messages.every((m) => m.to === to)) return this.transmitTo(to, messages);
    const byRank = new Map<number, GroupMessage[]>();
    for (const m of messages) {
      let list = byRank.get(m.to);
      if (!list) byRank.set(m.to, (list = []));
      list.push(m);
    }
    for (const [rank, list] of byRank) this.transmitTo(rank, list);
  }

  private transmitTo(rank: number, list: GroupMessage[]): void {
    const thread = this.locals.get(rank);
    const route = this.routes[rank];
    if (thread !== undefined) {
      if (!route || !this.endpoint.toThread(thread, route.token, list)) this.stats.dropped += list.length;
      return;
    }
    if (route && this.endpoint.hosts(route.token)) {
      if (!this.endpoint.deliverHere(route.token, list)) this.stats.dropped += list.length;
      return;
    }
    const token = this.tokens[rank];
    const link = route ? this.endpoint.linkTo(route, this) : null;
    if (!route || !token || !link) {
      this.stats.dropped += list.length;
      return;
    }
    for (const chunk of chunks(list)) {
      if (!link.write(encodeBatchFrame(token, chunk))) this.stats.dropped += chunk.length;
    }
  }

  get rank(): number {
    return this.options.rank;
  }

  /** @internal PathEndpoint: a send of this VM dialed a new connection. */
  dialed(): void {
    this.stats.links_dialed++;
  }

  private arrivedSafely(messages: GroupMessage[], source: string): void {
    try {
      this.arrived(messages);
    } catch (error) {
      this.hooks.problem(`messages from ${source} refused: ${(error as Error).message}`);
    }
  }

  /** @internal PathEndpoint: messages from a peer. Throws (to the link that brought them) if the VM finds one malformed. */
  arrived(messages: GroupMessage[]): void {
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
function chunks(messages: GroupMessage[]): GroupMessage[][] {
  let bytes = 0;
  for (const m of messages) bytes += m.bytes.length;
  if (bytes <= FRAME_PAYLOAD_TARGET_BYTES) return [messages];
  const out: GroupMessage[][] = [];
  let chunk: GroupMessage[] = [];
  bytes = 0;
  for (const m of messages) {
    if (chunk.length && bytes + m.bytes.length > FRAME_PAYLOAD_TARGET_BYTES) {
      out.push(chunk);
      chunk = [];
      bytes = 0;
    }
    chunk.push(m);
    bytes += m.bytes.length;
  }
  if (chunk.length) out.push(chunk);
  return out;
}
