/**
 * The primary of one group member on this host: a VM thread plus what the
 * host keeps for it. Group messages do not pass through here: the VM thread
 * sends and receives them itself on its message path (src/vm/message-path.ts);
 * the member opens the path, gives it routes, captures on the leader's `end`
 * (or its own clock), releases output once a cut commits, and carries out the
 * steps of a recovery.
 *
 * The VM keeps the protocol state that must fail over with it (sender log,
 * delivered vector, incarnation: src/vm/machine.ts); its thread keeps what may
 * be lost with the host (arrivals not yet offered, vm-mode held messages).
 */
import type { TlsMaterial } from "../../tls/context.js";
import { EventEmitter } from "node:events";
import type { MessagePort } from "node:worker_threads";
import type { VmWorker } from "../../vm/vm.js";
import type { CaptureResult } from "../../vm/protocol.js";
import type { PathCounters, Route } from "../../vm/message-path.js";
import { OutputLog } from "../output-log.js";
import { assert } from "../../util/assert.js";

export type MemberState = "running" | "frozen";

export interface MemberEvents {
  /**
   * group mode: checkpoint taken (the leader's `end`, or a message from the
   * next epoch), in epoch order; the delta is sealed. Its buffer is on loan
   * from the VM thread: the driver gives it back once shipped, so a listener
   * that keeps the bytes beyond its call copies them.
   */
  captured: [result: CaptureResult];
  /** External output (or, vm mode, a held message) waits for a commit (adaptive epochs); `urgent`: someone blocks on it. */
  output_pending: [epoch: number, urgent: boolean];
  /** The VM did something in `epoch` (once per epoch): the epoch is worth ending. */
  active: [epoch: number];
  problem: [reason: string];
}

const NO_COUNTERS: PathCounters = { sent_before_commit: 0, sent_after_commit: 0, held_total: 0, held: 0, dropped: 0, received: 0, links_dialed: 0 };

export class GroupMember extends EventEmitter<MemberEvents> {
  state: MemberState = "frozen";
  /** Newest checkpoint captured. */
  captured: number;
  committed: number;
  /** Where this member's message path listens (null until opened). */
  route: Route | null = null;
  /** The message path's counters as of the last capture. */
  counters: PathCounters = NO_COUNTERS;
  /** Serialises the VM steps the host asks for (the VM thread orders them with message deliveries). */
  private chain: Promise<unknown> = Promise.resolve();

  constructor(
    readonly rank: number,
    public vm: VmWorker,
    readonly log: OutputLog,
    cut: number,
  ) {
    super();
    this.captured = cut;
    this.committed = cut;
    this.listen(vm);
  }

  private listen(vm: VmWorker): void {
    vm.on("output_pending", (epoch, urgent) => {
      if (this.vm === vm && epoch > this.captured) this.emit("output_pending", epoch, urgent);
    });
    vm.on("active", (epoch) => {
      if (this.vm === vm && epoch > this.captured) this.emit("active", epoch);
    });
    vm.on("crashed", (message) => {
      if (this.vm === vm) this.emit("problem", `VM crashed: ${message}`);
    });
    vm.on("problem", (message) => {
      if (this.vm === vm) this.emit("problem", message);
    });
    vm.on("captured", (result) => {
      if (this.vm !== vm) return;
      this.captured = Math.max(this.captured, result.epoch);
      if (result.path) this.counters = result.path;
      this.emit("captured", result);
    });
  }

  // ---- the message path -------------------------------------------------------------------

  /** Opens the VM's message path (mutual TLS with `tls`); vm mode holds what it sends until its epoch commits. */
  openPath(bind_host: string, hold_until_commit: boolean, tls: TlsMaterial | null): Promise<Route> {
    return this.step("path_open", async () => {
      this.route = await this.vm.request("path_open", { bind_host, hold_until_commit, tls });
      return this.route;
    });
  }

  /** Every rank's route, the VM threads of the ranks on this host, and ports of MessageChannels to other VM threads (transferred to the VM thread). */
  setRoutes(routes: (Route | null)[], locals: { rank: number; thread: number }[], ports: { thread: number; port: MessagePort }[]): Promise<void> {
    return this.step("path_routes", async () => {
      await this.vm.request("path_routes", { routes, locals, ports }, ports.map((p) => p.port));
    });
  }

  get heldCount(): number {
    return this.counters.held;
  }

  // ---- checkpoints ---------------------------------------------------------------------

  /**
   * group mode: the leader ended epoch `epoch`; the delta comes as a
   * `captured` event (unless the VM ended it already). With `commit`, cut
   * `commit.epoch` committed as well (see commit()), in the same VM step.
   */
  endEpoch(epoch: number, commit?: { epoch: number; trim: number[] }): Promise<void> {
    return this.step("capture", async () => {
      const fresh = commit && commit.epoch > this.committed ? commit : undefined;
      const { released } = await this.vm.captureTo(epoch, fresh);
      if (fresh) {
        this.committed = fresh.epoch;
        this.log.appendPacked(released);
      }
    });
  }

  /** vm, none mode: checkpoint on the member's own clock. */
  capture(): Promise<CaptureResult> {
    return this.step("capture", async () => {
      const result = await this.vm.capture();
      this.captured = result.epoch;
      if (result.path) this.counters = result.path;
      assert(result.outbox.length === 0, "a member with a message path returned an outbox");
      return result;
    });
  }

  /**
   * Cut `epoch` committed: release its output, and trim the sender log to
   * `trim` (what each receiver delivered at the cut) in the same VM step; in
   * vm mode the VM thread also sends the messages it held for the epoch.
   */
  commit(epoch: number, trim?: number[]): Promise<void> {
    return this.step("commit", async () => {
      if (epoch <= this.committed) return;
      const released = await this.vm.request("commit", { epoch, trim });
      this.committed = epoch;
      this.log.appendPacked(released);
    });
  }

  trim(delivered_by_receiver: number[]): Promise<void> {
    return this.step("trim", async () => {
      await this.vm.request("trim_sender_log", { delivered_by_receiver });
    });
  }

  // ---- recovery --------------------------------------------------------------------------

  /** Stops the guest's timers and message deliveries; the state stays as it is until told. */
  freeze(): Promise<void> {
    this.state = "frozen";
    return this.step("freeze", async () => {
      await this.vm.request("freeze", {});
    });
  }

  /** Adopts incarnation `inc`; held (vm mode) messages are re-stamped with it. */
  setIncarnation(inc: number): Promise<void> {
    return this.step("set_incarnation", async () => {
      await this.vm.request("set_incarnation", { incarnation: inc });
    });
  }

  rollback(cut: number): Promise<{ pages_restored: number; rollback_us: number }> {
    return this.step("rollback", async () => {
      const result = await this.vm.request("rollback", { epoch: cut });
      this.captured = cut;
      return result;
    });
  }

  /** After a rollback or promotion to `cut` (committed by the recovery): release its output. */
  releaseAt(cut: number): Promise<void> {
    return this.step("release", async () => {
      this.log.appendPacked(await this.vm.request("commit", { epoch: cut }));
      this.committed = Math.max(this.committed, cut);
      this.captured = Math.max(this.captured, cut);
    });
  }

  imageCurrent(): Promise<Uint8Array> {
    return this.step("image_current", () => this.vm.request("image_current", {}));
  }

  /** Image at a fresh cut (vm mode: a running member's new backup). */
  imageFresh(): Promise<Uint8Array> {
    return this.step("image", () => this.vm.request("image", {}));
  }

  deliveredVector(): Promise<number[]> {
    return this.step("delivered_vector", () => this.vm.request("delivered_vector", {}));
  }

  /** Re-sends from the sender log what each receiver lacks (`delivered[r]`: what r delivered from this member). */
  resend(delivered: number[]): Promise<number> {
    return this.step("resend", async () => (await this.vm.request("resend", { delivered })).resent);
  }

  /** Runs the guest (again): timers on, arrivals kept meanwhile offered, what it sent meanwhile (e.g. in `start`) sent. */
  run(): Promise<void> {
    this.state = "running";
    return this.step("run", async () => {
      await this.vm.request("run", {});
    });
  }

  async stop(): Promise<void> {
    this.state = "frozen";
    await this.vm.terminate();
  }

  /** The step running now and since when (status: a VM step that does not finish shows here). */
  busy: { step: string; since_ms: number } | null = null;

  private step<T>(step: string, job: () => Promise<T>): Promise<T> {
    const run = async () => {
      this.busy = { step, since_ms: Date.now() };
      try {
        return await job();
      } finally {
        this.busy = null;
      }
    };
    const next = this.chain.then(run, run);
    this.chain = next.catch(() => undefined);
    return next;
  }
}
