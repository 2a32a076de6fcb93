/**
 * The CoordinationStore contract (src/store/store.ts), run against every
 * implementation: the embedded store (files), the in-memory store, and the
 * etcd store against a real etcd server (test/support/etcd.ts; skipped outside CI without the
 * binary). What only one implementation has (files, locks, etcd outages) is
 * tested in its own file.
 */
import * as fc from "fast-check";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { EmbeddedStore } from "../src/store/embedded.js";
import { EtcdStore } from "../src/store/etcd.js";
import { MemoryStore } from "../src/store/memory.js";
import { type CoordinationStore, StoreError } from "../src/store/store.js";
import { etcdAvailable, startEtcd, type RunningEtcd } from "./support/etcd.js";
import { rejectsWith } from "./support/store.js";

interface Backend {
  name: string;
  available: boolean;
  setupAll(): Promise<void>;
  teardownAll(): Promise<void>;
  /** A fresh, empty store space for the next test. */
  setupEach(): Promise<void>;
  /** A client of the current test's store space (several clients share it). */
  open(options?: { max_value_bytes?: number }): CoordinationStore;
  /** A client of a separate empty store space named `name`, within the current test's. */
  fresh(name: string): CoordinationStore;
}

let dir = "";
let etcd: RunningEtcd | null = null;
let space = 0;
let memory: MemoryStore | null = null;
const spaces = new Map<string, MemoryStore>();

/** A client of a shared MemoryStore whose close() closes only itself, as a client of the other stores does. */
function memoryClient(store: MemoryStore): CoordinationStore {
  let closed = false;
  const guard = <A extends unknown[], R>(fn: (...args: A) => Promise<R>) => (...args: A): Promise<R> =>
    closed ? Promise.reject(new StoreError("StoreUnavailable", "client closed")) : fn(...args);
  return {
    get: guard((key: string) => store.get(key)),
    put: guard((key: string, value: unknown, options?: Parameters<MemoryStore["put"]>[2]) => store.put(key, value, options)),
    cas: guard((key: string, expected: number, value: unknown) => store.cas(key, expected, value)),
    list: guard((prefix: string) => store.list(prefix)),
    delete: guard((key: string) => store.delete(key)),
    grantLease: guard((ttl_ms: number) => store.grantLease(ttl_ms)),
    watch: (prefix: string, onChange: () => void) => store.watch(prefix, onChange),
    close: async () => {
      closed = true;
    },
  } as CoordinationStore;
}

const backends: Backend[] = [
  {
    name: "EmbeddedStore",
    available: true,
    setupAll: async () => {},
    teardownAll: async () => {},
    setupEach: async () => {
      dir = await mkdtemp(join(tmpdir(), "cohort-test-"));
    },
    open: (options = {}) => new EmbeddedStore(dir, { fsync: false, ...options }),
    fresh: (name) => new EmbeddedStore(join(dir, name), { fsync: false }),
  },
  {
    name: "MemoryStore",
    available: true,
    setupAll: async () => {},
    teardownAll: async () => {},
    setupEach: async () => {
      memory = new MemoryStore();
      spaces.clear();
    },
    // Clients of one space share its store; close() of one client must not close the others' (a view per client).
    open: (options) => (options?.max_value_bytes ? new MemoryStore(options) : memoryClient(memory!)),
    fresh: (name) => {
      if (!spaces.has(name)) spaces.set(name, new MemoryStore());
      return spaces.get(name)!;
    },
  },
  {
    name: "EtcdStore",
    available: etcdAvailable(),
    setupAll: async () => {
      etcd = await startEtcd();
    },
    teardownAll: async () => {
      await etcd?.destroy();
    },
    setupEach: async () => {
      space++;
    },
    open: (options = {}) => new EtcdStore({ endpoints: [etcd!.endpoint], prefix: `t${space}/`, ...options }),
    fresh: (name) => new EtcdStore({ endpoints: [etcd!.endpoint], prefix: `t${space}/${name}/` }),
  },
];


describe.each(backends)("$name: the store contract", (backend) => {
  const stores: CoordinationStore[] = [];
  const open = (options?: { max_value_bytes?: number }) => {
    const s = backend.open(options);
    stores.push(s);
    return s;
  };

  beforeAll(async () => {
    if (backend.available) await backend.setupAll();
  }, 30_000);
  afterAll(async () => {
    if (backend.available) await backend.teardownAll();
  });
  beforeEach(async (ctx) => {
    if (!backend.available) ctx.skip();
    await backend.setupEach();
  });
  afterEach(async () => {
    await Promise.all(stores.splice(0).map((s) => s.close()));
    if (dir) await rm(dir, { recursive: true, force: true });
    dir = "";
  });

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

    it("shares state between instances and rejects calls after close", async () => {
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
          const s = backend.fresh(`model-${run++}`);
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

  it("a watch on a prefix says when it is in place, then hears another client's put, delete, revoked lease and lapsed lease under it, and nothing else (a renewal, another prefix)", async () => {
    const a = open();
    const b = open();
    let heard = 0;
    const watch = a.watch("hosts/", () => heard++);
    try {
      const until = async (what: string, check: () => boolean) => {
        const end = Date.now() + 5000;
        while (!check()) {
          if (Date.now() > end) throw new Error(`the watch did not hear ${what}`);
          await new Promise((r) => setTimeout(r, 20));
        }
      };
      await until("the watch in place", () => heard > 0); // it says so once
      await new Promise((r) => setTimeout(r, 300));
      let seen = heard;
      await b.put("hosts/h1", { n: 1 });
      await until("a put", () => heard > seen);
      seen = heard;
      await b.delete("hosts/h1");
      await until("a delete", () => heard > seen);
      seen = heard;
      const lease = await b.grantLease(1000);
      await b.put("hosts/h2", { n: 2 }, { lease });
      await until("a put with a lease", () => heard > seen);
      seen = heard;
      await lease.revoke();
      await until("the lease revoked", () => heard > seen);
      seen = heard;
      await b.put("groups/g", { n: 3 }); // another prefix
      await new Promise((r) => setTimeout(r, 600));
      expect(heard).toBe(seen);
      // A renewal changes nothing under the prefix; a lease left to lapse does.
      const lapsing = await b.grantLease(1000);
      await b.put("hosts/h3", { n: 4 }, { lease: lapsing });
      await until("a put with a second lease", () => heard > seen);
      seen = heard;
      await lapsing.keepAlive();
      await new Promise((r) => setTimeout(r, 300));
      expect(heard).toBe(seen);
      await until("the lease lapsed", () => heard > seen);
      expect(await a.get("hosts/h3")).toBeNull();
    } finally {
      watch.close();
    }
  });

  it("a key put with a lease lives while the lease does: revoked or lapsed, it reads as deleted and its versions go on", async () => {
    const s = open();
    const lease = await s.grantLease(1000);
    expect(lease.ttl_ms).toBeGreaterThanOrEqual(1000);
    expect(await s.put("hosts/h1", { a: 1 }, { lease })).toBe(1);
    expect(await s.put("hosts/h2", { a: 2 })).toBe(1);
    expect((await s.list("hosts/")).map((r) => r.key)).toEqual(["hosts/h1", "hosts/h2"]);
    await lease.revoke();
    expect(await s.get("hosts/h1")).toBeNull();
    expect((await s.list("hosts/")).map((r) => r.key)).toEqual(["hosts/h2"]);
    await rejectsWith(s.put("hosts/h1", { a: 3 }, { lease }), "LeaseLost");
    await rejectsWith(lease.keepAlive(), "LeaseLost");
    expect(await s.cas("hosts/h1", 1, { stale: true })).toBeNull(); // gone: only 0 matches
    expect(await s.cas("hosts/h1", 0, { a: 4 })).toBeGreaterThan(1); // no ABA
    await rejectsWith(s.grantLease(999), "InvalidArgument");
  });

  it("a lease kept alive outlives its ttl; left alone, it lapses and takes its keys", async () => {
    const s = open();
    const kept = await s.grantLease(1000);
    const left = await s.grantLease(1000);
    await s.put("hosts/kept", 1, { lease: kept });
    await s.put("hosts/left", 2, { lease: left });
    const until = Date.now() + Math.max(kept.ttl_ms, left.ttl_ms) + 1500;
    while (Date.now() < until) {
      await kept.keepAlive();
      await new Promise((r) => setTimeout(r, 250));
    }
    expect(await s.get("hosts/kept")).toEqual({ key: "hosts/kept", value: 1, version: 1 });
    expect(await s.get("hosts/left")).toBeNull();
    await rejectsWith(left.keepAlive(), "LeaseLost");
    await kept.revoke();
  }, 15_000);
});
