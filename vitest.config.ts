import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // Multi-process tests start real host processes whose failure detector
    // runs on a 300 ms timeout; on a 2-core machine, test files running side
    // by side would starve them. One file at a time keeps timings honest.
    pool: "forks",
    fileParallelism: false,
    testTimeout: 60_000,
    hookTimeout: 60_000,
  },
});
