/**
 * Which coordination store a host or a command uses, from one string (the
 * `--store` option, kept in a local cluster's cluster.json):
 *
 *   embedded                                  files in the state directory (default; one machine)
 *   etcd://host:port[,host:port...][/prefix]  etcd v3 members; keys under `prefix/` (default "cohort")
 *
 * e.g. `etcd://10.0.0.5:2379,10.0.0.6:2379/prod`. Anything else is refused
 * with a message that says what is accepted.
 */
import { EmbeddedStore } from "./embedded.js";
import { ETCD_STORE_DEFAULTS, EtcdStore } from "./etcd.js";
import type { CoordinationStore } from "./store.js";

export const STORE_DEFAULT = "embedded";

export type StoreSpec = { kind: "embedded" } | { kind: "etcd"; endpoints: string[]; prefix: string };

export class StoreSpecError extends Error {
  override name = "StoreSpecError";
}

const ACCEPTED = "expected `embedded` or `etcd://host:port[,host:port...][/prefix]`";
const ENDPOINT_RE = /^([a-zA-Z0-9.-]+|\[[0-9a-fA-F:]+\]):(\d{1,5})$/;
const PREFIX_RE = /^[a-zA-Z0-9][a-zA-Z0-9_.-]*(\/[a-zA-Z0-9][a-zA-Z0-9_.-]*)*$/;

/** Parses a store string; throws StoreSpecError naming what is wrong. */
export function parseStoreSpec(text: string): StoreSpec {
  if (text === "embedded") return { kind: "embedded" };
  if (!text.startsWith("etcd://")) throw new StoreSpecError(`store ${JSON.stringify(text)}: ${ACCEPTED}`);
  const rest = text.slice("etcd://".length);
  const slash = rest.indexOf("/");
  const hosts = slash < 0 ? rest : rest.slice(0, slash);
  const prefix = slash < 0 ? ETCD_STORE_DEFAULTS.prefix.slice(0, -1) : rest.slice(slash + 1);
  const endpoints = hosts.split(",");
  for (const e of endpoints) {
    const m = ENDPOINT_RE.exec(e);
    if (!m || Number(m[2]) < 1 || Number(m[2]) > 65535) throw new StoreSpecError(`store ${JSON.stringify(text)}: endpoint ${JSON.stringify(e)} is not host:port (${ACCEPTED})`);
  }
  if (!PREFIX_RE.test(prefix)) throw new StoreSpecError(`store ${JSON.stringify(text)}: prefix ${JSON.stringify(prefix)} must be path segments of letters, digits, _ . - (${ACCEPTED})`);
  return { kind: "etcd", endpoints, prefix: `${prefix}/` };
}

/**
 * The same store with keys under a further prefix segment `segment` (etcd), so
 * a demo or a test never sees another cluster's state in a shared etcd; an
 * embedded store is per state directory already and is returned as it is.
 */
export function withPrefixSegment(spec: string, segment: string): string {
  const s = parseStoreSpec(spec);
  if (s.kind === "embedded") return spec;
  return `etcd://${s.endpoints.join(",")}/${s.prefix}${segment}`;
}

/** The store a spec names; `state_dir` holds the embedded store's files. */
export function openStore(spec: string | StoreSpec, state_dir: string): CoordinationStore {
  const s = typeof spec === "string" ? parseStoreSpec(spec) : spec;
  return s.kind === "embedded" ? new EmbeddedStore(state_dir) : new EtcdStore({ endpoints: s.endpoints, prefix: s.prefix });
}
