/**
 * The machine's floor for a message round trip between two processes: two
 * plain Node processes (no Cohort code in them) bounce a payload over loopback
 * TCP, one echoing, the other sending the next payload as soon as the whole
 * echo came back. Whatever Cohort adds on top of a round trip is measured
 * against this. With `tls`, the two speak mutual TLS 1.3 with certificates
 * from a throwaway CA, as Cohort's peers do: the floor of an authenticated
 * transport.
 *
 * The two child scripts are inline (`node -e`), so this works the same from
 * src/ (tests) and from the compiled dist/ tree. The sender prints its result
 * as one JSON line; the parent only collects it. Children that misbehave are
 * killed by their own pid.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createCa, issueCert, writePair } from "../tls/ca.js";

export interface RawTcpOptions {
  /** Measured time, after the warm-up. */
  duration_ms: number;
  /** Bytes per message, each way. */
  payload_bytes: number;
  /** Round trips before measuring starts (connection, JIT, socket buffers). Default 200 ms. */
  warmup_ms?: number;
  /** Mutual TLS 1.3 between the two, with certificates from a throwaway CA: the floor of a transport that authenticates. */
  tls?: boolean;
}

export interface RawTcpResult {
  round_trips_per_s: number;
  latency_us_p50: number;
  latency_us_p99: number;
  round_trips: number;
  /** "tcp", or the TLS version the two negotiated ("TLSv1.3"). */
  transport: string;
}

export const RAW_TCP_DEFAULT_WARMUP_MS = 200;

/** Beyond warm-up + duration: time for two processes to start, connect and report. */
const STARTUP_BUDGET_MS = 10_000;

/** Mutual TLS 1.3 options from $COHORT_RAW_TLS_DIR (ca.crt, <name>.crt, <name>.key), as Cohort's peers use them. */
const TLS_OPTIONS_SCRIPT = `
function tlsOptions(name, extra) {
  const fs = require("node:fs");
  const file = (f) => fs.readFileSync(require("node:path").join(tlsDir, f));
  return { ca: file("ca.crt"), cert: file(name + ".crt"), key: file(name + ".key"), minVersion: "TLSv1.3", ...extra };
}
`;

/**
 * Echo side: listens on an ephemeral loopback port, prints {"port":N}, echoes
 * every byte back on the one connection it takes, exits when that connection closes.
 */
const ECHO_SCRIPT = `
const net = require("node:net");
const tlsDir = process.env.COHORT_RAW_TLS_DIR;
const onConnection = (socket) => {
  server.close();
  socket.setNoDelay(true);
  socket.on("data", (chunk) => socket.write(chunk));
  socket.on("error", () => process.exit(1));
  socket.on("close", () => process.exit(0));
};
const server = tlsDir
  ? require("node:tls").createServer(tlsOptions("echo", { requestCert: true, rejectUnauthorized: true }), onConnection)
  : net.createServer(onConnection);
server.listen(0, "127.0.0.1", () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + "\\n");
});
${TLS_OPTIONS_SCRIPT}
`;

/**
 * Sender side: argv = port, payload_bytes, warmup_ms, duration_ms. Sends one
 * payload, waits for exactly payload_bytes back, records the round trip,
 * repeats; prints one JSON line with the figures and exits.
 */
const SENDER_SCRIPT = `
const net = require("node:net");
const tlsDir = process.env.COHORT_RAW_TLS_DIR;
${TLS_OPTIONS_SCRIPT}
const [port, payloadBytes, warmupMs, durationMs] = process.argv.slice(1).map(Number);
const payload = Buffer.alloc(payloadBytes, 0x61);
const now = () => process.hrtime.bigint();
let samples = new Float64Array(1 << 16);
let count = 0;
let received = 0;
let sentAt = 0n;
const started = now();
const measureFrom = started + BigInt(Math.round(warmupMs * 1e6));
const measureUntil = measureFrom + BigInt(Math.round(durationMs * 1e6));
let measuredEnd = measureFrom;
const onConnect = () => {
  socket.setNoDelay(true);
  sentAt = now();
  socket.write(payload);
};
const socket = tlsDir
  ? require("node:tls").connect({ port, host: "127.0.0.1", ...tlsOptions("sender", { checkServerIdentity: () => undefined }) }, onConnect)
  : net.connect(port, "127.0.0.1", onConnect);
socket.on("data", (chunk) => {
  received += chunk.length;
  if (received < payloadBytes) return;
  if (received > payloadBytes) throw new Error("echo sent " + received + " bytes for a " + payloadBytes + "-byte message");
  received = 0;
  const t = now();
  if (sentAt >= measureFrom) {
    if (count === samples.length) {
      const grown = new Float64Array(samples.length * 2);
      grown.set(samples);
      samples = grown;
    }
    samples[count++] = Number(t - sentAt) / 1000;
    measuredEnd = t;
  }
  if (t >= measureUntil) {
    finish();
    return;
  }
  sentAt = now();
  socket.write(payload);
});
socket.on("error", (error) => {
  process.stderr.write(String(error && error.stack || error) + "\\n");
  process.exit(1);
});
function finish() {
  const sorted = samples.subarray(0, count).sort();
  const pct = (p) => (count === 0 ? 0 : sorted[Math.min(count - 1, Math.floor((count - 1) * p + 0.5))]);
  const seconds = Number(measuredEnd - measureFrom) / 1e9;
  const r1 = (x) => Math.round(x * 10) / 10;
  const result = {
    round_trips_per_s: r1(seconds > 0 ? count / seconds : 0),
    latency_us_p50: r1(pct(0.5)),
    latency_us_p99: r1(pct(0.99)),
    round_trips: count,
    transport: typeof socket.getProtocol === "function" ? socket.getProtocol() : "tcp",
  };
  process.stdout.write(JSON.stringify(result) + "\\n", () => {
    socket.end();
    process.exit(0);
  });
}
`;

interface Child {
  process: ChildProcess;
  /** Resolves with the first stdout line (parsed as JSON); rejects if the child exits or fails first. */
  firstLine: Promise<unknown>;
  exited: Promise<void>;
}

function startChild(name: string, script: string, args: string[], env: NodeJS.ProcessEnv): Child {
  const child = spawn(process.execPath, ["-e", script, ...args], { stdio: ["ignore", "pipe", "pipe"], env });
  let stdout = "";
  let stderr = "";
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  const exited = new Promise<void>((resolve) => child.once("close", () => resolve()));
  const firstLine = new Promise<unknown>((resolve, reject) => {
    child.once("error", (error) => reject(new Error(`${name} process failed to start: ${error.message}`)));
    child.stdout!.setEncoding("utf8").on("data", (d: string) => {
      stdout += d;
      const end = stdout.indexOf("\n");
      if (end < 0) return;
      try {
        resolve(JSON.parse(stdout.slice(0, end)));
      } catch (error) {
        reject(new Error(`${name} process (pid ${child.pid}) printed a bad line: ${stdout.slice(0, end)} (${(error as Error).message})`));
      }
    });
    child.once("close", (code, signal) =>
      reject(new Error(`${name} process (pid ${child.pid}) exited (${signal ?? code}) before reporting; stderr: ${stderr.trim()}`)),
    );
  });
  return { process: child, firstLine, exited };
}

/** Kills a child by its own pid, if it is still running. */
function kill(child: Child | undefined): void {
  const pid = child?.process.pid;
  if (pid === undefined || child!.process.exitCode !== null || child!.process.signalCode !== null) return;
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    // already gone
  }
}

function isResult(x: unknown): x is RawTcpResult {
  if (typeof x !== "object" || x === null) return false;
  const r = x as Record<string, unknown>;
  return ["round_trips_per_s", "latency_us_p50", "latency_us_p99", "round_trips"].every((k) => typeof r[k] === "number" && Number.isFinite(r[k]));
}

/**
 * Round trips of a `payload_bytes` message between two separate Node
 * processes over loopback TCP (Nagle off), for `duration_ms` after `warmup_ms`.
 * Latency percentiles are over every measured round trip, in µs.
 */
export async function measureRawTcp(options: RawTcpOptions): Promise<RawTcpResult> {
  const { duration_ms, payload_bytes } = options;
  const warmup_ms = options.warmup_ms ?? RAW_TCP_DEFAULT_WARMUP_MS;
  if (!(duration_ms > 0)) throw new RangeError(`duration_ms must be > 0, got ${duration_ms}`);
  if (!(warmup_ms >= 0)) throw new RangeError(`warmup_ms must be >= 0, got ${warmup_ms}`);
  if (!Number.isInteger(payload_bytes) || payload_bytes < 1) throw new RangeError(`payload_bytes must be a positive integer, got ${payload_bytes}`);

  let echo: Child | undefined;
  let sender: Child | undefined;
  let timer: NodeJS.Timeout | undefined;
  const budget = warmup_ms + duration_ms + STARTUP_BUDGET_MS;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`raw TCP benchmark did not finish within ${budget} ms`)), budget);
  });
  const tls_dir = options.tls ? await throwawayTls() : null;
  const env = tls_dir ? { ...process.env, COHORT_RAW_TLS_DIR: tls_dir } : process.env;
  try {
    echo = startChild("echo", ECHO_SCRIPT, [], env);
    const ready = await Promise.race([echo.firstLine, timeout]);
    const port = (ready as { port?: unknown }).port;
    if (typeof port !== "number") throw new Error(`echo process reported no port: ${JSON.stringify(ready)}`);
    sender = startChild("sender", SENDER_SCRIPT, [String(port), String(payload_bytes), String(warmup_ms), String(duration_ms)], env);
    const result = await Promise.race([sender.firstLine, timeout]);
    if (!isResult(result)) throw new Error(`sender process reported ${JSON.stringify(result)}`);
    // Both exit on their own once the connection closes.
    await Promise.race([Promise.all([sender.exited, echo.exited]), timeout]);
    return result;
  } finally {
    clearTimeout(timer);
    kill(sender);
    kill(echo);
    if (tls_dir) await rm(tls_dir, { recursive: true, force: true });
  }
}

/** A CA and two host certificates (echo, sender) in a new temporary directory. */
async function throwawayTls(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "cohort-raw-tls-"));
  const ca = await createCa(1);
  await writePair(dir, "ca", ca);
  for (const name of ["echo", "sender"]) await writePair(dir, name, await issueCert(ca, name, { role: "host", days: 1 }));
  return dir;
}
