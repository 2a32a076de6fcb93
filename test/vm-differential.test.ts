/**
 * Differential checkpoint tests, in-process (VmCore + BackupImage):
 *  - every delta, applied to a backup image, makes the image equal the
 *    primary's memory, globals and runtime state byte for byte at every cut;
 *  - rollback in place to any uncommitted cut equals the image taken at that cut;
 *  - restore-and-continue (zero-copy promotion or restore from an encoded image)
 *    produces the same outputs as an uninterrupted run of a deterministic guest.
 * Deltas and images go through the real binary format (seal, decode).
 */
import { describe, expect, it } from "vitest";
import fc from "fast-check";
import { BackupImage } from "../src/checkpoint/backup-image.js";
import { decodeImage, encodeImage } from "../src/checkpoint/format.js";
import { VmCore, type GuestModule } from "../src/vm/machine.js";
import { RESERVED_WASM_PAGES } from "../src/vm/layout.js";
import { decodeRuntimeState, type OutputRecord } from "../src/vm/runtime-state.js";
import { imageBytes, shipDelta } from "./support/checkpoint.js";
import { builtBytes, fixtureBytes, guestOf, options } from "./support/guests.js";

type Op = { name: string; args: (number | bigint)[] };

/**
 * Runs epochs of ops on a primary, ships each delta to a backup, and checks
 * image equality at every cut; then rolls back to a random cut, checks it,
 * and continues with a backup rebuilt from that cut.
 */
async function differential(guest: GuestModule, epochs: Op[][], rollbackPick: number, tail: Op[][]): Promise<void> {
  const opts = options();
  const vm = VmCore.boot(guest, opts);
  let backup = BackupImage.blank(guest, opts, RESERVED_WASM_PAGES + guest.info.guest_initial_pages);
  const cuts: Buffer[] = [];
  const runEpochs = (list: Op[][]) => {
    for (const ops of list) {
      for (const op of ops) vm.invoke(op.name, op.args);
      const epoch = shipDelta(vm, backup);
      const primaryImage = imageBytes(vm);
      expect(imageBytes(backup).equals(primaryImage), `backup image equals primary at cut ${epoch}`).toBe(true);
      cuts[epoch] = primaryImage;
    }
  };
  runEpochs(epochs);
  const cut = 1 + (rollbackPick % epochs.length);
  vm.rollback(cut);
  expect(imageBytes(vm).equals(cuts[cut]), `rollback to cut ${cut} equals the image at that cut`).toBe(true);
  // Continue from the rolled-back state with a backup that holds that cut.
  backup = BackupImage.fromImage(guest, opts, decodeImage(cuts[cut]));
  runEpochs(tail);
}

const PAGE = 4096;
/** Addresses biased towards 4 KiB page boundaries, where straddling stores live. */
const address = (limit: number) =>
  fc.oneof(
    fc.integer({ min: 0, max: limit }),
    fc.integer({ min: 1, max: Math.floor(limit / PAGE) }).chain((p) => fc.integer({ min: p * PAGE - 16, max: p * PAGE + 1 })),
  );

const epochsOf = (op: fc.Arbitrary<Op>) => fc.array(fc.array(op, { minLength: 0, maxLength: 12 }), { minLength: 1, maxLength: 6 });

describe("checkpoint differential (WAT fixtures)", () => {
  it("straddling stores of every width: backup equals primary at every cut, rollback equals the cut", async () => {
    const guest = await guestOf(fixtureBytes("straddle"));
    const memoryBytes = 2 * 65536;
    const op: fc.Arbitrary<Op> = fc.oneof(
      fc.record({ addr: address(memoryBytes - 16), kind: fc.integer({ min: 0, max: 7 }), value: fc.bigInt({ min: -(2n ** 63n), max: 2n ** 63n - 1n }) }).map(
        ({ addr, kind, value }) => ({ name: "store", args: [addr, kind, value] }),
      ),
      fc.record({ addr: address(memoryBytes - 4093 - 8), value: fc.bigInt({ min: 0n, max: 2n ** 63n - 1n }) }).map(({ addr, value }) => ({ name: "store_offset", args: [addr, value] })),
      fc.record({ addr: address(memoryBytes - 8), value: fc.bigInt({ min: 0n, max: 2n ** 63n - 1n }) }).map(({ addr, value }) => ({ name: "lane", args: [addr, value] })),
    );
    await fc.assert(fc.asyncProperty(epochsOf(op), fc.nat(), epochsOf(op), (e, pick, tail) => differential(guest, e, pick, tail)), { numRuns: 40 });
  });

  it("memory.fill / copy / init / data.drop across pages", async () => {
    const guest = await guestOf(fixtureBytes("bulk"));
    const memoryBytes = 4 * 65536;
    const span = fc.integer({ min: 0, max: 3 * PAGE });
    const op: fc.Arbitrary<Op> = fc.oneof(
      fc.tuple(address(memoryBytes - 3 * PAGE), fc.integer({ min: 0, max: 255 }), span).map(([d, v, n]) => ({ name: "fill", args: [d, v, n] })),
      fc.tuple(address(memoryBytes - 3 * PAGE), address(memoryBytes - 3 * PAGE), span).map(([d, s, n]) => ({ name: "copy", args: [d, s, n] })),
      fc.tuple(address(memoryBytes - 64), fc.integer({ min: 0, max: 10 }), fc.integer({ min: 0, max: 26 })).map(([d, o, n]) => ({ name: "init", args: [d, o, n] })),
    );
    await fc.assert(fc.asyncProperty(epochsOf(op), fc.nat(), epochsOf(op), (e, pick, tail) => differential(guest, e, pick, tail)), { numRuns: 40 });
  });

  it("data.drop survives a checkpoint: a restored VM still traps on memory.init of a dropped segment", async () => {
    const guest = await guestOf(fixtureBytes("bulk"));
    const opts = options();
    const vm = VmCore.boot(guest, opts);
    const backup = BackupImage.blank(guest, opts, RESERVED_WASM_PAGES + guest.info.guest_initial_pages);
    vm.invoke("init", [100, 0, 5]);
    vm.invoke("drop", []);
    shipDelta(vm, backup);
    const promoted = backup.promote();
    expect(() => promoted.invoke("init", [100, 0, 5])).toThrow(/out of bounds/);
    expect(promoted.crashed).toMatch(/init/);
  });

  it("a promoted backup's image equals the primary's image of the same cut byte for byte", async () => {
    // The runtime state travels through decode and is encoded again by the
    // promoted VM: the encoding must not depend on how its arrays were built.
    const guest = await guestOf(fixtureBytes("globals"));
    const opts = options({ size: 3 });
    const vm = VmCore.boot(guest, opts);
    const backup = BackupImage.blank(guest, opts, RESERVED_WASM_PAGES + guest.info.guest_initial_pages);
    vm.invoke("mix", [5n]);
    shipDelta(vm, backup);
    const primary = imageBytes(vm);
    expect(imageBytes(backup.promote()).equals(primary)).toBe(true);
  });

  it("memory.grow mid-epoch: deltas carry the new size; rollback across a grow shrinks memory back", async () => {
    const guest = await guestOf(fixtureBytes("grow"));
    const op: fc.Arbitrary<Op> = fc.oneof(
      fc.tuple(fc.integer({ min: 0, max: 2 }), fc.integer()).map(([p, v]) => ({ name: "grow_and_write", args: [p, v] })),
      fc.tuple(address(65536 - 4), fc.integer()).map(([a, v]) => ({ name: "poke", args: [a, v] })),
    );
    await fc.assert(fc.asyncProperty(epochsOf(op), fc.nat(), epochsOf(op), (e, pick, tail) => differential(guest, e, pick, tail)), { numRuns: 30 });
  });

  it("mutable globals of every type (i32, i64, f32 and f64 NaN payloads, v128) are bit-exact across cuts", async () => {
    const guest = await guestOf(fixtureBytes("globals"));
    const op: fc.Arbitrary<Op> = fc.bigInt({ min: -(2n ** 63n), max: 2n ** 63n - 1n }).map((x) => ({ name: "mix", args: [x] }));
    await fc.assert(fc.asyncProperty(epochsOf(op), fc.nat(), epochsOf(op), (e, pick, tail) => differential(guest, e, pick, tail)), { numRuns: 30 });
    // And the guest's own view agrees: digest after promotion equals the uninterrupted run.
    const opts = options();
    const a = VmCore.boot(guest, opts);
    const b = VmCore.boot(guest, opts);
    const backup = BackupImage.blank(guest, opts, RESERVED_WASM_PAGES + guest.info.guest_initial_pages);
    const xs = [3n, -1n, 0x7ff8000000000001n, 12345678901234n];
    for (const x of xs) {
      a.invoke("mix", [x]);
      b.invoke("mix", [x]);
    }
    shipDelta(b, backup);
    const promoted = backup.promote();
    a.invoke("mix", [99n]);
    promoted.invoke("mix", [99n]);
    expect(promoted.invoke("digest", [])).toBe(a.invoke("digest", []));
  });
});

/** The plain (uninstrumented) module: what every replica must agree with. */
function plainInstance(bytes: Uint8Array): Record<string, (...args: number[]) => number> {
  return new WebAssembly.Instance(new WebAssembly.Module(bytes as Uint8Array<ArrayBuffer>), {}).exports as unknown as Record<string, (...args: number[]) => number>;
}

const head = (vm: { invoke(name: string, args: number[]): unknown }, n: number) => Array.from({ length: n }, (_, i) => vm.invoke("load8", [i]));
const plainHead = (plain: Record<string, (...args: number[]) => number>, n: number) => Array.from({ length: n }, (_, i) => plain.load8(i));

describe("rollback in place undoes data.drop", () => {
  it("rollback to a cut before the drop: memory.init works as in the plain module and on a backup promoted from the cut", async () => {
    const bytes = fixtureBytes("segments");
    const guest = await guestOf(bytes);
    const opts = options();
    const vm = VmCore.boot(guest, opts);
    const backup = BackupImage.blank(guest, opts, RESERVED_WASM_PAGES + guest.info.guest_initial_pages);
    vm.commit(shipDelta(vm, backup));
    vm.invoke("drop", []);
    expect(() => vm.invoke("init", [])).toThrow(/out of bounds/); // dropped: the plain module traps too
    vm.rollback(1);
    vm.invoke("init", []);
    const plain = plainInstance(bytes);
    plain.init();
    expect(head(vm, 3)).toEqual(plainHead(plain, 3));
    expect(Buffer.from(head(vm, 3) as number[]).toString()).toBe("abc");
    const promoted = backup.promote();
    promoted.invoke("init", []);
    expect(head(promoted, 3)).toEqual(head(vm, 3));
  });

  it("rollback across several epochs revives the segment; a drop before the cut stays", async () => {
    const guest = await guestOf(fixtureBytes("segments"));
    const vm = VmCore.boot(guest, options());
    vm.commit(vm.capture().epoch); // cut 1: segment live
    vm.invoke("drop", []);
    vm.capture(); // cut 2: dropped
    vm.invoke("poke", [50, 1]);
    vm.capture(); // cut 3
    vm.rollback(2);
    expect(() => vm.invoke("init", [])).toThrow(/out of bounds/);
    vm.rollback(1);
    vm.invoke("init", []);
    expect(Buffer.from(head(vm, 3) as number[]).toString()).toBe("abc");
  });

  it("rollback across a memory.grow and a drop (the rollback that re-creates memory) revives the segment too", async () => {
    const guest = await guestOf(fixtureBytes("segments"));
    const vm = VmCore.boot(guest, options());
    vm.commit(vm.capture().epoch);
    vm.invoke("grow", []);
    vm.invoke("drop", []);
    vm.rollback(1);
    vm.invoke("init", []);
    expect(Buffer.from(head(vm, 3) as number[]).toString()).toBe("abc");
  });
});

describe("cut 0 means booted", () => {
  it("rollback(0) boots again: active segments and the start function's effects are back, and a backup promoted from cut 0 agrees", async () => {
    const bytes = fixtureBytes("segments");
    const guest = await guestOf(bytes);
    const opts = options();
    const vm = VmCore.boot(guest, opts);
    vm.invoke("poke", [100, 0]);
    vm.capture(); // cut 1, not committed
    vm.invoke("poke", [200, 7]);
    vm.rollback(0);
    const plain = plainInstance(bytes);
    expect(vm.invoke("started", [])).toBe(1);
    expect(Buffer.from([100, 101, 102, 103, 104, 105].map((a) => vm.invoke("load8", [a]) as number)).toString()).toBe("active");
    expect(vm.invoke("load8", [200])).toBe(plain.load8(200));
    vm.invoke("init", []); // the passive segment is live again as well
    const promoted = BackupImage.blank(guest, opts, RESERVED_WASM_PAGES + guest.info.guest_initial_pages).promote();
    promoted.invoke("init", []);
    // Both ship their next cut as booted, with the same image.
    vm.capture();
    promoted.capture();
    // Same memory and globals byte for byte; the runtime state compared decoded (V8's serializer
    // may encode equal arrays differently, dense or sparse, depending on how they were built).
    const [a, p] = [vm.image(), promoted.image()];
    expect({ ...a, runtime_state: null }).toEqual({ ...p, runtime_state: null });
    expect(decodeRuntimeState(a.runtime_state)).toEqual(decodeRuntimeState(p.runtime_state));
    expect(decodeRuntimeState(a.runtime_state).booted).toBe(true);
    // And a backup that folds the primary's next delta does not boot a second time when promoted.
    const backup = BackupImage.fromImage(guest, opts, decodeImage(imageBytes(vm)));
    expect(backup.promote().invoke("started", [])).toBe(1);
  });

  it("a primary rolled back to cut 0 gives cut 0's image, unbooted, though it booted again since (a recovery's image for a new backup)", async () => {
    const guest = await guestOf(fixtureBytes("segments"));
    const opts = options();
    const vm = VmCore.boot(guest, opts);
    vm.invoke("poke", [100, 0]);
    vm.capture(); // cut 1, not committed
    vm.invoke("poke", [200, 7]);
    vm.rollback(0); // boots again: epoch 1 has written the active segment
    const image = vm.image();
    const blank = BackupImage.blank(guest, opts, RESERVED_WASM_PAGES + guest.info.guest_initial_pages).image();
    // Cut 0's memory is the module's before its active segments are written (a blank backup's); its
    // globals are the module's initial ones, which a blank backup leaves to the instance.
    expect({ ...image, runtime_state: null, globals: null }).toEqual({ ...blank, runtime_state: null, globals: null });
    expect(decodeRuntimeState(image.runtime_state).booted).toBe(false);
    // A backup installed from it boots when promoted, as the primary did.
    const promoted = BackupImage.fromImage(guest, opts, image).promote();
    expect(promoted.invoke("started", [])).toBe(1);
    expect(Buffer.from([100, 101, 102, 103, 104, 105].map((a) => promoted.invoke("load8", [a]) as number)).toString()).toBe("active");
  });

  it("an image is its cut's whatever the guest did since", async () => {
    const guest = await guestOf(fixtureBytes("segments"));
    const vm = VmCore.boot(guest, options());
    vm.invoke("poke", [100, 0]);
    vm.capture();
    const atCut = vm.image();
    vm.invoke("poke", [200, 7]);
    vm.invoke("poke", [4096 * 3 + 5, 9]);
    expect(vm.image()).toEqual(atCut);
  });
});

/** kv requests as the guest's clients would send them. */
function kvRequests(count: number, seed: number): string[] {
  let x = seed >>> 0 || 1;
  const next = () => (x = (Math.imul(x, 1103515245) + 12345) >>> 0);
  const out: string[] = [];
  for (let i = 0; i < count; i++) {
    const key = `k${next() % 16}`;
    const r = next() % 3;
    out.push(r === 0 ? `put ${key} v${i} with spaces` : r === 1 ? `get ${key}` : `del ${key}`);
  }
  return out;
}

const text = (records: readonly OutputRecord[]) => records.map((r) => `${r.seq}:${Buffer.from(r.bytes).toString()}`);

describe("restore-and-continue equals an uninterrupted run (kv guest)", () => {
  it.each(["promote", "restore"] as const)("failover by %s at a random cut", async (how) => {
    const guest = await guestOf(builtBytes("kv"));
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 5, max: 60 }), fc.integer({ min: 1, max: 8 }), fc.nat(), fc.integer({ min: 0, max: 7 }), async (count, perEpoch, seed, extra) => {
        const requests = kvRequests(count, seed);
        const opts = options();
        // Uninterrupted run.
        const a = VmCore.boot(guest, opts);
        requests.forEach((r, i) => a.request(1, i, Buffer.from(r)));
        a.capture();
        const expected = text(a.commit(a.epoch - 1));
        // Protected run: checkpoint every `perEpoch` requests, commit each cut, then lose the primary.
        const b = VmCore.boot(guest, opts);
        const backup = BackupImage.blank(guest, opts, RESERVED_WASM_PAGES + guest.info.guest_initial_pages);
        const released: OutputRecord[] = [];
        let delivered = 0; // requests covered by the last committed cut
        for (let i = 0; i < requests.length; i++) {
          b.request(1, i, Buffer.from(requests[i]));
          if ((i + 1) % perEpoch === 0 && i + 1 < requests.length) {
            const epoch = shipDelta(b, backup);
            released.push(...b.commit(epoch));
            delivered = i + 1;
          }
        }
        // The primary ran `extra` more requests past the cut, then died: their effects must not survive.
        const survivor = how === "promote" ? backup.promote() : VmCore.restore(guest, decodeImage(encodeImage(backup.image())), opts);
        for (let i = delivered; i < requests.length; i++) survivor.request(1, i, Buffer.from(requests[i]));
        survivor.capture();
        released.push(...survivor.commit(survivor.epoch - 1));
        // A sink keeps each sequence number once: re-released records of the cut are dropped by seq.
        const seen = new Set<number>();
        const stream = released.filter((r) => !seen.has(r.seq) && seen.add(r.seq));
        expect(text(stream)).toEqual(expected);
        void extra;
      }),
      { numRuns: 25 },
    );
  });

  it("rollback in place discards uncommitted epochs and re-execution matches", async () => {
    const guest = await guestOf(builtBytes("kv"));
    const opts = options();
    const vm = VmCore.boot(guest, opts);
    const requests = kvRequests(40, 7);
    requests.slice(0, 20).forEach((r, i) => vm.request(1, i, Buffer.from(r)));
    vm.capture();
    const committed = vm.commit(vm.epoch - 1);
    const cutImage = imageBytes(vm);
    const cut = vm.epoch - 1;
    // Two uncommitted epochs of writes, then roll back.
    requests.slice(20, 30).forEach((r, i) => vm.request(1, 20 + i, Buffer.from(r)));
    vm.capture();
    requests.slice(30).forEach((r, i) => vm.request(1, 30 + i, Buffer.from(r)));
    const { pages_restored } = vm.rollback(cut);
    expect(pages_restored).toBeGreaterThan(0);
    expect(imageBytes(vm).equals(cutImage)).toBe(true);
    expect(vm.pendingOutput()).toEqual([]);
    // Re-executing gives the same replies as a run that never rolled back.
    requests.slice(20).forEach((r, i) => vm.request(1, 20 + i, Buffer.from(r)));
    vm.capture();
    const after = vm.commit(vm.epoch - 1);
    const straight = VmCore.boot(guest, opts);
    requests.forEach((r, i) => straight.request(1, i, Buffer.from(r)));
    straight.capture();
    expect(text([...committed, ...after])).toEqual(text(straight.commit(straight.epoch - 1)));
  });
});

describe("output commit in the runtime", () => {
  it("releases a ticker's output only at commit, in order, each count once", async () => {
    const guest = await guestOf(builtBytes("ticker"));
    let now = 0;
    const vm = VmCore.boot(guest, options({ now: () => now }));
    const released: string[] = [];
    for (let epoch = 0; epoch < 10; epoch++) {
      now += 10;
      vm.fireDueTimers(now);
      const pending = vm.pendingOutput().length;
      expect(pending).toBe(1);
      const captured = vm.capture();
      // Nothing leaves before its cut commits.
      expect(released.length).toBe(epoch);
      released.push(...vm.commit(captured.epoch).map((r) => Buffer.from(r.bytes).toString()));
    }
    expect(released).toEqual(Array.from({ length: 10 }, (_, i) => `${i + 1}\n`));
  });
});
