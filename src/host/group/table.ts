/**
 * The protected groups one host runs: one GroupDriver per group with a
 * replica here. It routes each validated GROUP frame to its group's driver
 * and lets a host the record newly names join a group on its first
 * `recover`. The daemon (src/host/host.ts) and the in-process cluster of
 * `cohort run` (src/host/group/in-process.ts) both keep their groups in one.
 */
import type { GroupFrame, Route } from "../../core/frames.js";
import { protectionKey, type ProtectionRecord } from "../../core/types.js";
import { GroupDriver, type GroupHostApi } from "./driver.js";
import { LogLimit } from "../../util/log-limit.js";

/** Joins checked against the store at once. */
const JOINING_MAX = 4;

/** How often prepared replicas not yet started ask the store whether their deploy still stands (a read of one key). */
export const PREPARED_WAIT_MS = 2_000;

export class GroupTable {
  readonly groups = new Map<string, GroupDriver>();
  /** GROUP frames no group here took (see dispatch). */
  refused = 0;
  /** Every refusal is counted; a flood of them is not logged line by line. */
  private readonly refusalLog = new LogLimit();
  /** Groups a `recover` asks this host to join, while the store is asked whether that decision stands. */
  private readonly joining = new Set<string>();

  constructor(private readonly api: GroupHostApi) {}

  get(group: string): GroupDriver | undefined {
    return this.groups.get(group);
  }

  values(): IterableIterator<GroupDriver> {
    return this.groups.values();
  }

  /** Boots this host's replicas of a newly deployed group (timers stopped); answers where its primaries' message paths listen. */
  async prepare(record: ProtectionRecord, module: Uint8Array): Promise<{ group: string; routes: Record<number, Route> }> {
    // A later attempt of the same deploy supersedes one given up while this host could not be told
    // (suspected, then back): the deploying host stored the new incarnation before asking.
    const given_up = this.groups.get(record.group);
    if (given_up && !given_up.hasStarted && given_up.record.incarnation < record.incarnation) await this.abort(record.group, given_up.record.incarnation);
    if (this.groups.has(record.group)) throw Object.assign(new Error(`group ${record.group} already has replicas on ${this.api.id}`), { code: "GroupExists" });
    const driver = await GroupDriver.prepare(this.api, record, module);
    this.groups.set(record.group, driver);
    this.api.log.info({ group: record.group, mode: record.mode, size: record.size, incarnation: record.incarnation }, "group replicas prepared");
    this.checkStartedLater(driver);
    return { group: record.group, routes: driver.pathRoutes() };
  }

  /**
   * Replicas prepared for a deploy attempt that was given up while this host
   * could not be told (it was suspected meanwhile, and read the
   * `group_prepare` from its socket later) would hold threads for nobody.
   * Until `group_run` comes, the store is asked every PREPARED_WAIT_MS whether
   * the attempt still stands: if the group's record now is another
   * incarnation, or gone, they stop. (A deploying host that dies mid-deploy
   * leaves its attempt's record standing: those replicas wait.)
   */
  private checkStartedLater(driver: GroupDriver): void {
    const timer = setTimeout(() => {
      if (this.groups.get(driver.name) !== driver || driver.hasStarted) return;
      this.api.store.get<ProtectionRecord>(protectionKey(driver.name)).then(
        (r) => {
          if (this.groups.get(driver.name) !== driver || driver.hasStarted) return;
          if (r !== null && r.value.incarnation === driver.record.incarnation) return this.checkStartedLater(driver);
          this.api.log.warn({ group: driver.name, incarnation: driver.record.incarnation, stored: r?.value.incarnation ?? null }, "prepared replicas of a deploy that was given up are stopped");
          this.abort(driver.name, driver.record.incarnation).catch((error: Error) => this.api.log.error({ err: error, group: driver.name }, "stopping prepared replicas failed"));
        },
        () => this.checkStartedLater(driver), // the store is away: ask again later
      );
    }, PREPARED_WAIT_MS);
    timer.unref();
  }

  /**
   * Stops this host's replicas of attempt `incarnation` of a deploy that was
   * given up, if they were never started (a started group is stopped only by
   * its protocol). Answers whether something was stopped.
   */
  async abort(group: string, incarnation: number): Promise<boolean> {
    const driver = this.groups.get(group);
    if (!driver || driver.hasStarted || driver.record.incarnation !== incarnation) return false;
    await this.remove(group);
    return true;
  }

  /**
   * A validated GROUP frame (body: the frame's binary part, e.g. a delta, or
   * the module with a `recover`). One no group here takes is refused, logged
   * and counted (`refused`): for a group with no replica here, or in this
   * host's own name (its frames never travel).
   */
  dispatch(frame: GroupFrame, body: Uint8Array): void {
    if (frame.from === this.api.id) return this.refuse(frame, "it claims to come from this host");
    const driver = this.groups.get(frame.g);
    if (driver) return driver.handleFrame(frame.from, frame, body);
    // A new backup host of a recovering group: it gets the module with the record.
    if (frame.k === "recover" && frame.record.placement.some((p) => p.primary === this.api.id || p.backup === this.api.id)) return this.join(frame, body);
    this.refuse(frame, "no replica of that group here");
  }

  /**
   * Joining a group runs its module and takes part in its recovery: only for
   * a decision the store holds (the compare-and-swap that won), not on a
   * frame's word. A repeated `recover` while the store is asked is dropped
   * (the coordinator repeats it until this host reports).
   */
  private join(frame: Extract<GroupFrame, { k: "recover" }>, body: Uint8Array): void {
    if (this.joining.has(frame.g)) return;
    // A flood of recovers for made-up groups must not become a flood of store reads (the coordinator of a real one repeats it).
    if (this.joining.size >= JOINING_MAX) return this.refuse(frame, `recover for group ${frame.g}: ${JOINING_MAX} joins are being checked already`);
    this.joining.add(frame.g);
    const module = body.slice();
    this.api.store.get<ProtectionRecord>(protectionKey(frame.g)).then(
      (stored) => {
        this.joining.delete(frame.g);
        const r = stored?.value;
        if (r?.incarnation !== frame.inc || r.leader !== frame.from) {
          return this.refuse(frame, `recover of incarnation ${frame.inc} from ${frame.from}; the store holds ${r ? `incarnation ${r.incarnation} led by ${r.leader}` : "no such group"}`);
        }
        let driver = this.groups.get(frame.g);
        if (!driver) {
          driver = GroupDriver.join(this.api, frame.record, module);
          this.groups.set(frame.g, driver);
        }
        driver.handleFrame(frame.from, frame, module);
      },
      (error: Error) => {
        this.joining.delete(frame.g);
        this.refuse(frame, `recover for group ${frame.g}: the store could not be read (${error.message})`);
      },
    );
  }

  private refuse(frame: GroupFrame, reason: string): void {
    this.refused++;
    const take = this.refusalLog.take(Date.now());
    if (take) this.api.log.warn({ group: frame.g, kind: frame.k, from: frame.from, reason, ...(take.skipped ? { refusals_not_logged: take.skipped } : {}) }, "group frame refused");
  }

  /** Whether this host holds groups and every one of them declared it failed (nothing here is counted on any more). */
  allFenced(): boolean {
    return this.groups.size > 0 && [...this.groups.values()].every((g) => g.status().state === "fenced");
  }

  /** The failure detector's view changed: every group re-evaluates. */
  hostsChanged(): void {
    for (const g of this.groups.values()) g.onHostsChanged();
  }

  /** Stops and forgets this host's replicas of `group` (a deploy that failed elsewhere). */
  async remove(group: string): Promise<void> {
    const driver = this.groups.get(group);
    if (!driver) return;
    this.groups.delete(group);
    await driver.stop();
    this.api.log.info({ group, incarnation: driver.record.incarnation }, "group replicas removed");
  }

  /** Stops every group's replicas here and forgets them (status shows none from then on). */
  async stop(): Promise<void> {
    const groups = [...this.groups.values()];
    this.groups.clear();
    await Promise.all(groups.map((g) => g.stop()));
  }
}
