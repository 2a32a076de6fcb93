/**
 * What a host's main thread and its heartbeat thread (beat-thread.ts,
 * beat-worker.ts) tell each other. The shared array holds, as wall-clock
 * milliseconds, the main loop's last pulse (slot BEAT_SLOT_PULSE) and when
 * each peer was last heard (0 = never), one slot per peer.
 */

/** Peers a host can hear at once (slots in the shared array; a slot is freed when its peer goes). */
export const BEAT_PEERS_MAX = 4096;
export const BEAT_SLOT_PULSE = 0;

export function slotIndex(slot: number): number {
  return 1 + slot;
}

export interface BeatThreadInit {
  id: string;
  bind_host: string;
  port: number;
  heartbeat_ms: number;
  detect_ms: number;
  /** A main loop silent this long stops the beats. */
  wedged_ms: number;
  /** Beats carry a tag under per-pair keys (the cluster runs mutual TLS). */
  secure: boolean;
  shared: SharedArrayBuffer;
}

export interface BeatPeer {
  id: string;
  slot: number;
  host: string;
  port: number;
  /** Beat this peer: this host's connection to it is open (and, with TLS, keyed). */
  send: boolean;
  /** The key of this host's connection to the peer (TLS), null without TLS. */
  key_out: Uint8Array | null;
  /** Keys of the peer's connections to this host, newest first: a beat from it carries one of them. */
  keys_in: Uint8Array[];
}

export type ToBeatThread = { kind: "peers"; peers: BeatPeer[] } | { kind: "stop" };

export type FromBeatThread =
  | { kind: "ready" }
  | { kind: "error"; message: string }
  | { kind: "heard"; id: string }
  | { kind: "quiet"; id: string }
  | { kind: "refused"; address: string; reason: string; count: number };
