/**
 * One `cohort host` process runs a sequence of host instances (identities,
 * src/host/instance.ts): it claims an identity, runs a Host under it, and
 * when that instance retires (its registration's lease lapsed, or every
 * group it held declared it failed: `Host.retired`) it stops everything of
 * it (VM threads, connections, its port), then claims the next identity and
 * starts again, empty: a fresh host, which the cluster places new replicas
 * on. A host cut off by a partition thus rejoins once the partition heals,
 * with no operator and no process restart; what it held before is never
 * released again, because the old identity's frames stay refused.
 */
import type { Logger } from "pino";
import type { CoordinationStore } from "../store/store.js";
import type { Host } from "./host.js";
import { claimHostInstance } from "./instance.js";

/** Between attempts to start the next instance while the store (or the port) is not there yet. */
const RESTART_RETRY_MS = 1000;

export interface HostProcessOptions {
  /** The host's name (`--id`); instances take part as name, name.2, ... */
  name: string;
  /** A new connection to the coordination store (each instance has its own: stopping a host closes it). */
  openStore(): CoordinationStore;
  /** The Host of identity `id` (not started). */
  makeHost(id: string, store: CoordinationStore): Host;
  log: Logger;
}

export class HostProcess {
  private current: Host | null = null;
  private stopping = false;
  private wake: (() => void) | null = null;
  private finished: Promise<void> | null = null;

  constructor(private readonly options: HostProcessOptions) {}

  /** The instance running now (null between two). */
  get host(): Host | null {
    return this.current;
  }

  /**
   * Starts the first instance (its failure is the caller's: a port in use,
   * no store) and returns once it is listening; the next instances follow in
   * the background until `stop`.
   */
  async start(): Promise<Host> {
    const first = await this.startInstance();
    this.finished = this.follow(first);
    return first;
  }

  async stop(): Promise<void> {
    this.stopping = true;
    this.wake?.();
    await this.current?.stop();
    await this.finished;
  }

  private async startInstance(): Promise<Host> {
    const store = this.options.openStore();
    try {
      const id = await claimHostInstance(store, this.options.name);
      const host = this.options.makeHost(id, store);
      this.current = host;
      await host.start();
      return host;
    } catch (error) {
      this.current = null;
      await store.close().catch(() => undefined);
      throw error;
    }
  }

  private async follow(first: Host): Promise<void> {
    let host: Host | null = first;
    while (!this.stopping) {
      if (host) {
        const reason = await Promise.race([host.retired, new Promise<null>((resolve) => (this.wake = () => resolve(null)))]);
        if (reason === null) return; // stopping: stop() stops the instance
        this.current = null;
        await host.stop();
        this.options.log.warn({ reason, instance: host.id }, "host instance stopped; starting a fresh one");
        host = null;
      }
      try {
        host = await this.startInstance();
        this.options.log.info({ instance: host.id }, "rejoined the cluster as a fresh host");
      } catch (error) {
        this.options.log.warn({ err: error }, `a fresh host instance could not start; trying again in ${RESTART_RETRY_MS} ms`);
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, RESTART_RETRY_MS);
          this.wake = () => {
            clearTimeout(timer);
            resolve();
          };
        });
      }
    }
    if (host && this.current === host) await host.stop(); // stopped while it was starting
  }
}
