/**
 * Test helpers for child processes that run TypeScript: `node --import <tsx loader> script`.
 * The loader is passed as an absolute file URL, so it resolves whatever the
 * child's working directory (a bare `--import tsx` resolves against the cwd).
 * `npx tsx script` is not used: it runs the script in a grandchild process,
 * so the pid we spawn would not be the pid doing the work.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

export const TSX_LOADER_URL = pathToFileURL(createRequire(import.meta.url).resolve("tsx")).href;

/** argv prefix that runs a .ts/.mts/.mjs script (which may import src/**\/*.ts) in a plain Node process. */
export function tsNodeCommand(script: string): string[] {
  return [process.execPath, "--import", TSX_LOADER_URL, script];
}

export interface Finished {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export function runTs(script: string, args: string[]): { child: ChildProcess; done: Promise<Finished> } {
  const [cmd, ...pre] = tsNodeCommand(script);
  const child = spawn(cmd, [...pre, ...args], { stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout!.setEncoding("utf8").on("data", (d: string) => (stdout += d));
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  const done = new Promise<Finished>((resolve, reject) => {
    child.once("error", reject);
    child.once("close", (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
  return { child, done };
}

/** Resolves once the child has printed `line` on stdout; rejects if it exits first or after timeout_ms. */
export function waitForLine(child: ChildProcess, line: string, timeout_ms = 15_000): Promise<void> {
  return new Promise((resolve, reject) => {
    let seen = "";
    let err = "";
    const timer = setTimeout(() => fail(new Error(`no "${line}" from pid ${child.pid} within ${timeout_ms} ms; stderr: ${err}`)), timeout_ms);
    const onData = (d: Buffer | string) => {
      seen += d.toString();
      if (seen.split("\n").includes(line)) finish();
    };
    const onErr = (d: Buffer | string) => (err += d.toString());
    const onExit = (code: number | null) => fail(new Error(`pid ${child.pid} exited (${code}) before printing "${line}"; stderr: ${err}`));
    const cleanup = () => {
      clearTimeout(timer);
      child.stdout?.off("data", onData);
      child.stderr?.off("data", onErr);
      child.off("exit", onExit);
    };
    const finish = () => (cleanup(), resolve());
    const fail = (e: Error) => (cleanup(), reject(e));
    child.stdout?.on("data", onData);
    child.stderr?.on("data", onErr);
    child.once("exit", onExit);
  });
}

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** SIGKILL if still running (by pid, never by name). */
export function killQuietly(pid: number | undefined): void {
  if (pid === undefined) return;
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    // already gone
  }
}
