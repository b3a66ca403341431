// The IDE WebSocket to the relay (/ws/ide): reconnects, heartbeats. End-to-end frames go
// over it through a BridgeLink (link.js); it reads only their envelope.
import { heartbeatSeconds } from "./bounds.js";
import { Kind, decode, encode, json } from "./wire.js";

const HEARTBEAT_TIMEOUT_FACTOR = 3;
const MAX_BACKOFF = 30;

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
    this.socket = null;
    this.heartbeat = 15;
  }

  connect() {
    this.onState(this.attempt ? "reconnecting" : "connecting");
    const socket = new WebSocket(`wss://${location.host}/ws/ide`);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => {
      this.attempt = 0;
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
    socket.onclose = () => this.closed(socket);
    this.socket = socket;
  }

  async closed(socket) {
    if (socket !== this.socket) return;
    this.stopHeartbeat();
    this.socket = null;
    this.attempt += 1;
    this.onState("reconnecting");
    // A refused handshake looks like any other close here: renew the session cookie first.
    await this.renewSession();
    const delay = Math.min(MAX_BACKOFF, 0.5 * 2 ** this.attempt) * (0.5 + Math.random());
    setTimeout(() => this.connect(), delay * 1000);
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
