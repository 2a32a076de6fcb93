/**
 * A host's identity in the cluster is one process lifetime, not its name.
 *
 * The user names a host (`--id h1`); each start of a process with that name
 * claims the next generation of it in the coordination store
 * (`hostgen/<name>`, compare-and-swap) and takes part as `h1` the first time
 * and `h1.2`, `h1.3`, ... after that. Why: a group's record names the hosts
 * it declared failed, and a host declared failed never takes part in that
 * group again (its old incarnation may still be paused somewhere, holding
 * stale replicas). A restarted host with an empty state is a different
 * participant; under a fresh identity it rejoins, and the hosts place new
 * replicas on it, while frames of the old process (same name, old
 * generation) stay refused.
 */
import type { CoordinationStore } from "../store/store.js";

/** A host name as the user gives it: generation suffixes (`.<n>`) are the cluster's to add. */
export const HOST_NAME_RE = /^[a-z0-9][a-z0-9_-]*$/;
/** A host identity as hosts and records use it: a name, and `.<generation>` from the second start on. */
export const HOST_ID_RE = /^[a-z0-9][a-z0-9_-]*(\.[1-9][0-9]*)?$/;

export const hostGenerationKey = (name: string) => `hostgen/${name}`;

/** Claims attempts before giving up (each lost race means another process with this name started at the same time). */
const CLAIM_ATTEMPTS_MAX = 20;

/** The identity of generation `generation` of host `name`. */
export function hostInstanceId(name: string, generation: number): string {
  return generation <= 1 ? name : `${name}.${generation}`;
}

/** The name an identity belongs to (`h1.3` → `h1`). */
export function hostNameOf(id: string): string {
  const dot = id.indexOf(".");
  return dot < 0 ? id : id.slice(0, dot);
}

/** Claims the next generation of `name`; returns the identity this process takes part as. */
export async function claimHostInstance(store: CoordinationStore, name: string): Promise<string> {
  if (!HOST_NAME_RE.test(name)) throw new Error(`host id ${JSON.stringify(name)} must match ${HOST_NAME_RE.source} (lower case letters, digits, _ and -)`);
  const key = hostGenerationKey(name);
  for (let attempt = 0; attempt < CLAIM_ATTEMPTS_MAX; attempt++) {
    const current = await store.get<number>(key);
    const generation = (current && Number.isSafeInteger(current.value) && current.value >= 1 ? current.value : 0) + 1;
    if ((await store.cas(key, current?.version ?? 0, generation)) !== null) return hostInstanceId(name, generation);
  }
  throw new Error(`host ${name}: could not claim a generation in ${CLAIM_ATTEMPTS_MAX} attempts (other processes with this id keep starting?)`);
}
