import { describe, expect, it } from "vitest";
import { measureRawTcp } from "../src/bench/raw-tcp.js";

describe("measureRawTcp", () => {
  it("bounces a 64-byte message between two processes and reports consistent figures", async () => {
    const duration_ms = 300;
    const result = await measureRawTcp({ duration_ms, payload_bytes: 64, warmup_ms: 100 });
    expect(result.transport).toBe("tcp");
    expect(result.round_trips).toBeGreaterThan(0);
    expect(result.latency_us_p50).toBeGreaterThan(0);
    expect(result.latency_us_p50).toBeLessThanOrEqual(result.latency_us_p99);
    const expected = result.round_trips / (duration_ms / 1000);
    expect(Math.abs(result.round_trips_per_s - expected)).toBeLessThanOrEqual(0.3 * expected);
  }, 3_000);

  it("over mutual TLS: the same figures, over a TLS 1.3 connection", async () => {
    const result = await measureRawTcp({ duration_ms: 300, payload_bytes: 64, warmup_ms: 100, tls: true });
    expect(result.transport).toBe("TLSv1.3");
    expect(result.round_trips).toBeGreaterThan(0);
    expect(result.latency_us_p50).toBeLessThanOrEqual(result.latency_us_p99);
  }, 10_000);

  it("rejects a payload that is not a positive integer", async () => {
    await expect(measureRawTcp({ duration_ms: 100, payload_bytes: 0 })).rejects.toThrow(RangeError);
  });
});
