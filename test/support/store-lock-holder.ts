/**
 * Child process for test/store-embedded.test.ts: takes the write lock of a key
 * of the embedded store, prints "locked" and keeps it until killed.
 *
 *   node --import <tsx> test/support/store-lock-holder.ts <state_dir> <key>
 */
import { EmbeddedStore } from "../../src/store/embedded.js";

const [state_dir, key] = process.argv.slice(2);
const store = new EmbeddedStore(state_dir);
await store.lockForTesting(key);
console.log("locked");
setInterval(() => {}, 60_000);
