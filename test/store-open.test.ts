/** Choosing a store from `--store` (src/store/open.ts): what is accepted, and the errors for what is not. */
import { spawnSync } from "node:child_process";
import { describe, expect, it } from "vitest";
import { parseStoreSpec, StoreSpecError, withPrefixSegment } from "../src/store/open.js";

describe("--store", () => {
  it("accepts embedded and etcd URLs with one or more endpoints and an optional prefix", () => {
    expect(parseStoreSpec("embedded")).toEqual({ kind: "embedded" });
    expect(parseStoreSpec("etcd://127.0.0.1:2379")).toEqual({ kind: "etcd", endpoints: ["127.0.0.1:2379"], prefix: "cohort/" });
    expect(parseStoreSpec("etcd://a.example:2379,10.0.0.6:2380/prod/eu")).toEqual({ kind: "etcd", endpoints: ["a.example:2379", "10.0.0.6:2380"], prefix: "prod/eu/" });
    expect(parseStoreSpec("etcd://[::1]:2379")).toEqual({ kind: "etcd", endpoints: ["[::1]:2379"], prefix: "cohort/" });
  });

  it("refuses anything else, naming the part that is wrong and what is accepted", () => {
    const bad: [string, RegExp][] = [
      ["", /expected `embedded` or `etcd:\/\//],
      ["file:///tmp", /expected `embedded`/],
      ["etcd://", /endpoint "" is not host:port/],
      ["etcd://localhost", /endpoint "localhost" is not host:port/],
      ["etcd://h:0", /endpoint "h:0"/],
      ["etcd://h:70000", /endpoint "h:70000"/],
      ["etcd://h:1,,h:2", /endpoint ""/],
      ["etcd://h:1/", /prefix ""/],
      ["etcd://h:1/a//b", /prefix "a\/\/b"/],
      ["etcd://h:1/../x", /prefix "..\/x"/],
    ];
    for (const [text, message] of bad) {
      expect(() => parseStoreSpec(text), text).toThrow(StoreSpecError);
      expect(() => parseStoreSpec(text), text).toThrow(message);
    }
  });

  it("a prefix segment isolates an etcd cluster's keys and leaves the embedded store alone", () => {
    expect(withPrefixSegment("embedded", "demo-1")).toBe("embedded");
    expect(withPrefixSegment("etcd://h:1", "demo-1")).toBe("etcd://h:1/cohort/demo-1");
    expect(parseStoreSpec(withPrefixSegment("etcd://h:1,h:2/p", "demo-1"))).toEqual({ kind: "etcd", endpoints: ["h:1", "h:2"], prefix: "p/demo-1/" });
  });

  it("the CLI refuses a bad --store before starting anything, with the reason", () => {
    const r = spawnSync(process.execPath, ["bin/cohort.js", "up", "--store", "etcd://nohost", "--state-dir", "/nonexistent/never"], { encoding: "utf8" });
    expect(r.status).not.toBe(0);
    expect(r.stderr).toContain('endpoint "nohost" is not host:port');
  });
});
