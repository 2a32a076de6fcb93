/**
 * `cohort ca init` and `cohort ca issue`: a cluster CA and the certificates
 * hosts and the CLI authenticate with (src/tls/ca.ts). `cohort up` does this
 * by itself for a local cluster; these are for hosts started by hand, e.g.
 * on several machines.
 */
import { type Command, InvalidArgumentError } from "commander";
import { resolve } from "node:path";

const days = (value: string) => {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError("--days must be a positive integer");
  return n;
};

export function registerCaCommands(program: Command): void {
  const ca = program
    .command("ca")
    .description("a cluster CA and the certificates hosts (`cohort host --tls-dir`) and the CLI authenticate with (mutual TLS)");

  ca.command("init")
    .description("create a cluster CA: <dir>/ca.crt and <dir>/ca.key (mode 0600); refuses to replace an existing one")
    .requiredOption("--dir <dir>", "directory of the CA")
    .option("--days <n>", "validity in days", days, 3650)
    .action(async (opts: { dir: string; days: number }) => {
      const { initCaDir } = await import("../tls/ca.js");
      const files = await initCaDir(resolve(opts.dir), opts.days);
      console.log(`CA certificate ${files.cert}\nCA key         ${files.key} (keep it private)`);
    });

  ca.command("issue")
    .description(
      "issue a certificate signed by the CA in --dir: <out>/<name>.crt and <out>/<name>.key (mode 0600). A host's name is its id " +
        "(`cohort host --id <name> --tls-dir <dir>` reads <dir>/ca.crt, <dir>/<name>.crt, <dir>/<name>.key); `admin` (or --admin) " +
        "issues the CLI's credential, which can dial hosts but not serve as one",
    )
    .argument("<name>", "host id, or admin")
    .requiredOption("--dir <dir>", "directory of the CA (ca.crt, ca.key)")
    .option("--out <dir>", "where to write the certificate and key (default: --dir)")
    .option("--admin", "a client-only certificate for the CLI (implied by the name admin)")
    .option("--days <n>", "validity in days", days, 365)
    .action(async (name: string, opts: { dir: string; out?: string; admin?: boolean; days: number }) => {
      const { issueToDir, ADMIN_NAME } = await import("../tls/ca.js");
      const role = opts.admin || name === ADMIN_NAME ? "admin" : "host";
      const files = await issueToDir(resolve(opts.dir), name, { role, days: opts.days }, resolve(opts.out ?? opts.dir));
      console.log(`${role} certificate ${files.cert}\n${role} key         ${files.key}`);
    });
}
