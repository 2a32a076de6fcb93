/**
 * Child process for test/store-embedded.test.ts: increments a counter key
 * `count` times with get + cas, retrying on conflict, then prints
 * {"done":count,"conflicts":n} on stdout.
 *
 *   node --import <tsx> test/support/store-counter.ts <state_dir> <key> <count>
 */
import { EmbeddedStore } from "../../src/store/embedded.js";

const [state_dir, key, count_text] = process.argv.slice(2);
const count = Number(count_text);
const store = new EmbeddedStore(state_dir, { fsync: false });
let conflicts = 0;
for (let i = 0; i < count; i++) {
  for (;;) {
    const cur = await store.get<number>(key);
    const next = await store.cas(key, cur?.version ?? 0, (cur?.value ?? 0) + 1);
    if (next !== null) break;
    conflicts++;
  }
}
await store.close();
console.log(JSON.stringify({ done: count, conflicts }));
