/**
 * A cluster of hosts inside this process: one GroupTable per host, GROUP
 * frames handed over in order (a turn of the event loop later, like TCP),
 * the coordination store in memory, liveness set by the caller. Every group
 * runs through the same core and driver as in the daemon; only the
 * transport and the failure detector are stand-ins. `cohort run` uses it to
 * protect one VM without starting host processes.
 */
import { pino, type Logger } from "pino";
import { parseFrame, type GroupFrame } from "../../core/frames.js";
import type { Notice } from "../../core/events.js";
import type { ProtectionRecord } from "../../core/types.js";
import type { GuestBundle } from "../../vm/protocol.js";
import { MemoryStore } from "../../store/memory.js";
import type { GroupHostApi } from "./driver.js";
import { GroupTable } from "./table.js";
import { startGroup } from "./start.js";

/** Stands for the failure detector's timeout, which an in-process cluster does not have. */
const IN_PROCESS_DETECT_MS = 100;

export interface InProcessOptions {
  hosts: string[];
  /** The guest every group of this cluster runs (compiled once). */
  guest: GuestBundle;
  log?: Logger;
  /** Record every host's group cores in this directory (src/host/group/recorder.ts). */
  record_dir?: string;
  /** Called with every notice of every host's core (failover steps, commits, refusals). */
  onNotice?: (host: string, group: string, notice: Notice) => void;
}

export class InProcessCluster {
  readonly store = new MemoryStore();
  readonly tables = new Map<string, GroupTable>();
  private readonly live: Set<string>;
  private readonly log: Logger;

  constructor(private readonly options: InProcessOptions) {
    this.live = new Set(options.hosts);
    this.log = options.log ?? pino({ level: "warn" }, pino.destination(2));
    for (const id of options.hosts) this.tables.set(id, new GroupTable(this.api(id)));
  }

  private api(id: string): GroupHostApi {
    return {
      id,
      log: this.log.child({ host: id }),
      store: this.store,
      // Liveness changes are told to every host at once (`kill`); the core's back-off for hosts that
      // are not the first to propose is counted in multiples of this.
      detect_ms: IN_PROCESS_DETECT_MS,
      listen_host: "127.0.0.1",
      send: (to, frame, body, done) => this.deliver(id, to, frame, body, done),
      liveHosts: () => [...this.live].sort(),
      // A killed in-process host also leaves the registrations at once (as if its lease were revoked).
      heardHosts: () => [...this.live].sort(),
      registeredHosts: () => [...this.live].sort(),
      guestFor: async () => this.options.guest,
      record_dir: this.options.record_dir ?? null,
      onNotice: (group, notice) => this.options.onNotice?.(id, group, notice),
    };
  }

  private deliver(from: string, to: string, frame: GroupFrame, body?: Uint8Array, done?: () => void): void {
    // A copy, as the wire would make it: no host may see another's objects.
    const header: unknown = JSON.parse(JSON.stringify(frame));
    const bytes = body ? body.slice() : new Uint8Array(0);
    done?.();
    setImmediate(() => {
      if (!this.live.has(from) || !this.live.has(to)) return; // a dead host neither sends nor receives
      this.tables.get(to)?.dispatch(parseFrame(header), bytes);
    });
  }

  /** Deploys a group as `cohort deploy` does (startGroup): every host it names prepares its replicas, then they run. */
  async deploy(record: ProtectionRecord, module: Uint8Array): Promise<void> {
    const table = (h: string): GroupTable => {
      const t = this.tables.get(h);
      if (!t || !this.live.has(h)) throw new Error(`host ${h} is not live`);
      return t;
    };
    const lost = await startGroup(
      {
        store: this.store,
        self: null,
        liveHosts: () => [...this.live].sort(),
        // Compiled once, given (InProcessOptions.guest).
        loadModule: async () => undefined,
        calls: {
          prepare: async (h, r, body) => table(h).prepare(r, body),
          run: async (h, group, routes) => {
            const driver = table(h).get(group);
            if (!driver) throw new Error(`group ${group} is not prepared on ${h}`);
            driver.run(routes);
          },
          abort: async (h, group, incarnation) => table(h).abort(group, incarnation),
        },
      },
      record,
      module,
    );
    if (lost.length > 0) throw new Error(`group ${record.group}: host(s) ${lost.join(", ")} are not live; nothing of it was started`);
  }

  /** Host `id` dies at once (its VM threads are terminated); the others are told. */
  async kill(id: string): Promise<void> {
    this.live.delete(id);
    await this.tables.get(id)?.stop();
    for (const h of this.live) this.tables.get(h)!.hostsChanged();
  }

  isLive(id: string): boolean {
    return this.live.has(id);
  }

  async stop(): Promise<void> {
    for (const h of [...this.live]) {
      this.live.delete(h);
      await this.tables.get(h)!.stop();
    }
    await this.store.close();
  }
}
