/**
 * TLS options for every peer connection (docs/ARCHITECTURE.md "TLS"): the
 * host port (host ⇄ host peer frames, CLI ⇄ host requests) and the group
 * message path between VM threads. Mutual TLS 1.3: each side presents a
 * certificate, and each verifies that the other's chains to the cluster CA.
 *
 * Certificates (issued by src/tls/ca.ts) name their holder in the subject's
 * CN (and a DNS SAN): a host's id, or `admin` for the CLI. Host certificates
 * may serve and dial (extended key usage serverAuth + clientAuth); the admin
 * certificate may only dial (clientAuth), so OpenSSL refuses it as a server.
 *
 * Only this module and src/tls/ca.ts touch key material. A TlsMaterial's
 * `key` is never logged, put in a status or an error message: what goes to
 * logs is the peer's address and OpenSSL's reason.
 */
import { HOST_NAME_RE, hostNameOf } from "../host/instance.js";
import { X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { createSecureContext, createServer, type ConnectionOptions, type PeerCertificate, type SecureContext, type Server, type TlsOptions, type TLSSocket } from "node:tls";

/** PEM text of the cluster CA's certificate, this side's certificate and its private key. */
export interface TlsMaterial {
  ca: string;
  cert: string;
  key: string;
}

/** Where a TlsMaterial is read from. */
export interface TlsFiles {
  ca: string;
  cert: string;
  key: string;
}

/** What a dialer verifies beyond the chain: the peer's certificate names `peer` (a host id), when the caller knows who it dials. */
export interface ClientTls {
  material: TlsMaterial;
  peer?: string;
}

/** The name of the CLI's credential: a client-only certificate, never a host's. */
export const ADMIN_NAME = "admin";

/** A peer that has not finished its handshake by then is dropped (a stalled or garbage handshake costs a socket this long, no more). */
export const TLS_HANDSHAKE_TIMEOUT_MS = 5000;

/** The files of `name` in a TLS directory as `cohort ca` and `cohort up` lay it out: ca.crt, <name>.crt, <name>.key. */
export function tlsDirFiles(dir: string, name: string): TlsFiles {
  return { ca: join(dir, "ca.crt"), cert: join(dir, `${name}.crt`), key: join(dir, `${name}.key`) };
}

export class TlsMaterialError extends Error {
  override name = "TlsMaterialError";
}

/**
 * Reads and checks a TlsMaterial: every file is there, the key fits the
 * certificate, the certificate chains to the CA and (with `name`) names it.
 * Errors name the files and the reason, never their contents.
 */
export function readTlsMaterial(files: TlsFiles, name?: string): TlsMaterial {
  const read = (what: string, file: string) => {
    try {
      return readFileSync(file, "utf8");
    } catch (error) {
      throw new TlsMaterialError(`cannot read the ${what} ${file}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
    }
  };
  const material = { ca: read("CA certificate", files.ca), cert: read("certificate", files.cert), key: read("private key", files.key) };
  try {
    createSecureContext(material);
  } catch (error) {
    throw new TlsMaterialError(`${files.cert} and ${files.key} do not make a TLS identity: ${(error as Error).message}`);
  }
  let cert: X509Certificate;
  let ca: X509Certificate;
  try {
    cert = new X509Certificate(material.cert);
    ca = new X509Certificate(material.ca);
  } catch (error) {
    throw new TlsMaterialError(`${files.cert} or ${files.ca} is not a certificate: ${(error as Error).message}`);
  }
  if (!cert.checkIssued(ca) || !cert.verify(ca.publicKey)) throw new TlsMaterialError(`${files.cert} was not issued by the CA in ${files.ca}`);
  if (name !== undefined && subjectName(cert.subject) !== name) throw new TlsMaterialError(`${files.cert} names ${JSON.stringify(subjectName(cert.subject))}, not ${JSON.stringify(name)}`);
  if (Date.parse(cert.validTo) < Date.now()) throw new TlsMaterialError(`${files.cert} expired on ${cert.validTo}`);
  return material;
}

/**
 * Options of a listening side: every client is asked for a certificate,
 * verified against the CA. `rejectUnauthorized` is false here only because
 * Node then destroys a refused socket without a word of why; the refusal is
 * ours instead, in mutualTlsServer, before a byte of the peer's is read.
 */
export function serverTlsOptions(material: TlsMaterial): TlsOptions {
  return {
    ca: material.ca,
    cert: material.cert,
    key: material.key,
    requestCert: true,
    rejectUnauthorized: false,
    minVersion: "TLSv1.3",
    handshakeTimeout: TLS_HANDSHAKE_TIMEOUT_MS,
    noDelay: true, // on the accepted TCP socket from the start; users set it on the TLS socket too
  };
}

/**
 * Why an accepted peer may not talk: null if its certificate chains to the
 * cluster CA, is in its validity period and fits a TLS client (OpenSSL's
 * checks, socket.authorized); else the reason, fit for a log line.
 */
export function refusalOf(socket: TLSSocket): string | null {
  if (socket.authorized) return null;
  const cert = socket.getPeerCertificate();
  if (!cert || Object.keys(cert).length === 0) return "no client certificate";
  return `certificate ${JSON.stringify(cert.subject?.CN ?? "")} refused: ${String(socket.authorizationError)}`;
}

/**
 * A mutual-TLS listener: `accept` gets only peers whose certificate the CA
 * issued (with the name in it); every other connection is closed and
 * `refused` told the peer's address and why (a failed handshake, garbage
 * instead of TLS, no certificate, another CA's, an expired one). Nothing a
 * peer sends can throw out of here.
 */
export function mutualTlsServer(material: TlsMaterial, accept: (socket: TLSSocket, peer: string) => void, refused: (address: string, reason: string) => void): Server {
  const server = createServer(serverTlsOptions(material), (socket) => {
    const address = `${socket.remoteAddress}:${socket.remotePort}`;
    const refusal = refusalOf(socket);
    if (refusal !== null) {
      socket.on("error", () => undefined); // whatever the peer does next, nobody listens
      socket.destroy();
      refused(address, refusal);
      return;
    }
    accept(socket, peerName(socket) ?? "?");
  });
  server.on("tlsClientError", (error, socket) => refused(`${socket.remoteAddress ?? "?"}:${socket.remotePort ?? "?"}`, tlsReason(error)));
  return server;
}

/** OpenSSL's reason without its file and line ("...:SSL routines:fn:peer did not return a certificate:../deps/..."). */
export function tlsReason(error: Error): string {
  const m = /SSL routines:[^:]*:([^:]+)/.exec(error.message);
  return m ? m[1] : error.message;
}

/**
 * Options of a dialing side (add host and port). The chain is verified
 * against the CA; the name check is ours, not a DNS name check: peers are
 * dialed by address, and a host is named by its id. With `peer`, the
 * certificate must name that host; without (the dialer does not know yet
 * which host listens there: a VM thread's message path, the CLI's `--host`),
 * it must name some host: a host name, not `admin`. Either way OpenSSL
 * takes only a certificate fit for serving (a host's, not the CLI's).
 */
export function clientTlsOptions({ material, peer }: ClientTls): ConnectionOptions {
  return {
    secureContext: dialContextOf(material),
    rejectUnauthorized: true,
    ...(peer !== undefined ? { servername: peer } : {}),
    checkServerIdentity: (_host: string, cert: PeerCertificate) => serverIdentityError(cert.subject?.CN, peer),
  };
}

/**
 * One dialing context per TlsMaterial (per thread: each VM thread has its
 * own copy of the material). Building one parses the CA, the certificate and
 * the key, about 1.3 ms; done per connection, a 64-VM group's message paths
 * (a connection per pair of VMs on different hosts) spent seconds of CPU on it.
 */
const dialContexts = new WeakMap<TlsMaterial, SecureContext>();

function dialContextOf(material: TlsMaterial): SecureContext {
  let context = dialContexts.get(material);
  if (!context) {
    context = createSecureContext({ ca: material.ca, cert: material.cert, key: material.key, minVersion: "TLSv1.3" });
    dialContexts.set(material, context);
  }
  return context;
}

/**
 * Why a listener whose verified certificate names `cn` is not the host a
 * dialer meant (`peer`, or any host without), or undefined if it is.
 */
export function serverIdentityError(cn: string | string[] | undefined, peer?: string): Error | undefined {
  if (peer !== undefined) {
    // A certificate names the host (h2); a restart of it takes part as h2.2, h2.3, ... (src/host/instance.ts).
    return cn === hostNameOf(peer) ? undefined : new Error(`the peer's certificate names ${JSON.stringify(cn)}, expected host ${JSON.stringify(hostNameOf(peer))}`);
  }
  if (typeof cn !== "string" || !HOST_NAME_RE.test(cn) || cn === ADMIN_NAME) return new Error(`the peer's certificate names ${JSON.stringify(cn ?? null)}, which is not a host name`);
  return undefined;
}

/** The name in the peer's verified certificate (a host id, or `admin`), or null. */
export function peerName(socket: TLSSocket): string | null {
  const cn = socket.getPeerCertificate()?.subject?.CN;
  return typeof cn === "string" && cn !== "" ? cn : null;
}

/** The CN of an X509Certificate subject ("CN=h1\nO=cohort"). */
function subjectName(subject: string): string | null {
  for (const line of subject.split("\n")) if (line.startsWith("CN=")) return line.slice(3);
  return null;
}
