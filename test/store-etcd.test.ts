/**
 * What only the etcd store has (the contract itself: test/store-contract.test.ts):
 * its records as etcd values, its prefix, several clients racing through one
 * server, and a server that is down, hung or restarted. A real etcd
 * (test/support/etcd.ts).
 */
import { Etcd3 } from "etcd3";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { EtcdStore } from "../src/store/etcd.js";
import { etcdAvailable, startEtcd, type RunningEtcd } from "./support/etcd.js";
import { rejectsWith } from "./support/store.js";

let etcd: RunningEtcd;
let raw: Etcd3;
const stores: EtcdStore[] = [];
let space = 0;

function open(options: Partial<ConstructorParameters<typeof EtcdStore>[0]> = {}): EtcdStore {
  const s = new EtcdStore({ endpoints: [etcd.endpoint], prefix: `e${space}/`, ...options });
  stores.push(s);
  return s;
}


describe.skipIf(!etcdAvailable())("EtcdStore on a real etcd", () => {
  beforeAll(async () => {
    etcd = await startEtcd();
    raw = new Etcd3({ hosts: `http://${etcd.endpoint}` });
  }, 30_000);
  afterAll(async () => {
    raw?.close();
    await etcd?.destroy();
  });
  afterEach(async () => {
    await Promise.all(stores.splice(0).map((s) => s.close()));
    space++;
  });

  it("keeps the record format under its prefix; reads a damaged one as Corrupt; lists only its own valid keys", async () => {
    const s = open();
    expect(await s.put("hosts/h1", { a: 1 })).toBe(1);
    await s.delete("hosts/h1");
    expect(await raw.get(`e${space}/hosts/h1`).string()).toBe('{"key":"hosts/h1","version":2,"deleted":true}\n');
    await raw.put(`e${space}/hosts/h2`).value("{not json");
    await rejectsWith(s.get("hosts/h2"), "Corrupt");
    await rejectsWith(s.list("hosts/"), "Corrupt");
    await raw.put(`e${space}/hosts/h2`).value(JSON.stringify({ key: "hosts/h9", version: 1, value: 1 }));
    await rejectsWith(s.get("hosts/h2"), "Corrupt");
    await raw.delete().key(`e${space}/hosts/h2`);
    await raw.put(`e${space}/Not A Key`).value("x"); // foreign: not a valid key, skipped
    await raw.put(`other/hosts/h3`).value("x"); // outside the prefix: invisible
    await s.put("hosts/h4", 4);
    expect(await s.list("")).toEqual([{ key: "hosts/h4", value: 4, version: 1 }]);
  });

  it("clients racing through one server lose no update", async () => {
    const clients = [open(), open(), open()];
    const increment = async (s: EtcdStore) => {
      for (let done = 0; done < 15; ) {
        const cur = await s.get<number>("counters/c");
        if ((await s.cas("counters/c", cur?.version ?? 0, (cur?.value ?? 0) + 1)) !== null) done++;
      }
    };
    await Promise.all(clients.flatMap((c) => [increment(c), increment(c)]));
    expect(await clients[0].get("counters/c")).toEqual({ key: "counters/c", value: 90, version: 90 });
  });

  it("a stopped or hung etcd is StoreUnavailable within the call deadline; once back, the same client works again", async () => {
    const s = open({ call_timeout_ms: 500, dial_timeout_ms: 500 });
    expect(await s.put("groups/g", 1)).toBe(1);

    await etcd.pause(); // hung: accepts connections, answers nothing
    let started = Date.now();
    try {
      const hung = await rejectsWith(s.get("groups/g"), "StoreUnavailable");
      expect(Date.now() - started).toBeLessThan(3000);
      expect(hung.message).toContain(etcd.endpoint);
    } finally {
      etcd.resume(); // a failure here must not leave the server stopped under the next tests
    }
    expect((await s.get("groups/g"))!.value).toBe(1);

    await etcd.stop(); // down: connections refused
    started = Date.now();
    await rejectsWith(s.cas("groups/g", 1, 2), "StoreUnavailable");
    await rejectsWith(s.list(""), "StoreUnavailable");
    expect(Date.now() - started).toBeLessThan(6000);
    await etcd.restart();
    // No circuit breaker holds calls back after the server returns (a few tries while the channel reconnects).
    let version: number | null = null;
    for (let i = 0; i < 50 && version === null; i++) {
      version = await s.cas("groups/g", 1, 2).catch(() => null);
      if (version === null) await new Promise((r) => setTimeout(r, 100));
    }
    expect(version).toBe(2);
    expect(await s.get("groups/g")).toEqual({ key: "groups/g", value: 2, version: 2 });
  }, 60_000);

  it("refuses calls after close with StoreUnavailable", async () => {
    const s = open();
    await s.put("a", 1);
    await s.close();
    await rejectsWith(s.get("a"), "StoreUnavailable");
  });
});
