/**
 * Local clusters for multi-process tests: real `cohort host` processes on
 * loopback, each test's cluster stopped (by pid) and its state directory
 * removed by `stopClusters` in afterEach. A timed-out wait prints the hosts'
 * logs, which go with the state directory.
 */
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { down, up, type ClusterFile } from "../../src/cluster/local-cluster.js";
import { openStore } from "../../src/store/open.js";
import type { CoordinationStore } from "../../src/store/store.js";
import { sleep } from "../../src/cli/client.js";
import { hostCommand } from "../../src/cli/demo.js";

const clusters: string[] = [];

/** What a bank demo's report says when its failover kept every promise (src/cli/demo-bank.ts). */
export const BANK_CHECKS_ALL_TRUE = {
  total_conserved: true,
  no_duplicate_transfer: true,
  rounds_contiguous: true,
  resumed_after_kill: true,
  new_primary_elsewhere: true,
  memory_moved_only_for_lost_replicas: true,
  processes_cleaned_up: true,
};

/**
 * `store`: the hosts' coordination store (src/store/open.ts), embedded unless a test names an etcd.
 * `tls`: false starts the hosts `--insecure` (plain TCP); mutual TLS by default, as `cohort up` does.
 */
export async function startCluster(hosts: number, detect_ms: number, store = "embedded", options: { tls?: boolean } = {}): Promise<{ dir: string; cluster: ClusterFile; store: CoordinationStore }> {
  const dir = await mkdtemp(join(tmpdir(), "cohort-it-"));
  clusters.push(dir);
  const c = await up({ hosts, state_dir: dir, host_command: hostCommand(), extra_args: ["--detect-ms", String(detect_ms)], store, tls: options.tls ?? true });
  await sleep(3 * detect_ms); // hosts see each other's heartbeats before placement
  return { dir, cluster: c, store: openStore(store, dir) };
}

export async function stopClusters(): Promise<void> {
  for (const dir of clusters.splice(0)) {
    await down({ state_dir: dir }).catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  }
}

export async function waitFor(cond: () => boolean | Promise<boolean>, timeout_ms: number, what: string): Promise<void> {
  const until = Date.now() + timeout_ms;
  while (!(await cond())) {
    if (Date.now() > until) {
      // The hosts' logs are deleted with the state directory after the test: show them now.
      for (const dir of clusters) console.error(await hostLogs(dir));
      throw new Error(`timed out after ${timeout_ms} ms waiting for ${what}`);
    }
    await sleep(20);
  }
}

async function hostLogs(dir: string): Promise<string> {
  const files = await readdir(join(dir, "logs")).catch(() => [] as string[]);
  const parts = await Promise.all(files.map(async (f) => `== ${f}\n${(await readFile(join(dir, "logs", f), "utf8")).split("\n").slice(-80).join("\n")}`));
  return parts.join("\n");
}
