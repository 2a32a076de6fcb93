/**
 * The protected groups one host runs: one GroupDriver per group with a
 * replica here. It routes each validated GROUP frame to its group's driver
 * and lets a host the record newly names join a group on its first
 * `recover`. The daemon (src/host/host.ts) and the in-process cluster of
 * `cohort run` (src/host/group/in-process.ts) both keep their groups in one.
 */
import type { GroupFrame, Route } from "../../core/frames.js";
import type { ProtectionRecord } from "../../core/types.js";
import { GroupDriver, type GroupHostApi } from "./driver.js";

export class GroupTable {
  readonly groups = new Map<string, GroupDriver>();

  constructor(private readonly api: GroupHostApi) {}

  get(group: string): GroupDriver | undefined {
    return this.groups.get(group);
  }

  values(): IterableIterator<GroupDriver> {
    return this.groups.values();
  }

  /** Boots this host's replicas of a newly deployed group (timers stopped); answers where its primaries' message paths listen. */
  async prepare(record: ProtectionRecord, module: Uint8Array): Promise<{ group: string; routes: Record<number, Route> }> {
    if (this.groups.has(record.group)) throw Object.assign(new Error(`group ${record.group} already has replicas on ${this.api.id}`), { code: "GroupExists" });
    const driver = await GroupDriver.prepare(this.api, record, module);
    this.groups.set(record.group, driver);
    this.api.log.info({ group: record.group, mode: record.mode, size: record.size }, "group replicas prepared");
    return { group: record.group, routes: driver.pathRoutes() };
  }

  /** A validated GROUP frame (body: the frame's binary part, e.g. a delta, or the module with a `recover`). */
  dispatch(frame: GroupFrame, body: Uint8Array): void {
    let driver = this.groups.get(frame.g);
    if (!driver && frame.k === "recover") {
      // A new backup host of a recovering group: it gets the module with the record.
      if (!frame.record.placement.some((p) => p.primary === this.api.id || p.backup === this.api.id)) return;
      driver = GroupDriver.join(this.api, frame.record, body.slice());
      this.groups.set(frame.g, driver);
    }
    driver?.handleFrame(frame.from, frame, body);
  }

  /** The failure detector's view changed: every group re-evaluates. */
  hostsChanged(): void {
    for (const g of this.groups.values()) g.onHostsChanged();
  }

  /** Stops and forgets this host's replicas of `group` (a deploy that failed elsewhere). */
  async remove(group: string): Promise<void> {
    const driver = this.groups.get(group);
    this.groups.delete(group);
    await driver?.stop();
  }

  async stop(): Promise<void> {
    await Promise.all([...this.groups.values()].map((g) => g.stop()));
  }
}
