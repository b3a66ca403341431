// When the IDE page reconnects (coder1_relay/static/connection.js; docs/protocol.md, section 8):
// at once after the relay says it is going away (1001) or its node went away (4012), with the
// usual backoff after any other close. In plain Node; run by tests/test_page_streams.py.
import assert from "node:assert/strict";
import { pageModule } from "./page.mjs";
import { run } from "./runner.mjs";

/** The delays the page sets, in ms, recorded instead of run. */
const timeouts = [];
globalThis.setTimeout = (callback, ms) => timeouts.push(ms);
globalThis.setInterval = () => 0;
globalThis.clearInterval = globalThis.clearTimeout = () => {};
globalThis.location = { host: "relay.test" };
globalThis.WebSocket = class {
  static OPEN = 1;
  readyState = 1;
  send() {}
};
let now = 1_000_000;
Date.now = () => now;
const { RelayConnection, nextAttempt } = await pageModule("connection.js");

const fresh = { attempt: 0, promptUntil: null };

/** A connection whose socket has just opened, and a way to close it with a code. */
async function opened() {
  const connection = new RelayConnection(() => {}, () => {}, async () => {});
  connection.connect();
  connection.socket.onopen();
  return connection;
}

async function close(connection, code) {
  timeouts.length = 0;
  await connection.socket.onclose({ code });
  connection.connect(); // the attempt the timer would make
  return timeouts.at(-1) / 1000;
}

const tests = {
  "1001 and 4012: the next attempt in 0.1 to 1 s, whatever the backoff had reached"() {
    for (const code of [1001, 4012]) {
      for (const [draw, delay] of [[0, 0.1], [0.5, 0.55], [1, 1]]) {
        const next = nextAttempt({ attempt: 7, promptUntil: null }, code, now, () => draw);
        assert.equal(next.delay, delay);
        assert.equal(next.attempt, 0);
      }
    }
  },

  "other closes back off as before: 0.5 × 2^n s, times 0.5 to 1.5, at most 30"() {
    for (const code of [1000, 1006, 4000, 4011, 4029, undefined]) {
      assert.equal(nextAttempt(fresh, code, now, () => 0.5).delay, 1);
      assert.equal(nextAttempt({ attempt: 2, promptUntil: null }, code, now, () => 0).delay, 2);
      assert.equal(nextAttempt({ attempt: 20, promptUntil: null }, code, now, () => 0.5).delay, 30);
    }
  },

  "failed attempts within 20 s of a 1001 stay prompt; after that the backoff starts over"() {
    let state = nextAttempt({ attempt: 5, promptUntil: null }, 1001, now, () => 0.5);
    for (let waited = 0; waited < 20_000; waited += 550) {
      state = nextAttempt(state, 1006, now + waited, () => 0.5);
      assert.equal(state.delay, 0.55);
    }
    state = nextAttempt(state, 1006, now + 20_000, () => 0.5);
    assert.deepEqual(state, { delay: 1, attempt: 1, promptUntil: null });
  },

  async "the page: backed off after three drops, back within 1 s after a 1001"() {
    const connection = await opened();
    const delays = [];
    for (let i = 0; i < 3; i += 1) delays.push(await close(connection, 1006));
    assert.ok(delays[2] >= 2, `third backoff ${delays[2]}`);
    connection.socket.onopen();
    await close(connection, 1006);
    connection.socket.onopen();
    const prompt = await close(connection, 1001);
    assert.ok(prompt >= 0.1 && prompt <= 1, `after 1001: ${prompt}`);
    const refused = await close(connection, 1006); // the relay is not back yet
    assert.ok(refused <= 1, `while restarting: ${refused}`);
  },
};

await run(tests);
