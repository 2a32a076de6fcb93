import js from "@eslint/js";
import tseslint from "typescript-eslint";
import { builtinModules } from "node:module";

const SANS_IO = "src/core is the deterministic, sans-I/O protocol core that the daemon and the simulator both drive: no Node builtins, clocks, timers or process state; the caller passes time and effects in and out.";

export default tseslint.config(
  { ignores: ["dist/", "build/", "node_modules/", ".scratch/", "sdk/assemblyscript/", "examples/", "bench/guests/"] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    // Scripts and the CLI entry run on Node.
    files: ["**/*.js", "**/*.mjs"],
    languageOptions: { globals: { console: "readonly", process: "readonly", performance: "readonly", URL: "readonly" } },
  },
  {
    rules: {
      "@typescript-eslint/no-explicit-any": "error",
      "@typescript-eslint/no-unused-vars": ["error", { argsIgnorePattern: "^_" }],
    },
  },
  {
    // Every promise in the daemon is handled: a rejection nobody awaits would crash the host process
    // (Node's default for unhandled rejections), so each async path ends in a handler that logs and
    // contains the error. `void promise` does not count as a handler.
    files: ["src/**/*.ts"],
    languageOptions: { parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname } },
    rules: {
      "@typescript-eslint/no-floating-promises": ["error", { ignoreVoid: false, ignoreIIFE: false }],
      // A promise where a callback's result is ignored (timers, EventEmitter listeners) floats too.
      "@typescript-eslint/no-misused-promises": ["error", { checksVoidReturn: true, checksConditionals: true, checksSpreads: true }],
    },
  },
  {
    files: ["src/core/**/*.ts"],
    rules: {
      "no-restricted-imports": [
        "error",
        {
          // Every builtin by its bare name too ("fs", "fs/promises", "net", "worker_threads", "timers", ...).
          paths: builtinModules.map((name) => ({ name, message: SANS_IO })),
          patterns: [
            { group: ["node:*"], message: SANS_IO },
            // Out of src/core only to pure utilities: anything else may bring I/O in through the back door.
            { regex: "^\\.\\./(?!util/assert\\.js$)", message: `${SANS_IO} Imports stay inside src/core (pure utilities such as src/util/assert.ts excepted).` },
          ],
        },
      ],
      "no-restricted-globals": [
        "error",
        ...["setTimeout", "setInterval", "setImmediate", "clearTimeout", "clearInterval", "clearImmediate", "queueMicrotask", "process", "Date", "performance", "Buffer"].map(
          (name) => ({ name, message: SANS_IO }),
        ),
      ],
      "no-restricted-properties": ["error", { object: "Math", property: "random", message: SANS_IO }],
    },
  },
  {
    // The simulator is deterministic: a seed is a run. Time is simulated, randomness is its seeded Rng,
    // and the wall clock (for steps/s) is passed in by the command.
    files: ["src/sim/**/*.ts"],
    rules: {
      "no-restricted-globals": [
        "error",
        ...["setTimeout", "setInterval", "setImmediate", "queueMicrotask", "Date", "performance", "process"].map((name) => ({
          name,
          message: "src/sim is deterministic: simulated time only, randomness from its seeded Rng (src/sim/rng.ts).",
        })),
      ],
      "no-restricted-properties": ["error", { object: "Math", property: "random", message: "src/sim draws from its seeded Rng (src/sim/rng.ts)." }],
    },
  },
);
