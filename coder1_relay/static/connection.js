// The IDE WebSocket to the relay (/ws/ide): reconnects, heartbeats. End-to-end frames go
// over it through a BridgeLink (link.js); it reads only their envelope.
import { heartbeatSeconds } from "./bounds.js";
import { Kind, decode, encode, json } from "./wire.js";

const HEARTBEAT_TIMEOUT_FACTOR = 3;
const MAX_BACKOFF = 30;
/** Closes after which the page comes back at once: the relay (1001) or its node (4012) went away. */
const AT_ONCE = new Set([1001, 4012]);
/** Then attempts are 0.1 to 1 s apart for this many seconds (a relay restarting), uncounted. */
const PROMPT_WINDOW = 20;

/**
 * Seconds until the next attempt, and the state after it: `attempt` counts failures for the
 * backoff; `promptUntil` (ms, on `now`'s clock) ends the prompt attempts a 1001 or 4012 began.
 */
export function nextAttempt({ attempt, promptUntil }, code, now, random = Math.random) {
  if (AT_ONCE.has(code)) promptUntil = now + PROMPT_WINDOW * 1000;
  if (promptUntil !== null && now < promptUntil) {
    return { delay: 0.1 + 0.9 * random(), attempt: 0, promptUntil };
  }
  attempt += 1;
  const delay = Math.min(MAX_BACKOFF, 0.5 * 2 ** attempt) * (0.5 + random());
  return { delay, attempt, promptUntil: null };
}

/**
 * The IDE WebSocket: reconnects with backoff and jitter, heartbeats both ways; before each
 * reconnection, `renewSession` makes sure of the session cookie.
 */
export class RelayConnection {
  constructor(onFrame, onState, renewSession) {
    this.onFrame = onFrame;
    this.onState = onState;
    this.renewSession = renewSession;
    this.attempt = 0;
    this.promptUntil = null;
    this.socket = null;
    this.heartbeat = 15;
  }

  connect() {
    this.onState(this.attempt || this.promptUntil !== null ? "reconnecting" : "connecting");
    const socket = new WebSocket(`wss://${location.host}/ws/ide`);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => {
      this.attempt = 0;
      this.promptUntil = null;
      this.onState("connected");
      this.startHeartbeat();
    };
    socket.onmessage = (event) => {
      this.alive();
      let frame;
      try {
        frame = decode(event.data);
        frame.raw = event.data; // the whole message: a sealed frame's header is authenticated too
      } catch (error) {
        console.warn("ignored a malformed frame", error);
        return;
      }
      if (frame.kind === Kind.PING) this.send(Kind.PONG);
      else if (frame.kind === Kind.WELCOME) {
        let asked = null;
        try {
          asked = json(frame)?.heartbeat;
        } catch {
          console.warn("ignored a malformed WELCOME");
        }
        this.heartbeat = heartbeatSeconds(asked) ?? this.heartbeat;
        this.startHeartbeat();
      }
      this.onFrame(frame);
    };
    socket.onclose = (event) => this.closed(socket, event.code);
    this.socket = socket;
  }

  async closed(socket, code) {
    if (socket !== this.socket) return;
    this.stopHeartbeat();
    this.socket = null;
    const next = nextAttempt(this, code, Date.now());
    this.attempt = next.attempt;
    this.promptUntil = next.promptUntil;
    this.onState("reconnecting");
    // A refused handshake looks like any other close here: renew the session cookie first.
    await this.renewSession();
    setTimeout(() => this.connect(), next.delay * 1000);
  }

  startHeartbeat() {
    this.stopHeartbeat();
    this.pinger = setInterval(() => this.send(Kind.PING), this.heartbeat * 1000);
    this.alive();
  }

  stopHeartbeat() {
    clearInterval(this.pinger);
    clearTimeout(this.watchdog);
  }

  alive() {
    clearTimeout(this.watchdog);
    this.watchdog = setTimeout(
      () => this.socket && this.socket.close(),
      this.heartbeat * HEARTBEAT_TIMEOUT_FACTOR * 1000,
    );
  }

  get open() {
    return this.socket !== null && this.socket.readyState === WebSocket.OPEN;
  }

  /** A control frame (PING, PONG): end-to-end frames go through a BridgeLink. */
  send(kind, fields = {}) {
    return this.sendRaw(encode(kind, fields));
  }

  sendRaw(frame) {
    if (!this.open) return false;
    this.socket.send(frame);
    return true;
  }
}
