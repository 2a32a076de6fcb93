/**
 * The primary of one group member on this host: a VM thread plus what the
 * host keeps for it. It feeds incoming group messages to the VM in batches,
 * hands what the guest sent to the group runtime for routing, captures on
 * the leader's `end`, and releases output once a cut commits.
 *
 * The VM itself keeps the protocol state that must fail over with it (sender
 * log, delivered vector, incarnation, held messages: src/vm/machine.ts);
 * the member keeps only what may be lost with the host: the queue of messages
 * not yet offered, and in `vm` mode the messages held until their sender's
 * checkpoint commits.
 */
import { EventEmitter } from "node:events";
import type { VmWorker } from "../../vm/vm.js";
import type { CaptureResult } from "../../vm/protocol.js";
import type { GroupMessage } from "../../vm/machine.js";
import { OutputLog } from "../output-log.js";
import { assert } from "../../util/assert.js";

/** Messages waiting to be offered to the VM (arrived while a batch was in the VM, or refused "full"). */
export const INBOX_MAX = 65536;

export type MemberState = "running" | "frozen";

export interface MemberEvents {
  /** What the guest sent, to route. */
  sent: [messages: GroupMessage[]];
  /** External output waits for a commit (adaptive epochs). */
  output_pending: [];
  problem: [reason: string];
}

export class GroupMember extends EventEmitter<MemberEvents> {
  state: MemberState = "running";
  /** Newest checkpoint captured. */
  captured: number;
  committed: number;
  private inbox: GroupMessage[] = [];
  /** Refused "full" (pending queue) or "early" (newer incarnation): offered again after the next capture / incarnation. */
  private refused: GroupMessage[] = [];
  private pumping = false;
  /** vm mode: sent, held until the sender's checkpoint of their epoch commits. */
  private held: GroupMessage[] = [];
  /** Serialises captures, commits and recovery steps (receives run alongside, the VM thread orders them). */
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
    vm.on("outbox", (messages) => {
      if (this.vm === vm) this.emit("sent", messages);
    });
    vm.on("output_pending", (epoch) => {
      if (this.vm === vm && epoch > this.captured) this.emit("output_pending");
    });
    vm.on("crashed", (message) => {
      if (this.vm === vm) this.emit("problem", `VM crashed: ${message}`);
    });
  }

  /** Replaces the VM thread (re-boot at cut 0 during a recovery). */
  replaceVm(vm: VmWorker): void {
    const old = this.vm;
    this.vm = vm;
    this.listen(vm);
    void old.terminate();
  }

  // ---- incoming group messages ---------------------------------------------------------

  deliver(messages: GroupMessage[]): void {
    if (this.inbox.length + messages.length > INBOX_MAX) {
      // Only a sender ignoring its own limits gets here; the sender re-sends after a recovery.
      this.emit("problem", `inbox of rank ${this.rank} full (${INBOX_MAX}): ${messages.length} message(s) dropped`);
      return;
    }
    for (const m of messages) this.inbox.push(m);
    if (!this.pumping) void this.pump();
  }

  private async pump(): Promise<void> {
    this.pumping = true;
    try {
      while (this.inbox.length && this.state === "running") {
        const batch = this.inbox;
        this.inbox = [];
        const vm = this.vm;
        let result;
        try {
          result = await vm.request("receive", { messages: batch });
        } catch (error) {
          this.emit("problem", `receive: ${(error as Error).message}`);
          return;
        }
        if (this.vm !== vm) return;
        result.statuses.forEach((status, i) => {
          if (status === "full" || status === "early") this.refused.push(batch[i]);
        });
        if (result.outbox.length) this.emit("sent", result.outbox);
      }
    } finally {
      this.pumping = false;
    }
  }

  /** Offers refused messages again (after a capture freed the pending queue, or a new incarnation). */
  private retryRefused(): void {
    if (!this.refused.length) return;
    const again = this.refused;
    this.refused = [];
    this.deliver(again);
  }

  // ---- checkpoints ---------------------------------------------------------------------

  /** Checkpoint `epoch` (group mode: the leader's number; must be the VM's). */
  capture(epoch?: number): Promise<CaptureResult> {
    return this.step("capture", async () => {
      const result = await this.vm.capture();
      assert(epoch === undefined || result.epoch === epoch, `rank ${this.rank}: captured epoch ${result.epoch}, the leader ended ${epoch}`);
      this.captured = result.epoch;
      if (result.outbox.length) this.emit("sent", result.outbox);
      this.retryRefused();
      return result;
    });
  }

  /**
   * Cut `epoch` committed: release its output, and trim the sender log to
   * `trim` (what each receiver delivered at the cut) in the same VM step; in
   * vm mode return the peer messages it frees.
   */
  commit(epoch: number, trim?: number[]): Promise<GroupMessage[]> {
    return this.step("commit", async () => {
      if (epoch <= this.committed) return [];
      const released = await this.vm.request("commit", { epoch, trim });
      this.committed = epoch;
      this.log.append(released);
      const free = this.held.filter((m) => m.epoch <= epoch);
      if (free.length) this.held = this.held.filter((m) => m.epoch > epoch);
      return free;
    });
  }

  trim(delivered_by_receiver: number[]): void {
    void this.vm.request("trim_sender_log", { delivered_by_receiver }).catch((error: Error) => this.emit("problem", `trim: ${error.message}`));
  }

  /** What left this member: at once while their epoch was not committed yet (group, none), or held first (vm). */
  readonly counters = { sent_before_commit: 0, sent_after_commit: 0, held_total: 0 };

  /** vm mode: keep until the sender's checkpoint of `message.epoch` commits. */
  hold(message: GroupMessage): void {
    this.held.push(message);
    this.counters.held_total++;
  }

  /** Counts a message leaving now (its epoch committed or not). */
  noteSent(message: GroupMessage): void {
    if (message.epoch > this.committed) this.counters.sent_before_commit++;
    else this.counters.sent_after_commit++;
  }

  get heldCount(): number {
    return this.held.length;
  }

  // ---- recovery --------------------------------------------------------------------------

  /** Stops the guest's timers and message deliveries; the state stays as it is until told. */
  freeze(): Promise<void> {
    this.state = "frozen";
    this.inbox = [];
    this.refused = [];
    return this.step("freeze", async () => {
      await this.vm.request("set_timers", { mode: "manual" });
    });
  }

  /** Adopts incarnation `inc`; held (vm mode) messages are re-stamped with it. */
  setIncarnation(inc: number): Promise<void> {
    for (const m of this.held) m.incarnation = inc;
    return this.step("set_incarnation", async () => {
      await this.vm.request("set_incarnation", { incarnation: inc });
    });
  }

  rollback(cut: number): Promise<{ pages_restored: number; rollback_us: number }> {
    return this.step("rollback", async () => {
      const result = await this.vm.request("rollback", { epoch: cut });
      this.captured = cut;
      this.held = this.held.filter((m) => m.epoch <= cut);
      return result;
    });
  }

  /** After a rollback or promotion to `cut` (committed by the recovery): release its output. */
  releaseAt(cut: number): Promise<void> {
    return this.step("release", async () => {
      this.log.append(await this.vm.request("commit", { epoch: cut }));
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

  resendFor(receiver: number, delivered: number): Promise<GroupMessage[]> {
    return this.step("resend_for", () => this.vm.request("resend_for", { receiver, delivered }));
  }

  /** Runs the guest again: timers on, queued messages offered, and what it sent meanwhile (e.g. in `start`) routed. */
  resume(): Promise<void> {
    this.state = "running";
    return this.step("resume", async () => {
      await this.vm.request("set_timers", { mode: "auto" });
      const outbox = await this.vm.request("take_outbox", {});
      if (outbox.length) this.emit("sent", outbox);
      if (this.inbox.length && !this.pumping) void this.pump();
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
