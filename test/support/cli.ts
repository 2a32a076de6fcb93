/**
 * The built CLI (bin/cohort.js) run as a child process, as a user runs it:
 * its exit code, signal, stdout and stderr; killed (and the test failed) if
 * it is still running after `limit_ms`, a bound on a hang.
 */
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";

export const CLI = fileURLToPath(new URL("../../bin/cohort.js", import.meta.url));

export interface CliExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  ms: number;
}

export function runCli(args: string[], options: { cwd: string; env: NodeJS.ProcessEnv; limit_ms: number }): Promise<CliExit> {
  const started = Date.now();
  const child = spawn(process.execPath, [CLI, ...args], { cwd: options.cwd, env: options.env, stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
  child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`cohort ${args.join(" ")} still running after ${options.limit_ms} ms; stderr: ${stderr}`));
    }, options.limit_ms);
    child.once("error", reject);
    child.once("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, ms: Date.now() - started });
    });
  });
}
