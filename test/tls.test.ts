/**
 * Mutual TLS against live host processes (`cohort up`, src/tls/): a peer
 * without a certificate, with another CA's, with an expired one, or speaking
 * plain TCP is refused by a host's port and by a VM's message path listener,
 * each refusal logged with the peer's address and the reason; the host keeps
 * serving certified clients and its group keeps committing; the CLI checks
 * that a host's certificate names the host it meant; no key reaches a log,
 * `status` or cluster.json; `cohort host` without TLS material refuses to start.
 */
import { execFile } from "node:child_process";
import { copyFile, mkdtemp, readdir, readFile, readlink, rm, stat } from "node:fs/promises";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect as tlsConnect } from "node:tls";
import { promisify } from "node:util";
import { afterEach, describe, expect, it } from "vitest";
import type { ClusterFile } from "../src/cluster/local-cluster.js";
import { parseManifest } from "../src/cluster/manifest.js";
import { guestPath } from "../src/guest/examples.js";
import { Connection } from "../src/host/connection.js";
import { HOST_DEFAULTS } from "../src/host/host.js";
import { clusterTls, requestAny } from "../src/cli/client.js";
import { createCa, issueCert } from "../src/tls/ca.js";
import type { TlsMaterial } from "../src/tls/context.js";
import { startCluster, stopClusters, waitFor } from "./support/cluster.js";

const run = promisify(execFile);
const CLI = join(process.cwd(), "bin/cohort.js");
const DAY_MS = 86_400_000;
afterEach(stopClusters);

type Credential = TlsMaterial | "no-cert" | "plain";

/** Connects to `port` with `how`, writes a few bytes; resolves with the local port once the listener closed the connection (rejects after 5 s). */
function intruder(port: number, how: Credential): Promise<number> {
  return new Promise((resolve, reject) => {
    const socket =
      how === "plain" ? connect(port, "127.0.0.1")
      : tlsConnect({ host: "127.0.0.1", port, rejectUnauthorized: false, ...(how === "no-cert" ? {} : { ca: how.ca, cert: how.cert, key: how.key }) });
    let local = 0;
    socket.once(how === "plain" ? "connect" : "secureConnect", () => {
      local = socket.localPort ?? 0;
      socket.write("GET / HTTP/1.1\r\n\r\n");
    });
    socket.on("error", () => undefined);
    socket.on("close", () => (local ? resolve(local) : reject(new Error("never connected"))));
    setTimeout(() => socket.destroy(new Error("the listener did not close the connection")), 5000).unref();
  });
}

/** TCP ports the process listens on (its host port and its VM threads' message paths), from /proc. */
async function listeningPorts(pid: number): Promise<number[]> {
  const inodes = new Set<string>();
  for (const fd of await readdir(`/proc/${pid}/fd`)) {
    const link = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => "");
    const m = /^socket:\[(\d+)\]$/.exec(link);
    if (m) inodes.add(m[1]);
  }
  const ports: number[] = [];
  for (const line of (await readFile("/proc/net/tcp", "utf8")).split("\n").slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length > 9 && f[3] === "0A" && inodes.has(f[9])) ports.push(parseInt(f[1].split(":")[1], 16));
  }
  return ports;
}

async function deploy(c: ClusterFile, group: string, guest: string, mode: string, size: number): Promise<void> {
  const module = guestPath(guest);
  const manifest = parseManifest(`group: ${group}\nmode: ${mode}\nsize: ${size}\nmodule: ${JSON.stringify(module)}\nepoch:\n  interval_ms: 20\n`, { source: "test", base_dir: "/" });
  await requestAny(c, "deploy", { manifest }, new Uint8Array(await readFile(module)));
}

/** The base64 body of a PEM key: what must never appear anywhere. */
const keyBody = (pem: string) => pem.replace(/-----[A-Z ]+-----/g, "").replace(/\s+/g, "");

describe("mutual TLS on live hosts", () => {
  it.skipIf(process.platform !== "linux")(
    "refuses and logs peers without a valid certificate on the host port and on a message path listener, serving certified ones throughout",
    async () => {
      const { cluster: c, dir } = await startCluster(2, HOST_DEFAULTS.detect_ms);
      expect(c.tls).not.toBeNull();
      for (const f of ["tls/ca.key", "tls/h1.key", "tls/h2.key", "admin.key"]) expect((await stat(join(dir, f))).mode & 0o777, f).toBe(0o600);
      await deploy(c, "bank", "bank", "group", 2);
      const committed = async () => Math.max(0, ...(await Promise.all(c.hosts.map((h) => requestAny(c, "status", {}, undefined, h.id)))).flatMap((s) => s.groups.map((g) => g.committed ?? 0)));
      await waitFor(async () => (await committed()) >= 5, 20_000, "the bank group committing");

      const ca = { cert: await readFile(join(dir, "tls/ca.crt"), "utf8"), key: await readFile(join(dir, "tls/ca.key"), "utf8") };
      const bad: [string, Credential, RegExp][] = [
        ["no certificate", "no-cert", /no client certificate/],
        ["another CA's certificate", { ca: ca.cert, ...(await issueCert(await createCa(), "h2", { role: "host" })) }, /UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT/],
        ["an expired certificate", { ca: ca.cert, ...(await issueCert(ca, "h2", { role: "host", not_before: new Date(Date.now() - 2 * DAY_MS), not_after: new Date(Date.now() - DAY_MS) })) }, /CERT_HAS_EXPIRED/],
        ["plain TCP", "plain", /http request|wrong version number/],
      ];
      const h1 = c.hosts.find((h) => h.id === "h1")!;
      const hostPort = Number(h1.address.split(":")[1]);
      const pathPorts = (await listeningPorts(h1.pid)).filter((p) => p !== hostPort);
      expect(pathPorts.length, "h1 runs a primary, whose message path listens").toBeGreaterThanOrEqual(1);
      const log = () => readFile(join(dir, "logs", "h1.log"), "utf8");

      for (const [what, how, reason] of bad) {
        // The host port.
        const local = await intruder(hostPort, how);
        await waitFor(async () => (await log()).includes(`127.0.0.1:${local}`), 5000, `${what}: the host port's refusal logged`);
        const line = (await log()).split("\n").find((l) => l.includes(`127.0.0.1:${local}`))!;
        expect(line, what).toContain("connection refused: not authenticated");
        expect(line, what).toMatch(reason);
        // A VM thread's message path.
        const viaPath = await intruder(pathPorts[0], how);
        await waitFor(async () => (await log()).includes(`127.0.0.1:${viaPath}`), 5000, `${what}: the message path's refusal logged`);
        const pathLine = (await log()).split("\n").find((l) => l.includes(`127.0.0.1:${viaPath}`))!;
        expect(pathLine, what).toContain("refused a connection from");
        expect(pathLine, what).toMatch(reason);
        // Certified clients are served all along.
        expect(await requestAny(c, "ping", {}, undefined, "h1")).toEqual({ id: "h1" });
      }
      // A Connection holding another CA's certificate gets no answer either.
      const foreign = bad[1][1] as TlsMaterial;
      const refused = await (async () => {
        const conn = await Connection.open(h1.address, "foreign", 2000, { material: foreign, peer: "h1" });
        try {
          await conn.request("ping", {}, undefined, 2000);
          return null;
        } finally {
          conn.close("done");
        }
      })().catch((error: Error) => error);
      expect(refused?.message).toMatch(/certificate|connection closed|verify/);
      // The CLI checks whom it reached: h1's certificate does not name h2.
      await expect(Connection.open(h1.address, "wrong-host", 2000, { material: clusterTls(c)!, peer: "h2" })).rejects.toThrow(/names "h1", expected host "h2"/);

      // The group kept committing, both hosts kept running, and the CLI (status over TLS) sees them.
      const before = await committed();
      await waitFor(async () => (await committed()) >= before + 5, 10_000, "the bank group committing after the refusals");
      const status = (await run(process.execPath, [CLI, "status", "--json", "--state-dir", dir])).stdout;
      const report = JSON.parse(status) as { hosts: { id: string; up: boolean }[] };
      expect(report.hosts.map((h) => h.up)).toEqual([true, true]);

      // No key anywhere it could leak: the logs, `status` (CLI and raw), cluster.json.
      const keys = await Promise.all(["tls/ca.key", "tls/h1.key", "tls/h2.key", "admin.key"].map(async (f) => keyBody(await readFile(join(dir, f), "utf8"))));
      const raw = JSON.stringify(await Promise.all(c.hosts.map((h) => requestAny(c, "status", {}, undefined, h.id))));
      const logs = await Promise.all(c.hosts.map((h) => readFile(join(dir, "logs", `${h.id}.log`), "utf8")));
      for (const text of [status, raw, await readFile(join(dir, "cluster.json"), "utf8"), ...logs]) {
        expect(text).not.toContain("PRIVATE KEY");
        for (const k of keys) expect(text.includes(k) || text.includes(k.slice(20, 60))).toBe(false);
      }
    },
    90_000,
  );

  it("cohort host without --tls-dir or --insecure refuses to start, naming both", async () => {
    const dir = await mkdtemp(join(tmpdir(), "cohort-tls-"));
    try {
      const failure = await run(process.execPath, [CLI, "host", "--id", "h1", "--state-dir", dir]).then(
        () => null,
        (error: Error & { code?: number; stderr?: string }) => error,
      );
      expect(failure?.code).toBe(1);
      expect(failure?.stderr).toMatch(/--tls-dir/);
      expect(failure?.stderr).toMatch(/--insecure/);
      // A --tls-dir whose certificate is another host's is refused too.
      await run(process.execPath, [CLI, "ca", "init", "--dir", dir]);
      await run(process.execPath, [CLI, "ca", "issue", "h2", "--dir", dir]);
      await copyFile(join(dir, "h2.crt"), join(dir, "h1.crt"));
      await copyFile(join(dir, "h2.key"), join(dir, "h1.key"));
      const wrong = await run(process.execPath, [CLI, "host", "--id", "h1", "--state-dir", dir, "--tls-dir", dir]).then(
        () => null,
        (error: Error & { stderr?: string }) => error,
      );
      expect(wrong?.stderr).toMatch(/h1\.crt names "h2", not "h1"/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
