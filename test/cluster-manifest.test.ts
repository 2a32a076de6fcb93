import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadManifest, type Manifest, ManifestError, parseManifest } from "../src/cluster/manifest.js";

let dir: string;
let wasm: string;

beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), "cohort-manifest-"));
  await mkdir(path.join(dir, "deploy"));
  await mkdir(path.join(dir, "guests"));
  wasm = path.join(dir, "guests", "bank.wasm");
  await writeFile(wasm, Buffer.from([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]));
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Write a manifest under <dir>/deploy and load it. */
async function load(name: string, text: string): Promise<Manifest> {
  const file = path.join(dir, "deploy", name);
  await writeFile(file, text);
  return loadManifest(file);
}

/** The ManifestError thrown by fn (sync or async). */
async function failure(fn: () => unknown): Promise<ManifestError> {
  try {
    await fn();
  } catch (e) {
    expect(e).toBeInstanceOf(ManifestError);
    return e as ManifestError;
  }
  throw new Error("expected a ManifestError");
}

const parse = (text: string) => parseManifest(text, { source: "test.yaml", base_dir: "/srv/deploy" });

describe("manifest", () => {
  it("YAML and JSON produce the same normalized manifest, defaults filled", async () => {
    const yaml = `
# a comment
group: bank
module: ../guests/bank.wasm
size: 4
epoch:
  min_interval_ms: 5
`;
    const json = JSON.stringify({ group: "bank", module: "../guests/bank.wasm", size: 4, epoch: { min_interval_ms: 5 } });
    const expected: Manifest = {
      group: "bank",
      mode: "group",
      module: wasm,
      size: 4,
      epoch: { interval_ms: 20, min_interval_ms: 5, max_interval_ms: 100 },
      limits: { memory_mib: 256, call_cpu_ms: 1000, output_bytes_max: 1024 * 1024 },
    };
    expect(await load("bank.yaml", yaml)).toEqual(expected);
    expect(await load("bank.json", json)).toEqual(expected);
  });

  it("accepts every field explicitly", () => {
    const m = parse(`
group: kv-store-2
mode: vm
module: /abs/kv.wasm
size: 256
epoch: { interval_ms: 50, min_interval_ms: 50, max_interval_ms: 10000 }
limits: { memory_mib: 4000, call_cpu_ms: 5, output_bytes_max: 4096 }
`);
    expect(m).toEqual({
      group: "kv-store-2",
      mode: "vm",
      module: "/abs/kv.wasm",
      size: 256,
      epoch: { interval_ms: 50, min_interval_ms: 50, max_interval_ms: 10000 },
      limits: { memory_mib: 4000, call_cpu_ms: 5, output_bytes_max: 4096 },
    });
  });

  it("unset epoch bounds follow an explicit interval_ms", () => {
    expect(parse("group: a\nmodule: m.wasm\nepoch: { interval_ms: 1 }").epoch).toEqual({
      interval_ms: 1,
      min_interval_ms: 1,
      max_interval_ms: 100,
    });
    expect(parse("group: a\nmodule: m.wasm\nepoch: { interval_ms: 500 }").epoch).toEqual({
      interval_ms: 500,
      min_interval_ms: 2,
      max_interval_ms: 500,
    });
  });

  it("syntax error → ManifestSyntax with the line", async () => {
    const e = await failure(() => parse("group: bank\nmodule: x.wasm\nepoch: {interval_ms: 5\n"));
    expect(e.code).toBe("ManifestSyntax");
    expect(e.issues[0].path).toBe("");
    expect(e.message).toMatch(/^test\.yaml: .*line \d+/);
    expect((await failure(() => parse('{"group": "a",, }'))).code).toBe("ManifestSyntax");
    expect((await failure(() => parse("group: a\ngroup: b\nmodule: m"))).code).toBe("ManifestSyntax");
  });

  it("missing group → InvalidManifest at group", async () => {
    const e = await failure(() => parse("module: x.wasm"));
    expect(e.code).toBe("InvalidManifest");
    expect(e.issues).toEqual([{ path: "group", message: "required" }]);
    expect(e.message).toBe("test.yaml: group: required");
  });

  it("bad group name → InvalidManifest at group", async () => {
    for (const g of ["Bank", "-bank", "a".repeat(64), "bank_1"]) {
      const e = await failure(() => parse(`group: "${g}"\nmodule: x.wasm`));
      expect(e.issues.map((i) => i.path)).toEqual(["group"]);
    }
  });

  it("bad mode → InvalidManifest at mode", async () => {
    const e = await failure(() => parse("group: bank\nmodule: x.wasm\nmode: remus"));
    expect(e.code).toBe("InvalidManifest");
    expect(e.issues.map((i) => i.path)).toEqual(["mode"]);
    expect(e.message).toContain("none, vm, group");
  });

  it("size 0 → InvalidManifest at size", async () => {
    const e = await failure(() => parse("group: bank\nmodule: x.wasm\nsize: 0"));
    expect(e.code).toBe("InvalidManifest");
    expect(e.issues.map((i) => i.path)).toEqual(["size"]);
    expect(e.message).toBe("test.yaml: size: must be an integer from 1 to 256, got 0");
  });

  it("min > interval and max < interval → the offending field's path", async () => {
    const e = await failure(() => parse("group: bank\nmodule: x.wasm\nepoch: {interval_ms: 10, min_interval_ms: 11}"));
    expect(e.code).toBe("InvalidManifest");
    expect(e.issues.map((i) => i.path)).toEqual(["epoch.min_interval_ms"]);
    const e2 = await failure(() => parse("group: bank\nmodule: x.wasm\nepoch: {interval_ms: 10, max_interval_ms: 9}"));
    expect(e2.issues.map((i) => i.path)).toEqual(["epoch.max_interval_ms"]);
  });

  it("unknown field → InvalidManifest at that field, nested too", async () => {
    const e = await failure(() => parse("group: bank\nmodule: x.wasm\nsise: 4\nlimits: {memory_mb: 5}"));
    expect(e.code).toBe("InvalidManifest");
    expect(e.issues.map((i) => i.path).sort()).toEqual(["limits.memory_mb", "sise"]);
  });

  it("wrong type → InvalidManifest at that field", async () => {
    const e = await failure(() => parse('group: bank\nmodule: x.wasm\nlimits: {memory_mib: "256"}\nepoch: 20'));
    expect(e.code).toBe("InvalidManifest");
    expect(e.issues.map((i) => i.path).sort()).toEqual(["epoch", "limits.memory_mib"]);
    const e2 = await failure(() => parse("- group: bank"));
    expect(e2.issues.map((i) => i.path)).toEqual([""]);
  });

  it("lists every issue, one line each", async () => {
    const e = await failure(() => parse("group: Bank\nmodule: 3\nsize: 2.5"));
    expect(e.message.split("\n")).toEqual([
      "test.yaml: group: must be 1-63 characters of a-z, 0-9 and '-', not starting with '-'",
      "test.yaml: module: expected a string (path to a .wasm file), got number 3",
      "test.yaml: size: must be an integer from 1 to 256, got 2.5",
    ]);
  });

  it("missing module file → InvalidManifest at module (loadManifest)", async () => {
    const e = await failure(() => load("missing.yaml", "group: bank\nmodule: ../guests/nope.wasm"));
    expect(e.code).toBe("InvalidManifest");
    expect(e.issues.map((i) => i.path)).toEqual(["module"]);
    expect(e.message).toContain(path.join(dir, "guests", "nope.wasm"));
    const e2 = await failure(() => load("dir.yaml", "group: bank\nmodule: ../guests"));
    expect(e2.issues.map((i) => i.path)).toEqual(["module"]);
  });

  it("missing manifest file → ManifestNotFound", async () => {
    const e = await failure(() => loadManifest(path.join(dir, "nope.yaml")));
    expect(e.code).toBe("ManifestNotFound");
    expect(e.message).toContain("nope.yaml");
  });
});
