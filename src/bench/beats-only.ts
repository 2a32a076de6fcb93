/**
 * A process that does only what a host's heartbeat thread does: `cohort
 * bench idle` starts one per host as the `beats_only` case, the floor under
 * the hosts' own floor. It runs the hosts' heartbeat thread itself
 * (src/host/beat-thread.ts: a worker thread, a UDP beat with an HMAC tag to
 * every peer every `heartbeat_ms` on the wall clock's grid, the peers'
 * beats checked), and its main thread only pulses it once a second (a
 * host's main loop ticks every heartbeat interval and does much more).
 *
 *   node beats-only.js '{"id":"b1","port":41001,"peers":[{"id":"b2","port":41002}],"heartbeat_ms":100,"detect_ms":300}'
 *
 * Prints `ready` once its socket is bound and `heard <id>` when it first
 * hears each peer; stops on SIGTERM.
 */
import { createHash } from "node:crypto";
import { z } from "zod";
import { BeatThread, mainLoopWedgedMs } from "../host/beat-thread.js";

const configSchema = z.object({
  id: z.string().min(1),
  port: z.number().int().min(1).max(65535),
  peers: z.array(z.object({ id: z.string().min(1), port: z.number().int().min(1).max(65535) })),
  heartbeat_ms: z.number().int().positive(),
  detect_ms: z.number().int().positive(),
});

/** The tag key of beats from `from` to `to`: fixed per pair (hosts export theirs from the TLS session of their connection). */
function pairKey(from: string, to: string): Uint8Array {
  return createHash("sha256").update(`${from}->${to}`).digest();
}

const config = configSchema.parse(JSON.parse(process.argv[2] ?? ""));
const beats = await BeatThread.start({
  id: config.id,
  bind_host: "127.0.0.1",
  port: config.port,
  heartbeat_ms: config.heartbeat_ms,
  detect_ms: config.detect_ms,
  wedged_ms: mainLoopWedgedMs(config.detect_ms),
  secure: true,
});
beats.setPeers(
  config.peers.map((p) => ({ id: p.id, slot: beats.takeSlot(), host: "127.0.0.1", port: p.port, send: true, key_out: pairKey(config.id, p.id), keys_in: [pairKey(p.id, config.id)] })),
);
const heard = new Set<string>();
beats.on("heard", (id) => {
  if (heard.has(id)) return;
  heard.add(id);
  console.log(`heard ${id}`);
});
beats.on("error", (message) => console.error(message));
// Within mainLoopWedgedMs (2 s at least), so the thread keeps beating.
const pulse = setInterval(() => beats.pulse(Date.now()), 1000);
beats.pulse(Date.now());
console.log("ready");
process.once("SIGTERM", () => {
  clearInterval(pulse);
  beats.stop().then(
    () => process.exit(0),
    () => process.exit(1),
  );
});
