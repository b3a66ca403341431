// Unit tests of the page's resume, acknowledgement and input-retention logic
// (coder1_relay/static/streams.js; docs/protocol.md, section 5.7), in plain Node.
// Run by tests/test_page_streams.py: `node tests/js/streams_test.mjs` prints one line per test
// and exits non-zero if any fails.
import assert from "node:assert/strict";
import { pageModule } from "./page.mjs";
import { run } from "./runner.mjs";

const streams = await pageModule("streams.js");
const { Kind } = await pageModule("wire.js");
const { MAX_BACKLOG } = await pageModule("link.js");
const { Acknowledger, InputStream, OutputStream, positions, position, newClientId } = streams;

const bytes = (text) => new TextEncoder().encode(text);
const text = (data) => new TextDecoder().decode(data);
/** A PTY_OUTPUT frame as the page has it once opened: `seq` a BigInt, as wire.js decodes it. */
const output = (seq, data, kind = Kind.PTY_OUTPUT) => ({ kind, seq: BigInt(seq), payload: bytes(data) });

/** A fake clock for the Acknowledger: timers run only when the test advances time. */
class Clock {
  constructor() {
    this.now = 0;
    this.timers = new Map();
    this.ids = 0;
  }

  setTimer = (callback, delay) => {
    this.ids += 1;
    this.timers.set(this.ids, { at: this.now + delay, callback });
    return this.ids;
  };

  clearTimer = (id) => {
    this.timers.delete(id);
  };

  advance(ms) {
    this.now += ms;
    for (const [id, timer] of [...this.timers].sort((a, b) => a[1].at - b[1].at)) {
      if (timer.at <= this.now && this.timers.delete(id)) timer.callback();
    }
  }
}

/** An InputStream whose frames land in `wire` while `up` is true. */
function inputStream(options) {
  const link = { up: true, wire: [] };
  const stream = new InputStream((kind, seq, payload) => {
    if (!link.up) return false;
    link.wire.push({ kind, seq, payload });
    return true;
  }, options);
  return { stream, link };
}

const tests = {
  "positions: BigInt seq and JSON numbers, nothing past 2^53 or negative"() {
    assert.equal(position(0n), 0);
    assert.equal(position(123456789012n), 123456789012);
    assert.equal(position(2n ** 53n), null);
    assert.equal(position(2n ** 64n - 1n), null);
    assert.equal(position(-1), null);
    assert.equal(position(1.5), null);
    assert.equal(position("7"), null);
    const found = positions([
      { type: "pty", stream: 7, next: 3 },
      { type: "cmd", stream: 7, next: 9 },
      { type: "pty", stream: 8, next: -1 },
      { type: "zzz", stream: 9, next: 1 },
      null,
    ]);
    assert.deepEqual([...found], [["pty:7", 3], ["cmd:7", 9]]);
    assert.equal(positions({ not: "a list" }).size, 0);
  },

  "the client id is 22 base64url characters, new each time"() {
    const ids = new Set(Array.from({ length: 50 }, newClientId));
    assert.equal(ids.size, 50);
    for (const id of ids) assert.match(id, /^[A-Za-z0-9_-]{22}$/);
  },

  "output in order is taken whole and moves next"() {
    const out = new OutputStream(7);
    const opened = out.take(output(0, '{"pid":1}', Kind.PTY_OPENED));
    assert.equal(opened.end, 9);
    assert.equal(text(out.take(output(9, "hello")).payload), "hello");
    assert.equal(text(out.take(output(14, " world")).payload), " world");
    assert.equal(out.next, 20);
  },

  "duplicates after a resume are dropped"() {
    const out = new OutputStream(7);
    out.take(output(0, "abc"));
    out.take(output(3, "def"));
    // The bridge resends from an older position (a second RESUME raced frames in flight).
    assert.equal(out.take(output(0, "abc")), null);
    assert.equal(out.take(output(3, "def")), null);
    assert.equal(out.take(output(5, "f")), null); // ends exactly at next
    assert.equal(out.next, 6);
    assert.equal(text(out.take(output(6, "ghi")).payload), "ghi");
    assert.equal(out.take(output(9, "")), null); // empty frames carry nothing
  },

  "a frame straddling next is cut to the bytes from next on"() {
    const out = new OutputStream(7);
    out.take(output(0, "0123456"));
    const got = out.take(output(4, "456789"));
    assert.equal(text(got.payload), "789");
    assert.equal(got.end, 10);
    assert.equal(out.next, 10);
  },

  "a structured frame is never cut"() {
    const out = new OutputStream(7);
    out.take(output(0, "abcd"));
    const exit = out.take(output(2, '{"exit_code":0}', Kind.PTY_EXIT));
    assert.equal(text(exit.payload), '{"exit_code":0}');
  },

  "a seq beyond 2^53 is not taken"() {
    const out = new OutputStream(7);
    assert.equal(out.take({ kind: Kind.PTY_OUTPUT, seq: 2n ** 60n, payload: bytes("x") }), null);
    assert.equal(out.next, 0);
  },

  "GAP moves next to `to` and says how many bytes are lost"() {
    const out = new OutputStream(7);
    out.take(output(0, "x".repeat(100)));
    const lost = out.gap({ type: "pty", stream: 7, from: 100, to: 5000, bytes: 4900 });
    assert.deepEqual(lost, { bytes: 4900, end: 5000 });
    assert.equal(out.next, 5000);
    assert.equal(out.gap({ from: 100, to: 5000, bytes: 4900 }), null); // the same GAP again
    assert.equal(out.gap({ from: 0, to: "5001" }), null); // malformed
    // Output after the gap follows on.
    assert.equal(out.take(output(4990, "y".repeat(10))), null);
    assert.equal(text(out.take(output(5000, "zz")).payload), "zz");
    // A GAP from before what the page has counts only what it lacks.
    const other = new OutputStream(8);
    other.take(output(0, "x".repeat(50)));
    assert.deepEqual(other.gap({ from: 10, to: 80, bytes: 70 }), { bytes: 30, end: 80 });
  },

  "ACK at once when half the window is unacknowledged"() {
    const clock = new Clock();
    const sent = [];
    const acks = new Acknowledger((body) => sent.push(body) > 0, clock);
    acks.setWindow(8000);
    const a = new OutputStream(1);
    const b = new OutputStream(2);
    assert.deepEqual(acks.resume([a, b]), [
      { type: "pty", stream: 1, next: 0 },
      { type: "pty", stream: 2, next: 0 },
    ]);
    b.took(10);
    acks.progress(b);
    a.took(3999);
    acks.progress(a);
    assert.equal(sent.length, 0);
    a.took(4000);
    acks.progress(a);
    // One ACK for the bridge, with every stream that has something unacknowledged.
    assert.deepEqual(sent, [{ streams: [{ type: "pty", stream: 1, next: 4000 }, { type: "pty", stream: 2, next: 10 }] }]);
    assert.equal(clock.timers.size, 0);
    clock.advance(1000);
    assert.equal(sent.length, 1);
  },

  "otherwise ACK 100 ms after output was last taken in"() {
    const clock = new Clock();
    const sent = [];
    const acks = new Acknowledger((body) => sent.push(body) > 0, clock);
    const a = new OutputStream(1);
    acks.follow(a);
    a.took(10);
    acks.progress(a);
    clock.advance(60);
    a.took(20);
    acks.progress(a);
    clock.advance(60);
    assert.equal(sent.length, 0, "the delay starts again with more output");
    clock.advance(40);
    assert.deepEqual(sent, [{ streams: [{ type: "pty", stream: 1, next: 20 }] }]);
    clock.advance(1000);
    assert.equal(sent.length, 1, "nothing new: no ACK");
    acks.progress(a);
    assert.equal(clock.timers.size, 0);
  },

  "an ACK that cannot go is tried again; a RESUME resets what counts as acknowledged"() {
    const clock = new Clock();
    const sent = [];
    let up = false;
    const acks = new Acknowledger((body) => up && sent.push(body) > 0, clock);
    acks.setWindow(8192);
    const a = new OutputStream(1);
    acks.follow(a);
    a.took(80);
    acks.progress(a);
    assert.equal(sent.length, 0);
    assert.equal(a.acked, 0);
    // A new channel: the page resumes from next (80), which the bridge counts as acknowledged.
    a.next = 90;
    assert.deepEqual(acks.resume([a]), [{ type: "pty", stream: 1, next: 90 }]);
    up = true;
    a.took(90);
    acks.progress(a);
    assert.equal(clock.timers.size, 0, "nothing past the RESUME position yet");
    a.took(90 + 4096);
    acks.progress(a);
    assert.deepEqual(sent, [{ streams: [{ type: "pty", stream: 1, next: 90 + 4096 }] }]);
    // A stream no longer followed is not acknowledged.
    acks.leave(a);
    a.took(400);
    acks.progress(a);
    clock.advance(200);
    assert.equal(sent.length, 1);
    acks.setWindow(null);
    acks.setWindow("wide");
    assert.equal(acks.window, 8192);
  },

  "every frame sent on a stream is numbered from 0 and kept until confirmed"() {
    const { stream, link } = inputStream();
    stream.transmit(Kind.PTY_OPEN, { cols: 80, rows: 24 });
    stream.input(bytes("ls\r"));
    stream.resize({ cols: 100, rows: 30 });
    stream.input(bytes("exit\r"));
    stream.close();
    assert.deepEqual(link.wire.map((f) => [f.kind, f.seq]), [
      [Kind.PTY_OPEN, 0], [Kind.PTY_INPUT, 1], [Kind.PTY_RESIZE, 2], [Kind.PTY_INPUT, 3], [Kind.PTY_CLOSE, 4],
    ]);
    assert.equal(stream.sent.length, 5);
    assert.equal(stream.closeSeq, 4);
    assert.equal(stream.closed, false);
    stream.confirm(3); // INPUT_ACK: the bridge expects 3
    assert.deepEqual(stream.sent.map((f) => f.seq), [3, 4]);
    assert.equal(stream.sentBytes, 5);
    stream.confirm(2); // an older confirmation changes nothing
    assert.deepEqual(stream.sent.map((f) => f.seq), [3, 4]);
    stream.confirm(5);
    assert.equal(stream.sent.length, 0);
    assert.equal(stream.closed, true);
  },

  "after RESUMED the frames from its next are resent in order, then what waited"() {
    const { stream, link } = inputStream();
    stream.transmit(Kind.PTY_OPEN, { cols: 80, rows: 24 });
    for (const key of ["a", "b", "c"]) stream.input(bytes(key));
    // The channel goes: typed meanwhile waits, the latest size only.
    link.up = false;
    assert.equal(stream.input(bytes("d")), true);
    stream.resize({ cols: 90, rows: 20 });
    stream.resize({ cols: 91, rows: 21 });
    assert.equal(stream.input(bytes("e")), true);
    assert.equal(link.wire.length, 4);
    // A new channel is secure but not resumed: new input still waits behind the rest.
    link.up = true;
    assert.equal(stream.transmit(Kind.PTY_INPUT, bytes("f")), false);
    stream.input(bytes("f"));
    link.wire = [];
    // RESUMED: the bridge has 0 and 1 ("a"), expects 2.
    assert.deepEqual(stream.resume(2), { missing: 0 });
    assert.deepEqual(link.wire.map((f) => [f.seq, f.kind === Kind.PTY_INPUT ? text(f.payload) : f.payload]), [
      [2, "b"], [3, "c"], [4, { cols: 91, rows: 21 }], [5, "d"], [6, "e"], [7, "f"],
    ]);
    assert.deepEqual(stream.sent.map((f) => f.seq), [2, 3, 4, 5, 6, 7]);
    // Now frames go at once again.
    assert.equal(stream.input(bytes("g")), true);
    assert.equal(link.wire.at(-1).seq, 8);
  },

  "a RESUMED for a stream the bridge does not know resends everything kept"() {
    const { stream, link } = inputStream();
    stream.transmit(Kind.PTY_OPEN, { cols: 80, rows: 24 });
    stream.input(bytes("x"));
    link.wire = [];
    stream.resume(undefined);
    assert.deepEqual(link.wire.map((f) => [f.kind, f.seq]), [[Kind.PTY_OPEN, 0], [Kind.PTY_INPUT, 1]]);
  },

  "a channel lost while resending: the rest waits, in order"() {
    const { stream, link } = inputStream();
    for (const key of ["a", "b"]) stream.input(bytes(key));
    link.up = false;
    stream.input(bytes("c"));
    stream.close();
    let budget = 1;
    link.up = true;
    const send = stream.send;
    stream.send = (...args) => budget-- > 0 && send(...args);
    link.wire = [];
    stream.resume(1); // "b" goes, then the channel is gone
    assert.deepEqual(link.wire.map((f) => f.seq), [1]);
    assert.equal(stream.waiting, true);
    stream.send = send;
    link.wire = [];
    stream.resume(2);
    assert.deepEqual(link.wire.map((f) => [f.kind, f.seq]), [[Kind.PTY_INPUT, 2], [Kind.PTY_CLOSE, 3]]);
    assert.equal(stream.waiting, false);
  },

  "what waits for a channel is bounded; a frame that does not fit is dropped whole"() {
    const { stream, link } = inputStream();
    link.up = false;
    assert.equal(stream.input(new Uint8Array(MAX_BACKLOG - 10)), true);
    assert.equal(stream.input(new Uint8Array(70000)), false);
    assert.equal(stream.input(new Uint8Array(11)), false);
    assert.equal(stream.input(new Uint8Array(10)), true);
    assert.equal(stream.backlog.lost, 70011);
    assert.equal(stream.backlog.bytes, MAX_BACKLOG);
    link.up = true;
    stream.resume(0);
    assert.deepEqual(link.wire.map((f) => [f.seq, f.payload.length]), [[0, MAX_BACKLOG - 10], [1, 10]]);
    assert.equal(stream.backlog.lost, 0, "the count starts again after the backlog went out");
  },

  "sent frames kept are bounded: the oldest are forgotten and reported if the bridge lacks them"() {
    const { stream } = inputStream({ retain: 1000 });
    for (let i = 0; i < 30; i += 1) stream.input(new Uint8Array(100));
    assert.ok(stream.sentBytes <= 1000);
    assert.equal(stream.sent.length, 10);
    assert.equal(stream.forgotten, 20);
    assert.deepEqual(stream.resume(15), { missing: 5 });
    assert.deepEqual(stream.resume(25), { missing: 0 });
    assert.equal(stream.sent.length, 5);
    const { stream: one } = inputStream({ retain: 10 });
    one.input(new Uint8Array(50)); // one frame larger than the bound is still kept
    assert.equal(one.sent.length, 1);
  },

  "the stream ends: the unsent bytes are counted and nothing is kept"() {
    const { stream, link } = inputStream();
    stream.input(bytes("sent"));
    link.up = false;
    stream.input(bytes("not sent"));
    assert.equal(stream.end(), 8);
    assert.equal(stream.sent.length, 0);
    assert.equal(stream.waiting, false);
  },
};

await run(tests);
