/**
 * Commands that run or talk to a cluster: host, up, down, deploy, status,
 * logs, demo. The ones that talk to a running cluster (deploy, status, logs)
 * find it through <state dir>/cluster.json, or through `--host` (any host's
 * address) with the CLI's credential from `--credentials` (or `--insecure`).
 */
import { type Command, InvalidArgumentError } from "commander";
import { readFile } from "node:fs/promises";
import { resolve } from "node:path";
import { defaultStateDir, down, up } from "../cluster/local-cluster.js";
import { loadManifest } from "../cluster/manifest.js";
import { DETECT_MS_MIN, heartbeatFor, Host, HOST_DEFAULTS } from "../host/host.js";
import { openStore, parseStoreSpec, STORE_DEFAULT } from "../store/open.js";
import { LEASE_TTL_MS_MIN } from "../store/store.js";
import { clusterAt, clusterOrFail, type ClusterAccess, LogFollower, readLog, requestAny } from "./client.js";
import { splitAddress } from "../host/connection.js";
import { HostProcess } from "../host/lifecycle.js";
import { pino } from "pino";
import type { ReleasedRecord } from "../core/frames.js";
import { hostCommand, runDemo } from "./demo.js";
import { ADMIN_NAME, readTlsMaterial, tlsDirFiles, TlsMaterialError } from "../tls/context.js";

const int = (name: string) => (value: string) => {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError(`${name} must be a non-negative integer`);
  return n;
};
const atLeast = (name: string, min: number) => (value: string) => {
  const n = int(name)(value);
  if (n < min) throw new InvalidArgumentError(`${name} must be at least ${min}`);
  return n;
};

/** Addresses of `--host` (or $COHORT_HOST): host:port, separated by commas. */
function addressList(value: string, what: string): string[] {
  const addresses = value.split(",").map((a) => a.trim()).filter((a) => a !== "");
  for (const a of addresses) {
    try {
      splitAddress(a);
    } catch {
      throw new InvalidArgumentError(`${what}: ${JSON.stringify(a)} is not an address (want host:port, e.g. 10.0.0.11:7400)`);
    }
  }
  return addresses;
}

/** The options of a command that talks to a running cluster (deploy, status, logs). */
interface ClusterTargetOptions {
  stateDir?: string;
  host?: string[];
  credentials?: string;
  insecure?: boolean;
}

/**
 * The cluster a command talks to: with `--host` (or $COHORT_HOST), the one
 * the first host that answers at those addresses describes, dialed with the
 * credential in `--credentials` (or $COHORT_CREDENTIALS), or plain TCP with
 * `--insecure`; else the one <state dir>/cluster.json names.
 */
async function clusterOf(opts: ClusterTargetOptions, state_dir: string): Promise<ClusterAccess> {
  const hosts = opts.host ?? addressList(process.env.COHORT_HOST ?? "", "$COHORT_HOST");
  if (hosts.length === 0) {
    if (opts.credentials !== undefined || opts.insecure) throw new InvalidArgumentError("--credentials and --insecure go with --host (without it, the cluster and its credential come from cluster.json)");
    return clusterOrFail(state_dir);
  }
  if (opts.credentials !== undefined && opts.insecure) throw new InvalidArgumentError("give either --credentials or --insecure, not both");
  const credentials = opts.insecure ? null : (opts.credentials ?? (process.env.COHORT_CREDENTIALS || null));
  if (credentials === null && !opts.insecure) {
    throw new InvalidArgumentError(
      "--host needs the CLI's credential: give --credentials <dir> (or $COHORT_CREDENTIALS) holding ca.crt, admin.crt and admin.key " +
        "(`cohort ca issue admin --dir <dir>` makes them), or --insecure for hosts started --insecure",
    );
  }
  if (credentials === null) return clusterAt(hosts, null);
  const dir = resolve(credentials);
  try {
    return await clusterAt(hosts, tlsDirFiles(dir, ADMIN_NAME));
  } catch (error) {
    if (error instanceof TlsMaterialError) throw new Error(`the credential in ${dir} cannot be used: ${error.message}`, { cause: error });
    throw error;
  }
}

export function registerClusterCommands(program: Command): void {
  const stateOption = (c: Command) => c.option("--state-dir <dir>", "cluster state directory (default: $COHORT_STATE_DIR or ./.cohort)");
  const stateDir = (opts: { stateDir?: string }) => resolve(opts.stateDir ?? defaultStateDir());
  const storeOption = (c: Command) =>
    c.option(
      "--store <store>",
      "coordination store: embedded (files in the state directory, one machine) or etcd://host:port[,host:port...][/prefix] (default: $COHORT_STORE or embedded)",
      (value: string) => {
        try {
          parseStoreSpec(value);
        } catch (error) {
          throw new InvalidArgumentError((error as Error).message);
        }
        return value;
      },
    );
  const storeOf = (opts: { store?: string }) => opts.store ?? (process.env.COHORT_STORE || STORE_DEFAULT);
  const targetOptions = (c: Command) =>
    stateOption(c)
      .option(
        "--host <address>",
        "host:port of any host of the cluster, instead of <state dir>/cluster.json: the first that answers names the others " +
          "(repeat it or separate addresses by commas; default: $COHORT_HOST)",
        (value: string, previous: string[] | undefined) => {
          const addresses = addressList(value, "--host");
          if (addresses.length === 0) throw new InvalidArgumentError("--host: no address given (want host:port)");
          return [...(previous ?? []), ...addresses];
        },
      )
      .option(
        "--credentials <dir>",
        "with --host: the CLI's credential, <dir>/ca.crt (the cluster CA), <dir>/admin.crt and <dir>/admin.key, as `cohort ca issue admin --dir <dir>` makes them (default: $COHORT_CREDENTIALS)",
      )
      .option("--insecure", "with --host: plain TCP, no authentication, for hosts started --insecure");

  storeOption(stateOption(
    program
      .command("host")
      .description("run one host daemon (normally started by `cohort up`)")
      .requiredOption("--id <id>", "host id, e.g. h1 (a restarted host takes part as h1.2, h1.3, ...: a new participant)")
      .option("--listen <address>", "address to listen on", "127.0.0.1")
      .option("--port <port>", "TCP port for peer traffic, and the UDP port of the same number for heartbeats (0 = any free pair)", int("--port"), 0)
      .option("--heartbeat-ms <ms>", `interval between heartbeats to each peer (default: ${HOST_DEFAULTS.heartbeat_ms}, or a third of a shorter --detect-ms)`, int("--heartbeat-ms"))
      .option("--detect-ms <ms>", `a peer silent this long is considered failed (>= ${DETECT_MS_MIN})`, atLeast("--detect-ms", DETECT_MS_MIN), HOST_DEFAULTS.detect_ms)
      .option("--lease-ms <ms>", "TTL of the lease this host's registration lives by (>= 1000; etcd rounds up to whole seconds): a host that cannot renew it for this long (the store away, or the host cut off) stops its replicas and rejoins as a fresh host", atLeast("--lease-ms", LEASE_TTL_MS_MIN), HOST_DEFAULTS.lease_ms)
      .option("--record-core-events <dir>", "record each group core's events and actions in <dir> for `cohort sim --replay-recording` (default: $COHORT_RECORD_CORE_EVENTS; off)")
      .option(
        "--tls-dir <dir>",
        "mutual TLS on the host port and the VMs' message paths with <dir>/ca.crt (the cluster CA), <dir>/<id>.crt and <dir>/<id>.key " +
          "(`cohort ca issue <id> --dir <dir>`; `cohort up` passes <state dir>/tls); peers without a certificate from that CA are refused",
      )
      .option("--insecure", "plain TCP, no authentication: anyone who reaches the port is a peer (one of --tls-dir and --insecure is required)")
      .addHelpText("after", "\nA host refuses to start without --tls-dir or --insecure."),
  )).action(async (opts: { id: string; listen: string; port: number; heartbeatMs?: number; detectMs: number; leaseMs: number; recordCoreEvents?: string; stateDir?: string; store?: string; tlsDir?: string; insecure?: boolean }) => {
    const state_dir = stateDir(opts);
    const record_dir = opts.recordCoreEvents ?? process.env.COHORT_RECORD_CORE_EVENTS ?? null;
    if (opts.tlsDir !== undefined && opts.insecure) throw new InvalidArgumentError("give either --tls-dir or --insecure, not both");
    if (opts.tlsDir === undefined && !opts.insecure) throw new InvalidArgumentError("no TLS material: give --tls-dir <dir> (ca.crt, <id>.crt, <id>.key) or, to run unauthenticated, --insecure");
    // The certificate names the host (h1); a restart takes part as h1.2, ... under the same certificate.
    const tls = opts.tlsDir !== undefined ? readTlsMaterial(tlsDirFiles(resolve(opts.tlsDir), opts.id), opts.id) : null;
    // Each start is a new participant: `h1` the first time, `h1.2` after a restart, or after this
    // process's instance retired and it rejoined as a fresh host (src/host/instance.ts, lifecycle.ts).
    const log = pino({ base: { host: opts.id } });
    const hostProcess = new HostProcess({
      name: opts.id,
      openStore: () => openStore(storeOf(opts), state_dir),
      makeHost: (id, store) =>
        new Host({ id, listen_host: opts.listen, port: opts.port, state_dir, heartbeat_ms: opts.heartbeatMs ?? heartbeatFor(opts.detectMs), detect_ms: opts.detectMs, lease_ms: opts.leaseMs, record_dir, tls }, store),
      log,
    });
    const shutdown = (signal: string) => {
      log.info({ signal }, "shutting down");
      hostProcess.stop().then(
        () => process.exit(0),
        () => process.exit(1),
      );
    };
    process.once("SIGTERM", () => shutdown("SIGTERM"));
    process.once("SIGINT", () => shutdown("SIGINT"));
    // Fault injection (tests of the failure detector): with $COHORT_FAULT_BLOCK_MAIN_MS set, SIGUSR2 holds
    // this process's main thread busy that long, a wedged main loop, while its other threads run on.
    const block_ms = Number(process.env.COHORT_FAULT_BLOCK_MAIN_MS ?? 0);
    if (block_ms > 0) {
      process.on("SIGUSR2", () => {
        log.warn({ block_ms }, "fault injection: the main thread is held busy");
        const end = Date.now() + block_ms;
        while (Date.now() < end) {
          // busy on purpose
        }
      });
    }
    await hostProcess.start();
  });

  storeOption(stateOption(
    program
      .command("up")
      .description(
        "start a local cluster of host processes on loopback; returns once they are ready. Hosts, their VMs and the CLI authenticate each other " +
          "with mutual TLS: the cluster CA and host certificates are made in <state dir>/tls, the CLI's credential (admin.crt, admin.key) beside cluster.json",
      )
      .option("--hosts <n>", "number of hosts", int("--hosts"), 3)
      .option("--detect-ms <ms>", `failure detection timeout of each host (>= ${DETECT_MS_MIN})`, atLeast("--detect-ms", DETECT_MS_MIN), HOST_DEFAULTS.detect_ms)
      .option("--json", "print the cluster as JSON"),
  )).action(async (opts: { hosts: number; detectMs: number; json?: boolean; stateDir?: string; store?: string }) => {
    const cluster = await up({ hosts: opts.hosts, state_dir: stateDir(opts), host_command: hostCommand(), extra_args: ["--detect-ms", String(opts.detectMs)], store: storeOf(opts) });
    if (opts.json) console.log(JSON.stringify(cluster));
    else for (const h of cluster.hosts) console.log(`${h.id}  ${h.address}  pid ${h.pid}`);
  });

  stateOption(program.command("down").description("stop exactly the host processes `cohort up` started (by pid)")).action(async (opts: { stateDir?: string }) => {
    const result = await down({ state_dir: stateDir(opts) });
    console.log(`stopped ${result.stopped.length} host(s)${result.already_gone.length ? `, ${result.already_gone.length} already gone` : ""}`);
  });

  targetOptions(
    program
      .command("deploy")
      .description("deploy a group from a YAML or JSON manifest")
      .argument("<manifest>", "manifest file")
      .option("--json", "print the placement as JSON"),
  ).action(async (file: string, opts: { json?: boolean } & ClusterTargetOptions) => {
    const manifest = await loadManifest(file);
    const cluster = await clusterOf(opts, stateDir(opts));
    const result = await requestAny(cluster, "deploy", { manifest }, new Uint8Array(await readFile(manifest.module)));
    if (opts.json) console.log(JSON.stringify(result));
    else for (const vm of result.vms) console.log(`${vm.vm}  primary ${vm.primary}  backup ${vm.backup ?? "-"}  mode ${vm.mode}`);
  });

  targetOptions(program.command("status").description("hosts, groups, VMs and where each replica is").option("--json", "print JSON")).action(
    async (opts: { json?: boolean } & ClusterTargetOptions) => {
      const cluster = await clusterOf(opts, stateDir(opts));
      const { groups, vms, hosts: registered } = await requestAny(cluster, "records", {});
      // The hosts `cohort up` started (or registered when --host was asked), and the ones registered since
      // (a host restarted as h2.2, or started by hand).
      const known = [...cluster.hosts, ...registered.filter((r) => !cluster.hosts.some((h) => h.id === r.id)).map((r) => ({ id: r.id, address: r.address, pid: r.pid }))];
      const hosts = await Promise.all(
        known.map(async (h) => {
          try {
            return { ...h, up: true, status: await requestAny(cluster, "status", {}, undefined, h.id) };
          } catch {
            return { ...h, up: false, status: null };
          }
        }),
      );
      // Frames refused and replica steps failed, summed over the hosts that answered (src/host/api.ts HostStatus).
      const ofGroup = (group: string) => hosts.flatMap((h) => h.status?.groups.filter((s) => s.group === group) ?? []);
      const report = {
        hosts: hosts.map((h) => ({ id: h.id, address: h.address, pid: h.pid, up: h.up, lease: h.status?.lease ?? null, group_frames_refused: h.status?.group_frames_refused ?? null, main_loop: h.status?.main_loop ?? null })),
        groups: groups.map((g) => ({
          group: g.group,
          mode: g.mode,
          refused: ofGroup(g.group).reduce((n, s) => n + s.refused, 0),
          steps_failed: ofGroup(g.group).reduce((n, s) => n + s.steps_failed, 0),
          vms: vms
            .filter((v) => v.group === g.group)
            .map((v) => {
              const primary = hosts.find((h) => h.id === v.primary)?.status?.primaries.find((p) => p.vm === v.vm);
              const healthy = !!primary?.protected || v.mode === "none";
              return {
                vm: v.vm,
                primary: v.primary,
                backup: primary?.backup ?? v.backup,
                incarnation: v.incarnation,
                epoch: primary?.epoch ?? null,
                committed: primary?.committed ?? null,
                released_seq: primary?.released_seq ?? null,
                health: primary ? (healthy ? "healthy" : "degraded") : "unreachable",
              };
            }),
        })),
      };
      if (opts.json) {
        console.log(JSON.stringify(report));
        return;
      }
      console.log("HOSTS");
      const lease = (l: { ttl_ms: number; renewed_ms_ago: number } | null) => (l ? `lease ${l.ttl_ms} ms, renewed ${l.renewed_ms_ago} ms ago` : "no lease");
      for (const h of report.hosts) console.log(`  ${h.id}  ${h.address}  pid ${h.pid}  ${h.up ? `up  ${lease(h.lease)}  group frames refused ${h.group_frames_refused}  main loop late max ${h.main_loop?.delay_ms_max ?? "?"} ms` : "DOWN"}`);
      for (const g of report.groups) {
        console.log(`GROUP ${g.group} (mode ${g.mode})  frames refused ${g.refused}  steps failed ${g.steps_failed}`);
        for (const v of g.vms) {
          console.log(`  ${v.vm}  primary ${v.primary}  backup ${v.backup ?? "-"}  epoch ${v.epoch ?? "?"}  committed ${v.committed ?? "?"}  incarnation ${v.incarnation}  ${v.health}`);
        }
      }
    },
  );

  targetOptions(
    program
      .command("logs")
      .description("show a VM's released output (only output whose checkpoint committed)")
      .argument("<vm>", "VM name, e.g. ticker-0")
      .option("--follow", "keep following, across failovers")
      .option("--from <seq>", "first output sequence number", int("--from"), 1),
  ).action(async (vm: string, opts: { follow?: boolean; from: number } & ClusterTargetOptions) => {
    const cluster = await clusterOf(opts, stateDir(opts));
    const print = (r: ReleasedRecord) => process.stdout.write(r.text.endsWith("\n") ? r.text : `${r.text}\n`);
    if (!opts.follow) {
      // One pass: what the primary has now, page by page, then stop.
      await readLog(cluster, vm, opts.from, (records) => records.forEach(print));
      return;
    }
    const follower = new LogFollower(cluster, vm, opts.from, print, (line) => console.error(line));
    process.once("SIGINT", () => follower.stop());
    await follower.run();
  });

  storeOption(program
    .command("demo"))
    .description("start a 3-host local cluster, deploy a guest, kill -9 a host holding primaries, check the released output")
    .option("--scenario <name>", "ticker (one VM, vm mode) or bank (4 VMs, group mode)", "ticker")
    .option("--hosts <n>", "hosts in the cluster", int("--hosts"), 3)
    .option("--detect-ms <ms>", `failure detection timeout (>= ${DETECT_MS_MIN})`, atLeast("--detect-ms", DETECT_MS_MIN), HOST_DEFAULTS.detect_ms)
    .option("--json", "print one JSON object")
    .action(async (opts: { scenario: string; hosts: number; detectMs: number; json?: boolean; store?: string }) => {
      if (opts.scenario === "bank") return bankDemo({ ...opts, store: storeOf(opts) });
      if (opts.scenario !== "ticker") throw new InvalidArgumentError(`unknown scenario ${opts.scenario} (available: ticker, bank)`);
      const report = await runDemo(
        { scenario: "ticker", hosts: opts.hosts, run_before_kill_ms: 1500, run_after_kill_ms: 1500, detect_ms: opts.detectMs, interval_ms: 20, store: storeOf(opts) },
        (line) => {
          if (!opts.json) console.log(line);
        },
      );
      if (opts.json) console.log(JSON.stringify(report));
      else {
        console.log(`released ${report.released} outputs; lost ${report.lost}, duplicated ${report.duplicated}; failover ${report.failover_ms} ms (detection timeout ${report.detect_ms} ms)`);
        console.log(`release latency (produced → released): p50 ${report.release_latency_ms_p50} ms, p99 ${report.release_latency_ms_p99} ms (adaptive epochs, interval ${report.interval_ms} ms)`);
        for (const [check, ok] of Object.entries(report.checks)) console.log(`  ${ok ? "ok  " : "FAIL"} ${check}`);
      }
      if (!Object.values(report.checks).every(Boolean)) process.exitCode = 1;
    });
}

async function bankDemo(opts: { hosts: number; detectMs: number; json?: boolean; store: string }): Promise<void> {
  const { runBankDemo } = await import("./demo-bank.js");
  const report = await runBankDemo({ hosts: opts.hosts, size: 4, run_before_kill_ms: 1500, run_after_kill_ms: 2000, detect_ms: opts.detectMs, store: opts.store }, (line) => {
    if (!opts.json) console.log(line);
  });
  if (opts.json) console.log(JSON.stringify(report));
  else {
    console.log(`released ${report.released} lines over ${report.size} ranks; lost rounds ${report.lost}, repeated rounds ${report.duplicated}; failover ${report.failover_ms} ms (detection timeout ${report.detect_ms} ms)`);
    console.log(`ranks promoted ${report.promoted.join(", ")}; rolled back in place ${report.survived.join(", ")}`);
    for (const [check, ok] of Object.entries(report.checks)) console.log(`  ${ok ? "ok  " : "FAIL"} ${check}`);
  }
  if (!Object.values(report.checks).every(Boolean)) process.exitCode = 1;
}
