// Every number the page takes from the relay (or a bridge) is kept to a sane range
// (coder1_relay/static/bounds.js; docs/protocol.md, sections 7 and 9), in plain Node.
// Run by tests/test_page_streams.py: one line per test, non-zero exit if any fails.
import assert from "node:assert/strict";
import { pageModule } from "./page.mjs";
import { run } from "./runner.mjs";

const { Kind, encode } = await pageModule("wire.js");
const { Acknowledger } = await pageModule("streams.js");
const bounds = await pageModule("bounds.js");

/** Timers the page sets, recorded instead of run. */
const timers = [];
globalThis.setInterval = (callback, ms) => timers.push({ kind: "interval", ms }) && timers.length;
globalThis.setTimeout = (callback, ms) => timers.push({ kind: "timeout", ms }) && timers.length;
globalThis.clearInterval = globalThis.clearTimeout = () => {};
globalThis.location = { host: "relay.test" };
globalThis.fetch = async () => ({});
/** What RelayConnection opens: it only records what the page sends. */
globalThis.WebSocket = class {
  static OPEN = 1;
  readyState = 1;
  sent = [];
  send(frame) {
    this.sent.push(frame);
  }
};
const { RelayConnection } = await pageModule("connection.js");

/** A RelayConnection that has received a WELCOME with `payload`: its PING and watchdog delays. */
function welcomed(payload) {
  const connection = new RelayConnection(() => {}, () => {});
  connection.connect();
  connection.socket.onopen();
  timers.length = 0;
  const frame = encode(Kind.WELCOME, { payload: new TextEncoder().encode(payload) });
  connection.socket.onmessage({ data: frame });
  const interval = timers.filter((t) => t.kind === "interval").map((t) => t.ms);
  const watchdog = timers.filter((t) => t.kind === "timeout").map((t) => t.ms);
  return { interval: interval.at(-1), watchdog: watchdog.at(-1) };
}

const tests = {
  "a WELCOME's tiny heartbeat cannot make the page spin: PINGs at most every 5 s"() {
    for (const asked of ["1e-6", "0", "-1"]) {
      assert.deepEqual(welcomed(`{"heartbeat":${asked}}`), { interval: 5000, watchdog: 15000 }, asked);
    }
  },

  "a WELCOME's huge heartbeat cannot stop the watchdog: silence for 90 s closes"() {
    for (const asked of ["1e308", "3600"]) {
      assert.deepEqual(welcomed(`{"heartbeat":${asked}}`), { interval: 30000, watchdog: 90000 }, asked);
    }
  },

  "a WELCOME without a number keeps the interval in use"() {
    for (const payload of ['{"heartbeat":"15"}', '{"heartbeat":null}', "[1]", "not json", "null"]) {
      assert.deepEqual(welcomed(payload), { interval: 15000, watchdog: 45000 }, payload);
    }
  },

  "a RESUMED's window is kept between 4 KiB and 1 GiB"() {
    const acks = new Acknowledger(() => true);
    acks.setWindow(1);
    assert.equal(acks.window, 4096);
    acks.setWindow(2 ** 60);
    assert.equal(acks.window, 1024 ** 3);
    acks.setWindow("big");
    assert.equal(acks.window, 1024 ** 3);
    acks.setWindow(100_000.5);
    assert.equal(acks.window, 100_000);
  },

  "Retry-After: whole seconds from 1 to 3600, else 60"() {
    const { retryAfterSeconds } = bounds;
    assert.equal(retryAfterSeconds("12"), 12);
    assert.equal(retryAfterSeconds("0"), 1);
    assert.equal(retryAfterSeconds("99999999"), 3600);
    for (const junk of [null, "", "soon", "1e9", "-5", "Wed, 21 Oct 2015 07:28:00 GMT", "9".repeat(400)]) {
      assert.equal(retryAfterSeconds(junk), 60, junk);
    }
  },

  "a pairing code's lifetime: 0 to 3600 s, else 300"() {
    const { codeLifetimeSeconds } = bounds;
    assert.equal(codeLifetimeSeconds(299.99), 299.99);
    assert.equal(codeLifetimeSeconds(1e308), 3600);
    assert.equal(codeLifetimeSeconds(-5), 0);
    assert.equal(codeLifetimeSeconds(NaN), 300);
    assert.equal(codeLifetimeSeconds("300"), 300);
  },

  "a listed terminal's size is whole, 1 to 1000, else 80 x 24"() {
    const { terminalSize } = bounds;
    assert.deepEqual(terminalSize({ cols: 120, rows: 32 }), { cols: 120, rows: 32 });
    assert.deepEqual(terminalSize({ cols: 1e9, rows: 0 }), { cols: 1000, rows: 1 });
    assert.deepEqual(terminalSize({ cols: "wide", rows: 30.6 }), { cols: 80, rows: 31 });
    assert.deepEqual(terminalSize(null), { cols: 80, rows: 24 });
  },
};

await run(tests);
