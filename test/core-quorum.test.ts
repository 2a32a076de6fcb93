/**
 * Only a side that sees a majority of the cluster decides a failover
 * (GroupCore.quorate, docs/PROTOCOL.md "Who decides"): a host cut off from
 * its peers but not from the store suspects them all as they suspect it,
 * and both reach the store. The core on its own, fed what the failure
 * detector and the registrations say, and the store's answers.
 */
import { describe, expect, it } from "vitest";
import { GroupCore } from "../src/core/node.js";
import type { CoreAction, Notice } from "../src/core/events.js";
import type { ProtectionRecord } from "../src/core/types.js";
import { protectionRecord } from "./support/record.js";

/** Three hosts: member 0 on h1 (backup h2), member 1 on h2 (backup h3), led by h1. */
const RECORD = protectionRecord({
  placement: [
    { primary: "h1", backup: "h2" },
    { primary: "h2", backup: "h3" },
  ],
});

const route = (port: number) => ({ address: `127.0.0.1:${port}`, token: `t${port}` });

/** A running core on `host`; `settle` runs its clock for `ms`, answering each store read with `record` (version 1), and returns what it asked for. */
function coreOn(host: string, record: ProtectionRecord, cluster: string[]) {
  let now_ms = 0;
  const core = GroupCore.deployed({ host, record, now_ms, detect_ms: 300, live: cluster, registered: cluster });
  for (const a of core.handle({ type: "start", routes: record.placement.map((_, i) => route(i + 1)) })) {
    if (a.type === "members") core.handle({ type: "done", id: a.id, ok: true, value: {} });
  }
  const settle = (ms: number) => {
    const cas: Extract<CoreAction, { type: "store_cas" }>[] = [];
    const notices: Notice[] = [];
    const take = (actions: CoreAction[]) => {
      for (const a of actions) {
        if (a.type === "store_get") take(core.handle({ type: "store", op: "get", ok: true, record, version: 1 }));
        else if (a.type === "store_cas") cas.push(a);
        else if (a.type === "notify") notices.push(a.notice);
      }
    };
    const end = now_ms + ms;
    while (now_ms < end) {
      now_ms = Math.min(end, now_ms + 10);
      take(core.handle({ type: "tick", now_ms }));
    }
    return { cas, notices };
  };
  const hosts = (live: string[], registered: string[], heard = live) => core.handle({ type: "hosts", live, heard, registered });
  return { core, settle, hosts };
}

describe("a failover is decided by a majority of the cluster only", () => {
  const cluster = ["h1", "h2", "h3"];

  it("a host that sees only itself of three reads the record but writes no decision; it says why, once", () => {
    const h1 = coreOn("h1", RECORD, cluster);
    h1.hosts(["h1"], cluster);
    const { cas, notices } = h1.settle(5000);
    expect(cas).toEqual([]);
    expect(notices.filter((n) => n.kind === "no_quorum")).toEqual([{ kind: "no_quorum", heard: ["h1"], registered: cluster }]);
  });

  it("the two that see each other decide, naming the third failed", () => {
    const h2 = coreOn("h2", RECORD, cluster);
    h2.hosts(["h2", "h3"], cluster);
    const { cas, notices } = h2.settle(5000);
    expect(cas).toHaveLength(1);
    expect(cas[0].value.failed).toEqual(["h1"]);
    expect(cas[0].value.incarnation).toBe(2);
    expect(notices.some((n) => n.kind === "no_quorum")).toBe(false);
  });

  it("the lone host decides once the others' registrations lapse (they died: their leases were not renewed)", () => {
    const h1 = coreOn("h1", RECORD, cluster);
    h1.hosts(["h1"], cluster);
    expect(h1.settle(2000).cas).toEqual([]);
    h1.hosts(["h1"], ["h1"]);
    const { cas } = h1.settle(100);
    expect(cas).toHaveLength(1);
    expect(cas[0].value.failed.sort()).toEqual(["h2", "h3"]);
  });

  it("two halves that both reach the store may each write: the compare-and-swap picks one (so of two hosts, one dying is decided at once)", () => {
    const two: ProtectionRecord = { ...RECORD, placement: [{ primary: "h1", backup: "h2" }, { primary: "h2", backup: "h1" }] };
    const pair = ["h1", "h2"];
    for (const [host, other] of [["h1", "h2"], ["h2", "h1"]]) {
      const core = coreOn(host, two, pair);
      core.hosts([host], pair);
      expect(core.settle(3000).cas.map((c) => c.value.failed)).toEqual([[other]]);
    }
  });

  it("of four hosts, one cut off waits; the three decide", () => {
    const four = ["h1", "h2", "h3", "h4"];
    const h1 = coreOn("h1", RECORD, four);
    h1.hosts(["h1"], four);
    expect(h1.settle(3000).cas).toEqual([]);
    const h3 = coreOn("h3", RECORD, four);
    h3.hosts(["h2", "h3", "h4"], four);
    expect(h3.settle(3000).cas.map((c) => c.value.failed)).toEqual([["h1"]]);
  });

  it("a cut host times its peers out one by one: deciding about the first, it does not count the second (silent, not yet timed out) on its side", () => {
    const h1 = coreOn("h1", RECORD, cluster);
    // h2 timed out; h3 is still within the detection timeout but not heard from within half of it.
    h1.hosts(["h1", "h3"], cluster, ["h1"]);
    expect(h1.settle(200).cas).toEqual([]);
    // The same view with h3 heard recently: a majority, which decides.
    h1.hosts(["h1", "h3"], cluster, ["h1", "h3"]);
    expect(h1.settle(200).cas.map((c) => c.value.failed)).toEqual([["h2"]]);
  });
});
