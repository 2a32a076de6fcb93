/**
 * The CLI given any host's address instead of a cluster file (`--host`,
 * $COHORT_HOST): real `cohort host` processes (`cohort up`), the built CLI
 * run from a directory without cluster.json and with `--state-dir` naming an
 * empty one. It learns every host and group from the host it reaches, with
 * the credential of `--credentials` (or $COHORT_CREDENTIALS), or none with
 * `--insecure`; what it cannot use is refused with the reason: no credential,
 * another CA's, plain TCP against TLS and the reverse, unreachable
 * addresses, a listener whose certificate names no host.
 */
import { copyFile, mkdir, mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { createServer as createTcpServer, type AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { clusterAt } from "../src/cli/client.js";
import { guestPath } from "../src/guest/examples.js";
import { Connection } from "../src/host/connection.js";
import { HOST_DEFAULTS } from "../src/host/host.js";
import { createCa, issueCert, writePair } from "../src/tls/ca.js";
import { mutualTlsServer, readTlsMaterial, tlsDirFiles } from "../src/tls/context.js";
import { startCluster, stopClusters, waitFor } from "./support/cluster.js";
import { runCli, type CliExit } from "./support/cli.js";


const scratch: string[] = [];
afterEach(async () => {
  await stopClusters();
  for (const d of scratch.splice(0)) await rm(d, { recursive: true, force: true });
});

/** A fresh directory, removed after the test. */
async function tempDir(): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), "cohort-cli-host-"));
  scratch.push(d);
  return d;
}

/**
 * Runs the built CLI in `cwd` with none of the environment that would point
 * it at a cluster (COHORT_HOST, COHORT_CREDENTIALS, COHORT_STATE_DIR) but
 * what `env` gives; killed (and the test failed) after 10 s (a bound on a hang: each call normally exits within a second).
 */
function cohort(args: string[], cwd: string, env: Record<string, string> = {}): Promise<CliExit> {
  const base = { ...process.env };
  for (const k of ["COHORT_HOST", "COHORT_CREDENTIALS", "COHORT_STATE_DIR"]) delete base[k];
  return runCli(args, { cwd, env: { ...base, ...env }, limit_ms: 10_000 });
}

/** Runs the CLI and expects it to succeed. */
async function ok(args: string[], cwd: string, env: Record<string, string> = {}): Promise<string> {
  const exit = await cohort(args, cwd, env);
  expect(exit.stderr, `cohort ${args.join(" ")}`).toBe("");
  expect(exit.code, `cohort ${args.join(" ")}`).toBe(0);
  return exit.stdout;
}

/** A loopback port nothing listens on (it did a moment ago). */
async function closedPort(): Promise<number> {
  const server = createTcpServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** A CA of its own in `dir` with the CLI's credential beside it, as a user makes them (`cohort ca init`, `cohort ca issue admin`). */
async function otherCa(dir: string): Promise<void> {
  await ok(["ca", "init", "--dir", dir], dir);
  await ok(["ca", "issue", "admin", "--dir", dir], dir);
}

interface StatusReport {
  hosts: { id: string; address: string; pid: number; up: boolean }[];
  groups: { group: string; mode: string; vms: { vm: string; primary: string; incarnation: number }[] }[];
}

const lines = (text: string) => text.split("\n").filter((l) => l !== "");

describe("cohort status / deploy / logs --host: any host's address instead of a cluster file", () => {
  it("learn every host and group from the host reached, over mutual TLS with a credential directory, as cluster.json would", async () => {
    const { dir, cluster } = await startCluster(3, HOST_DEFAULTS.detect_ms);
    const [h1, h2, h3] = cluster.hosts;
    // Where the CLI runs: no cluster.json here, and --state-dir names an empty directory.
    const work = await tempDir();
    const empty = join(work, "state");
    await mkdir(empty);
    // The CLI's credential, issued by the cluster CA into a directory of its own, with the CA certificate.
    const creds = join(work, "creds");
    await ok(["ca", "issue", "admin", "--dir", join(dir, "tls"), "--out", creds], work);
    await copyFile(join(dir, "tls", "ca.crt"), join(creds, "ca.crt"));

    for (const group of ["ticker", "tock"]) {
      await writeFile(join(work, `${group}.yaml`), `group: ${group}\nmode: vm\nmodule: ${JSON.stringify(guestPath("ticker"))}\nepoch:\n  interval_ms: 20\n`);
    }
    // deploy with the options; the second through the environment, its first address dead.
    const viaH3 = ["--host", h3.address, "--credentials", creds, "--state-dir", empty];
    const deployed = JSON.parse(await ok(["deploy", join(work, "ticker.yaml"), "--json", ...viaH3], work)) as { vms: { vm: string }[] };
    expect(deployed.vms.map((v) => v.vm)).toEqual(["ticker-0"]);
    const env = { COHORT_HOST: `127.0.0.1:${await closedPort()},${h2.address}`, COHORT_CREDENTIALS: creds };
    expect(JSON.parse(await ok(["deploy", join(work, "tock.yaml"), "--json", "--state-dir", empty], work, env)).vms.map((v: { vm: string }) => v.vm)).toEqual(["tock-0"]);

    // logs: the released output, through a host that may not be the VM's.
    let viaHost: string[] = [];
    await waitFor(async () => (viaHost = lines(await ok(["logs", "ticker-0", ...viaH3], work))).length >= 5, 10_000, "ticker-0's output through --host");
    const viaFile = lines(await ok(["logs", "ticker-0", "--state-dir", dir], work));
    expect(viaFile.slice(0, viaHost.length)).toEqual(viaHost);

    // status: every host and group, the same as through cluster.json.
    const status = JSON.parse(await ok(["status", "--json", "--host", h1.address, "--credentials", creds, "--state-dir", empty], work)) as StatusReport;
    const fromEnv = JSON.parse(await ok(["status", "--json"], work, env)) as StatusReport;
    const fromFile = JSON.parse(await ok(["status", "--json", "--state-dir", dir], work)) as StatusReport;
    expect(status.hosts.map((h) => [h.id, h.address, h.pid, h.up])).toEqual(cluster.hosts.map((h) => [h.id, h.address, h.pid, true]));
    const shape = (r: StatusReport) => ({ hosts: r.hosts.map((h) => [h.id, h.address, h.up]), groups: r.groups.map((g) => [g.group, g.mode, g.vms.map((v) => [v.vm, v.primary, v.incarnation])]) });
    expect(shape(status).groups.map(([g]) => g).sort()).toEqual(["ticker", "tock"]);
    expect(shape(status)).toEqual(shape(fromFile));
    expect(shape(fromEnv)).toEqual(shape(fromFile));
    // Nothing was written where the CLI ran.
    expect(await readdir(empty)).toEqual([]);
    expect((await readdir(work)).sort()).toEqual(["creds", "state", "ticker.yaml", "tock.yaml"]);
  }, 90_000);

  it("refuses --host without a credential, another CA's credential, one that cannot be read, and plain TCP to a TLS host, each saying why", async () => {
    const { cluster } = await startCluster(1, HOST_DEFAULTS.detect_ms);
    const h1 = cluster.hosts[0].address;
    const work = await tempDir();

    const none = await cohort(["status", "--host", h1, "--state-dir", work], work);
    expect(none.code).toBe(1);
    expect(none.stderr).toMatch(/^cohort: --host needs the CLI's credential: give --credentials <dir> .*ca\.crt, admin\.crt and admin\.key.*, or --insecure for hosts started --insecure\n$/);

    const other = join(work, "other-ca");
    await mkdir(other);
    await otherCa(other);
    const foreign = await cohort(["status", "--host", h1, "--credentials", other, "--state-dir", work], work);
    expect(foreign.code).toBe(1);
    expect(foreign.stderr).toContain(`${h1}: TLS to ${h1}: `);
    expect(foreign.stderr).toMatch(/\((SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT\w*)\): the host's certificate was not issued by the CA in /);
    expect(foreign.stderr).toContain(join(other, "ca.crt"));

    const partial = join(work, "partial");
    await mkdir(partial);
    await copyFile(join(other, "ca.crt"), join(partial, "ca.crt"));
    const unreadable = await cohort(["status", "--host", h1, "--credentials", partial, "--state-dir", work], work);
    expect(unreadable.code).toBe(1);
    expect(unreadable.stderr).toBe(`cohort: the credential in ${partial} cannot be used: cannot read the certificate ${join(partial, "admin.crt")}: ENOENT\n`);

    const plain = await cohort(["status", "--host", h1, "--insecure", "--state-dir", work], work);
    expect(plain.code).toBe(1);
    expect(plain.stderr).toContain(`${h1}: `);
    expect(plain.stderr).toMatch(/a host with TLS closes plain TCP connections: give --credentials/);

    const both = await cohort(["status", "--host", h1, "--insecure", "--credentials", other, "--state-dir", work], work);
    expect(both.code).toBe(1);
    expect(both.stderr).toMatch(/either --credentials or --insecure, not both/);
    const without = await cohort(["status", "--credentials", other, "--state-dir", work], work);
    expect(without.code).toBe(1);
    expect(without.stderr).toMatch(/--credentials and --insecure go with --host/);
  }, 60_000);

  it("--insecure reaches hosts started --insecure; a credential there is refused, pointing at --insecure", async () => {
    const { cluster } = await startCluster(2, HOST_DEFAULTS.detect_ms, "embedded", { tls: false });
    expect(cluster.tls).toBeNull();
    const work = await tempDir();
    const status = JSON.parse(await ok(["status", "--json", "--host", cluster.hosts[1].address, "--insecure", "--state-dir", work], work)) as StatusReport;
    expect(status.hosts.map((h) => [h.id, h.up])).toEqual([
      ["h1", true],
      ["h2", true],
    ]);
    await otherCa(work);
    const tls = await cohort(["status", "--host", cluster.hosts[1].address, "--credentials", work, "--state-dir", work], work);
    expect(tls.code).toBe(1);
    expect(tls.stderr).toMatch(/a host started --insecure speaks plain TCP: give --insecure/);
  }, 60_000);

  it("unreachable addresses: every one tried is named with its reason; a malformed one is refused before dialing", async () => {
    const work = await tempDir();
    const [a, b] = [await closedPort(), await closedPort()];
    const exit = await cohort(["status", "--host", `127.0.0.1:${a}`, "--host", `127.0.0.1:${b}`, "--insecure", "--state-dir", work], work);
    expect(exit.code).toBe(1);
    expect(exit.stderr).toBe(
      `cohort: no host of the cluster answered at the addresses given:\n  127.0.0.1:${a}: connect ECONNREFUSED 127.0.0.1:${a}\n  127.0.0.1:${b}: connect ECONNREFUSED 127.0.0.1:${b}\n`,
    );
    const malformed = await cohort(["status", "--host", `127.0.0.1:${a},nohost`, "--insecure", "--state-dir", work], work);
    expect(malformed.code).toBe(1);
    expect(malformed.stderr).toMatch(/"nohost" is not an address \(want host:port/);
    const empty = await cohort(["status", "--host", "", "--insecure", "--state-dir", work], work);
    expect(empty.code).toBe(1);
    expect(empty.stderr).toMatch(/--host: no address given/);
    const fromEnv = await cohort(["logs", "x", "--insecure", "--state-dir", work], work, { COHORT_HOST: "127.0.0.1" });
    expect(fromEnv.code).toBe(1);
    expect(fromEnv.stderr).toMatch(/\$COHORT_HOST: "127\.0\.0\.1" is not an address/);
  }, 30_000);

  it("an address whose host is not known yet: a certificate of the cluster CA is taken only if it names a host", async () => {
    const dir = await tempDir();
    const ca = await createCa();
    await writePair(dir, "ca", ca);
    await writePair(dir, "admin", await issueCert(ca, "admin", { role: "admin" }));
    const credential = tlsDirFiles(dir, "admin");
    const client = readTlsMaterial(credential);
    // A listener of the CA that serves as `name`, and answers nothing.
    const listen = async (name: string) => {
      const server = mutualTlsServer({ ca: ca.cert, ...(await issueCert(ca, name, { role: "host" })) }, (socket) => socket.on("error", () => undefined), () => undefined);
      await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
      return { server, address: `127.0.0.1:${(server.address() as AddressInfo).port}` };
    };
    const host = await listen("h7");
    const impostor = await listen("admin"); // issued for serving, but the name of the CLI's credential, not a host's
    try {
      const reached = await Connection.open(host.address, "test", 2000, { material: client });
      reached.close("done");
      await expect(Connection.open(impostor.address, "test", 2000, { material: client })).rejects.toThrow(`TLS to ${impostor.address}: the peer's certificate names "admin", which is not a host name`);
      await expect(clusterAt([impostor.address], credential)).rejects.toThrow(`${impostor.address}: TLS to ${impostor.address}: the peer's certificate names "admin", which is not a host name`);
    } finally {
      host.server.close();
      impostor.server.close();
    }
  });
});
