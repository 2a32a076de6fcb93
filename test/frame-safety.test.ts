/**
 * No peer frame can crash a host (docs/ARCHITECTURE.md, "Hosts, replication
 * and failover"). First the group protocol core on its own, fed bad frames
 * of every kind: each is refused with a counted reason, asks for no replica
 * step and leaves the group running. Then real host processes: a fake peer
 * (authenticated: it holds the cluster's admin credential, as a compromised
 * or buggy peer would hold a certificate)
 * sends a bad frame of every GROUP kind (and bad control frames) to live
 * hosts running two groups, and every host stays up, both groups keep
 * committing and releasing output, no replica step fails, and each refusal
 * shows in `status`.
 */
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { promisify } from "node:util";
import { readFile } from "node:fs/promises";
import { afterEach, describe, expect, it } from "vitest";
import { GroupCore } from "../src/core/node.js";
import { parseFrame, type GroupFrame } from "../src/core/frames.js";
import { planRecovery } from "../src/core/recovery.js";
import { scheduleFor } from "../src/sim/campaign.js";
import { simulate } from "../src/sim/simulator.js";
import type { CoreAction } from "../src/core/events.js";
import { GROUP_SIZE_MAX, protectionKey, type ProtectionRecord } from "../src/core/types.js";
import { protectionRecord } from "./support/record.js";
import { MessagePath } from "../src/vm/message-path.js";
import { encodeDelta, encodeImage } from "../src/checkpoint/format.js";
import { bodyProblem } from "../src/host/group/driver.js";
import { LogLimit } from "../src/util/log-limit.js";
import { DEFAULT_LIMITS } from "../src/vm/machine.js";
import { VmWorker } from "../src/vm/vm.js";
import { instrument } from "../src/guest/instrument.js";
import { compileGuest } from "../src/guest/module-cache.js";
import { builtBytes } from "./support/guests.js";
import type { ClusterFile } from "../src/cluster/local-cluster.js";
import { parseManifest } from "../src/cluster/manifest.js";
import { guestPath } from "../src/guest/examples.js";
import { Connection } from "../src/host/connection.js";
import { MSG } from "../src/host/messages.js";
import { encodeBeat } from "../src/host/beat-wire.js";
import { createSocket } from "node:dgram";
import { dialTls, requestAny, sleep } from "../src/cli/client.js";
import type { HostStatus } from "../src/host/api.js";
import { startCluster, stopClusters, waitFor } from "./support/cluster.js";
import { HOST_DEFAULTS } from "../src/host/host.js";

// ---- the core on its own -------------------------------------------------------------------

const RECORD = protectionRecord({
  group: "bank",
  incarnation: 3,
  placement: [
    { primary: "h1", backup: "h2" },
    { primary: "h2", backup: "h1" },
  ],
});

const route = (port: number) => ({ address: `127.0.0.1:${port}`, token: `t${port}` });

/** A header as a host would send it, through the same validation as on arrival. */
function frame(from: string, fields: Record<string, unknown>, inc = RECORD.incarnation): GroupFrame {
  return parseFrame({ v: 1, g: RECORD.group, from, inc, ...fields });
}

/** h1 of RECORD: leader, primary of rank 0, backup of rank 1; running, epoch 1 ended by its leader. */
function runningCore(): { core: GroupCore; now: () => number; tick: (ms: number) => CoreAction[] } {
  let now_ms = 0;
  const core = GroupCore.deployed({ host: "h1", record: RECORD, now_ms, detect_ms: 300, live: ["h1", "h2"], registered: ["h1", "h2"] });
  const [run] = core.handle({ type: "start", routes: [route(1), route(2)] });
  expect(run.type).toBe("members");
  core.handle({ type: "done", id: (run as Extract<CoreAction, { type: "members" }>).id, ok: true, value: {} });
  const tick = (ms: number) => {
    now_ms += ms;
    return core.handle({ type: "tick", now_ms });
  };
  return { core, now: () => now_ms, tick };
}

const steps = (actions: CoreAction[]) => actions.filter((a) => a.type === "vm" || a.type === "backup" || a.type === "members");

describe("delivered vectors and matrices are refused by their shape", () => {
  const header = (fields: Record<string, unknown>) => ({ v: 1, g: RECORD.group, from: "h2", inc: RECORD.incarnation, ...fields });
  const badVectors: [string, unknown][] = [
    ["a negative count", [0, -1]],
    ["a fraction", [0, 1.5]],
    ["NaN", [0, Number.NaN]],
    ["a count past 2^53", [0, 2 ** 53]],
    ["a string", [0, "1"]],
    ["null", [0, null]],
    ["not an array", { 0: 0 }],
    ["too long", new Array(GROUP_SIZE_MAX + 1).fill(0)],
  ];
  for (const [what, d] of badVectors) {
    it(`a vector with ${what}, alone or in a matrix`, () => {
      expect(() => parseFrame(header({ k: "delta", rank: 1, e: 1, d }))).toThrow(/malformed group frame: d:/);
      expect(() => parseFrame(header({ k: "commit", c: 1, d: [[0, 0], d] }))).toThrow(/malformed group frame: d:/);
    });
  }

  it("a matrix with too many rows is refused, a full-size one taken as it is", () => {
    expect(() => parseFrame(header({ k: "commit", c: 1, d: new Array(GROUP_SIZE_MAX + 1).fill([0]) }))).toThrow(/malformed/);
    const d = Array.from({ length: 256 }, (_, r) => Array.from({ length: 256 }, (_, s) => r * 1000 + s));
    expect(parseFrame(header({ k: "commit", c: 3, d }))).toEqual(header({ k: "commit", c: 3, d }));
  });
});

describe("the group core refuses bad frames of every kind", () => {
  const bad: [string, string, Record<string, unknown>, number?][] = [
    ["end from a host that does not lead", "h2", { k: "end", e: 1 }],
    ["end of an epoch past the member's next", "h1", { k: "end", e: 50 }],
    ["commit of a cut never taken", "h1", { k: "commit", c: 9, d: [[0, 0], [0, 0]] }],
    ["pending from a host that holds no primary", "h9", { k: "pending", u: false }],
    ["active from a host that holds no primary", "h9", { k: "active", e: 1 }],
    ["delta that does not follow the staged one", "h2", { k: "delta", rank: 1, e: 7, d: [0, 0] }],
    ["delta from a host that is not the member's primary", "h1", { k: "delta", rank: 1, e: 1, d: [0, 0] }],
    ["delta of a rank the group does not have", "h2", { k: "delta", rank: 5, e: 1, d: [0, 0] }],
    ["delta with a vector of the wrong length", "h2", { k: "delta", rank: 1, e: 1, d: [0, 0, 0] }],
    ["image from a host that is not the member's primary", "h9", { k: "image", rank: 1, e: 1, released_seq: 0, history: [] }],
    ["staged from a host that is not the member's backup", "h1", { k: "staged", rank: 0, e: 1, d: [0, 0] }],
    ["vcommit in group mode", "h2", { k: "vcommit", rank: 1, e: 1 }],
    ["dv in group mode", "h2", { k: "dv", rank: 1, e: 1, d: [0, 0] }],
    ["recover whose record declares this host failed", "h2", { k: "recover", record: { ...RECORD, incarnation: 4, leader: "h2", failed: ["h1"] } }, 4],
    ["recover from a host its record does not name leader", "h9", { k: "recover", record: { ...RECORD, incarnation: 4, leader: "h2" } }, 4],
    ["report from a host not in the record", "h9", { k: "report", primaries: [], backups: [] }],
    ["report whose primary committed past what it captured", "h2", { k: "report", primaries: [{ rank: 1, hi: 2, committed: 5 }], backups: [] }],
    ["rollback outside a recovery", "h1", { k: "rollback", cut: 0, targets: {}, images: [] }],
    ["rolled from a host not in the record", "h9", { k: "rolled", d: {}, routes: {} }],
    ["resume outside a recovery", "h1", { k: "resume", e: 1, d: [[0, 0], [0, 0]], routes: [null, null] }],
    ["halt naming no member", "h1", { k: "halt", lost: [] }],
    ["halt from a host that does not lead", "h2", { k: "halt", lost: [1] }],
    ["halt calling lost a member whose primary runs here", "h9", { k: "halt", lost: [0] }, 9],
    ["frame of an older incarnation", "h2", { k: "staged", rank: 0, e: 1, d: [0, 0] }, 1],
    ["frame of an incarnation not adopted", "h1", { k: "end", e: 1 }, 8],
  ];
  for (const [what, from, fields, inc] of bad) {
    it(what, () => {
      const { core, tick } = runningCore();
      tick(1000); // the leader ends epoch 1
      const before = core.status();
      let f: GroupFrame;
      try {
        f = frame(from, fields, inc);
      } catch {
        // Refused by its shape already (the host closes the connection): nothing reaches the core.
        return;
      }
      const actions = core.handle({ type: "frame", from, frame: f, body: new Uint8Array(0) });
      expect(core.status().refused, what).toBe(before.refused + 1);
      expect(steps(actions), what).toEqual([]);
      expect(actions.some((a) => a.type === "notify" && a.notice.kind === "refused")).toBe(true);
      const after = core.status();
      expect(after.state).toBe("running");
      expect(after.incarnation).toBe(RECORD.incarnation);
      expect(after.recovering).toBe(false);
      expect(after.primaries).toEqual(before.primaries);
      expect(after.backups).toEqual(before.backups);
    });
  }

  it("a recover that names this host failed asks the store instead of fencing", () => {
    const { core, tick } = runningCore();
    core.handle({ type: "frame", from: "h2", frame: frame("h2", { k: "recover", record: { ...RECORD, incarnation: 4, leader: "h2", failed: ["h1"] } }, 4), body: null });
    expect(tick(1).some((a) => a.type === "store_get")).toBe(true);
    expect(core.status().state).toBe("running");
  });

  it("after every bad frame the group still ends epochs and stages the real delta", () => {
    const { core, tick } = runningCore();
    core.handle({ type: "active", rank: 0, epoch: 1 }); // member 0 did something: epoch 1 is worth ending
    const ended = tick(1000);
    expect(ended.some((a) => a.type === "vm" && a.step.op === "capture_to" && a.step.epoch === 1)).toBe(true);
    for (const [, from, fields, inc] of bad) {
      try {
        core.handle({ type: "frame", from, frame: frame(from, fields, inc), body: null });
      } catch (error) {
        expect((error as Error).name).toBe("FrameError");
      }
    }
    const staged = core.handle({ type: "frame", from: "h2", frame: frame("h2", { k: "delta", rank: 1, e: 1, d: [0, 0] }), body: null });
    expect(staged.some((a) => a.type === "backup" && a.step.op === "stage" && a.step.epoch === 1)).toBe(true);
    expect(core.status().state).toBe("running");
  });

  it("a delta of a corrupt body that fails to stage is refused and counted; the next delta is still judged on its own", () => {
    const { core } = runningCore();
    const [stage] = core.handle({ type: "frame", from: "h2", frame: frame("h2", { k: "delta", rank: 1, e: 1, d: [0, 0] }), body: null });
    expect(stage.type).toBe("backup");
    const before = core.status();
    core.handle({ type: "done", id: (stage as Extract<CoreAction, { type: "backup" }>).id, ok: false, error: "ChecksumMismatch" });
    expect(core.status().refused).toBe(before.refused + 1);
    expect(core.status().steps_failed).toBe(before.steps_failed + 1);
    expect(core.status().state).toBe("running");
  });

  it("a delta or image body that is not what its header says is refused before the core sees it", () => {
    const delta = frame("h2", { k: "delta", rank: 1, e: 1, d: [0, 0] });
    const image = (history: number[], released_seq: number) =>
      frame("h2", { k: "image", rank: 1, e: 1, released_seq, history: history.map((seq) => ({ seq, epoch: 1, kind: 0, text: "", produced_ms: 0, released_ms: 0 })) });
    const parts = { memory_pages: 1, page_indices: new Uint32Array(0), page_data: new Uint8Array(0), globals: new Uint8Array(0), runtime_state: new Uint8Array(0) };
    const hash = new Uint8Array(32).fill(7);
    const good = encodeImage({ ...parts, epoch: 1, module_hash: hash });
    expect(bodyProblem(delta, new Uint8Array(randomBytes(100)))).toMatch(/body refused/);
    expect(bodyProblem(delta, encodeDelta({ ...parts, epoch: 2 }))).toMatch(/holds 2/);
    expect(bodyProblem(delta, encodeDelta({ ...parts, epoch: 1 }))).toBeNull();
    expect(bodyProblem(image([1, 2, 3], 3), good, hash)).toBeNull();
    expect(bodyProblem(image([], 0), good, hash)).toBeNull();
    expect(bodyProblem(image([1, 3], 3), good, hash)).toMatch(/not the records up to 3/);
    expect(bodyProblem(image([2, 3], 2), good, hash)).toMatch(/not the records/);
    expect(bodyProblem(image([1], 1), good, new Uint8Array(32))).toMatch(/another module/);
    const flipped = good.slice();
    flipped[flipped.length - 1] ^= 1; // the crc32 trailer
    expect(bodyProblem(image([], 0), flipped, hash)).toMatch(/checksum/i);
  });

  it("the simulated protocol, crashes and second failures included, trips none of these rules: it refuses only frames of other incarnations", () => {
    let refusals = 0;
    for (let run = 0; run < 150; run++) {
      for (const line of simulate(scheduleFor(1, run)).timeline) {
        const at = line.indexOf(" refused: ");
        if (at < 0) continue;
        refusals++;
        expect(line.slice(at + 10), `run ${run}`).toMatch(/^\w+ frame of incarnation \d+ from \S+: this host is at \d+$/);
      }
    }
    expect(refusals).toBeGreaterThan(0); // the scan sees refusals at all
  });

  it("a flood of refusals is logged a bounded number of lines per second, each left-out count said", () => {
    const limit = new LogLimit(3, 1000);
    const taken = Array.from({ length: 10 }, (_, i) => limit.take(i));
    expect(taken.filter((t) => t !== null)).toHaveLength(3);
    expect(limit.take(1000)).toEqual({ skipped: 7 });
    expect(limit.take(1001)).toEqual({ skipped: 0 });
  });

  it("reports that cannot all be true give no recovery plan, not an assertion", () => {
    const next = { ...RECORD, incarnation: 4, placement: [{ primary: "h1", backup: "h3" }, { primary: "h2", backup: "h1" }], failed: [] };
    const plan = planRecovery(
      next,
      new Map([
        ["h1", { primaries: [{ rank: 0, hi: 3, committed: 2 }], backups: [{ rank: 1, has_image: true, lo: 90, hi: 90 }] }],
        ["h2", { primaries: [{ rank: 1, hi: 3, committed: 2 }], backups: [] }],
        ["h3", { primaries: [], backups: [] }],
      ]),
    );
    expect(plan.refused).toMatch(/no safe recovery cut/);
  });

  it("a route that is no address gives a closed link and a reported problem, not an exception", () => {
    const problems: string[] = [];
    const path = new MessagePath({ rank: 0, bind_host: "127.0.0.1", hold_until_commit: false, tls: null }, { offer: () => [], committed: () => 0, problem: (p) => problems.push(p) });
    path.setRoutes([null, { address: "127.0.0.1:99999", token: "x" }], []);
    path.run();
    expect(() => path.send([{ from: 0, to: 1, incarnation: 0, epoch: 1, seq: 1, bytes: new Uint8Array(1) }])).not.toThrow();
    expect(problems.join()).toMatch(/cannot connect/);
    path.close();
  });
});

// ---- a VM thread -------------------------------------------------------------------------

describe("a VM thread fed bad values", () => {
  const vms: VmWorker[] = [];
  afterEach(async () => {
    await Promise.all(vms.splice(0).map((vm) => vm.terminate()));
  });

  it("a cut out of range, a far epoch, a bad trim or re-send fails that request only (or that part of it); the VM goes on", async () => {
    const guest = await compileGuest(instrument(builtBytes("pingpong")));
    const vm = await VmWorker.boot(guest, { rank: 0, size: 2, limits: { ...DEFAULT_LIMITS }, timers: "manual", consistent_cut: true });
    vms.push(vm);
    await vm.request("path_open", { bind_host: "127.0.0.1", hold_until_commit: false, tls: null });
    await expect(vm.captureTo(5)).rejects.toThrow(/capture_to 5/);
    await expect(vm.request("commit", { epoch: 7 })).rejects.toThrow(/commit 7/);
    await expect(vm.request("rollback", { epoch: 3 })).rejects.toThrow(/rollback to 3/);
    expect((await vm.captureTo(1)).captured).toBe(1);
    // A trim that is not a cut of this VM's history (it sent nothing): reported, and the commit stands.
    const problems: string[] = [];
    vm.on("problem", (p) => problems.push(p));
    await vm.request("commit", { epoch: 1, trim: [0, 99] });
    expect((await vm.status()).committed).toBe(1);
    await until(() => problems.some((p) => /not trimmed/.test(p)), "the trim reported");
    // A resume's matrix saying a receiver delivered more than this VM sent it: nothing re-sent to it, reported, the request answers.
    expect(await vm.request("resend", { delivered: [0, 99] })).toEqual({ resent: 0 });
    await until(() => problems.some((p) => /nothing re-sent to rank 1/.test(p)), "the resend reported");
    expect(vm.goneReason).toBeNull();
  });

  it("a broken invariant ends that VM's thread, not the process", async () => {
    const guest = await compileGuest(instrument(builtBytes("pingpong")));
    const vm = await VmWorker.boot(guest, { rank: 0, size: 2, limits: { ...DEFAULT_LIMITS }, timers: "manual", consistent_cut: true });
    vms.push(vm);
    const crashed = new Promise<string>((resolve) => vm.once("crashed", resolve));
    await vm.request("path_open", { bind_host: "127.0.0.1", hold_until_commit: false, tls: null });
    // Opening the path twice trips an assertion in the worker: it answers, then its thread dies loudly.
    await expect(vm.request("path_open", { bind_host: "127.0.0.1", hold_until_commit: false, tls: null })).rejects.toThrow(/open already/);
    expect(await crashed).toMatch(/VM thread/);
    await expect(vm.status()).rejects.toThrow();
  });
});

async function until(check: () => boolean, what: string, timeout_ms = 5000): Promise<void> {
  const start = Date.now();
  while (!check()) {
    if (Date.now() - start > timeout_ms) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

// ---- live hosts ----------------------------------------------------------------------------

const run = promisify(execFile);
// The product's default detector: a deploy that starts many VM threads must not look like a crash.
const DETECT_MS = HOST_DEFAULTS.detect_ms;
afterEach(stopClusters);

async function deploy(c: ClusterFile, group: string, guest: string, mode: string, size: number): Promise<void> {
  const module = guestPath(guest);
  const manifest = parseManifest(`group: ${group}\nmode: ${mode}\nsize: ${size}\nmodule: ${JSON.stringify(module)}\nepoch:\n  interval_ms: 20\n`, { source: "test", base_dir: "/" });
  await requestAny(c, "deploy", { manifest }, new Uint8Array(await readFile(module)));
}

describe("bad frames sent to live hosts", () => {
  it("every host stays up, a second group keeps releasing output, the first keeps committing, and each refusal is counted", async () => {
    const { cluster: c, store } = await startCluster(3, DETECT_MS);
    await deploy(c, "bank", "bank", "group", 2);
    await deploy(c, "tick", "ticker", "vm", 1);
    const record = (await store.get<ProtectionRecord>(protectionKey("bank")))!.value;
    await store.close();
    const address = (id: string) => c.hosts.find((h) => h.id === id)!.address;
    const status = (id: string): Promise<HostStatus> => requestAny(c, "status", {}, undefined, id);
    const all = () => Promise.all(c.hosts.map((h) => status(h.id)));
    const bankCommitted = async () => (await status(record.leader)).groups.find((g) => g.group === "bank")?.committed ?? 0;
    const tickReleased = async () => Math.max(0, ...(await all()).flatMap((s) => s.primaries.filter((p) => p.vm === "tick-0").map((p) => p.released_seq)));
    await waitFor(async () => (await bankCommitted()) >= 5 && (await tickReleased()) >= 5, 20_000, "both groups running");
    const start = { bank: await bankCommitted(), tick: await tickReleased() };

    // deploy places rank r's primary on hosts[o + r] and its backup on hosts[o + r + 1]; rank 0's host leads.
    const L = record.leader;
    const [p0, p1] = record.placement;
    expect(p0.primary).toBe(L);
    const inc = record.incarnation;
    const refusedOf = async (id: string) => {
      const s = await status(id);
      return { group: s.groups.find((g) => g.group === "bank")!.refused, host: s.group_frames_refused };
    };

    /** Sends one frame on a fresh connection, as a peer would; resolves once the host handled it (or closed the connection). */
    async function send(to: string, type: number, header: Record<string, unknown>, body?: Uint8Array): Promise<boolean> {
      const connection = await Connection.open(address(to), "fake-peer", 2000, dialTls(c, to));
      connection.send(MSG.HELLO, { from: "fake" });
      connection.send(type, header, body);
      const closed = await Promise.race([new Promise<boolean>((resolve) => connection.once("close", () => resolve(true))), sleep(200).then(() => false)]);
      connection.close("done");
      return closed;
    }
    const group = (from: string, fields: Record<string, unknown>, at = inc) => ({ v: 1, g: "bank", from, inc: at, ...fields });
    const garbage = new Uint8Array(randomBytes(4096));
    // A well-formed image (checksum and all) of no module this cluster runs.
    const otherImage = encodeImage({ epoch: 1, memory_pages: 1, module_hash: new Uint8Array(32), page_indices: new Uint32Array(0), page_data: new Uint8Array(0), globals: new Uint8Array(0), runtime_state: new Uint8Array(0) });

    // [what, to, header, body, where the refusal is counted]
    const cases: [string, string, Record<string, unknown>, Uint8Array | undefined, "group" | "host"][] = [
      ["malformed group frame (end without an epoch)", p1.primary, group(L, { k: "end" }), undefined, "host"],
      ["group frame of a newer version", p1.primary, { ...group(L, { k: "pending", u: false }), v: 2 }, undefined, "host"],
      ["group frame of a group not on the host", p1.primary, { ...group(L, { k: "pending", u: false }), g: "nope" }, undefined, "host"],
      ["group frame that claims to come from its receiver", p1.primary, group(p1.primary, { k: "pending", u: false }), undefined, "host"],
      ["recover: joining a group the store does not know", p1.primary, { ...group(L, { k: "recover", record: { ...record, group: "ghost", incarnation: 1 } }, 1), g: "ghost" }, garbage, "host"],
      ["end: an epoch far past the members'", p1.primary, group(L, { k: "end", e: 1_000_000 }), undefined, "group"],
      ["end: from a host that does not lead", p1.primary, group(p1.backup!, { k: "end", e: 1 }), undefined, "group"],
      ["end: an incarnation never decided", p1.primary, group(L, { k: "end", e: 1 }, inc + 7), undefined, "group"],
      ["pending: from a host of no primary", L, group("fake", { k: "pending", u: false }), undefined, "group"],
      ["active: from a host of no primary", L, group("fake", { k: "active", e: 1 }), undefined, "group"],
      ["delta: corrupt body", p0.backup!, group(p0.primary, { k: "delta", rank: 0, e: 1, d: [0, 0] }), garbage, "group"],
      ["delta: rank out of range", p0.backup!, group(p0.primary, { k: "delta", rank: 9, e: 1, d: [0, 0] }), undefined, "group"],
      ["delta: huge vector", p0.backup!, group(p0.primary, { k: "delta", rank: 0, e: 1, d: new Array(200).fill(1) }), undefined, "group"],
      ["image: an output history with a hole", p0.backup!, group(p0.primary, { k: "image", rank: 0, e: 1, released_seq: 3, history: [1, 3].map((seq) => ({ seq, epoch: 1, kind: 0, text: "x", produced_ms: 0, released_ms: 0 })) }), otherImage, "group"],
      ["image: of another module", p0.backup!, group(p0.primary, { k: "image", rank: 0, e: 1, released_seq: 0, history: [] }), otherImage, "group"],
      ["image: garbage body", p0.backup!, group(p0.primary, { k: "image", rank: 0, e: 1, released_seq: 0, history: [] }), garbage, "group"],
      ["staged: from a host that is not the backup", L, group(p1.primary, { k: "staged", rank: 1, e: 1, d: [0, 0] }), undefined, "group"],
      ["commit: a cut never staged", p1.primary, group(L, { k: "commit", c: 1_000_000, d: [[0, 0], [0, 0]] }), undefined, "group"],
      ["vcommit: in group mode", p0.backup!, group(p0.primary, { k: "vcommit", rank: 0, e: 1 }), undefined, "group"],
      ["dv: in group mode", p1.primary, group(L, { k: "dv", rank: 0, e: 1, d: [0, 0] }), undefined, "group"],
      ["recover: a record declaring the receiver failed", p1.primary, group(L, { k: "recover", record: { ...record, incarnation: inc + 1, failed: [p1.primary] } }, inc + 1), undefined, "group"],
      ["recover: a next incarnation the store never decided", p1.primary, group(L, { k: "recover", record: { ...record, incarnation: inc + 1 } }, inc + 1), undefined, "group"],
      ["recover: from a host its record does not name leader", p1.primary, group(p1.backup!, { k: "recover", record: { ...record, incarnation: inc + 1 } }, inc + 1), undefined, "group"],
      ["report: from a host not in the record", L, group("fake", { k: "report", primaries: [], backups: [{ rank: 1, has_image: true, lo: 99, hi: 99 }] }), undefined, "group"],
      ["rollback: to a cut out of range, outside a recovery", p1.primary, group(L, { k: "rollback", cut: 1_000_000, targets: {}, images: [] }), undefined, "group"],
      ["rolled: from a host not in the record", L, group("fake", { k: "rolled", d: { 0: [5, 5] }, routes: {} }), undefined, "group"],
      ["resume: a wrong matrix, outside a recovery", p1.primary, group(L, { k: "resume", e: 2, d: [[9, 9], [9, 9]], routes: [null, null] }), undefined, "group"],
      ["halt: calling lost a member whose primary runs on the receiver", p1.primary, group("fake", { k: "halt", lost: [1] }, inc + 1), undefined, "group"],
      ["halt: from a host that does not lead", p1.primary, group(p1.backup!, { k: "halt", lost: [0] }), undefined, "group"],
    ];
    for (const [what, to, header, body, where] of cases) {
      const before = await refusedOf(to);
      const closed = await send(to, MSG.GROUP, header, body);
      // A header that does not parse closes its connection; anything else is refused and the connection serves on.
      expect(closed, `${what}: connection closed`).toBe(what.startsWith("malformed") || what.includes("newer version"));
      await waitFor(async () => (await refusedOf(to))[where] > before[where], 5000, `${what}: refusal counted on ${to}`);
    }
    // A flood: every frame is refused and counted, the log gets a bounded share of it.
    const logLines = async () => (await readFile(join(c.state_dir, "logs", `${L}.log`), "utf8")).split("\n").filter((l) => l.includes("group frame refused")).length;
    const [floodBefore, linesBefore] = [await refusedOf(L), await logLines()];
    const flood = await Connection.open(address(L), "fake-peer", 2000, dialTls(c, L));
    for (let i = 0; i < 2000; i++) flood.send(MSG.GROUP, group("fake", { k: "pending", u: false }));
    await waitFor(async () => (await refusedOf(L)).group >= floodBefore.group + 2000, 10_000, "2000 refusals counted");
    flood.close("done");
    const logged = (await logLines()) - linesBefore;
    expect(logged).toBeGreaterThan(0);
    expect(logged).toBeLessThan(200);

    // A newer incarnation's `stale` only makes the host ask the store, which says nothing changed.
    await send(p1.primary, MSG.GROUP, group("fake", { k: "stale" }, inc + 1));

    // Control frames: the wrong shape closes that connection only.
    for (const [type, header] of [
      [2, { from: "fake", sent_ms: Date.now() }], // heartbeats left peer connections for datagrams
      [MSG.REQUEST, { id: "x", op: "status" }],
      [MSG.REPLY, { id: 1, ok: "yes" }],
      [MSG.LOG, { vm: "tick-0", records: [] }],
      [MSG.HELLO, { v: 99, from: "fake" }],
      [77, { anything: true }],
    ] as [number, Record<string, unknown>][]) {
      expect(await send(L, type, header), `control frame ${type} of the wrong shape closes its connection`).toBe(true);
    }

    // Heartbeat datagrams to the leader's port: garbage, truncated, untagged, and tagged with a key of
    // no connection (a host that claims to be the leader's peer). Each refused, and nobody fails over.
    const [lhost, lport] = address(L).split(":");
    const udp = createSocket("udp4");
    const forged = (from: string, key: Uint8Array | null) => encodeBeat({ from, sent_ms: Date.now() }, key);
    const datagrams = [Buffer.from(garbage.subarray(0, 1200)), Buffer.alloc(3), forged(p1.primary, null).subarray(0, 10), forged(p1.primary, null), forged(p1.primary, randomBytes(32)), forged("fake", randomBytes(32))];
    for (let i = 0; i < 50; i++) for (const d of datagrams) await new Promise<void>((resolve) => udp.send(d, Number(lport), lhost, () => resolve()));
    udp.close();
    await waitFor(async () => (await readFile(join(c.state_dir, "logs", `${L}.log`), "utf8")).includes("heartbeats refused"), 10_000, "the refused heartbeats logged");

    // Both groups kept going: the bank commits further, the ticker releases further.
    await waitFor(async () => (await bankCommitted()) >= start.bank + 10 && (await tickReleased()) >= start.tick + 10, 15_000, "both groups progressing after the bad frames");
    const final = await all();
    expect(final.flatMap((s) => s.groups.map((g) => g.group)).filter((g) => g !== "bank" && g !== "tick")).toEqual([]);
    for (const h of c.hosts) expect(() => process.kill(h.pid, 0), `host ${h.id} is alive`).not.toThrow();
    for (const s of final) {
      for (const g of s.groups) {
        expect(g.state, `${g.group} on ${s.id}`).toBe("running");
        expect(g.steps_failed, `${g.group} on ${s.id}: no replica step failed`).toBe(0);
        expect(g.recovering).toBe(false);
        expect(g.incarnation).toBe(g.group === "bank" ? inc : g.incarnation);
      }
    }
    expect(final.reduce((n, s) => n + (s.groups.find((g) => g.group === "bank")?.refused ?? 0), 0)).toBeGreaterThanOrEqual(cases.filter((x) => x[4] === "group").length);
    // What `cohort status` shows.
    const cli = JSON.parse((await run(process.execPath, [join(process.cwd(), "bin/cohort.js"), "status", "--json", "--state-dir", c.state_dir])).stdout) as {
      hosts: { id: string; group_frames_refused: number }[];
      groups: { group: string; refused: number; steps_failed: number }[];
    };
    const bank = cli.groups.find((g) => g.group === "bank")!;
    expect(bank.refused).toBeGreaterThanOrEqual(cases.filter((x) => x[4] === "group").length);
    expect(bank.steps_failed).toBe(0);
    expect(cli.groups.find((g) => g.group === "tick")!.steps_failed).toBe(0);
    expect(cli.hosts.reduce((n, h) => n + h.group_frames_refused, 0)).toBeGreaterThanOrEqual(cases.filter((x) => x[4] === "host").length);
  }, 60_000);
});
