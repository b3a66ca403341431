// The end-to-end channel between this tab's IDE connection and one bridge (docs/e2e.md):
// the KEY_OFFER / KEY_ANSWER handshake, its retries, and sealing and opening the frames.
// No DOM here: the page learns what happens through the callbacks it passes in.
import { HandshakeError, Initiator, IntegrityError, channelOf } from "./e2e.js";
import { Kind, encode } from "./wire.js";

/** Seconds to wait for a KEY_ANSWER before trying again with a new offer. */
export const HANDSHAKE_TIMEOUT = 10;
/** Bytes of typed input a terminal keeps while its bridge has no secure channel. */
export const MAX_BACKLOG = 64 * 1024;
/**
 * Verdicts after which both ends keep the channel: the refused frame did not advance the
 * counter, so the genuine next frame still opens (junk from a cookie holder cannot end a
 * channel). "dropped" is a real gap: that channel is over.
 */
const KEPT_AFTER = new Set(["tampered", "replayed"]);
const MAX_BACKOFF = 30;
const decoder = new TextDecoder();

function parse(payload) {
  try {
    const body = JSON.parse(decoder.decode(payload));
    return body && typeof body === "object" ? body : null;
  } catch {
    return null;
  }
}

/**
 * One bridge, one IDE connection: at most one live channel at a time.
 *
 * `state` is "idle", "handshaking", "secure", "retrying" or "unsupported" (the bridge answered
 * KEY_OFFER as a kind it does not know: it is too old to encrypt). Nothing is sent to the
 * bridge unsealed except KEY_OFFER, and nothing it sends is acted on unless it opens.
 */
export class BridgeLink {
  /**
   * @param peer      the bridge's number
   * @param bridgeRaw its public key as pinned by this page (65 bytes)
   * @param identity  this browser's Identity
   * @param since     when the relay saw this bridge connect (a new value means a new connection)
   * @param sendRaw   (ArrayBuffer) => boolean: send one frame on the IDE connection
   * @param on        {state(link), secure(link), frame(frame), problem(link, problem)}
   * @param timeout   seconds to wait for a KEY_ANSWER
   */
  constructor({ peer, bridgeRaw, identity, since, sendRaw, on, timeout = HANDSHAKE_TIMEOUT }) {
    Object.assign(this, { peer, bridgeRaw, identity, since, sendRaw, on, timeout });
    this.state = "idle";
    this.channel = null; // the SecureChannel once the handshake succeeded
    this.initiator = null; // the handshake waiting for its answer
    this.attempt = 0; // handshakes failed in a row, for the backoff
    this.generation = 0; // bumped by every start and stop: late async work checks it
    this.timer = null;
    this.outbox = Promise.resolve();
    this.refusal = null; // the first frame of this channel refused here as tampered or replayed
    this.resumed = false; // a RESUMED (or UNSUPPORTED, from an older bridge) came on this channel
    this.legacy = false; // the bridge is older than resume (docs/protocol.md, 5.7)
  }

  setState(state) {
    this.state = state;
    this.on.state(this);
  }

  /** Start a new handshake now (forgetting any channel or handshake under way). */
  async start() {
    this.clear();
    const generation = this.generation;
    this.setState("handshaking");
    const initiator = new Initiator(this.identity, this.bridgeRaw, this.peer);
    const offer = await initiator.offer();
    if (generation !== this.generation) return;
    this.initiator = initiator;
    this.sendRaw(encode(Kind.KEY_OFFER, { peer: this.peer, stream: 0, seq: 0, payload: offer }));
    this.timer = setTimeout(() => this.retry(), this.timeout * 1000);
  }

  /** Start again after a backoff that grows with each failure in a row. */
  retry() {
    this.clear();
    this.attempt += 1;
    const delay = Math.min(MAX_BACKOFF, 0.5 * 2 ** this.attempt) * (0.5 + Math.random());
    this.setState("retrying");
    this.timer = setTimeout(() => this.start(), delay * 1000);
  }

  /** Forget the channel and any handshake, and stop. */
  stop() {
    this.clear();
    this.setState("idle");
  }

  clear() {
    this.generation += 1;
    clearTimeout(this.timer);
    this.timer = null;
    this.channel = null;
    this.initiator = null;
    this.refusal = null;
    this.resumed = false;
    this.legacy = false;
  }

  get secure() {
    return this.state === "secure" && this.channel !== null;
  }

  /** Secure, and the bridge has answered its RESUME: terminals' frames may go. */
  get ready() {
    return this.secure && this.resumed;
  }

  /** Seal and send one end-to-end frame; false when there is no channel to send it on. */
  send(kind, { stream = 0, seq = 0 } = {}, payload = new Uint8Array()) {
    if (!this.secure) return false;
    const { channel } = this;
    const sealed = channel.seal(kind, { peer: this.peer, stream, seq }, payload);
    // In the order sealed: the bridge accepts only the next counter.
    this.outbox = this.outbox.then(() => sealed).then(
      (frame) => this.channel === channel && this.sendRaw(frame),
      (error) => console.error("sealing a frame failed", error),
    );
    return true;
  }

  /** A frame from this bridge (decoded, with `raw`, the whole message). */
  async receive(frame) {
    if (frame.kind === Kind.KEY_ANSWER) return this.answered(frame);
    if (frame.kind === Kind.KEY_ERROR) return this.refused(frame);
    const sealedFor = channelOf(frame.payload);
    if (this.channel !== null && sealedFor === this.channel.id) return this.open(frame);
    if ((frame.kind === Kind.UNSUPPORTED || frame.kind === Kind.PTY_ERROR) && this.initiator) {
      // An older bridge answers KEY_OFFER, in plaintext, as a kind it does not know.
      const body = parse(frame.payload);
      if (body && body.error === "unsupported" && (body.kind === undefined || body.kind === Kind.KEY_OFFER)) {
        this.clear();
        this.setState("unsupported");
      }
    }
    // Anything else is another tab's channel, or an old channel of ours: not for us.
    return undefined;
  }

  async answered(frame) {
    const body = parse(frame.payload);
    const initiator = this.initiator;
    if (!initiator || !body || body.channel !== initiator.channel) return; // another tab's
    const generation = this.generation;
    try {
      if (frame.stream !== 0 || frame.seq !== 0n) {
        throw new HandshakeError("malformed", "the answer is not on stream 0, seq 0");
      }
      const channel = await initiator.accept(frame.payload);
      if (generation !== this.generation) return;
      this.clear();
      this.channel = channel;
      this.attempt = 0;
      this.setState("secure");
      this.on.secure(this);
    } catch (error) {
      if (!(error instanceof HandshakeError)) throw error;
      // Keep waiting: the genuine answer may still come (this one may be the relay's forgery).
      this.on.problem(this, { reason: error.reason, message: error.message });
    }
  }

  refused(frame) {
    const body = parse(frame.payload);
    const ours = [this.initiator?.channel, this.channel?.id].filter((c) => c !== undefined);
    if (!body || !ours.includes(body.channel)) return;
    // Plaintext the relay could have written: shown as a hint, and at most it makes a new channel.
    const text = typeof body.message === "string" ? body.message.slice(0, 200) : "";
    const code = typeof body.error === "string" ? body.error.slice(0, 40) : "refused";
    const kept = KEPT_AFTER.has(code) && this.channel !== null && body.channel === this.channel.id;
    this.on.problem(this, {
      reason: code, message: text || "the bridge refused the secure channel", kept,
    });
    // The bridge keeps a channel after a tampered or replayed frame; anything else (dropped,
    // no-channel, bad-offer, ...) means it has no channel with us: make a new one.
    if (!kept) this.retry();
  }

  async open(frame) {
    const channel = this.channel;
    let plaintext;
    try {
      plaintext = await channel.open(frame.raw);
    } catch (error) {
      if (!(error instanceof IntegrityError)) throw error;
      if (this.channel !== channel) return;
      if (KEPT_AFTER.has(error.verdict)) {
        // Not acted on, and the counter did not move: the genuine next frame still opens.
        this.refusal = this.refusal || error.verdict;
        this.on.problem(this, { verdict: error.verdict, message: error.message, kept: true });
        return;
      }
      // A gap: what is missing cannot be had again on this channel. Nothing more is opened
      // with it; a new channel re-lists the terminals (PTY_LIST once secure).
      const after = this.refusal;
      this.channel = null;
      this.on.problem(this, { verdict: error.verdict, message: error.message, kept: false, after });
      this.retry();
      return;
    }
    if (this.channel !== channel) return;
    this.on.frame({ kind: frame.kind, peer: frame.peer, stream: frame.stream, seq: frame.seq, payload: plaintext });
  }
}

/**
 * What a terminal typed while its bridge had no secure channel (being made, or made again),
 * to send in order once there is one. At most `limit` bytes of input: a frame that does not fit
 * is dropped whole (half a paste reaching a shell is worse than none) and counted in `lost`,
 * for the terminal to say so. Only the latest size is kept: it is sent first, as it is then.
 */
export class Backlog {
  constructor(limit = MAX_BACKLOG) {
    this.limit = limit;
    this.inputs = []; // Uint8Array payloads of PTY_INPUT, in the order typed
    this.bytes = 0;
    this.size = null; // the latest {cols, rows} not sent
    this.lost = 0; // bytes dropped since the last take()
  }

  get empty() {
    return this.inputs.length === 0 && this.size === null;
  }

  /** Keep one frame's input; false (and counted in `lost`) when it does not fit. */
  input(bytes) {
    if (this.bytes + bytes.length > this.limit) {
      this.lost += bytes.length;
      return false;
    }
    this.inputs.push(bytes);
    this.bytes += bytes.length;
    return true;
  }

  resize(size) {
    this.size = size;
  }

  /** Everything kept, emptying the backlog: {size, inputs, lost}. */
  take() {
    const taken = { size: this.size, inputs: this.inputs, lost: this.lost };
    this.inputs = [];
    this.bytes = 0;
    this.size = null;
    this.lost = 0;
    return taken;
  }
}
