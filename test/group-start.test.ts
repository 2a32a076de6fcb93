/**
 * One attempt at starting a deployed group (src/host/group/start.ts), its
 * hosts stood in for by plain functions: which failures cost the deploy an
 * attempt (the group is placed again) and which end it.
 */
import { describe, expect, it } from "vitest";
import { startGroup, type GroupStartCalls } from "../src/host/group/start.js";
import { ConnectionClosedError } from "../src/host/connection.js";
import { MemoryStore } from "../src/store/memory.js";
import type { ProtectionRecord } from "../src/core/types.js";

const record: ProtectionRecord = {
  group: "g",
  mode: "group",
  size: 3,
  incarnation: 1,
  leader: "h1",
  placement: [
    { primary: "h1", backup: "h2" },
    { primary: "h2", backup: "h3" },
    { primary: "h3", backup: "h1" },
  ],
  failed: [],
  epoch: { interval_ms: 20, min_interval_ms: 2, max_interval_ms: 100 },
  limits: { memory_mib: 64, call_cpu_ms: 1000, output_bytes_max: 1 << 20 },
};

/** Hosts that prepare (h2 fails as `h2Fails` says), run and abort, each call noted. */
function hosts(h2Fails: () => Error): { calls: GroupStartCalls; seen: string[] } {
  const seen: string[] = [];
  const rank = (h: string) => Number(h.slice(1)) - 1;
  return {
    seen,
    calls: {
      prepare: async (h) => {
        seen.push(`prepare ${h}`);
        if (h === "h2") throw h2Fails();
        return { routes: { [rank(h)]: { address: `127.0.0.1:${1000 + rank(h)}`, token: h } } };
      },
      run: async (h) => void seen.push(`run ${h}`),
      abort: async (h) => void seen.push(`abort ${h}`),
    },
  };
}

describe("starting a deployed group", () => {
  it("a host whose connection closed while it prepared costs an attempt, even if it is heard again by then", async () => {
    const { calls, seen } = hosts(() => new ConnectionClosedError("out:h2: connection closed (peer failed)"));
    const lost = await startGroup({ store: new MemoryStore(), calls, self: "h1", liveHosts: () => ["h1", "h2", "h3"], loadModule: async () => undefined }, record, new Uint8Array(0));
    expect(lost).toEqual(["h2"]);
    // Nothing ran; every host, the flapping one too, stops what it prepared.
    expect(seen.filter((s) => s.startsWith("run"))).toEqual([]);
    expect(seen.filter((s) => s.startsWith("abort")).sort()).toEqual(["abort h1", "abort h2", "abort h3"]);
  });

  it("a live host that refuses to prepare ends the deploy with its error", async () => {
    const { calls, seen } = hosts(() => new Error("the guest trapped at boot"));
    await expect(startGroup({ store: new MemoryStore(), calls, self: "h1", liveHosts: () => ["h1", "h2", "h3"], loadModule: async () => undefined }, record, new Uint8Array(0))).rejects.toThrow(/trapped at boot/);
    expect(seen.filter((s) => s.startsWith("run"))).toEqual([]);
  });

  it("with every host prepared, every host runs the group", async () => {
    const { calls, seen } = hosts(() => new Error("unused"));
    const ok = { ...calls, prepare: async (h: string, r: ProtectionRecord, m: Uint8Array) => (h === "h2" ? { routes: { 1: { address: "127.0.0.1:1001", token: "h2" } } } : calls.prepare(h, r, m)) };
    expect(await startGroup({ store: new MemoryStore(), calls: ok, self: "h1", liveHosts: () => ["h1", "h2", "h3"], loadModule: async () => undefined }, record, new Uint8Array(0))).toEqual([]);
    expect(seen.filter((s) => s.startsWith("run")).sort()).toEqual(["run h1", "run h2", "run h3"]);
  });

  it("loads the module once before any host prepares; then every host prepares at once", async () => {
    const seen: string[] = [];
    let preparing = 0;
    let preparing_max = 0;
    const calls: GroupStartCalls = {
      prepare: async (h) => {
        seen.push(`prepare ${h}`);
        preparing_max = Math.max(preparing_max, ++preparing);
        await new Promise((r) => setTimeout(r, 20));
        preparing--;
        const rank = Number(h.slice(1)) - 1;
        return { routes: { [rank]: { address: `127.0.0.1:${1000 + rank}`, token: h } } };
      },
      run: async (h) => void seen.push(`run ${h}`),
      abort: async (h) => void seen.push(`abort ${h}`),
    };
    const loadModule = async () => {
      await new Promise((r) => setTimeout(r, 20));
      seen.push("load");
    };
    expect(await startGroup({ store: new MemoryStore(), calls, self: "h1", liveHosts: () => ["h1", "h2", "h3"], loadModule }, record, new Uint8Array(0))).toEqual([]);
    expect(seen[0]).toBe("load");
    expect(preparing_max).toBe(3);
  });

  it("a module that cannot be loaded ends the start before any host prepares", async () => {
    const { calls, seen } = hosts(() => new Error("unused"));
    const loadModule = async () => {
      throw new Error("malformed module: not WebAssembly");
    };
    await expect(startGroup({ store: new MemoryStore(), calls, self: "h1", liveHosts: () => ["h1", "h2", "h3"], loadModule }, record, new Uint8Array(0))).rejects.toThrow(/not WebAssembly/);
    expect(seen.filter((s) => s.startsWith("prepare") || s.startsWith("run"))).toEqual([]);
  });
});
