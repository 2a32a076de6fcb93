/**
 * One TCP connection carrying peer frames, either direction. A malformed or
 * oversized frame, a message that does not parse, or a control frame of a
 * newer version or the wrong shape (src/host/messages.ts checkControl)
 * closes this connection with a logged reason; nothing else is affected.
 * Requests are the typed host API (src/host/api.ts).
 *
 * Over mutual TLS when the cluster has it (src/tls/context.ts): open() then
 * verifies the host's certificate (and, given the host id, that it names it)
 * and presents this side's.
 */
import { connect, type Socket } from "node:net";
import { connect as tlsConnect } from "node:tls";
import { clientTlsOptions, tlsReason, type ClientTls } from "../tls/context.js";
import { EventEmitter } from "node:events";
import { encodeFrame, FrameDecoder, MAX_FRAME_BYTES_DEFAULT } from "../transport/frame.js";
import { checkControl, CONTROL_VERSION, decodePayload, encodePayload, MSG, parseReply, type Reply, type Request } from "./messages.js";
import type { HostOp, HostOps } from "./api.js";

/**
 * A request's connection closed before its reply came (the peer was declared
 * failed, or its socket broke): the request may or may not have been carried
 * out there. `code` lets callers that only see the error tell it apart.
 */
export class ConnectionClosedError extends Error {
  override name = "ConnectionClosedError";
  readonly code = "ConnectionClosed";
}

export interface ConnectionEvents {
  message: [type: number, header: Record<string, unknown>, body: Uint8Array];
  close: [reason: string];
}

/** Bytes queued in the socket before we stop sending: a slow peer costs memory up to this, not more. */
export const SEND_BUFFER_MAX_BYTES = 256 * 1024 * 1024;
export const REQUEST_TIMEOUT_MS_DEFAULT = 30_000;

export class Connection extends EventEmitter<ConnectionEvents> {
  private readonly decoder: FrameDecoder;
  private closed: string | null = null;
  private corked = false;
  private nextRequestId = 1;
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }>();

  constructor(
    readonly socket: Socket,
    readonly label: string,
    max_frame_bytes = MAX_FRAME_BYTES_DEFAULT,
  ) {
    super();
    this.decoder = new FrameDecoder({ max_frame_bytes });
    socket.setNoDelay(true);
    socket.on("data", (chunk: Buffer) => this.onData(chunk));
    socket.on("error", (error) => this.close(`socket error: ${error.message}`));
    socket.on("close", () => this.close("peer closed the connection"));
  }

  /** Dials `address`; with `tls`, over mutual TLS (resolves once the handshake is done and the host's certificate verified). */
  static open(address: string, label: string, timeout_ms = 2000, tls: ClientTls | null = null): Promise<Connection> {
    const [host, port] = splitAddress(address);
    return new Promise((resolve, reject) => {
      const socket = tls ? tlsConnect({ host, port, ...clientTlsOptions(tls) }) : connect({ host, port });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`connect to ${address} timed out after ${timeout_ms} ms`));
      }, timeout_ms);
      socket.once(tls ? "secureConnect" : "connect", () => {
        clearTimeout(timer);
        resolve(new Connection(socket, label));
      });
      socket.once("error", (error: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        socket.destroy();
        reject(tls && error.code !== "ECONNREFUSED" ? Object.assign(new Error(`TLS to ${address}: ${tlsReason(error)}`), { code: error.code ?? "TLS" }) : error);
      });
    });
  }

  get isClosed(): boolean {
    return this.closed !== null;
  }

  get closeReason(): string | null {
    return this.closed;
  }

  /**
   * Sends one frame; a control frame's header (every type but GROUP) gets the
   * control version `v`. `done`, if given, is called once the socket no longer
   * reads `body`: it was written out, the write failed, or (send returns
   * false) it was never queued. Until then the caller must leave the bytes be.
   */
  send(type: number, header: unknown, body?: Uint8Array, done?: () => void): boolean {
    if (this.closed) {
      done?.();
      return false;
    }
    if (this.socket.writableLength > SEND_BUFFER_MAX_BYTES) {
      this.close(`send buffer above ${SEND_BUFFER_MAX_BYTES} bytes: peer too slow`);
      done?.();
      return false;
    }
    const stamped = type === MSG.GROUP ? header : Object.assign({ v: CONTROL_VERSION }, header);
    const parts = encodeFrame(type, encodePayload(stamped, body));
    // Frames sent in the same event-loop turn (a commit to every host, the deltas of several
    // members to one backup host, acks) leave in one writev once the turn's I/O and VM-thread
    // messages are handled: one syscall and one wake-up of the peer, not one per frame.
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      setImmediate(() => {
        this.corked = false;
        this.socket.uncork();
      });
    }
    // Writes complete in order: once the trailer is out (or failed, or the socket was destroyed), so is the body.
    const last = parts.length - 1;
    for (let i = 0; i < last; i++) this.socket.write(parts[i]);
    this.socket.write(parts[last], done && (() => done()));
    return true;
  }

  /** A request of the host API (control plane): its arguments are checked by the host, its result typed by the table. */
  request<Op extends HostOp>(op: Op, args: HostOps[Op]["args"], body?: Uint8Array, timeout_ms?: number): Promise<HostOps[Op]["result"]>;
  request(op: string, args: unknown, body?: Uint8Array, timeout_ms = REQUEST_TIMEOUT_MS_DEFAULT): Promise<unknown> {
    if (this.closed) return Promise.reject(new ConnectionClosedError(`${this.label}: connection closed (${this.closed})`));
    const id = this.nextRequestId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`${this.label}: ${op} timed out after ${timeout_ms} ms`));
      }, timeout_ms);
      this.pending.set(id, { resolve, reject, timer });
      this.send(MSG.REQUEST, { id, op, args } satisfies Request, body);
    });
  }

  reply(id: number, result: { ok: true; value: unknown } | { ok: false; error: { code: string; message: string } }): void {
    this.send(MSG.REPLY, { id, ...result } satisfies Reply);
  }

  close(reason: string): void {
    if (this.closed) return;
    this.closed = reason;
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(new ConnectionClosedError(`${this.label}: connection closed (${reason})`));
    }
    this.pending.clear();
    this.socket.destroy();
    this.emit("close", reason);
  }

  private onData(chunk: Buffer): void {
    let frames;
    try {
      frames = this.decoder.push(chunk);
    } catch (error) {
      this.close(`malformed frame: ${(error as Error).message}`);
      return;
    }
    for (const frame of frames) {
      if (this.closed) return;
      let decoded;
      try {
        decoded = decodePayload<Record<string, unknown>>(frame.payload);
      } catch (error) {
        this.close(`malformed message: ${(error as Error).message}`);
        return;
      }
      if (frame.type === MSG.REPLY) {
        let reply;
        try {
          reply = parseReply(decoded.header);
        } catch (error) {
          this.close(`control frame refused: ${(error as Error).message}`);
          return;
        }
        const pending = this.pending.get(reply.id);
        if (!pending) continue;
        this.pending.delete(reply.id);
        clearTimeout(pending.timer);
        if (reply.ok) pending.resolve(reply.value);
        else pending.reject(Object.assign(new Error(reply.error?.message ?? "request failed"), { code: reply.error?.code }));
        continue;
      }
      if (frame.type !== MSG.GROUP) {
        try {
          checkControl(frame.type, decoded.header);
        } catch (error) {
          this.close(`control frame refused: ${(error as Error).message}`);
          return;
        }
      }
      this.emit("message", frame.type, decoded.header, decoded.body);
    }
  }
}

export function splitAddress(address: string): [string, number] {
  const i = address.lastIndexOf(":");
  const port = Number(address.slice(i + 1));
  if (i <= 0 || !Number.isInteger(port) || port <= 0 || port > 65535) throw new Error(`bad address "${address}" (want host:port)`);
  return [address.slice(0, i), port];
}
