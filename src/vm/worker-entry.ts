/**
 * A VM thread's first module: it lowers the thread's priority and only then
 * loads the VM runtime (worker.ts). Loading that module graph (the runtime,
 * checkpoint formats, the message path with net and tls) is most of a new
 * thread's start-up CPU; run at the host main thread's priority, a deploy
 * that starts tens of VM threads at once kept the main threads waiting for a
 * core for seconds (/proc/<tid>/schedstat of each host's main thread: 4.5–5.2
 * s of run-queue wait in 12 s while a 64-VM group started on 4 hosts and 2
 * cores, 2.9–3.8 s with this module; `cohort bench scale --sizes 64` shows
 * the stalls), and their peers declared them failed. Messages the host posts meanwhile wait in the port until worker.ts
 * listens.
 */
import { yieldCpuToMainThread } from "../util/thread-priority.js";

yieldCpuToMainThread();
await import("./worker.js");
