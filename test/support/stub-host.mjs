// Stand-in for `cohort host` in test/cluster-local.test.ts. Plain Node ESM,
// started as `node --import <tsx loader> stub-host.mjs ...` so that it can
// register through the real store `up` names (src/store/open.ts) and thus
// exactly where `up` polls.
//
//   stub-host.mjs --id h1 --port 0 --state-dir DIR [--store SPEC] [--tls-dir DIR | --insecure] [--stub-fail h2:never-register|exit|ignore-term ...]
//
// On start it records its pid in DIR/stub-pids/<id>.pid (so tests can find
// every process ever started, independently of cluster.json), listens on
// 127.0.0.1, puts {id, address, pid, started_at_ms} under hosts/<id> and
// exits on SIGTERM. --stub-fail makes the host with that id misbehave.
import { mkdirSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { openStore } from "../../src/store/open.ts";

const { values } = parseArgs({
  options: {
    id: { type: "string" },
    port: { type: "string" },
    "state-dir": { type: "string" },
    store: { type: "string", default: "embedded" },
    // What `up` passes for TLS; the stub speaks plain TCP either way (test/tls.test.ts tests real hosts).
    "tls-dir": { type: "string" },
    insecure: { type: "boolean" },
    "stub-fail": { type: "string", multiple: true, default: [] },
  },
  strict: true,
});
const id = values.id;
const stateDir = values["state-dir"];
if (!id || !stateDir || values.port === undefined) {
  console.error("stub-host: --id, --port and --state-dir are required");
  process.exit(2);
}
const mode = values["stub-fail"].map((f) => f.split(":")).find(([who]) => who === id)?.[1] ?? "normal";

mkdirSync(join(stateDir, "stub-pids"), { recursive: true });
writeFileSync(join(stateDir, "stub-pids", `${id}.pid`), String(process.pid));
console.log(`stub-host ${id} pid ${process.pid} mode ${mode}`);

if (mode === "exit") {
  console.error(`stub-host ${id}: failing on purpose (exit 3)`);
  process.exit(3);
}

const server = createServer((socket) => socket.end(`${id}\n`));
await new Promise((resolve, reject) => {
  server.once("error", reject);
  server.listen(Number(values.port), "127.0.0.1", resolve);
});
const address = `127.0.0.1:${server.address().port}`;

if (mode === "ignore-term") process.on("SIGTERM", () => console.log(`stub-host ${id}: ignoring SIGTERM`));
else {
  process.once("SIGTERM", () => {
    console.log(`stub-host ${id}: SIGTERM, exiting`);
    server.close();
    process.exit(0);
  });
}

if (mode !== "never-register") {
  const store = openStore(values.store, stateDir);
  await store.put(`hosts/${id}`, { id, address, pid: process.pid, started_at_ms: Date.now() });
  await store.close();
  console.log(`stub-host ${id}: registered ${address}`);
} else {
  console.log(`stub-host ${id}: listening on ${address}, not registering`);
}
