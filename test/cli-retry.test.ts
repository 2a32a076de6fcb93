/**
 * Which requests the CLI asks of the next host when a host does not answer:
 * reads, yes; a deploy, never (the silent host may be carrying it out, and a
 * second host then answered "already deployed" for a group being deployed).
 * Real TCP servers on loopback stand in for hosts: one reads requests and
 * never answers, the other counts the connections it gets.
 */
import { createServer, type Server } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { requestAny, type ClusterAccess } from "../src/cli/client.js";
import type { HostRecord } from "../src/cluster/local-cluster.js";

const servers: Server[] = [];
afterEach(async () => {
  for (const s of servers.splice(0)) await new Promise((r) => s.close(r));
});

/** A host that accepts connections and reads everything, answering nothing; counts its connections. */
async function silentHost(): Promise<{ address: string; connections: () => number }> {
  let n = 0;
  const server = createServer((socket) => {
    n++;
    socket.on("data", () => undefined);
    socket.on("error", () => undefined);
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as { port: number }).port;
  return { address: `127.0.0.1:${port}`, connections: () => n };
}

function access(...addresses: string[]): ClusterAccess {
  return { hosts: addresses.map((address, i) => ({ id: `h${i + 1}`, address }) as HostRecord), tls: null };
}

describe("requestAny: a host that does not answer", () => {
  it("a deploy is not sent to a second host: the error says the first may be carrying it out", async () => {
    const [a, b] = [await silentHost(), await silentHost()];
    const manifest = { group: "g" } as never;
    await expect(requestAny(access(a.address, b.address), "deploy", { manifest }, new Uint8Array(1), undefined, { timeout_ms: 300 })).rejects.toThrow(/h1 did not answer deploy .*may have been carried out there/);
    expect(a.connections()).toBe(1);
    expect(b.connections()).toBe(0);
  });

  it("a read (status) is asked of the next host", async () => {
    const [a, b] = [await silentHost(), await silentHost()];
    await expect(requestAny(access(a.address, b.address), "status", {}, undefined, undefined, { timeout_ms: 300 })).rejects.toThrow(/no host answered \(h1: .*did not answer status.*; h2: /);
    expect(a.connections()).toBe(1);
    expect(b.connections()).toBe(1);
  });
});
