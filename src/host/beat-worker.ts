/**
 * The heartbeat thread of a host (see beat-thread.ts): sends this host's
 * beats and hears its peers', on a UDP socket of its own, so that neither
 * waits for the host's main thread. Written to by the main thread through
 * messages (who the peers are, their keys) and read by it through a shared
 * array (when each peer was last heard); it writes nothing else.
 */
import { createSocket, type Socket } from "node:dgram";
import { isIPv6 } from "node:net";
import { parentPort, workerData } from "node:worker_threads";
import { decodeBeat, encodeBeat } from "./beat-wire.js";
import { BEAT_SLOT_PULSE, slotIndex, type BeatPeer, type BeatThreadInit, type ToBeatThread, type FromBeatThread } from "./beat-protocol.js";

const init = workerData as BeatThreadInit;
const port = parentPort!;
const shared = new BigInt64Array(init.shared);
const post = (message: FromBeatThread): void => port.postMessage(message);

let peers = new Map<string, BeatPeer>();
/** Peers said to be quiet (see the `quiet` message) and not heard since. */
const quiet = new Set<string>();
let lastTick_ms = 0;
let timer: NodeJS.Timeout | null = null;

const socket: Socket = createSocket({ type: isIPv6(init.bind_host) ? "udp6" : "udp4" });
socket.on("error", (error) => post({ kind: "error", message: error.message }));
socket.on("message", (datagram, from) => onDatagram(datagram, `${from.address}:${from.port}`));
socket.bind(init.port, init.bind_host, () => {
  post({ kind: "ready" });
  schedule();
});

port.on("message", (message: ToBeatThread) => {
  switch (message.kind) {
    case "peers":
      peers = new Map(message.peers.map((p) => [p.id, p]));
      for (const id of quiet) if (!peers.has(id)) quiet.delete(id);
      return;
    case "stop":
      if (timer) clearTimeout(timer);
      socket.close(() => process.exit(0));
      return;
  }
});

/** Ticks on the wall clock's grid, as every host's do: a cluster's beats leave together. */
function schedule(): void {
  const now = Date.now();
  const due_ms = (Math.floor(now / init.heartbeat_ms) + 1) * init.heartbeat_ms;
  timer = setTimeout(() => {
    tick();
    schedule();
  }, due_ms - now);
}

function tick(): void {
  const now = Date.now();
  // This thread stalled too (the process was stopped): what its peers sent meanwhile waits in the
  // socket, unread, so their silence is this host's own. Every peer heard before gets a fresh window.
  if (lastTick_ms > 0 && now - lastTick_ms > init.detect_ms) {
    for (const p of peers.values()) if (Atomics.load(shared, slotIndex(p.slot)) > 0n) Atomics.store(shared, slotIndex(p.slot), BigInt(now));
    quiet.clear(); // their silence starts again from now, and is said again when it is long
  }
  lastTick_ms = now;
  sayQuiet(now);
  // A main loop wedged past the bound stops this host's beats: its peers fail it over, as they would a dead one.
  const pulse_ms = Number(Atomics.load(shared, BEAT_SLOT_PULSE));
  if (now - pulse_ms > init.wedged_ms) return;
  for (const p of peers.values()) {
    if (!p.send) continue;
    const datagram = encodeBeat({ from: init.id, sent_ms: now }, p.key_out);
    // A peer out of reach (its link down, its port closed) is the detector's business, not an error of
    // this socket: without a callback each failed send would be emitted as one.
    socket.send(datagram, p.port, p.host, () => undefined);
  }
}

/**
 * Tells the main thread of each peer whose silence passed half the
 * detection timeout, or whose timeout comes before this thread's next beat;
 * the main thread then watches that peer to the millisecond (host.ts,
 * armDetect). Once per silence: a beat heard ends it.
 */
function sayQuiet(now: number): void {
  for (const p of peers.values()) {
    if (quiet.has(p.id)) continue;
    const heard_ms = Number(Atomics.load(shared, slotIndex(p.slot)));
    if (heard_ms === 0) continue;
    if (now - heard_ms > init.detect_ms / 2 || heard_ms + init.detect_ms <= now + init.heartbeat_ms) {
      quiet.add(p.id);
      post({ kind: "quiet", id: p.id });
    }
  }
}

/** Refused datagrams since the last report: a flood of them costs the main thread one message per REFUSALS_REPORT_MS. */
let refusals = 0;
let refusalsReported_ms = 0;
const REFUSALS_REPORT_MS = 5000;

function refused(address: string, reason: string): void {
  refusals++;
  const now = Date.now();
  if (now - refusalsReported_ms < REFUSALS_REPORT_MS) return;
  post({ kind: "refused", address, reason, count: refusals });
  refusals = 0;
  refusalsReported_ms = now;
}

function onDatagram(datagram: Buffer, address: string): void {
  const beat = decodeBeat(datagram, (from) => (init.secure ? (peers.get(from)?.keys_in ?? []) : null));
  if ("refused" in beat) {
    if (!beat.keyless) refused(address, beat.refused);
    return;
  }
  const peer = peers.get(beat.from);
  if (!peer) return;
  const now = Date.now();
  // One that sat in a buffer says nothing about the present; one from the future is a broken clock.
  const age_ms = now - beat.sent_ms;
  if (age_ms >= init.detect_ms || age_ms <= -init.detect_ms) return;
  const before = Number(Atomics.load(shared, slotIndex(peer.slot)));
  Atomics.store(shared, slotIndex(peer.slot), BigInt(now));
  // Heard for the first time, or again after a silence: the main thread looks now.
  const wasQuiet = quiet.delete(peer.id);
  if (before === 0 || wasQuiet || now - before > init.detect_ms / 2) post({ kind: "heard", id: peer.id });
}
