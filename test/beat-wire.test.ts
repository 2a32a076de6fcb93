/**
 * Heartbeat datagrams (src/host/beat-wire.ts): a beat is taken only as the
 * cluster's transport would take a frame (tagged under the pair's key with
 * TLS, untagged without), and no datagram makes the decoder throw.
 */
import { randomBytes } from "node:crypto";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { BEAT_TAG_BYTES, decodeBeat, encodeBeat } from "../src/host/beat-wire.js";

const key = randomBytes(32);
const other = randomBytes(32);

describe("heartbeat datagrams", () => {
  it("a tagged beat is taken under its pair's key, among the newest two, and under no other", () => {
    const d = encodeBeat({ from: "h1.2", sent_ms: 1234.5 }, key);
    expect(decodeBeat(d, () => [key])).toEqual({ from: "h1.2", sent_ms: 1234.5 });
    expect(decodeBeat(d, () => [other, key])).toEqual({ from: "h1.2", sent_ms: 1234.5 });
    expect(decodeBeat(d, () => [other])).toEqual({ refused: "heartbeat from h1.2 with a wrong tag" });
    expect(decodeBeat(d, () => [])).toMatchObject({ keyless: true });
  });

  it("a beat altered in flight is refused (sender, time or tag)", () => {
    const d = encodeBeat({ from: "h1", sent_ms: 1000 }, key);
    for (let i = 6; i < d.length; i++) {
      const bad = Buffer.from(d);
      bad[i] ^= 1;
      const got = decodeBeat(bad, () => [key]);
      expect("refused" in got, `byte ${i} flipped`).toBe(true);
    }
  });

  it("with TLS an untagged beat is refused; without, a tagged one is", () => {
    expect(decodeBeat(encodeBeat({ from: "h1", sent_ms: 1 }, null), () => [key])).toEqual({ refused: "heartbeat from h1 without a tag" });
    expect(decodeBeat(encodeBeat({ from: "h1", sent_ms: 1 }, null), () => null)).toEqual({ from: "h1", sent_ms: 1 });
    expect(decodeBeat(encodeBeat({ from: "h1", sent_ms: 1 }, key), () => null)).toMatchObject({ refused: expect.stringMatching(/with a tag/) });
  });

  it("malformed datagrams are refused with a reason, and none throws", () => {
    expect(decodeBeat(Buffer.alloc(3), () => null)).toMatchObject({ refused: expect.stringMatching(/shorter/) });
    expect(decodeBeat(Buffer.from("GET / HTTP/1.1\r\n\r\n"), () => null)).toMatchObject({ refused: expect.stringMatching(/magic/) });
    const d = encodeBeat({ from: "h1", sent_ms: 1 }, null);
    expect(decodeBeat(d.subarray(0, d.length - 1), () => null)).toMatchObject({ refused: expect.stringMatching(/truncated/) });
    const nan = Buffer.from(d);
    nan.writeDoubleLE(Number.NaN, d.length - 8);
    expect(decodeBeat(nan, () => null)).toMatchObject({ refused: expect.stringMatching(/not a number/) });
    expect(() => encodeBeat({ from: "", sent_ms: 1 }, null)).toThrow(RangeError);
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), fc.boolean(), (bytes, secure) => {
        const got = decodeBeat(bytes, () => (secure ? [key] : null));
        // Random bytes pass only as an untagged beat on a cluster without TLS (a tag cannot be guessed).
        if (!("refused" in got)) expect(secure).toBe(false);
      }),
      { numRuns: 2000 },
    );
    expect(BEAT_TAG_BYTES).toBe(16);
  });
});
