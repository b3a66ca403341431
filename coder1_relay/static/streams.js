// Resume, acknowledgements and flow control for the page's streams (docs/protocol.md, 5.7):
// where each terminal's output has got to, what the page acknowledges to its bridge, and the
// input it keeps until the bridge confirms it. No DOM here, so Node can test it
// (tests/js/streams_test.mjs); app.js joins it to xterm.js and to the bridge links.
import { windowBytes } from "./bounds.js";
import { Backlog, MAX_BACKLOG } from "./link.js";
import { Kind } from "./wire.js";

/** Milliseconds after the last output was taken in before the page acknowledges it. */
export const ACK_DELAY = 100;
/** The send window until a RESUMED names the bridge's (its `--send-window` default). */
export const DEFAULT_WINDOW = 512 * 1024;
/** Bytes of sent, unconfirmed input a stream keeps for resending; beyond it the oldest go. */
export const MAX_RETAINED = 1024 * 1024;
/** At most this many streams in one RESUME. */
export const MAX_RESUME_STREAMS = 256;

/** The sequenced kinds of each stream type: their `seq` is a byte position. */
const SEQUENCED = new Map([
  [Kind.PTY_OPENED, "pty"], [Kind.PTY_OUTPUT, "pty"], [Kind.PTY_EXIT, "pty"],
  [Kind.CMD_STDOUT, "cmd"], [Kind.CMD_STDERR, "cmd"], [Kind.CMD_EXIT, "cmd"],
]);
/** Sequenced kinds whose payload is bytes, so a frame that starts before `next` can be cut. */
const RAW = new Set([Kind.PTY_OUTPUT, Kind.CMD_STDOUT, Kind.CMD_STDERR]);
const utf8 = new TextEncoder();

/** "pty" or "cmd" for a sequenced kind, else null. */
export function sequencedType(kind) {
  return SEQUENCED.get(kind) || null;
}

/**
 * A u64 position as a JS number: `seq` arrives as a BigInt (wire.js), JSON fields as numbers.
 * Null for anything negative, fractional or beyond 2^53 (no stream gets that far: 8 PiB).
 */
export function position(value) {
  if (typeof value === "bigint") {
    return value >= 0n && value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : null;
  }
  return Number.isSafeInteger(value) && value >= 0 ? value : null;
}

/** The `{type, stream, next}` entries of a RESUMED or INPUT_ACK as a Map `${type}:${stream}` -> next. */
export function positions(list) {
  const found = new Map();
  if (!Array.isArray(list)) return found;
  for (const entry of list) {
    const next = position(entry?.next);
    if ((entry?.type === "pty" || entry?.type === "cmd") && Number.isInteger(entry.stream) && next !== null) {
      found.set(`${entry.type}:${entry.stream}`, next);
    }
  }
  return found;
}

/** A new `client` id for RESUME: 16 random bytes in base64url (22 characters), new per page load. */
export function newClientId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/**
 * The output side of one stream: `next`, the end of what has arrived (what a RESUME asks
 * from), and `taken`, the end of what the consumer has finished with (xterm.js has parsed it):
 * what an ACK reports. `acked` is the position last reported on the current channel.
 */
export class OutputStream {
  constructor(stream, { type = "pty", next = 0 } = {}) {
    this.type = type;
    this.stream = stream;
    this.next = next;
    this.taken = next;
    this.acked = next;
  }

  get key() {
    return `${this.type}:${this.stream}`;
  }

  /**
   * A sequenced frame (`seq` its byte position): null when the page has all of it already (a
   * duplicate after a resume), else `{kind, payload, end}` with only the bytes from `next` on
   * of one that starts before it (a structured frame, which cannot be cut, comes whole).
   */
  take({ kind, seq, payload }) {
    const start = position(seq);
    if (start === null || payload.length === 0) return null;
    const end = start + payload.length;
    if (end <= this.next) return null;
    const cut = start < this.next && RAW.has(kind) ? payload.subarray(this.next - start) : payload;
    this.next = end;
    return { kind, payload: cut, end };
  }

  /**
   * A GAP `{from, to, bytes}`: the output up to `to` is gone. Null if the page is past `to`
   * already, else `{bytes, end}`: how many bytes after what it had are lost, and the new `next`.
   */
  gap(body) {
    const to = position(body?.to);
    if (to === null || to <= this.next) return null;
    const bytes = to - this.next;
    this.next = to;
    return { bytes, end: to };
  }

  /** The consumer is done with everything before `end`. */
  took(end) {
    if (end > this.taken) this.taken = end;
  }

  /** Taken in and not acknowledged on this channel. */
  get unacked() {
    return Math.max(0, this.taken - this.acked);
  }
}

/**
 * The acknowledgements to one bridge: one ACK for all the streams that channel follows, as
 * soon as a stream has half the window unacknowledged, else ACK_DELAY ms after output was last
 * taken in. The timer functions are injected for tests.
 */
export class Acknowledger {
  /**
   * @param send  (body) => boolean: send one ACK with `{streams}`; false if it cannot go now
   * @param delay milliseconds, see ACK_DELAY
   */
  constructor(send, {
    delay = ACK_DELAY,
    setTimer = (callback, ms) => setTimeout(callback, ms), // not bare: a browser wants `window` as this
    clearTimer = (id) => clearTimeout(id),
  } = {}) {
    Object.assign(this, { send, delay, setTimer, clearTimer });
    this.window = DEFAULT_WINDOW;
    this.streams = new Map(); // key -> OutputStream followed on the current channel
    this.timer = null;
  }

  /**
   * A RESUME on the channel for exactly `outputs`: the body's `streams`, each from its `next`,
   * which the bridge then counts as acknowledged.
   */
  resume(outputs) {
    this.cancel();
    this.streams = new Map();
    for (const output of outputs.slice(0, MAX_RESUME_STREAMS)) {
      output.acked = output.next;
      this.streams.set(output.key, output);
    }
    return [...this.streams.values()].map(({ type, stream, next }) => ({ type, stream, next }));
  }

  /** A stream the channel follows without a RESUME (the page opened it there: from 0). */
  follow(output) {
    this.streams.set(output.key, output);
  }

  leave(output) {
    this.streams.delete(output.key);
  }

  /** The bridge's window, from RESUMED (in bounds: a tiny one would ACK every byte). */
  setWindow(window) {
    this.window = windowBytes(window) ?? this.window;
  }

  /** `output` was taken in further: acknowledge now, or in `delay` ms from now. */
  progress(output) {
    if (!this.streams.has(output.key) || output.unacked === 0) return;
    if (output.unacked >= this.window / 2) {
      this.flush();
      return;
    }
    this.cancel();
    this.timer = this.setTimer(() => {
      this.timer = null;
      this.flush();
    }, this.delay);
  }

  /** Send one ACK for every followed stream with something unacknowledged. */
  flush() {
    this.cancel();
    const due = [...this.streams.values()].filter((output) => output.unacked > 0);
    if (due.length === 0) return false;
    const streams = due.map(({ type, stream, taken }) => ({ type, stream, next: taken }));
    if (!this.send({ streams })) return false;
    for (const output of due) output.acked = output.taken;
    return true;
  }

  cancel() {
    if (this.timer !== null) this.clearTimer(this.timer);
    this.timer = null;
  }
}

/** Bytes a frame's payload counts for (a Uint8Array, a string or a JSON object). */
function sizeOf(payload) {
  if (payload instanceof Uint8Array) return payload.length;
  return utf8.encode(typeof payload === "string" ? payload : JSON.stringify(payload)).length;
}

/**
 * The input side of one stream. Every frame sent on it takes the next number (PTY_OPEN 0,
 * then each PTY_INPUT, PTY_RESIZE, PTY_CLOSE) and is kept until the bridge confirms it
 * (INPUT_ACK, RESUMED), to be sent again after a resume. While frames cannot go (no channel,
 * or one not yet resumed), input waits in a Backlog, bounded, and goes after the resent ones.
 * Sent frames are kept up to `retain` bytes: beyond that the oldest are forgotten (`forgotten`
 * is then the first number still kept), so memory stays bounded even if nothing is confirmed.
 */
export class InputStream {
  /**
   * @param send (kind, seq, payload) => boolean: seal and send one frame now; false when the
   *             bridge has no resumed channel
   */
  constructor(send, { limit = MAX_BACKLOG, retain = MAX_RETAINED } = {}) {
    this.send = send;
    this.retain = retain;
    this.number = 0; // the next frame's number
    this.sent = []; // [{seq, kind, payload, bytes}] sent and not confirmed, in order
    this.sentBytes = 0;
    this.forgotten = 0; // numbers below this were forgotten unconfirmed (or confirmed)
    this.backlog = new Backlog(limit);
    this.closing = false; // PTY_CLOSE waits for a channel
    this.closeSeq = null; // the number PTY_CLOSE went out with
  }

  /** Whether frames wait for a channel (so new ones must wait behind them). */
  get waiting() {
    return !this.backlog.empty || this.closing;
  }

  /** Send one frame now, numbered and kept; false (nothing sent) when it cannot go now. */
  transmit(kind, payload = new Uint8Array()) {
    if (this.waiting) return false;
    return this.emit(kind, payload);
  }

  emit(kind, payload) {
    const seq = this.number;
    if (!this.send(kind, seq, payload)) return false;
    this.number += 1;
    const bytes = sizeOf(payload);
    this.sent.push({ seq, kind, payload, bytes });
    this.sentBytes += bytes;
    while (this.sentBytes > this.retain && this.sent.length > 1) {
      const old = this.sent.shift();
      this.sentBytes -= old.bytes;
      this.forgotten = old.seq + 1;
    }
    if (kind === Kind.PTY_CLOSE) this.closeSeq = seq;
    return true;
  }

  /** Typed bytes: sent, or kept; false when they were dropped (counted in `backlog.lost`). */
  input(bytes) {
    if (this.transmit(Kind.PTY_INPUT, bytes)) return true;
    return this.backlog.input(bytes);
  }

  resize(size) {
    if (!this.transmit(Kind.PTY_RESIZE, size)) this.backlog.resize(size);
  }

  /** Hang up: now, or after what waits, once there is a channel. */
  close() {
    if (!this.transmit(Kind.PTY_CLOSE)) this.closing = true;
  }

  /** The bridge has every frame numbered below `next`: forget them. */
  confirm(next) {
    while (this.sent.length && this.sent[0].seq < next) this.sentBytes -= this.sent.shift().bytes;
    if (next > this.forgotten) this.forgotten = Math.min(next, this.number);
  }

  /** Whether the bridge has confirmed the PTY_CLOSE sent on this stream. */
  get closed() {
    return this.closeSeq !== null && !this.sent.some((frame) => frame.seq === this.closeSeq);
  }

  /**
   * The first RESUMED on a new channel: the bridge expects number `next` (undefined: it does
   * not know the stream, so everything kept goes again). Resend the kept frames from `next`
   * on, in order, then what waited in the backlog (the latest size first), then a waiting
   * PTY_CLOSE. Returns `{missing}`: how many frames the bridge lacks that were forgotten, so
   * cannot be resent (0 unless `retain` was exceeded while nothing was confirmed).
   */
  resume(next) {
    const from = next === undefined ? 0 : next;
    if (next !== undefined) this.confirm(next);
    const missing = next === undefined ? 0 : Math.max(0, this.forgotten - next);
    for (const frame of this.sent) {
      if (frame.seq >= from && !this.send(frame.kind, frame.seq, frame.payload)) return { missing };
    }
    this.flush();
    return { missing };
  }

  /** Send what waited for a channel, in order; what cannot go now waits again. */
  flush() {
    const { size, inputs } = this.backlog.take();
    const waiting = [...(size ? [[Kind.PTY_RESIZE, size]] : []), ...inputs.map((b) => [Kind.PTY_INPUT, b])];
    for (const [at, [kind, payload]] of waiting.entries()) {
      if (this.emit(kind, payload)) continue;
      for (const [later, body] of waiting.slice(at)) {
        if (later === Kind.PTY_RESIZE) this.backlog.resize(body);
        else this.backlog.input(body);
      }
      return;
    }
    if (this.closing && this.emit(Kind.PTY_CLOSE, new Uint8Array())) this.closing = false;
  }

  /** The stream ended: forget everything; the bytes of input that never went out. */
  end() {
    const { inputs } = this.backlog.take();
    this.sent = [];
    this.sentBytes = 0;
    this.closing = false;
    return inputs.reduce((n, bytes) => n + bytes.length, 0);
  }
}
