/**
 * A UDP port free on loopback now (the kernel's pick for port 0, released
 * again): for processes a benchmark or test starts and must name each other's
 * ports up front. Another process may take it meanwhile; callers that start
 * several then fail to bind and say so.
 */
import { createSocket } from "node:dgram";

export async function freeUdpPort(): Promise<number> {
  const socket = createSocket("udp4");
  await new Promise<void>((resolve) => socket.bind(0, "127.0.0.1", () => resolve()));
  const { port } = socket.address();
  await new Promise<void>((resolve) => socket.close(() => resolve()));
  return port;
}
