#!/usr/bin/env node
// Compiled CLI entry (`npm run build` produces dist/). Baseline tiers of V8's
// wasm compiler are skipped so guests and benchmarks run optimized code from
// the first call: a VM is long-lived, and one long guest call would otherwise
// run entirely in the baseline tier (there is no on-stack replacement for wasm).
import { setFlagsFromString } from "node:v8";
setFlagsFromString("--no-liftoff");
await import("../dist/src/cli/main.js");
