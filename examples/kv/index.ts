// Key-value store answering client requests. Request payloads are UTF-8 text:
//
//   put <key> <value>   -> "ok"              (value: everything after the key's following space)
//   get <key>           -> the value, or "not_found"
//   del <key>           -> "ok", or "not_found"
//   anything else       -> "error: ..."
//
// Keys are non-empty and contain no space; values are non-empty. One trailing
// "\n" (or "\r\n") on the request is ignored, for line-oriented clients.

import { E_TOO_BIG, inboxText, reply } from "../../sdk/assemblyscript/index";

export { cohort_inbox } from "../../sdk/assemblyscript/index";

const store = new Map<string, string>();

export function request(session: i32, requestId: i32, ptr: usize, len: i32): void {
  const answer = handle(inboxText(ptr, len));
  const rc = reply(session, requestId, answer);
  // A stored value can be bigger than one reply may be; say so rather than
  // leave the client without an answer.
  if (rc == E_TOO_BIG) reply(session, requestId, "error: value too big to reply");
}

/** The reply to one request line (updates the store for put/del). */
function handle(text: string): string {
  const line = stripNewline(text);
  const sp = line.indexOf(" ");
  const cmd = sp < 0 ? line : line.substring(0, sp);
  const rest = sp < 0 ? "" : line.substring(sp + 1);

  if (cmd == "put") {
    const ks = rest.indexOf(" ");
    if (ks <= 0) return "error: usage: put <key> <value>";
    const key = rest.substring(0, ks);
    const value = rest.substring(ks + 1);
    if (value.length == 0) return "error: usage: put <key> <value>";
    store.set(key, value);
    return "ok";
  }
  if (cmd == "get") {
    if (!isKey(rest)) return "error: usage: get <key>";
    return store.has(rest) ? store.get(rest) : "not_found";
  }
  if (cmd == "del") {
    if (!isKey(rest)) return "error: usage: del <key>";
    return store.delete(rest) ? "ok" : "not_found";
  }
  return "error: unknown command (expected put, get or del)";
}

function isKey(s: string): bool {
  return s.length > 0 && s.indexOf(" ") < 0;
}

function stripNewline(s: string): string {
  if (s.endsWith("\r\n")) return s.substring(0, s.length - 2);
  if (s.endsWith("\n")) return s.substring(0, s.length - 1);
  return s;
}
