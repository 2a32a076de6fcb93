/**
 * The group message data path between VM threads (src/vm/message-path.ts,
 * src/vm/message-wire.ts): the batch format, real loopback TCP links between
 * paths (order, tokens, malformed input refused without harm to other links,
 * frozen paths keeping arrivals, vm-mode holds, refused messages offered
 * again), the in-process MessageChannel path, and the marker rule across real
 * VM threads (a message from the next epoch makes its receiver capture).
 */
import { connect } from "node:net";
import { connect as tlsConnect } from "node:tls";
import { MessageChannel } from "node:worker_threads";
import { afterEach, describe, expect, it } from "vitest";
import fc from "fast-check";
import type { GroupMessage } from "../src/vm/machine.js";
import { DEFAULT_LIMITS } from "../src/vm/machine.js";
import { MessagePath, PathEndpoint, type PathHooks } from "../src/vm/message-path.js";
import { decodeBatch, encodeBatch, MalformedPathFrameError } from "../src/vm/message-wire.js";
import { encodeFrame } from "../src/transport/frame.js";
import { instrument } from "../src/guest/instrument.js";
import { compileGuest } from "../src/guest/module-cache.js";
import type { CaptureResult, WorkerVmOptions } from "../src/vm/protocol.js";
import { VmWorker } from "../src/vm/vm.js";
import { builtBytes } from "./support/guests.js";
import type { TlsMaterial } from "../src/tls/context.js";
import { createCa, issueCert } from "../src/tls/ca.js";

const message = (from: number, to: number, seq: number, epoch = 1, text = `m${seq}`): GroupMessage => ({
  from,
  to,
  incarnation: 1,
  epoch,
  seq,
  bytes: new TextEncoder().encode(text),
});

describe("message batch format", () => {
  it("decodes what it encodes, for any batch", () => {
    const arbMessage = fc.record({
      from: fc.nat(0xffff),
      to: fc.nat(0xffff),
      incarnation: fc.nat(0xffff_ffff),
      epoch: fc.integer({ min: 1, max: Number.MAX_SAFE_INTEGER }),
      seq: fc.integer({ min: 1, max: Number.MAX_SAFE_INTEGER }),
      bytes: fc.uint8Array({ maxLength: 300 }),
    });
    fc.assert(
      fc.property(fc.array(arbMessage, { maxLength: 40 }), (batch) => {
        expect(decodeBatch(encodeBatch(batch))).toEqual(batch);
      }),
    );
  });

  it("refuses a layout that does not add up", () => {
    const good = encodeBatch([message(0, 1, 1), message(0, 1, 2)]);
    expect(() => decodeBatch(good.slice(0, 3))).toThrow(MalformedPathFrameError); // no count
    expect(() => decodeBatch(good.slice(0, good.length - 1))).toThrow(/overrun/);
    const longer = new Uint8Array(good.length + 1);
    longer.set(good);
    expect(() => decodeBatch(longer)).toThrow(/longer than its payloads/);
    const lying = good.slice();
    new DataView(lying.buffer).setUint32(0, 1000, true); // 1000 entries claimed
    expect(() => decodeBatch(lying)).toThrow(/do not fit/);
  });
});

/** A path whose VM is a list: what it was offered, in order. */
/** Each test path's rank (routes leave out the path's own). */
const ranks = new Map<unknown, number>();

function testPath(rank: number, options: { hold?: boolean; refuse?: (m: GroupMessage) => boolean; tls?: TlsMaterial; endpoint?: PathEndpoint } = {}) {
  const offered: GroupMessage[] = [];
  const problems: string[] = [];
  let committed = 0;
  const hooks: PathHooks = {
    offer: (messages) => {
      const refused = messages.filter((m) => options.refuse?.(m) ?? false);
      offered.push(...messages.filter((m) => !refused.includes(m)));
      return refused;
    },
    committed: () => committed,
    problem: (reason) => problems.push(reason),
  };
  const path = new MessagePath({ rank, bind_host: "127.0.0.1", hold_until_commit: options.hold ?? false, tls: options.tls ?? null }, hooks, options.endpoint);
  const made = { path, offered, problems, commit: (e: number) => (committed = e) };
  ranks.set(made, rank);
  return made;
}

const paths: MessagePath[] = [];
afterEach(() => {
  for (const p of paths.splice(0)) p.close();
});

async function pair(options: { hold?: boolean; refuse?: (m: GroupMessage) => boolean } = {}) {
  const a = testPath(0, { hold: options.hold });
  const b = testPath(1, { refuse: options.refuse });
  paths.push(a.path, b.path);
  const portA = await a.path.listen();
  const portB = await b.path.listen();
  const routes = [
    { address: `127.0.0.1:${portA}`, token: a.path.token },
    { address: `127.0.0.1:${portB}`, token: b.path.token },
  ];
  a.path.setRoutes([null, routes[1]], []);
  b.path.setRoutes([routes[0], null], []);
  return { a, b, portB };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until(check: () => boolean, what: string, timeout_ms = 5000): Promise<void> {
  const start = Date.now();
  while (!check()) {
    if (Date.now() - start > timeout_ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

describe("message path over TCP", () => {
  it("delivers every message once, in send order, with its stamps and bytes", async () => {
    const { a, b } = await pair();
    a.path.run();
    b.path.run();
    const sent = Array.from({ length: 500 }, (_, i) => message(0, 1, i + 1, 1 + (i >> 7), "x".repeat(i % 97)));
    for (let i = 0; i < sent.length; i += 7) a.path.send(sent.slice(i, i + 7));
    await until(() => b.offered.length === sent.length, "500 messages");
    expect(b.offered).toEqual(sent);
    expect(a.path.counters.sent_before_commit).toBe(500);
    expect(b.problems).toEqual([]);
  });

  it("the receiver answers on the connection its sender dialed: one connection per pair", async () => {
    const { a, b } = await pair();
    a.path.run();
    b.path.run();
    for (let i = 1; i <= 20; i++) {
      a.path.send([message(0, 1, i)]);
      await until(() => b.offered.length === i, `ping ${i}`);
      b.path.send([message(1, 0, i)]);
      await until(() => a.offered.length === i, `pong ${i}`);
    }
    expect(a.offered.map((m) => m.seq)).toEqual(Array.from({ length: 20 }, (_, i) => i + 1));
    expect(a.path.counters.links_dialed).toBe(1);
    expect(b.path.counters.links_dialed).toBe(0);
    expect([...a.problems, ...b.problems]).toEqual([]);
  });

  it("does not answer on a connection from a member's former primary", async () => {
    const { a, b } = await pair();
    a.path.run();
    b.path.run();
    a.path.send([message(0, 1, 1)]);
    await until(() => b.offered.length === 1, "the ping from the old primary");
    // Rank 0 moved: a new primary with its own token and port.
    const moved = testPath(0);
    paths.push(moved.path);
    const port = await moved.path.listen();
    moved.path.run();
    b.path.setRoutes([{ address: `127.0.0.1:${port}`, token: moved.path.token }, null], []);
    b.path.send([message(1, 0, 1)]);
    await until(() => moved.offered.length === 1, "the answer at the new primary");
    await sleep(30);
    expect(a.offered).toEqual([]);
    expect(b.path.counters.links_dialed).toBe(1);
  });

  it("both members dialing at once still deliver every message once, in order", async () => {
    const { a, b } = await pair();
    a.path.run();
    b.path.run();
    const toB = Array.from({ length: 50 }, (_, i) => message(0, 1, i + 1));
    const toA = Array.from({ length: 50 }, (_, i) => message(1, 0, i + 1));
    for (let i = 0; i < 50; i++) {
      a.path.send([toB[i]]);
      b.path.send([toA[i]]);
    }
    await until(() => a.offered.length === 50 && b.offered.length === 50, "both directions");
    expect(b.offered).toEqual(toB);
    expect(a.offered).toEqual(toA);
  });

  it("a frozen path sends nothing and keeps what arrives until it runs", async () => {
    const { a, b } = await pair();
    a.path.run();
    a.path.send([message(0, 1, 1), message(0, 1, 2)]);
    await until(() => b.path.counters.received === 2, "arrivals");
    expect(b.offered).toEqual([]); // b is frozen
    b.path.run();
    expect(b.offered.map((m) => m.seq)).toEqual([1, 2]);
    a.path.freeze();
    a.path.send([message(0, 1, 3)]);
    expect(a.path.counters.dropped).toBe(1);
    a.path.send([message(0, 1, 3)], true); // a recovery's re-send goes out while frozen
    await until(() => b.offered.length === 3, "the forced re-send");
  });

  it("vm mode holds a message until its sender epoch commits", async () => {
    const { a, b } = await pair({ hold: true });
    a.path.run();
    b.path.run();
    a.path.send([message(0, 1, 1, 1), message(0, 1, 2, 2)]);
    await sleep(50);
    expect(b.offered).toEqual([]);
    expect(a.path.counters).toMatchObject({ held: 2, held_total: 2, sent_before_commit: 0 });
    a.commit(1);
    a.path.release(1);
    await until(() => b.offered.length === 1, "epoch 1's message");
    await sleep(30);
    expect(b.offered.map((m) => m.seq)).toEqual([1]);
    a.commit(2);
    a.path.release(2);
    await until(() => b.offered.length === 2, "epoch 2's message");
    expect(a.path.counters).toMatchObject({ held: 0, sent_after_commit: 2, sent_before_commit: 0 });
  });

  it("messages the VM refused are offered again on retry", async () => {
    let full = true;
    const { a, b } = await pair({ refuse: () => full });
    a.path.run();
    b.path.run();
    a.path.send([message(0, 1, 1)]);
    await until(() => b.path.counters.received === 1, "arrival");
    expect(b.offered).toEqual([]);
    full = false;
    b.path.retryRefused();
    expect(b.offered.map((m) => m.seq)).toEqual([1]);
  });

  it("refuses a link with the wrong token or malformed frames, and other links carry on", async () => {
    const { a, b, portB } = await pair();
    a.path.run();
    b.path.run();
    const raw = (bytes: Uint8Array[]) =>
      new Promise<void>((resolve) => {
        const s = connect(portB, "127.0.0.1", () => {
          for (const part of bytes) s.write(part);
        });
        s.on("close", () => resolve());
        s.on("error", () => resolve());
      });
    const hello = (token: string) => encodeFrame(1, new TextEncoder().encode(JSON.stringify({ token, from: 0 })));
    await raw(hello("not-the-token"));
    await raw([new TextEncoder().encode("GET / HTTP/1.1\r\n\r\n")]);
    await raw([...hello(b.path.token), ...encodeFrame(2, new Uint8Array([9, 9, 9, 9, 9]))]);
    expect(b.problems.join("\n")).toMatch(/wrong token/);
    expect(b.problems.join("\n")).toMatch(/entries do not fit|no count|overrun|token of \d+ bytes does not fit/);
    expect(b.problems.length).toBe(3);
    expect(b.offered).toEqual([]);
    a.path.send([message(0, 1, 1)]);
    await until(() => b.offered.length === 1, "a message on the good link");
  });

  it("VMs on one thread share its endpoint: one listener, one connection to a peer thread for all of them, each batch to its own VM", async () => {
    const shared = new PathEndpoint("127.0.0.1", null);
    const a = testPath(0);
    const b1 = testPath(1, { endpoint: shared });
    const b2 = testPath(2, { endpoint: shared });
    paths.push(a.path, b1.path, b2.path);
    const portA = await a.path.listen();
    const [port1, port2] = [await b1.path.listen(), await b2.path.listen()];
    expect(port2).toBe(port1);
    const routes = [
      { address: `127.0.0.1:${portA}`, token: a.path.token },
      { address: `127.0.0.1:${port1}`, token: b1.path.token },
      { address: `127.0.0.1:${port2}`, token: b2.path.token },
    ];
    for (const p of [a, b1, b2]) {
      p.path.setRoutes(routes.map((r, rank) => (rank === ranks.get(p) ? null : r)), []);
      p.path.run();
    }
    a.path.send([message(0, 1, 1), message(0, 2, 1), message(0, 1, 2)]);
    await until(() => b1.offered.length === 2 && b2.offered.length === 1, "messages to both VMs of the shared thread");
    expect(b1.offered.map((m) => [m.to, m.seq])).toEqual([[1, 1], [1, 2]]);
    expect(b2.offered.map((m) => [m.to, m.seq])).toEqual([[2, 1]]);
    // Both answer on the one connection a dialed.
    b1.path.send([message(1, 0, 1)]);
    b2.path.send([message(2, 0, 1)]);
    await until(() => a.offered.length === 2, "the answers");
    expect(a.path.counters.links_dialed).toBe(1);
    expect(b1.path.counters.links_dialed + b2.path.counters.links_dialed).toBe(0);
    expect(shared.connections).toBe(1);
    // A VM that left the thread: batches for it are dropped there and reported; the other's still arrive.
    b2.path.close();
    a.path.send([message(0, 2, 2), message(0, 1, 3)]);
    await until(() => b1.offered.length === 3, "the message to the VM still there");
    await until(() => b1.problems.some((p) => /not on this thread/.test(p)), "the dropped batch reported");
    expect(b2.offered).toHaveLength(1);
  });

  it("uses one MessageChannel per pair of threads for ranks on other threads of the same host", async () => {
    // Two threads' endpoints: a on one, b and c on the other; the port reaches b's thread through b alone.
    const a = testPath(0);
    const other = new PathEndpoint("127.0.0.1", null);
    const b = testPath(1, { endpoint: other });
    const c = testPath(2, { endpoint: other });
    paths.push(a.path, b.path, c.path);
    const routes = [a, b, c].map((p) => ({ address: "127.0.0.1:1", token: p.path.token }));
    const { port1, port2 } = new MessageChannel();
    a.path.setRoutes(routes, [{ rank: 1, thread: 2 }, { rank: 2, thread: 2 }], [{ thread: 2, port: port1 }]);
    b.path.setRoutes(routes, [{ rank: 0, thread: 1 }], [{ thread: 1, port: port2 }]);
    c.path.setRoutes(routes, [{ rank: 0, thread: 1 }]);
    for (const p of [a, b, c]) p.path.run();
    a.path.send([message(0, 1, 1), message(0, 2, 1), message(0, 1, 2)]);
    await until(() => b.offered.length === 2 && c.offered.length === 1, "messages over the channel");
    expect(b.offered.map((m) => new TextDecoder().decode(m.bytes))).toEqual(["m1", "m2"]);
    // c answers over the port its thread got through b; nobody dialed a connection.
    c.path.send([message(2, 0, 1)]);
    await until(() => a.offered.length === 1, "the answer");
    expect(a.offered[0].from).toBe(2);
    expect(a.path.counters.links_dialed + b.path.counters.links_dialed + c.path.counters.links_dialed).toBe(0);
  });

  it("hands messages between VMs of one thread over on the thread itself, in order, copies", async () => {
    const shared = new PathEndpoint("127.0.0.1", null);
    const a = testPath(0, { endpoint: shared });
    const b = testPath(1, { endpoint: shared });
    paths.push(a.path, b.path);
    const routes = [a, b].map((p) => ({ address: "127.0.0.1:1", token: p.path.token }));
    a.path.setRoutes(routes, []);
    b.path.setRoutes(routes, []);
    a.path.run();
    b.path.run();
    const sent = [message(0, 1, 1), message(0, 1, 2), message(0, 1, 3)];
    a.path.send(sent);
    // Not inside the sender's call: on a later turn.
    expect(b.offered).toHaveLength(0);
    await until(() => b.offered.length === 3, "messages on the thread");
    expect(b.offered.map((m) => m.seq)).toEqual([1, 2, 3]);
    expect(b.offered[0]).not.toBe(sent[0]);
    expect(shared.connections).toBe(0);
  });

  it("drops (and counts) messages to a rank without a route", async () => {
    const a = testPath(0);
    paths.push(a.path);
    a.path.setRoutes([null, null], []);
    a.path.run();
    a.path.send([message(0, 1, 1)]);
    expect(a.path.counters.dropped).toBe(1);
  });
});

describe("message path over mutual TLS", () => {
  /** A cluster CA, the material of two hosts it certified, and bad credentials: another CA's, an expired one. */
  async function credentials() {
    const ca = await createCa();
    const material = async (name: string): Promise<TlsMaterial> => ({ ca: ca.cert, ...(await issueCert(ca, name, { role: "host" })) });
    const day = 86_400_000;
    return {
      h1: await material("h1"),
      h2: await material("h2"),
      foreign: { ca: ca.cert, ...(await issueCert(await createCa(), "h2", { role: "host" })) },
      expired: { ca: ca.cert, ...(await issueCert(ca, "h2", { role: "host", not_before: new Date(Date.now() - 2 * day), not_after: new Date(Date.now() - day) })) },
    };
  }

  /** Dials `port` as a peer would (TLS with `material`, TLS without a certificate, or plain TCP), sends a hello for `token`; resolves with the local port once the listener closed the connection. */
  function intruder(port: number, how: TlsMaterial | "no-cert" | "plain", token: string): Promise<number> {
    return new Promise((resolve, reject) => {
      const hello = encodeFrame(1, new TextEncoder().encode(JSON.stringify({ token, from: 0 })));
      const socket =
        how === "plain" ? connect(port, "127.0.0.1")
        : tlsConnect({ host: "127.0.0.1", port, ca: how === "no-cert" ? undefined : how.ca, rejectUnauthorized: false, ...(how === "no-cert" ? {} : { cert: how.cert, key: how.key }) });
      let local = 0;
      socket.once(how === "plain" ? "connect" : "secureConnect", () => {
        local = socket.localPort ?? 0;
        for (const part of hello) socket.write(part);
      });
      socket.on("error", () => undefined);
      socket.on("close", () => (local ? resolve(local) : reject(new Error("never connected"))));
      setTimeout(() => socket.destroy(new Error("not closed by the listener")), 5000).unref();
    });
  }

  it("delivers both ways between certified VMs; refuses no certificate, another CA's, an expired one and plain TCP, each reported with the peer and the reason", async () => {
    const creds = await credentials();
    const a = testPath(0, { tls: creds.h1 });
    const b = testPath(1, { tls: creds.h2 });
    paths.push(a.path, b.path);
    const [portA, portB] = [await a.path.listen(), await b.path.listen()];
    const routes = [
      { address: `127.0.0.1:${portA}`, token: a.path.token },
      { address: `127.0.0.1:${portB}`, token: b.path.token },
    ];
    a.path.setRoutes([null, routes[1]], []);
    b.path.setRoutes([routes[0], null], []);
    a.path.run();
    b.path.run();
    a.path.send([message(0, 1, 1)]);
    await until(() => b.offered.length === 1, "a message over TLS");
    b.path.send([message(1, 0, 1)]);
    await until(() => a.offered.length === 1, "the answer on the same link");
    expect(a.path.counters.links_dialed + b.path.counters.links_dialed).toBe(1);

    const cases: [string, TlsMaterial | "no-cert" | "plain", RegExp][] = [
      ["no certificate", "no-cert", /no client certificate/],
      ["another CA's certificate", creds.foreign, /UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT/],
      ["an expired certificate", creds.expired, /CERT_HAS_EXPIRED/],
      ["plain TCP", "plain", /wrong version number|http request|record|packet length|unexpected/i],
    ];
    for (const [what, how, reason] of cases) {
      const local = await intruder(portB, how, b.path.token);
      await until(() => b.problems.some((p) => p.includes(`127.0.0.1:${local}`)), `${what}: refusal reported`);
      const line = b.problems.find((p) => p.includes(`127.0.0.1:${local}`))!;
      expect(line, what).toMatch(/^refused a connection from 127\.0\.0\.1:\d+: /);
      expect(line, what).toMatch(reason);
      expect(line).not.toContain("PRIVATE KEY");
    }
    expect(b.offered).toHaveLength(1); // no intruder's hello got through
    // The certified link carries on.
    a.path.send([message(0, 1, 2)]);
    await until(() => b.offered.length === 2, "a message after the refusals");
    // A dialer checks the listener too: a path holding another CA's certificate is not dialed into.
    const impostor = testPath(1, { tls: creds.foreign });
    paths.push(impostor.path);
    const portI = await impostor.path.listen();
    impostor.path.run();
    a.path.setRoutes([null, { address: `127.0.0.1:${portI}`, token: impostor.path.token }], []);
    a.path.send([message(0, 1, 3)]);
    await until(() => a.problems.some((p) => /closed: .*(certificate|verify)/i.test(p)), "the dialer refusing the impostor");
    await sleep(50);
    expect(impostor.offered).toEqual([]);
  });
});

describe("the marker rule across real VM threads", () => {
  const vms: VmWorker[] = [];
  afterEach(async () => {
    await Promise.all(vms.splice(0).map((vm) => vm.terminate()));
  });

  it("a message from the next epoch makes its receiver capture at once; the leader's end then finds it done", async () => {
    const guest = await compileGuest(instrument(builtBytes("pingpong")));
    const options = (rank: number): WorkerVmOptions => ({ rank, size: 2, limits: { ...DEFAULT_LIMITS }, timers: "manual", consistent_cut: true });
    const [vm0, vm1] = await Promise.all([VmWorker.boot(guest, options(0)), VmWorker.boot(guest, options(1))]);
    vms.push(vm0, vm1);
    const routes = await Promise.all([vm0, vm1].map((vm) => vm.request("path_open", { bind_host: "127.0.0.1", hold_until_commit: false, tls: null })));
    await vm0.request("path_routes", { routes, locals: [], ports: [] });
    await vm1.request("path_routes", { routes, locals: [], ports: [] });
    const captured1: CaptureResult[] = [];
    vm1.on("captured", (c) => captured1.push(c));
    await vm1.request("run", {});
    await vm0.request("run", {}); // rank 0's first ping (sent in `start`) leaves now
    const received = async () => (await vm1.request("path_counters", {}))!.received;
    await sleep(200);
    expect(captured1).toEqual([]); // all in epoch 1: nothing to capture
    const before = await received();
    // Rank 0 ends epoch 1 (as on the leader's `end 1`); its next ping carries epoch 2.
    const c0 = await vm0.captureTo(1);
    expect(c0.captured).toBe(1);
    await until(() => captured1.length === 1, "rank 1's own capture of epoch 1");
    expect(captured1[0].epoch).toBe(1);
    // The leader's `end 1` reaching rank 1's host later: done already; a commit riding on it still applies.
    const late = await vm1.captureTo(1, { epoch: 1 });
    expect(late.captured).toBeNull();
    expect((await vm1.status()).committed).toBe(1);
    const after = await received();
    await sleep(100);
    expect(await received()).toBeGreaterThan(after); // the ping-pong goes on
    expect(after).toBeGreaterThan(before);
  });
});
