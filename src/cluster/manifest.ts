/**
 * Deployment manifest: which module to run as which group, how it is protected,
 * and per-VM limits. YAML or JSON (the `yaml` package reads both, since JSON
 * is YAML 1.2), validated with a strict zod schema so a typo in a field name
 * is an error rather than a silently ignored setting.
 *
 *   group: bank            # required, [a-z0-9][a-z0-9-]{0,62}
 *   mode: group            # none | vm | group (default group)
 *   module: ../build/guests/bank.wasm   # required, relative to the manifest's directory
 *   size: 4                # VMs in the group, 1..256 (default 1)
 *   epoch: { interval_ms: 20, min_interval_ms: 2, max_interval_ms: 100 }
 *   limits: { memory_mib: 256, call_cpu_ms: 1000, output_bytes_max: 1048576 }
 *
 * Every error carries the field path (e.g. "epoch.min_interval_ms") so a user
 * sees exactly what to fix; all issues are reported at once, not the first.
 */
import { readFile, stat } from "node:fs/promises";
import * as path from "node:path";
import { parseDocument, type YAMLError } from "yaml";
import { z } from "zod";

export const PROTECTION_MODES = ["none", "vm", "group"] as const;
export type ProtectionMode = (typeof PROTECTION_MODES)[number];

/** A validated manifest with every default filled in. */
export interface Manifest {
  group: string;
  mode: ProtectionMode;
  /** Absolute path of the guest `.wasm` module. */
  module: string;
  size: number;
  epoch: { interval_ms: number; min_interval_ms: number; max_interval_ms: number };
  limits: { memory_mib: number; call_cpu_ms: number; output_bytes_max: number };
}

export type ManifestErrorCode = "InvalidManifest" | "ManifestSyntax" | "ManifestNotFound";

export interface ManifestIssue {
  /** Dotted field path ("epoch.min_interval_ms"); "" for the manifest as a whole. */
  path: string;
  message: string;
}

export class ManifestError extends Error {
  override name = "ManifestError";

  constructor(
    /** Stable, machine-readable; messages may change, codes do not. */
    readonly code: ManifestErrorCode,
    /** The file path (or label) the manifest came from. */
    readonly source: string,
    readonly issues: ManifestIssue[],
  ) {
    // One line per issue: "<source>: <path>: <message>" (path omitted when "").
    super(issues.map((i) => [source, i.path, i.message].filter((s) => s !== "").join(": ")).join("\n"));
  }
}

// ---- schema ---------------------------------------------------------------

const GROUP_NAME = /^[a-z0-9][a-z0-9-]{0,62}$/;
const EPOCH_DEFAULT = { interval_ms: 20, min_interval_ms: 2, max_interval_ms: 100 };
const MIB = 1024 * 1024;

/** Describe a wrong value for a message: `string "4"`, `null`, `an array`. */
function describe(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "a list";
  if (typeof v === "string") return `string ${JSON.stringify(v)}`;
  if (typeof v === "object") return "a mapping";
  return `${typeof v} ${String(v)}`;
}

function typeError(expected: string) {
  return (iss: { input?: unknown }) =>
    iss.input === undefined ? "required" : `expected ${expected}, got ${describe(iss.input)}`;
}

function intField(min: number, max: number) {
  const range = (iss: { input?: unknown }) => `must be an integer from ${min} to ${max}, got ${String(iss.input)}`;
  return z.number({ error: typeError("an integer") }).int({ error: range }).min(min, { error: range }).max(max, { error: range });
}

const epochSchema = z
  .strictObject(
    {
      interval_ms: intField(1, 10_000).default(EPOCH_DEFAULT.interval_ms),
      // Optional so that their defaults can follow interval_ms (below).
      min_interval_ms: intField(1, 10_000).optional(),
      max_interval_ms: intField(1, 10_000).optional(),
    },
    { error: typeError("a mapping") },
  )
  .prefault({})
  .transform((e, ctx) => {
    // Defaults bend around an explicit interval_ms (interval_ms: 1 must not
    // fail on a min_interval_ms the user never wrote); explicit values must
    // satisfy min <= interval <= max, reported on the field that is off.
    const min = e.min_interval_ms ?? Math.min(EPOCH_DEFAULT.min_interval_ms, e.interval_ms);
    const max = e.max_interval_ms ?? Math.max(EPOCH_DEFAULT.max_interval_ms, e.interval_ms);
    if (min > e.interval_ms) {
      ctx.addIssue({ code: "custom", path: ["min_interval_ms"], message: `must be <= interval_ms (${e.interval_ms}), got ${min}` });
    }
    if (max < e.interval_ms) {
      ctx.addIssue({ code: "custom", path: ["max_interval_ms"], message: `must be >= interval_ms (${e.interval_ms}), got ${max}` });
    }
    return { interval_ms: e.interval_ms, min_interval_ms: min, max_interval_ms: max };
  });

const limitsSchema = z
  .strictObject(
    {
      memory_mib: intField(1, 4000).default(256),
      call_cpu_ms: intField(1, 3_600_000).default(1000),
      output_bytes_max: intField(1, 1024 * MIB).default(MIB),
    },
    { error: typeError("a mapping") },
  )
  .prefault({});

/** Also checks a manifest as a `deploy` request carries it (src/host/api.ts). */
export const manifestSchema = z.strictObject(
  {
    group: z
      .string({ error: typeError("a string") })
      .regex(GROUP_NAME, { error: "must be 1-63 characters of a-z, 0-9 and '-', not starting with '-'" }),
    mode: z
      .enum(PROTECTION_MODES, { error: (iss) => `must be one of ${PROTECTION_MODES.join(", ")}, got ${describe(iss.input)}` })
      .default("group"),
    module: z.string({ error: typeError("a string (path to a .wasm file)") }).min(1, { error: "must not be empty" }),
    size: intField(1, 256).default(1),
    epoch: epochSchema,
    limits: limitsSchema,
  },
  { error: typeError("a mapping of manifest fields") },
);

// ---- parsing --------------------------------------------------------------

/** Longest manifest text parseManifest reads. */
export const MANIFEST_CHARS_MAX = 8 * 1024;

/**
 * Parse and validate manifest text. `source` names it in error messages;
 * `base_dir` is the directory `module` is relative to. Does not touch the
 * file system (see `loadManifest` for the module-exists check).
 */
export function parseManifest(text: string, opts: { source: string; base_dir: string }): Manifest {
  if (text.length > MANIFEST_CHARS_MAX) {
    // The YAML parser's time grows faster than linearly on some inputs (deep
    // flow nesting, many anchors: ≈ 0.5 s for 16 KiB, 2 s for 32 KiB); a manifest is a few
    // hundred bytes, so a small cap bounds parse time without refusing any real one.
    throw new ManifestError("InvalidManifest", opts.source, [
      { path: "", message: `manifest is ${text.length} characters long; the limit is ${MANIFEST_CHARS_MAX}` },
    ]);
  }
  const nesting = nestingProblem(text);
  if (nesting) throw new ManifestError("ManifestSyntax", opts.source, [{ path: "", message: nesting }]);
  const doc = parseDocument(text);
  if (doc.errors.length > 0) {
    throw new ManifestError(
      "ManifestSyntax",
      opts.source,
      doc.errors.map((e) => ({ path: "", message: syntaxMessage(e) })),
    );
  }
  let data: unknown;
  try {
    data = doc.toJS(); // may throw, e.g. on alias bombs (maxAliasCount)
  } catch (e) {
    throw new ManifestError("ManifestSyntax", opts.source, [{ path: "", message: (e as Error).message }]);
  }
  if (data === null || data === undefined) {
    throw new ManifestError("InvalidManifest", opts.source, [{ path: "", message: "manifest is empty" }]);
  }

  const result = manifestSchema.safeParse(data);
  if (!result.success) {
    throw new ManifestError("InvalidManifest", opts.source, result.error.issues.flatMap(toIssues));
  }
  return { ...result.data, module: path.resolve(opts.base_dir, result.data.module) };
}

/**
 * Read, parse and validate a manifest file, then check that its module
 * exists. `module` is resolved against the manifest file's directory.
 */
export async function loadManifest(file: string): Promise<Manifest> {
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? "error";
    const message = code === "ENOENT" ? "no such file" : `cannot read manifest (${code})`;
    throw new ManifestError("ManifestNotFound", file, [{ path: "", message }]);
  }
  const manifest = parseManifest(text, { source: file, base_dir: path.dirname(path.resolve(file)) });
  const problem = await stat(manifest.module).then(
    (s) => (s.isFile() ? null : `${manifest.module} is not a file`),
    () => `module file not found: ${manifest.module}`,
  );
  if (problem) throw new ManifestError("InvalidManifest", file, [{ path: "module", message: problem }]);
  return manifest;
}

/** Flow collections ([ or {) a manifest may open in all; it needs two or three. */
export const MANIFEST_FLOW_COLLECTIONS_MAX = 128;
/** Block nesting a manifest may reach; it needs two levels. */
export const MANIFEST_BLOCK_DEPTH_MAX = 64;

/**
 * The YAML parser recurses once per nesting level: about a thousand levels
 * overflow the stack, and about two thousand `[` (a 2 KiB file) make Node
 * abort the whole process with a fatal out-of-memory error from inside the
 * parser. So nesting is bounded before parsing, by upper bounds that need no
 * YAML parsing: every `[` or `{` anywhere counts as a flow level (closing
 * brackets are not subtracted, as one inside a quoted string would be), and
 * a line's block depth is at most its number of enclosing indentation
 * levels plus the `-`, `?` and `:` indicators on it.
 */
function nestingProblem(text: string): string | null {
  let flow = 0;
  const indents: number[] = [];
  let line = 1;
  let at = 0;
  while (at < text.length) {
    let end = text.indexOf("\n", at);
    if (end < 0) end = text.length;
    let indent = 0;
    while (at + indent < end && text[at + indent] === " ") indent++;
    let indicators = 0;
    for (let i = at + indent; i < end; i++) {
      const c = text[i];
      if (c === "[" || c === "{") {
        if (++flow > MANIFEST_FLOW_COLLECTIONS_MAX) return `more than ${MANIFEST_FLOW_COLLECTIONS_MAX} flow collections ([ or {) (line ${line})`;
      } else if ((c === "-" || c === "?" || c === ":") && (i + 1 === end || text[i + 1] === " " || text[i + 1] === "\t" || text[i + 1] === "\r")) {
        indicators++;
      }
    }
    if (at + indent < end && text[at + indent] !== "#") {
      while (indents.length && indent < indents[indents.length - 1]) indents.pop();
      if (!indents.length || indent > indents[indents.length - 1]) indents.push(indent);
      if (indents.length + indicators > MANIFEST_BLOCK_DEPTH_MAX) return `nested deeper than ${MANIFEST_BLOCK_DEPTH_MAX} levels (line ${line})`;
    }
    at = end + 1;
    line++;
  }
  return null;
}

function syntaxMessage(e: YAMLError): string {
  // yaml's messages end in " at line L, column C:" followed by a code excerpt;
  // keep the first line. Its MULTIPLE_DOCS text addresses library callers.
  const first = e.message.split("\n")[0].replace(/:$/, "");
  if (e.code === "MULTIPLE_DOCS" && e.linePos) {
    return `more than one YAML document (second starts at line ${e.linePos[0].line})`;
  }
  return first;
}

/** zod issue -> our issues; an unknown-keys issue becomes one issue per key. */
function toIssues(iss: z.core.$ZodIssue): ManifestIssue[] {
  const at = iss.path.map(String);
  if (iss.code === "unrecognized_keys") {
    return iss.keys.map((k) => ({ path: [...at, k].join("."), message: "unknown field" }));
  }
  return [{ path: at.join("."), message: iss.message }];
}
