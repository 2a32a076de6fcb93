/**
 * What a coordination store sustains, for sizing a cluster:
 * the rate and latency of the operations Cohort's control plane makes, with
 * `concurrency` of them in flight, as many hosts would keep them.
 *
 * - put: a VM record written after a deploy or a failover (one per VM);
 * - cas: the failover decision (a read, then a compare-and-swap of the
 *   group's record), each client on its own key, so none conflicts;
 * - keepalive: a host's registration lease renewed (one per host per tenth
 *   of its TTL);
 * - list: `list` of a prefix holding `list_keys` records (a host re-reading
 *   the registrations, `cohort status`).
 *
 * Everything is written under `bench/store-<nonce>/` and removed, leases
 * revoked, before the report returns; the store is any the hosts take
 * (`--store`), e.g. a real etcd.
 */
import { randomBytes } from "node:crypto";
import type { CoordinationStore, Lease } from "../store/store.js";
import { percentileOfSorted, round } from "../util/stats.js";

export interface StoreBenchOptions {
  store: CoordinationStore;
  /** What the store is, for the report ("embedded", "etcd://127.0.0.1:2379"). */
  store_name: string;
  measure_ms: number;
  concurrency: number;
  /** Records under the listed prefix. */
  list_keys: number;
  progress: (line: string) => void;
}

export interface StoreOpResult {
  ops_per_s: number;
  ops: number;
  latency_ms_p50: number;
  latency_ms_p99: number;
}

export interface StoreBenchReport {
  bench: "store";
  store: string;
  measure_ms: number;
  concurrency: number;
  list_keys: number;
  results: { put: StoreOpResult; cas: StoreOpResult; keepalive: StoreOpResult; list: StoreOpResult };
}

/** A VM record's size, about: what each put and cas writes. */
const VALUE = { vm: "bank-17", group: "bank", rank: 17, mode: "group", primary: "h3", backup: "h4", incarnation: 12, health: "healthy", padding: "x".repeat(200) };
/** Lease TTL of the keepalive phase: the hosts' default registration lease. */
const LEASE_TTL_MS = 10_000;

/** Runs `op` in `concurrency` loops for `measure_ms`; every call's latency is kept. */
async function measure(measure_ms: number, concurrency: number, op: (worker: number, i: number) => Promise<unknown>): Promise<StoreOpResult> {
  const latencies: number[] = [];
  const start = performance.now();
  const until = start + measure_ms;
  await Promise.all(
    Array.from({ length: concurrency }, async (_, worker) => {
      for (let i = 0; performance.now() < until; i++) {
        const t = performance.now();
        await op(worker, i);
        latencies.push(performance.now() - t);
      }
    }),
  );
  const seconds = (performance.now() - start) / 1000;
  latencies.sort((a, b) => a - b);
  return {
    ops_per_s: round(latencies.length / seconds, 1),
    ops: latencies.length,
    latency_ms_p50: round(percentileOfSorted(latencies, 0.5), 2),
    latency_ms_p99: round(percentileOfSorted(latencies, 0.99), 2),
  };
}

export async function runStoreBench(options: StoreBenchOptions): Promise<StoreBenchReport> {
  const { store, measure_ms, concurrency, list_keys } = options;
  if (!(measure_ms > 0)) throw new RangeError(`measure_ms must be > 0, got ${measure_ms}`);
  if (!Number.isInteger(concurrency) || concurrency < 1) throw new RangeError(`concurrency must be a positive integer, got ${concurrency}`);
  if (!Number.isInteger(list_keys) || list_keys < 1) throw new RangeError(`list_keys must be a positive integer, got ${list_keys}`);
  const base = `bench/store-${randomBytes(4).toString("hex")}`;
  const leases: Lease[] = [];
  try {
    options.progress(`put: ${concurrency} writers, ${measure_ms} ms`);
    const put = await measure(measure_ms, concurrency, (w, i) => store.put(`${base}/put/${w}/${i % 16}`, VALUE));

    options.progress(`cas: ${concurrency} clients, each a get then a compare-and-swap of its own key`);
    const cas = await measure(measure_ms, concurrency, async (w) => {
      const key = `${base}/cas/${w}`;
      const current = await store.get<typeof VALUE>(key);
      const version = await store.cas(key, current?.version ?? 0, { ...VALUE, incarnation: (current?.value.incarnation ?? 0) + 1 });
      if (version === null) throw new Error(`cas on ${key} conflicted, but only one client writes it`);
    });

    options.progress(`keepalive: ${concurrency} leases renewed`);
    for (let w = 0; w < concurrency; w++) leases.push(await store.grantLease(LEASE_TTL_MS));
    const keepalive = await measure(measure_ms, concurrency, (w) => leases[w].keepAlive());

    options.progress(`list: a prefix of ${list_keys} records, ${concurrency} readers`);
    for (let k = 0; k < list_keys; k++) await store.put(`${base}/list/${String(k).padStart(6, "0")}`, VALUE);
    const list = await measure(measure_ms, concurrency, async () => {
      const found = await store.list(`${base}/list/`);
      if (found.length !== list_keys) throw new Error(`list found ${found.length} records, ${list_keys} were written`);
    });

    return { bench: "store", store: options.store_name, measure_ms, concurrency, list_keys, results: { put, cas, keepalive, list } };
  } finally {
    options.progress("removing what the benchmark wrote");
    for (const lease of leases) await lease.revoke().catch(() => undefined);
    for (const { key } of await store.list(`${base}/`)) await store.delete(key);
  }
}
