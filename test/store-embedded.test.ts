import { mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { setTimeout as sleep } from "node:timers/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { EmbeddedStore } from "../src/store/embedded.js";
import { isAlive, killQuietly, runTs, waitForLine } from "./support/child.js";
import { casIncrement, rejectsWith } from "./support/store.js";

const support = (name: string) => fileURLToPath(new URL(`./support/${name}`, import.meta.url));

let dir: string;
const stores: EmbeddedStore[] = [];
const children: (number | undefined)[] = [];

function open(options: ConstructorParameters<typeof EmbeddedStore>[1] = {}): EmbeddedStore {
  const s = new EmbeddedStore(dir, { fsync: false, ...options });
  stores.push(s);
  return s;
}


beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "cohort-test-"));
});

afterEach(async () => {
  for (const pid of children.splice(0)) killQuietly(pid);
  await Promise.all(stores.splice(0).map((s) => s.close()));
  await rm(dir, { recursive: true, force: true });
});

describe("EmbeddedStore: files (the contract itself: test/store-contract.test.ts)", () => {
  it("an empty store lists nothing before its directory exists", async () => {
    expect(await new EmbeddedStore(join(dir, "fresh")).list("")).toEqual([]);
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

  it("leaves no lock or temporary file behind after concurrent writes", async () => {
    const s = open();
    await Promise.all(Array.from({ length: 20 }, () => casIncrement(s, "n")));
    expect(await s.get("n")).toEqual({ key: "n", value: 20, version: 20 });
    expect((await readdir(s.dir)).sort()).toEqual(["n.json"]);
  });

  it("ignores foreign and temporary files in its directory", async () => {
    const s = open();
    await s.put("a", 1);
    await writeFile(join(s.dir, "a.json.123.abc.tmp"), "partial");
    await writeFile(join(s.dir, "README"), "hello");
    await writeFile(join(s.dir, "Bad~Key.json"), "{}");
    expect(await s.list("")).toEqual([{ key: "a", value: 1, version: 1 }]);
  });

  it("a renewal moves the lease file's modification time and rewrites nothing; the lease lapses its TTL after the last renewal, for another client too", async () => {
    const owner = open();
    const reader = open();
    const lease = await owner.grantLease(1000);
    await owner.put("hosts/h1", 1, { lease });
    const file = join(owner.dir, `${lease.id}.lease`);
    const before = await stat(file);
    const text = await readFile(file, "utf8");
    await sleep(600);
    await lease.keepAlive();
    const after = await stat(file);
    expect(after.ino).toBe(before.ino); // not a new file renamed over it
    expect(await readFile(file, "utf8")).toBe(text);
    expect(after.mtimeMs - before.mtimeMs).toBeGreaterThanOrEqual(550);
    // 1.0 s after the grant the key would be gone without the renewal; it lives until 1.0 s after it.
    await sleep(600);
    expect(await reader.get("hosts/h1")).toEqual({ key: "hosts/h1", value: 1, version: 1 });
    await sleep(600);
    expect(await reader.get("hosts/h1")).toBeNull();
    await rejectsWith(lease.keepAlive(), "LeaseLost");
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
