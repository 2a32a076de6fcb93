/**
 * The cluster CA: creating it and issuing host and admin certificates
 * (`cohort ca init`, `cohort ca issue`, and `cohort up` for a local cluster).
 *
 * Why @peculiar/x509: it is a maintained, typed X.509 builder on WebCrypto,
 * so keys are made and signed by Node's own crypto (ECDSA P-256 here: small
 * keys, cheap handshakes) and no key material passes through a pure-JS
 * bignum implementation (node-forge's alternative, which also has no ECDSA
 * certificate signing). Its dependency injection needs the reflect-metadata
 * polyfill, imported first. Hosts never load this module: they only read
 * PEM files (src/tls/context.ts).
 *
 * Layout of a CA directory: ca.crt, ca.key, and <name>.crt / <name>.key per
 * issued certificate. Keys are written with mode 0600.
 */
import { HOST_NAME_RE } from "../host/instance.js";
import "reflect-metadata";
import * as x509 from "@peculiar/x509";
import { randomBytes, webcrypto } from "node:crypto";
import { chmod, mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { ADMIN_NAME, tlsDirFiles, type TlsFiles } from "./context.js";

x509.cryptoProvider.set(webcrypto as unknown as Crypto);

const ALGORITHM = { name: "ECDSA", namedCurve: "P-256", hash: "SHA-256" } as const;
const DAY_MS = 86_400_000;

/** A certificate and its private key, PEM. */
export interface CertPair {
  cert: string;
  key: string;
}

/** host: serves and dials (a host daemon). admin: dials only (the CLI's credential). */
export type CertRole = "host" | "admin";

export interface IssueOptions {
  role: CertRole;
  /** Valid from (default: an hour ago, for clocks a little apart) ... */
  not_before?: Date;
  /** ... until (default: `days` from now). */
  not_after?: Date;
  days?: number;
}

export const CA_DAYS_DEFAULT = 3650;
export const CERT_DAYS_DEFAULT = 365;
/** Names a certificate can carry: host ids (src/cluster/local-cluster.ts) and `admin`. */
/** A certificate names a host (as `cohort host --id` takes it) or `admin`: the same rule as host names. */
export const CERT_NAME = HOST_NAME_RE;

export class CaError extends Error {
  override name = "CaError";
}

function serial(): string {
  const bytes = randomBytes(16);
  bytes[0] &= 0x7f; // a positive integer
  return bytes.toString("hex");
}

async function exportKey(key: CryptoKey): Promise<string> {
  return x509.PemConverter.encode(await webcrypto.subtle.exportKey("pkcs8", key as webcrypto.CryptoKey), "PRIVATE KEY");
}

/** A new self-signed CA. */
export async function createCa(days = CA_DAYS_DEFAULT): Promise<CertPair> {
  const keys = (await webcrypto.subtle.generateKey(ALGORITHM, true, ["sign", "verify"])) as CryptoKeyPair;
  const now = Date.now();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: serial(),
    name: `CN=cohort cluster CA ${randomBytes(4).toString("hex")}, O=cohort`,
    notBefore: new Date(now - 3_600_000),
    notAfter: new Date(now + days * DAY_MS),
    signingAlgorithm: ALGORITHM,
    keys,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  return { cert: cert.toString("pem"), key: await exportKey(keys.privateKey) };
}

/** A certificate for `name` signed by `ca`. */
export async function issueCert(ca: CertPair, name: string, options: IssueOptions): Promise<CertPair> {
  if (!CERT_NAME.test(name)) throw new CaError(`bad certificate name ${JSON.stringify(name)} (want lowercase letters, digits, - and _)`);
  const caCert = new x509.X509Certificate(ca.cert);
  const caKey = await webcrypto.subtle.importKey("pkcs8", x509.PemConverter.decodeFirst(ca.key), ALGORITHM, false, ["sign"]);
  const keys = (await webcrypto.subtle.generateKey(ALGORITHM, true, ["sign", "verify"])) as CryptoKeyPair;
  const now = Date.now();
  const usages = options.role === "host" ? [x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth] : [x509.ExtendedKeyUsage.clientAuth];
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: serial(),
    subject: `CN=${name}, O=cohort`,
    issuer: caCert.subject,
    notBefore: options.not_before ?? new Date(now - 3_600_000),
    notAfter: options.not_after ?? new Date(now + (options.days ?? CERT_DAYS_DEFAULT) * DAY_MS),
    signingAlgorithm: ALGORITHM,
    publicKey: keys.publicKey,
    signingKey: caKey as CryptoKey,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension(usages, false),
      new x509.SubjectAlternativeNameExtension([{ type: "dns", value: name }], false),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
      await x509.AuthorityKeyIdentifierExtension.create(caCert),
    ],
  });
  return { cert: cert.toString("pem"), key: await exportKey(keys.privateKey) };
}

/** Writes a pair as <dir>/<name>.crt and <dir>/<name>.key (0600, also when it replaces a file). */
export async function writePair(dir: string, name: string, pair: CertPair): Promise<{ cert: string; key: string }> {
  await mkdir(dir, { recursive: true });
  const files = { cert: join(dir, `${name}.crt`), key: join(dir, `${name}.key`) };
  await writeFile(files.key, pair.key, { mode: 0o600 });
  await chmod(files.key, 0o600); // mode applies only to a new file
  await writeFile(files.cert, pair.cert, { mode: 0o644 });
  return files;
}

export async function readCa(dir: string): Promise<CertPair> {
  try {
    return { cert: await readFile(join(dir, "ca.crt"), "utf8"), key: await readFile(join(dir, "ca.key"), "utf8") };
  } catch (error) {
    throw new CaError(`no CA in ${dir} (${(error as NodeJS.ErrnoException).code ?? (error as Error).message}); create one with \`cohort ca init --dir ${dir}\``);
  }
}

/** `cohort ca init`: a new CA in `dir`; refuses to replace one (every certificate it issued would stop working). */
export async function initCaDir(dir: string, days = CA_DAYS_DEFAULT): Promise<{ cert: string; key: string }> {
  const existing = await readCa(dir).catch(() => null);
  if (existing) throw new CaError(`${dir} holds a CA already (ca.crt, ca.key); certificates it issued would stop working if it were replaced`);
  return writePair(dir, "ca", await createCa(days));
}

/** `cohort ca issue`: a certificate for `name` from the CA in `ca_dir`, written to `out_dir` (default: the CA directory). */
export async function issueToDir(ca_dir: string, name: string, options: IssueOptions, out_dir = ca_dir): Promise<{ cert: string; key: string }> {
  if (name === "ca") throw new CaError(`"ca" names the CA's own files`);
  return writePair(out_dir, name, await issueCert(await readCa(ca_dir), name, options));
}

export { ADMIN_NAME };

/**
 * TLS for a local cluster (`cohort up`): a CA in <state_dir>/tls (kept
 * across `up`s, created the first time), a fresh certificate per host id
 * there, and the admin credential beside cluster.json. Returns the files the
 * CLI uses (cluster.json's `tls`).
 */
export async function localClusterTls(state_dir: string, host_ids: string[]): Promise<{ tls_dir: string; admin: TlsFiles }> {
  const tls_dir = join(state_dir, "tls");
  const ca = await readCa(tls_dir).catch(async () => {
    await writePair(tls_dir, "ca", await createCa());
    return readCa(tls_dir);
  });
  for (const id of host_ids) await writePair(tls_dir, id, await issueCert(ca, id, { role: "host" }));
  await writePair(state_dir, ADMIN_NAME, await issueCert(ca, ADMIN_NAME, { role: "admin" }));
  return { tls_dir, admin: { ...tlsDirFiles(state_dir, ADMIN_NAME), ca: join(tls_dir, "ca.crt") } };
}
