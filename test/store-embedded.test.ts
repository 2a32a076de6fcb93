import * as fc from "fast-check";
import { mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { EmbeddedStore } from "../src/store/embedded.js";
import { StoreError, type StoreErrorCode } from "../src/store/store.js";
import { isAlive, killQuietly, runTs, waitForLine } from "./support/child.js";

const support = (name: string) => fileURLToPath(new URL(`./support/${name}`, import.meta.url));

let dir: string;
const stores: EmbeddedStore[] = [];
const children: (number | undefined)[] = [];

function open(options: ConstructorParameters<typeof EmbeddedStore>[1] = {}): EmbeddedStore {
  const s = new EmbeddedStore(dir, { fsync: false, ...options });
  stores.push(s);
  return s;
}

async function rejectsWith(p: Promise<unknown>, code: StoreErrorCode): Promise<StoreError> {
  const e = await p.then(
    () => null,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(StoreError);
  expect((e as StoreError).code).toBe(code);
  return e as StoreError;
}

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "cohort-test-"));
});

afterEach(async () => {
  for (const pid of children.splice(0)) killQuietly(pid);
  await Promise.all(stores.splice(0).map((s) => s.close()));
  await rm(dir, { recursive: true, force: true });
});

describe("EmbeddedStore: single process", () => {
  it("cas creates only if absent, fails on a stale version, and versions grow by one per write", async () => {
    const s = open();
    expect(await s.get("groups/ticker")).toBeNull();
    expect(await s.cas("groups/ticker", 0, { size: 1 })).toBe(1);
    expect(await s.cas("groups/ticker", 0, { size: 9 })).toBeNull(); // exists already
    expect(await s.get("groups/ticker")).toEqual({ key: "groups/ticker", value: { size: 1 }, version: 1 });
    expect(await s.cas("groups/ticker", 1, { size: 2 })).toBe(2);
    expect(await s.cas("groups/ticker", 1, { size: 3 })).toBeNull(); // stale
    expect(await s.cas("groups/ticker", 5, { size: 3 })).toBeNull(); // from the future
    expect(await s.put("groups/ticker", { size: 4 })).toBe(3);
    expect(await s.cas("groups/ticker", 3, { size: 5 })).toBe(4);
    expect(await s.get("groups/ticker")).toEqual({ key: "groups/ticker", value: { size: 5 }, version: 4 });
    expect(await s.put("vms/ticker-0", "x")).toBe(1); // versions are per key
  });

  it("delete removes a key; a re-created key never reuses an old version (no ABA)", async () => {
    const s = open();
    await s.delete("hosts/none"); // no-op
    expect(await s.put("hosts/h1", { a: 1 })).toBe(1);
    expect(await s.put("hosts/h1", { a: 2 })).toBe(2);
    await s.delete("hosts/h1");
    expect(await s.get("hosts/h1")).toBeNull();
    expect(await s.list("hosts/")).toEqual([]);
    expect(await s.cas("hosts/h1", 2, { stale: true })).toBeNull(); // deleted: only 0 matches
    const v = await s.cas("hosts/h1", 0, { a: 3 });
    expect(v).not.toBeNull();
    expect(v!).toBeGreaterThan(2);
    expect(await s.cas("hosts/h1", 2, { stale: true })).toBeNull();
    expect(await s.get("hosts/h1")).toEqual({ key: "hosts/h1", value: { a: 3 }, version: v });
  });

  it("lists by prefix, sorted by key, without deleted keys", async () => {
    const s = open();
    for (const k of ["hosts/h2", "hosts/h10", "groups/a", "hostsx", "hosts/h1", "vms/a-0", "hosts/h3"]) await s.put(k, k.length);
    await s.delete("hosts/h3");
    expect((await s.list("hosts/")).map((r) => r.key)).toEqual(["hosts/h1", "hosts/h10", "hosts/h2"]);
    expect((await s.list("hosts")).map((r) => r.key)).toEqual(["hosts/h1", "hosts/h10", "hosts/h2", "hostsx"]);
    expect((await s.list("")).map((r) => r.key)).toEqual(["groups/a", "hosts/h1", "hosts/h10", "hosts/h2", "hostsx", "vms/a-0"]);
    expect(await s.list("nothing/")).toEqual([]);
    expect(await s.list("groups/")).toEqual([{ key: "groups/a", value: 8, version: 1 }]);
  });

  it("an empty store lists nothing before its directory exists", async () => {
    expect(await new EmbeddedStore(join(dir, "fresh")).list("")).toEqual([]);
  });

  it("rejects invalid keys and prefixes with InvalidKey", async () => {
    const s = open();
    const bad = ["", "Hosts/h1", "/hosts", "-a", ".a", "_a", "a b", "a/../b", "a..b", "..", "a/", "a//b", "a\\b", "a~b", "é", "a\nb", "x".repeat(201)];
    for (const key of bad) {
      await rejectsWith(s.get(key), "InvalidKey");
      await rejectsWith(s.put(key, 1), "InvalidKey");
      await rejectsWith(s.cas(key, 0, 1), "InvalidKey");
      await rejectsWith(s.delete(key), "InvalidKey");
    }
    await rejectsWith(s.get(42 as unknown as string), "InvalidKey");
    for (const prefix of ["/", "Hosts/", "a..", "a//"]) await rejectsWith(s.list(prefix), "InvalidKey");
    const longest = `k/${"x".repeat(198)}`;
    expect(longest.length).toBe(200);
    expect(await s.put(longest, 1)).toBe(1);
    expect(await s.put("a.b_c-d/0.9", 1)).toBe(1);
    expect((await s.list("")).map((r) => r.key)).toEqual(["a.b_c-d/0.9", longest]);
  });

  it("rejects values that are not JSON or too large; nothing is written", async () => {
    const s = open({ max_value_bytes: 100 });
    await rejectsWith(s.put("k", undefined), "InvalidValue");
    await rejectsWith(s.put("k", () => 1), "InvalidValue");
    await rejectsWith(s.put("k", 10n), "InvalidValue");
    const cyclic: Record<string, unknown> = {};
    cyclic.self = cyclic;
    await rejectsWith(s.cas("k", 0, cyclic), "InvalidValue");
    expect(await s.put("k", "x".repeat(98))).toBe(1); // 100 bytes as JSON
    await rejectsWith(s.put("k", "x".repeat(99)), "ValueTooLarge");
    await rejectsWith(s.cas("k", 1, "é".repeat(50)), "ValueTooLarge"); // 102 bytes of UTF-8
    await rejectsWith(s.cas("k", -1, 1), "InvalidArgument");
    await rejectsWith(s.cas("k", 1.5, 1), "InvalidArgument");
    expect(await s.get("k")).toEqual({ key: "k", value: "x".repeat(98), version: 1 });
  });

  it("has a 1 MiB value limit by default", async () => {
    const s = open();
    const big = "x".repeat(1024 * 1024 - 2);
    expect(await s.put("big", big)).toBe(1);
    expect((await s.get<string>("big"))!.value.length).toBe(big.length);
    await rejectsWith(s.put("big", `${big}x`), "ValueTooLarge");
  });

  it("reports a damaged record as Corrupt", async () => {
    const s = open();
    await s.put("hosts/h1", 1);
    await writeFile(join(s.dir, "hosts~h1.json"), "{not json");
    await rejectsWith(s.get("hosts/h1"), "Corrupt");
    await rejectsWith(s.list("hosts/"), "Corrupt");
    await writeFile(join(s.dir, "hosts~h1.json"), JSON.stringify({ key: "hosts/h2", version: 1, value: 1 }));
    await rejectsWith(s.get("hosts/h1"), "Corrupt");
    await writeFile(join(s.dir, "hosts~h1.json"), JSON.stringify({ key: "hosts/h1", version: 0, value: 1 }));
    await rejectsWith(s.put("hosts/h1", 2), "Corrupt");
  });

  it("ignores foreign and temporary files in its directory", async () => {
    const s = open();
    await s.put("a", 1);
    await writeFile(join(s.dir, "a.json.123.abc.tmp"), "partial");
    await writeFile(join(s.dir, "README"), "hello");
    await writeFile(join(s.dir, "Bad~Key.json"), "{}");
    expect(await s.list("")).toEqual([{ key: "a", value: 1, version: 1 }]);
  });

  it("shares state between instances on one directory and rejects calls after close", async () => {
    const a = open();
    const b = open();
    await a.put("groups/g", { n: 1 });
    expect(await b.get("groups/g")).toEqual({ key: "groups/g", value: { n: 1 }, version: 1 });
    expect(await b.cas("groups/g", 1, { n: 2 })).toBe(2);
    expect(await a.cas("groups/g", 1, { n: 3 })).toBeNull();
    await a.close();
    await rejectsWith(a.get("groups/g"), "StoreUnavailable");
    await rejectsWith(a.put("groups/g", 1), "StoreUnavailable");
    expect((await b.get("groups/g"))!.value).toEqual({ n: 2 });
  });

  it("serialises concurrent cas within one process (no lost update)", async () => {
    const s = open();
    const increment = async () => {
      for (;;) {
        const cur = await s.get<number>("n");
        if ((await s.cas("n", cur?.version ?? 0, (cur?.value ?? 0) + 1)) !== null) return;
      }
    };
    await Promise.all(Array.from({ length: 20 }, increment));
    expect(await s.get("n")).toEqual({ key: "n", value: 20, version: 20 });
    expect((await readdir(s.dir)).sort()).toEqual(["n.json"]); // no lock or temporary file left
  });

  it("behaves like a map with per-key versions (model-based, random operation sequences)", async () => {
    type Op = { op: "put" | "cas" | "delete" | "get"; key: string; value: number; delta: number };
    const opArb = fc.record({
      op: fc.constantFrom<Op["op"]>("put", "cas", "delete", "get"),
      key: fc.constantFrom("a", "a/b", "b"),
      value: fc.integer({ min: 0, max: 1000 }),
      delta: fc.integer({ min: -1, max: 1 }),
    });
    let run = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(opArb, { maxLength: 25 }), async (ops) => {
        const s = new EmbeddedStore(join(dir, `model-${run++}`), { fsync: false });
        const model = new Map<string, { value: number; version: number }>();
        const last = new Map<string, number>(); // highest version ever used per key
        try {
          for (const o of ops) {
            const cur = model.get(o.key);
            if (o.op === "get") {
              expect(await s.get(o.key)).toEqual(cur ? { key: o.key, ...cur } : null);
            } else if (o.op === "put") {
              const v = await s.put(o.key, o.value);
              expect(v).toBeGreaterThan(last.get(o.key) ?? 0);
              model.set(o.key, { value: o.value, version: v });
              last.set(o.key, v);
            } else if (o.op === "cas") {
              const expected = Math.max(0, (cur?.version ?? 0) + o.delta);
              const v = await s.cas(o.key, expected, o.value);
              if (expected === (cur?.version ?? 0)) {
                expect(v).not.toBeNull();
                expect(v!).toBeGreaterThan(last.get(o.key) ?? 0);
                model.set(o.key, { value: o.value, version: v! });
                last.set(o.key, v!);
              } else expect(v).toBeNull();
            } else {
              await s.delete(o.key);
              model.delete(o.key);
            }
          }
          const want = [...model.entries()].map(([key, r]) => ({ key, ...r })).sort((x, y) => (x.key < y.key ? -1 : 1));
          expect(await s.list("")).toEqual(want);
        } finally {
          await s.close();
        }
      }),
      { numRuns: 40 },
    );
  });
});

describe("EmbeddedStore: across processes", () => {
  it("4 processes x 50 cas-increments of one counter lose no update", async () => {
    const runs = Array.from({ length: 4 }, () => runTs(support("store-counter.ts"), [dir, "counters/c", "50"]));
    for (const r of runs) children.push(r.child.pid);
    const results = await Promise.all(runs.map((r) => r.done));
    for (const r of results) {
      expect(r.stderr).toBe("");
      expect(r.code).toBe(0);
      expect(JSON.parse(r.stdout)).toMatchObject({ done: 50 });
    }
    const s = open();
    expect(await s.get("counters/c")).toEqual({ key: "counters/c", value: 200, version: 200 });
    // The processes really contended (otherwise this test proves little).
    const conflicts = results.reduce((n, r) => n + (JSON.parse(r.stdout) as { conflicts: number }).conflicts, 0);
    expect(conflicts).toBeGreaterThan(0);
    expect((await readdir(s.dir)).filter((n) => !n.endsWith(".json"))).toEqual([]);
  });

  it("a lock left by a SIGKILLed process is broken once stale; the store recovers", async () => {
    const s = open();
    await s.put("vms/ticker-0", { incarnation: 1 });
    const holder = runTs(support("store-lock-holder.ts"), [dir, "vms/ticker-0"]);
    children.push(holder.child.pid);
    await waitForLine(holder.child, "locked");
    expect((await readdir(s.dir)).sort()).toContain("vms~ticker-0.lock");
    process.kill(holder.child.pid!, "SIGKILL");
    const exit = await holder.done;
    expect(exit.signal).toBe("SIGKILL");
    expect(isAlive(holder.child.pid!)).toBe(false);

    const t0 = Date.now();
    expect(await s.cas("vms/ticker-0", 1, { incarnation: 2 })).toBe(2);
    const waited = Date.now() - t0;
    expect(waited).toBeLessThan(2000); // broken after ~1 s (stale_lock_ms), within the 2 s lock timeout
    expect(await s.get("vms/ticker-0")).toEqual({ key: "vms/ticker-0", value: { incarnation: 2 }, version: 2 });
    expect((await readdir(s.dir)).sort()).toEqual(["vms~ticker-0.json"]);
  });

  it("several processes racing to break one stale lock still lose no update", async () => {
    const holder = runTs(support("store-lock-holder.ts"), [dir, "counters/c"]);
    children.push(holder.child.pid);
    await waitForLine(holder.child, "locked");
    process.kill(holder.child.pid!, "SIGKILL");
    await holder.done;
    const runs = Array.from({ length: 4 }, () => runTs(support("store-counter.ts"), [dir, "counters/c", "25"]));
    for (const r of runs) children.push(r.child.pid);
    for (const r of await Promise.all(runs.map((r) => r.done))) {
      expect(r.stderr).toBe("");
      expect(r.code).toBe(0);
    }
    expect(await open().get("counters/c")).toEqual({ key: "counters/c", value: 100, version: 100 });
  });

  it("never breaks the lock of a live process: writers get StoreUnavailable naming the holder", async () => {
    const s = open({ lock_timeout_ms: 300, stale_lock_ms: 100 });
    const holder = runTs(support("store-lock-holder.ts"), [dir, "groups/g"]);
    children.push(holder.child.pid);
    await waitForLine(holder.child, "locked");
    await new Promise((r) => setTimeout(r, 200)); // older than stale_lock_ms: only liveness protects it
    const e = await rejectsWith(s.put("groups/g", 1), "StoreUnavailable");
    expect(e.message).toContain(`pid ${holder.child.pid}`);
    expect(await s.get("groups/g")).toBeNull(); // reads take no lock
    await s.put("groups/other", 1); // other keys are not affected
    process.kill(holder.child.pid!, "SIGKILL");
    await holder.done;
    expect(await s.put("groups/g", 2)).toBe(1);
  });
});
