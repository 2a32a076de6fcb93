/**
 * A log follower stopped at any moment ends: `cohort logs --follow` and the
 * demos stop theirs and wait for them. A real TCP server on loopback stands
 * in for a host: it answers `locate` (after a delay) and `logs`, and keeps
 * every follow connection open, as a live primary would.
 */
import { createServer, type Server, type Socket } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { LogFollower, sleep } from "../src/cli/client.js";
import { Connection } from "../src/host/connection.js";
import { MSG, type Request } from "../src/host/messages.js";
import type { HostRecord } from "../src/cluster/local-cluster.js";

const servers: Server[] = [];
const sockets: Socket[] = [];
afterEach(async () => {
  for (const s of sockets.splice(0)) s.destroy();
  for (const s of servers.splice(0)) await new Promise((r) => s.close(r));
});

interface FakeHost {
  locateDelay_ms?: number;
  /** Called with each follow connection once its first page is answered. */
  onFollow?: (connection: Connection) => void;
  /** Counts the locate requests it answered. */
  locates?: { count: number };
}

async function fakePrimary(locateDelay_ms: number): Promise<string> {
  return fakeHost({ locateDelay_ms });
}

async function fakeHost({ locateDelay_ms = 0, onFollow, locates }: FakeHost): Promise<string> {
  const server = createServer((socket) => {
    sockets.push(socket);
    const connection = new Connection(socket, "fake-host");
    connection.on("message", (type, header) => {
      if (type !== MSG.REQUEST) return;
      const request = header as unknown as Request;
      if (request.op === "locate") {
        if (locates) locates.count++;
        const vm = { vm: "t-0", group: "t", rank: 0, primary: "h1", backup: "h2", incarnation: 1 };
        setTimeout(() => connection.reply(request.id, { ok: true, value: { vm } }), locateDelay_ms);
      } else if (request.op === "logs") {
        connection.reply(request.id, { ok: true, value: { vm: "t-0", role: "primary", first_seq: 1, records: [], more: false } });
        onFollow?.(connection);
      }
    });
    socket.on("error", () => undefined);
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return `127.0.0.1:${(server.address() as { port: number }).port}`;
}

describe("LogFollower.stop", () => {
  it("ends run() whether it lands while the follower asks where the VM is, dials, or follows", async () => {
    const address = await fakePrimary(100);
    const access = { hosts: [{ id: "h1", address } as HostRecord], tls: null };
    for (const stopAfter_ms of [20, 100, 105, 110, 300]) {
      const follower = new LogFollower(access, "t-0", 1, () => undefined);
      const running = follower.run();
      await sleep(stopAfter_ms);
      follower.stop();
      const ended = await Promise.race([running.then(() => true), sleep(3000).then(() => false)]);
      expect(ended, `stopped ${stopAfter_ms} ms after it started`).toBe(true);
    }
  });
});

describe("LogFollower's watch of its primary", () => {
  it("asks the other hosts where the VM is only while the stream is silent, less often the longer it lasts", async () => {
    const locates = { count: 0 };
    let seq = 1;
    let streaming = true;
    const primary = await fakeHost({
      onFollow: (connection) => {
        // A record every 100 ms for 1.5 s, then silence (a paused host keeps its socket open).
        const timer = setInterval(() => {
          if (!streaming || connection.isClosed) return clearInterval(timer);
          const now = Date.now();
          connection.send(MSG.LOG, { vm: "t-0", records: [{ seq, epoch: seq, kind: 0, text: `line ${seq}`, produced_ms: now, released_ms: now }] });
          seq++;
        }, 100);
      },
    });
    const other = await fakeHost({ locates });
    const access = { hosts: [{ id: "h1", address: primary } as HostRecord, { id: "h2", address: other } as HostRecord], tls: null };
    const got: number[] = [];
    const follower = new LogFollower(access, "t-0", 1, (r) => got.push(r.seq));
    const running = follower.run();
    try {
      await sleep(1500);
      streaming = false;
      // Its first locate goes to h1, which answers first: h2 has heard none while records came.
      expect(got.length).toBeGreaterThanOrEqual(8);
      expect(locates.count).toBe(0);
      // Silent for 4 s: asked after 0.5 s, then 1 s and 2 s later (it was asked every 100 ms before).
      await sleep(4000);
      expect(locates.count).toBeGreaterThanOrEqual(2);
      expect(locates.count).toBeLessThanOrEqual(4);
    } finally {
      follower.stop();
      await running;
    }
    expect(got).toEqual(Array.from({ length: got.length }, (_, i) => i + 1));
  });
});
