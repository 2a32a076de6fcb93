/**
 * The host API (src/host/api.ts) and control frame versions
 * (src/host/messages.ts): argument schemas refuse bad arguments by field
 * name, a control frame of a newer version is refused by name and closes
 * only its connection, and against real host processes a bad request gets a
 * BadArguments error while the host keeps serving good ones.
 */
import { readFile } from "node:fs/promises";
import { createServer, connect, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { connect as tlsConnect } from "node:tls";
import { afterEach, describe, expect, it } from "vitest";
import { parseManifest, type Manifest } from "../src/cluster/manifest.js";
import type { ClusterFile } from "../src/cluster/local-cluster.js";
import { protectionRecord } from "./support/record.js";
import { guestPath } from "../src/guest/examples.js";
import { BadArgumentsError, checkArgs, isHostOp } from "../src/host/api.js";
import { Connection } from "../src/host/connection.js";
import { vmKey, type VmRecord } from "../src/host/records.js";
import { checkControl, CONTROL_VERSION, ControlFrameError, encodePayload, MSG } from "../src/host/messages.js";
import { encodeFrameBytes } from "../src/transport/frame.js";
import { clusterTls, requestAny } from "../src/cli/client.js";
import { clientTlsOptions } from "../src/tls/context.js";
import { startCluster, stopClusters, waitFor } from "./support/cluster.js";
import { HOST_DEFAULTS } from "../src/host/host.js";

const MANIFEST: Manifest = {
  group: "kv",
  mode: "vm",
  module: "/srv/kv.wasm",
  size: 1,
  epoch: { interval_ms: 20, min_interval_ms: 2, max_interval_ms: 100 },
  limits: { memory_mib: 256, call_cpu_ms: 1000, output_bytes_max: 1 << 20 },
};

const RECORD = protectionRecord({
  placement: [
    { primary: "h1", backup: "h2" },
    { primary: "h2", backup: "h1" },
  ],
  epoch: MANIFEST.epoch,
  limits: MANIFEST.limits,
});

/** The BadArgumentsError `checkArgs` throws for these arguments. */
function refusal(op: Parameters<typeof checkArgs>[0], args: unknown): BadArgumentsError {
  try {
    checkArgs(op, args);
  } catch (error) {
    expect(error).toBeInstanceOf(BadArgumentsError);
    return error as BadArgumentsError;
  }
  throw new Error(`${op} accepted ${JSON.stringify(args)}`);
}

describe("host API argument schemas", () => {
  it("accept good arguments and fill defaults", () => {
    expect(checkArgs("deploy", { manifest: MANIFEST })).toEqual({ manifest: MANIFEST });
    expect(checkArgs("group_prepare", { record: RECORD })).toEqual({ record: RECORD });
    expect(checkArgs("logs", { vm: "kv-0" })).toEqual({ vm: "kv-0", from_seq: 1, follow: false });
    expect(checkArgs("group_run", { group: "g", routes: [{ address: "127.0.0.1:1", token: "t" }, null] }).routes).toHaveLength(2);
    expect(checkArgs("ping", {})).toEqual({});
  });

  it("refuse bad arguments with code BadArguments, naming each field", () => {
    const size = refusal("deploy", { manifest: { ...MANIFEST, size: 0 } });
    expect(size.code).toBe("BadArguments");
    expect(size.message).toMatch(/^bad arguments for deploy: manifest\.size: must be an integer from 1 to 256, got 0$/);
    expect(size.issues.map((i) => i.path)).toEqual(["manifest.size"]);

    expect(refusal("vm_request", { vm: "kv-0" }).issues.map((i) => i.path)).toEqual(["text"]);
    expect(refusal("vm_request", { vm: "", text: 7 }).issues.map((i) => i.path)).toEqual(["vm", "text"]);
    expect(refusal("logs", { vm: "kv-0", from_seq: -1, follow: "yes" }).issues.map((i) => i.path)).toEqual(["from_seq", "follow"]);
    expect(refusal("group_run", { group: "g", routes: [{ address: 1, token: "t" }] }).message).toContain("routes.0.address");
    expect(refusal("group_prepare", { record: { ...RECORD, mode: "fast" } }).message).toContain("record.mode");
    // What the schema alone cannot see: the record's own consistency.
    const same = refusal("group_prepare", { record: { ...RECORD, placement: [{ primary: "h1", backup: "h1" }, RECORD.placement[1]] } });
    expect(same.message).toContain("primary and backup on one host");
    expect(refusal("ping", { extra: 1 }).issues).toEqual([{ path: "extra", message: "unknown field" }]);
    expect(refusal("deploy", { manifest: { ...MANIFEST, colour: "red" } }).issues).toEqual([{ path: "manifest.colour", message: "unknown field" }]);
    expect(refusal("status", "everything").message).toMatch(/^bad arguments for status: /);
    expect(refusal("status", null).code).toBe("BadArguments");
    expect(refusal("locate", {}).issues.map((i) => i.path)).toEqual(["vm"]);
    expect(refusal("records", { prefix: "vms/" }).issues).toEqual([{ path: "prefix", message: "unknown field" }]);
  });

  it("know exactly the ops of the table", () => {
    for (const op of ["ping", "status", "deploy", "group_prepare", "group_run", "vm_request", "logs", "records", "locate"]) expect(isHostOp(op)).toBe(true);
    for (const op of ["start_primary", "install_backup", "toString", "__proto__", "constructor", ""]) expect(isHostOp(op)).toBe(false);
  });
});

describe("control frame versions", () => {
  it("a header of a newer version is refused by name, before its shape is looked at", () => {
    const newer = () => checkControl(MSG.REQUEST, { v: CONTROL_VERSION + 1, id: 1, op: "ping", args: {}, future_field: true });
    expect(newer).toThrow(ControlFrameError);
    expect(newer).toThrow(`REQUEST frame version ${CONTROL_VERSION + 1} is newer than this host's ${CONTROL_VERSION}`);
    expect(() => checkControl(MSG.HELLO, { v: 9, from: "h2" })).toThrow(/^HELLO frame version 9 is newer/);
    expect(() => checkControl(MSG.LOG, { v: 3, vm: "t-0", records: [] })).toThrow(/^LOG frame version 3 is newer/);
  });

  it("a header without a version, or of the wrong shape, is malformed", () => {
    expect(() => checkControl(MSG.HELLO, { from: "cli" })).toThrow(/malformed HELLO frame: v:/);
    expect(() => checkControl(MSG.REQUEST, { v: 1, id: "one", op: "ping", args: {} })).toThrow(/malformed REQUEST frame: id:/);
    expect(() => checkControl(MSG.LOG, { v: 1, vm: "t-0", records: [{ seq: -1 }] })).toThrow(/malformed LOG frame: records\.0\.seq:/);
    expect(() => checkControl(MSG.HELLO, { v: CONTROL_VERSION, from: "cli" })).not.toThrow();
    // A failed request's REPLY has no value; a REQUEST without args is the op's to refuse.
    expect(() => checkControl(MSG.REPLY, { v: CONTROL_VERSION, id: 3, ok: false, error: { code: "BadArguments", message: "..." } })).not.toThrow();
    expect(() => checkControl(MSG.REQUEST, { v: CONTROL_VERSION, id: 3, op: "ping" })).not.toThrow();
  });

  it("over TCP: a newer REQUEST closes only its connection, with the reason; others keep being answered", async () => {
    const served: Connection[] = [];
    const server: Server = createServer((socket) => {
      const c = new Connection(socket, `in:${served.length}`);
      served.push(c);
      c.on("message", (type, header) => {
        if (type === MSG.REQUEST) c.reply(Number(header.id), { ok: true, value: { id: "stub", v_seen: header.v } });
      });
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const address = server.address();
    if (!address || typeof address === "string") throw new Error("no address");
    try {
      const good = await Connection.open(`127.0.0.1:${address.port}`, "good");
      const raw: Socket = connect({ host: "127.0.0.1", port: address.port });
      const rawClosed = new Promise<void>((resolve) => raw.once("close", () => resolve()));
      raw.on("error", () => undefined);
      raw.write(encodeFrameBytes(MSG.REQUEST, encodePayload({ v: CONTROL_VERSION + 1, id: 1, op: "ping", args: {} })));
      await rawClosed;
      await waitFor(() => served.length === 2 && served.some((c) => c.isClosed), 2000, "the refusing side to close");
      const refused = served.find((c) => c.isClosed)!;
      expect(refused.closeReason).toBe(`control frame refused: REQUEST frame version ${CONTROL_VERSION + 1} is newer than this host's ${CONTROL_VERSION}`);
      // Connection.send stamped the version on what `good` sent.
      expect(await good.request("ping", {})).toEqual({ id: "stub", v_seen: CONTROL_VERSION });
      good.close("done");
    } finally {
      for (const c of served) c.close("test over");
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  });

  it("Connection.send lets go of a body only once the socket wrote it (a pooled delta goes back then), or at once if it never queued it", async () => {
    const bodies: Buffer[] = [];
    const served: Connection[] = [];
    const server: Server = createServer((socket) => {
      const c = new Connection(socket, "in");
      served.push(c);
      c.on("message", (_type, _header, body) => bodies.push(Buffer.from(body)));
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const address = server.address();
    if (!address || typeof address === "string") throw new Error("no address");
    try {
      const out = await Connection.open(`127.0.0.1:${address.port}`, "out");
      const body = new Uint8Array(4 << 20).map((_, i) => i * 7);
      const expected = Buffer.from(body);
      let done = 0;
      expect(out.send(MSG.GROUP, { k: "test" }, body, () => done++)).toBe(true);
      expect(done).toBe(0); // queued on the socket, not written yet: the bytes are still read
      await waitFor(() => done === 1, 5000, "the write to complete");
      await waitFor(() => bodies.length === 1, 5000, "the frame to arrive");
      expect(bodies[0].equals(expected)).toBe(true);
      out.close("test");
      expect(out.send(MSG.GROUP, { k: "test" }, body, () => done++)).toBe(false);
      expect(done).toBe(2);
    } finally {
      for (const c of served) c.close("test over");
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  });
});

describe("host API against real host processes", () => {
  afterEach(stopClusters);

  /** The error a request ends in (a BadArguments reply carries code and message). */
  async function failure(p: Promise<unknown>): Promise<Error & { code?: string }> {
    return p.then(
      () => {
        throw new Error("the request succeeded");
      },
      (error: Error & { code?: string }) => error,
    );
  }

  async function deploy(c: ClusterFile, group: string, mode: string, size: number): Promise<void> {
    const module = guestPath("kv");
    const manifest = parseManifest(`group: ${group}\nmode: ${mode}\nsize: ${size}\nmodule: ${JSON.stringify(module)}\n`, { source: "test", base_dir: "/" });
    await requestAny(c, "deploy", { manifest }, new Uint8Array(await readFile(module)));
  }

  it("a bad-argument request gets BadArguments and harms nothing; a newer frame closes only its connection; good requests keep being served", async () => {
    const { dir, cluster: c, store } = await startCluster(2, 1000);
    try {
      const h1 = c.hosts[0];
      // Requests the types refuse, sent anyway, as a buggy or hostile client could.
      // @ts-expect-error text is missing
      const noText = await failure(requestAny(c, "vm_request", { vm: "kv-0" }, undefined, h1.id));
      expect(noText.code).toBe("BadArguments");
      expect(noText.message).toMatch(/^bad arguments for vm_request: text: /);

      const module = new Uint8Array(await readFile(guestPath("kv")));
      // @ts-expect-error size must be a number
      const badDeploy = await failure(requestAny(c, "deploy", { manifest: { ...MANIFEST, module: guestPath("kv"), size: "4" } }, module, h1.id));
      expect(badDeploy.code).toBe("BadArguments");
      expect(badDeploy.message).toContain("manifest.size");
      expect(await store.list("groups/")).toEqual([]); // refused before anything happened

      // @ts-expect-error not an op of the table
      const unknown = await failure(requestAny(c, "no_such_op", {}, undefined, h1.id));
      expect(unknown.code).toBe("UnknownRequest");

      // A REQUEST frame of a newer control version, from an authenticated client (the cluster's admin
      // credential, over TLS): that connection is closed, with the reason in the host's log.
      const [host, port] = h1.address.split(":");
      const raw = tlsConnect({ host, port: Number(port), ...clientTlsOptions({ material: clusterTls(c)!, peer: h1.id }) });
      raw.on("error", () => undefined);
      const closed = new Promise<void>((resolve) => raw.once("close", () => resolve()));
      raw.once("secureConnect", () => raw.write(encodeFrameBytes(MSG.REQUEST, encodePayload({ v: CONTROL_VERSION + 1, id: 1, op: "ping", args: {} }))));
      await closed;
      const refusedLine = `REQUEST frame version ${CONTROL_VERSION + 1} is newer than this host's ${CONTROL_VERSION}`;
      await waitFor(async () => (await readFile(join(dir, "logs", `${h1.id}.log`), "utf8")).includes(refusedLine), 5000, "the refusal in the host's log");

      // The host serves good requests afterwards: typed results, no casts.
      expect(await requestAny(c, "ping", {}, undefined, h1.id)).toEqual({ id: h1.id });
      // A single VM (a group of one) and a group of two: deploy, group_prepare, group_run, vm_request, logs.
      await deploy(c, "kv", "vm", 1);
      await deploy(c, "kvg", "group", 2);
      for (const vm of ["kv-0", "kvg-1"]) {
        const primary = (await store.get<VmRecord>(vmKey(vm)))!.value.primary;
        expect((await requestAny(c, "vm_request", { vm, text: "put a 1" }, undefined, primary)).reply).toBe("ok");
        const got = await requestAny(c, "vm_request", { vm, text: "get a" }, undefined, primary);
        expect(got).toMatchObject({ vm, reply: "1" });
        const logs = await requestAny(c, "logs", { vm }, undefined, primary);
        expect(logs).toMatchObject({ vm, role: "primary", first_seq: 1 });
      }
      const status = await requestAny(c, "status", {}, undefined, h1.id);
      expect(status.id).toBe(h1.id);
      expect(status.peers.map((p) => p.id)).toEqual([c.hosts[1].id]);
      expect(status.groups.map((g) => g.group).sort()).toEqual(["kv", "kvg"]); // a single VM is a group of one
      expect(status.primaries.length + status.backups.length).toBeGreaterThan(0);
      // What the CLI knows of the cluster comes from these two, asked of any host: the store's records as the host reads them.
      for (const h of c.hosts) {
        const records = await requestAny(c, "records", {}, undefined, h.id);
        expect(records.groups.map((g) => g.group).sort()).toEqual(["kv", "kvg"]);
        expect(records.vms.map((v) => v.vm).sort()).toEqual(["kv-0", "kvg-0", "kvg-1"]);
        expect(records.hosts.map((x) => x.id).sort()).toEqual(c.hosts.map((x) => x.id).sort());
        expect((await requestAny(c, "locate", { vm: "kvg-1" }, undefined, h.id)).vm).toEqual((await store.get<VmRecord>(vmKey("kvg-1")))!.value);
        expect(await requestAny(c, "locate", { vm: "nope-0" }, undefined, h.id)).toEqual({ vm: null });
      }
      // Registrations live by a lease the host keeps renewing: a host killed with -9 vanishes from hosts/ after its TTL.
      expect(status.lease).toMatchObject({ ttl_ms: HOST_DEFAULTS.lease_ms });
      expect(status.lease!.renewed_ms_ago).toBeLessThan(HOST_DEFAULTS.lease_ms / 2);
      process.kill(c.hosts[1].pid, "SIGKILL");
      await waitFor(async () => (await requestAny(c, "records", {}, undefined, h1.id)).hosts.every((x) => x.id !== c.hosts[1].id), HOST_DEFAULTS.lease_ms + 5000, "the killed host's registration to lapse");
      expect((await requestAny(c, "records", {}, undefined, h1.id)).hosts.map((x) => x.id)).toEqual([h1.id]);
    } finally {
      await store.close();
    }
  }, 60_000);
});
