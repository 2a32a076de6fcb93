import { setTimeout as sleep } from "node:timers/promises";
import { afterEach, describe, expect, it } from "vitest";
import { BeatThread } from "../src/host/beat-thread.js";
import { freeUdpPort } from "../src/util/udp-port.js";

const HEARTBEAT_MS = 100;
/** Long enough that a beat thread of this noisy machine waiting for a core is not called quiet. */
const DETECT_MS = 1000;

const threads: BeatThread[] = [];
const pulses: NodeJS.Timeout[] = [];

afterEach(async () => {
  for (const p of pulses.splice(0)) clearInterval(p);
  await Promise.all(threads.splice(0).map((t) => t.stop()));
});

async function start(id: string, port: number): Promise<BeatThread> {
  const t = await BeatThread.start({ id, bind_host: "127.0.0.1", port, heartbeat_ms: HEARTBEAT_MS, detect_ms: DETECT_MS, wedged_ms: 4 * DETECT_MS, secure: false });
  threads.push(t);
  pulses.push(setInterval(() => t.pulse(Date.now()), HEARTBEAT_MS));
  return t;
}

function hears(t: BeatThread, id: string, slot: number, port: number): void {
  t.setPeers([{ id, slot, host: "127.0.0.1", port, send: true, key_out: null, keys_in: [] }]);
}

/** Resolves with the wall-clock time of `t`'s next `event` about `id`. */
function next(t: BeatThread, event: "heard" | "quiet", id: string): Promise<number> {
  return new Promise((resolve) => {
    const on = (peer: string) => {
      if (peer !== id) return;
      t.off(event, on);
      resolve(Date.now());
    };
    t.on(event, on);
  });
}

describe("heartbeat thread: what it tells the main thread", () => {
  it("a peer is heard once when it starts beating, called quiet once when it stops (after half the timeout of silence), and heard again when it is back", async () => {
    const [pa, pb] = [await freeUdpPort(), await freeUdpPort()];
    const a = await start("a", pa);
    const slot = a.takeSlot();
    const events: string[] = [];
    a.on("heard", (id) => events.push(`heard ${id}`));
    a.on("quiet", (id) => events.push(`quiet ${id}`));
    const firstHeard = next(a, "heard", "b");
    hears(a, "b", slot, pb);
    let b = await start("b", pb);
    hears(b, "a", b.takeSlot(), pa);
    await firstHeard;

    // Beating: nothing more to say.
    await sleep(DETECT_MS + 200);
    expect(events).toEqual(["heard b"]);

    // Silent: quiet once the silence passed half the timeout, and only once.
    const quiet = next(a, "quiet", "b");
    await b.stop();
    const quiet_at_ms = await quiet;
    expect(quiet_at_ms - a.lastHeard(slot)).toBeGreaterThan(DETECT_MS / 2);
    await sleep(DETECT_MS);
    expect(events).toEqual(["heard b", "quiet b"]);

    // Back: heard again at its first beat, then quiet again at the next silence.
    const again = next(a, "heard", "b");
    b = await start("b", pb);
    hears(b, "a", b.takeSlot(), pa);
    await again;
    const quietAgain = next(a, "quiet", "b");
    await b.stop();
    await quietAgain;
    expect(events).toEqual(["heard b", "quiet b", "heard b", "quiet b"]);
  });
});
