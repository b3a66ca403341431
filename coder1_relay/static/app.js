// The Coder1 IDE page: pairing dialog, paired bridges, and terminals on the paired machine.
// Every end-to-end frame is sealed for the bridge (docs/e2e.md; e2e.js, link.js): the relay
// forwards what it cannot read.
import { Terminal } from "./vendor/xterm.mjs";
import { FitAddon } from "./vendor/addon-fit.mjs";
import { Kind, decode, encode, json } from "./wire.js";
import { PinStore, RAW_KEY_SIZE, b64u, loadIdentity, sas, unb64u } from "./e2e.js";
import { BridgeLink } from "./link.js";

const $ = (selector) => document.querySelector(selector);
const HEARTBEAT_TIMEOUT_FACTOR = 3;
const MAX_BACKOFF = 30;

/** The IDE WebSocket: reconnects with backoff and jitter, heartbeats both ways. */
class RelayConnection {
  constructor(onFrame, onState) {
    this.onFrame = onFrame;
    this.onState = onState;
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
        this.heartbeat = json(frame).heartbeat || this.heartbeat;
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
    await fetch("/api/session", { method: "POST" }).catch(() => {});
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

/** One terminal tab attached to a PTY on a bridge. */
class TerminalTab {
  constructor(app, peer, stream) {
    this.app = app;
    this.peer = peer;
    this.stream = stream;
    this.seq = 0;
    this.state = "opening";
    this.term = new Terminal({ cursorBlink: true, fontSize: 14, scrollback: 5000 });
    this.fit = new FitAddon();
    this.term.loadAddon(this.fit);

    this.element = document.createElement("div");
    this.element.className = "term-pane";
    this.element.dataset.stream = stream;
    this.element.dataset.peer = peer;
    this.element.setAttribute("aria-hidden", "true");
    $("#terminals").append(this.element);

    this.tab = document.createElement("button");
    this.tab.type = "button";
    this.tab.className = "tab";
    this.tab.dataset.stream = stream;
    this.tab.dataset.state = "running";
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = `${app.bridgeLabel(peer)} #${app.terminals.size + 1}`;
    const close = document.createElement("span");
    close.className = "close";
    close.textContent = "×";
    close.title = "Close this terminal";
    close.addEventListener("click", (event) => {
      event.stopPropagation();
      this.close();
    });
    this.tab.append(title, close);
    this.tab.addEventListener("click", () => app.select(this));
    $("#new-terminal").before(this.tab);

    this.term.open(this.element);
    this.term.onData((data) => this.send(Kind.PTY_INPUT, data));
    this.term.onBinary((data) => this.send(Kind.PTY_INPUT, Uint8Array.from(data, (c) => c.charCodeAt(0))));
    this.term.onResize(({ cols, rows }) => this.send(Kind.PTY_RESIZE, { cols, rows }));
    this.resizer = new ResizeObserver(() => this.visible && this.fit.fit());
    this.resizer.observe(this.element);
  }

  get visible() {
    return this.element.getAttribute("aria-hidden") === "false";
  }

  send(kind, payload = new Uint8Array()) {
    if (this.state === "exited") return;
    this.app.sendTo(this.peer, kind, { stream: this.stream, seq: this.seq++ }, payload);
  }

  open() {
    this.fit.fit();
    this.send(Kind.PTY_OPEN, { cols: this.term.cols, rows: this.term.rows });
  }

  reattach(size) {
    this.state = "running";
    this.term.resize(size.cols, size.rows);
    this.fit.fit();
  }

  receive(frame) {
    switch (frame.kind) {
      case Kind.PTY_OUTPUT:
        this.term.write(frame.payload.slice());
        break;
      case Kind.PTY_OPENED:
        this.state = "running";
        break;
      case Kind.PTY_EXIT: {
        const end = json(frame);
        const how = end.signal ? `killed by signal ${end.signal}` : `exited with code ${end.exit_code}`;
        this.ended(`[process ${how}]`);
        break;
      }
      case Kind.PTY_ERROR:
      case Kind.ERROR:
        this.ended(`[${json(frame).message}]`);
        break;
      default:
        break;
    }
  }

  ended(message) {
    this.term.write(`\r\n\x1b[2m${message}\x1b[0m\r\n`);
    this.state = "exited";
    this.tab.dataset.state = "exited";
    this.element.dataset.state = "exited";
  }

  close() {
    if (this.state !== "exited") this.send(Kind.PTY_CLOSE);
    this.dispose();
  }

  dispose() {
    this.resizer.disconnect();
    this.term.dispose();
    this.element.remove();
    this.tab.remove();
    this.app.forget(this);
  }
}

/** The pairing dialog: a code, its countdown and the command to run; then the SAS to compare. */
class PairingDialog {
  constructor(app) {
    this.app = app;
    this.dialog = $("#pair-dialog");
    this.pairedPeer = null;
    $("#bridge-button").addEventListener("click", () => this.show());
    $("#pair-new-code").addEventListener("click", () => this.newCode());
    $("#pair-close").addEventListener("click", () => this.close());
    $("#pair-done").addEventListener("click", () => this.close());
    $("#pair-mismatch").addEventListener("click", () => this.mismatch());
    this.dialog.addEventListener("close", () => clearInterval(this.ticker));
  }

  show() {
    this.view("code");
    if (!this.dialog.open) this.dialog.showModal();
    this.newCode();
  }

  /** "code" (the code to type) or "paired" (the verification code to compare). */
  view(name) {
    this.dialog.dataset.view = name;
    $("#pair-code-view").hidden = name !== "code";
    $("#pair-paired-view").hidden = name !== "paired";
  }

  close() {
    clearInterval(this.ticker);
    if (this.dialog.open) this.dialog.close();
  }

  message(text) {
    $("#pair-message").textContent = text;
  }

  /** Whether the dialog shows a code a bridge can still redeem. */
  get waiting() {
    return this.dialog.open && this.dialog.dataset.view === "code" && $("#pair-code").dataset.state === "live";
  }

  async newCode() {
    clearInterval(this.ticker);
    this.message("");
    const code = $("#pair-code");
    code.dataset.state = "loading";
    const identity = await this.app.identityReady;
    if (!identity) {
      this.message("This browser cannot keep the key that encrypts your terminals (its site storage"
        + " is off, as in some private windows), so it cannot pair.");
      return;
    }
    let response;
    try {
      response = await fetch("/api/pairing-codes", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ browser_key: b64u(identity.raw) }),
      });
    } catch {
      this.message("The relay cannot be reached. Check your connection and try again.");
      return;
    }
    const body = await response.json().catch(() => ({}));
    if (response.status === 429) {
      const wait = response.headers.get("Retry-After") || "60";
      this.message(`Too many codes requested. Try again in ${wait} seconds.`);
      return;
    }
    if (response.status === 401) {
      await fetch("/api/session", { method: "POST" });
      this.message("Your session was renewed. Click “New code”.");
      return;
    }
    if (!response.ok) {
      this.message(body.message || `The relay refused (HTTP ${response.status}).`);
      return;
    }
    this.app.knownPeers = new Set(this.app.bridges.keys());
    code.textContent = `${body.code.slice(0, 3)} ${body.code.slice(3)}`;
    code.dataset.code = body.code;
    code.dataset.state = "live";
    $("#pair-command").textContent = `coder1-bridge pair --relay ${body.relay} ${body.code}`;
    $("#pair-hint").textContent = ["localhost", "127.0.0.1"].includes(location.hostname)
      ? "Development relay: also pass --ca-cert with the relay's dev-cert.pem (see the README)."
      : "";
    const deadline = performance.now() + body.expires_in * 1000;
    const tick = () => {
      const left = Math.max(0, Math.round((deadline - performance.now()) / 1000));
      $("#pair-countdown").textContent = `Expires in ${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")}`;
      if (left === 0) {
        clearInterval(this.ticker);
        code.dataset.state = "expired";
        this.message("This code has expired. Click “New code” for a fresh one.");
      }
    };
    tick();
    this.ticker = setInterval(tick, 1000);
  }

  /**
   * A bridge redeemed a code of this session (PAIRED): if it is the one shown, compare codes.
   * `code` is the code it redeemed, when the relay says (another tab's code is not ours).
   */
  paired(bridge, code) {
    if (!this.waiting || this.app.knownPeers.has(bridge.peer)) return;
    if (code !== null && code !== $("#pair-code").dataset.code) return;
    clearInterval(this.ticker);
    $("#pair-code").dataset.state = "used";
    if (bridge.trust === "key-changed") {
      this.message(`Bridge #${bridge.peer} paired, but ${KEY_CHANGED}`);
      return;
    }
    if (!bridge.sas) {
      this.message(`Bridge #${bridge.peer} paired, but the relay did not send its key, so this`
        + " browser cannot encrypt for it. Update the relay, then pair again.");
      return;
    }
    this.pairedPeer = bridge.peer;
    $("#pair-label").textContent = bridge.label;
    $("#pair-sas").textContent = bridge.sas;
    this.view("paired");
    $("#pair-done").focus();
  }

  /** The two verification codes differ: the pairing went through someone else's keys. */
  async mismatch() {
    const peer = this.pairedPeer;
    this.view("code");
    this.message("The codes differ: someone may be intercepting between this browser and your"
      + " machine. The bridge is revoked: run “coder1-bridge unpair” on it, then pair again.");
    if (peer !== null) await this.app.revokeNow(peer);
  }
}

const KEY_CHANGED = "This bridge's key changed: someone may be intercepting. Revoke it and pair again.";

/** What each verdict on a refused frame means, for people. */
const VERDICTS = {
  tampered: "it was altered on the way",
  replayed: "it had already been received once",
  dropped: "frames before it never arrived",
};

/** What the bridge list says about each state of a bridge's channel. */
const LINK_STATES = {
  idle: "",
  handshaking: "securing…",
  retrying: "securing… (retrying)",
  secure: "end-to-end encrypted",
  unsupported: "this bridge cannot encrypt end to end: update coder1-bridge on it",
};

/** A b64u public key in the relay's words, if it is one (65 bytes, uncompressed). */
function publicKey(text) {
  try {
    const raw = unb64u(text);
    return raw.length === RAW_KEY_SIZE && raw[0] === 4 ? text : null;
  } catch {
    return null;
  }
}

class App {
  constructor() {
    // peer -> {peer, label, version, since, connected, key, pin, trust, sas, armed}
    // trust: "pinned" (the key to use is pinned), "key-changed" (the relay named another
    // key: never used again), "unknown" (no key yet).
    this.bridges = new Map();
    this.live = new Set(); // connected peers, as of the latest PRESENCE
    this.knownPeers = new Set();
    this.terminals = new Map(); // `${peer}:${stream}` -> TerminalTab
    this.links = new Map(); // peer -> BridgeLink, on the current IDE connection
    this.pins = new PinStore(location.origin);
    this.pinned = new Map(); // peer -> b64u key, what this.pins holds
    this.inbox = Promise.resolve(); // frames are handled one at a time, in order
    this.selectedPeer = null;
    this.current = null;
    this.identity = null;
    this.identityReady = loadIdentity().then(
      (identity) => (this.identity = identity),
      (error) => {
        console.error("no identity", error);
        this.showProblem("no-identity", "This browser cannot keep the key that encrypts your"
          + " terminals (its site storage is off, as in some private windows): nothing can be"
          + " sent to your machine.");
        return null;
      },
    );
    this.pairing = new PairingDialog(this);
    this.connection = new RelayConnection(
      (frame) => this.receive(frame),
      (state) => this.connectionState(state),
    );
    $("#new-terminal").addEventListener("click", () => this.newTerminal());
    $("#e2e-error-close").addEventListener("click", () => { $("#e2e-error").hidden = true; });
    window.addEventListener("resize", () => this.current && this.current.fit.fit());
  }

  start() {
    this.connection.connect();
    this.refreshBridges();
  }

  connectionState(state) {
    const element = $("#connection-state");
    element.dataset.state = state;
    element.textContent = { connected: "connected to relay", connecting: "connecting…" }[state]
      || "reconnecting…";
    if (state !== "connected") this.stopLinks();
    this.updateControls();
  }

  bridgeLabel(peer) {
    const bridge = this.bridges.get(peer);
    return bridge ? bridge.label : `bridge ${peer}`;
  }

  bridge(peer) {
    if (!this.bridges.has(peer)) {
      this.bridges.set(peer, {
        peer, label: `bridge ${peer}`, version: null, since: null, connected: this.live.has(peer),
        key: null, pin: null, trust: "unknown", sas: null, armed: false,
      });
    }
    return this.bridges.get(peer);
  }

  receive(frame) {
    this.inbox = this.inbox.then(() => this.handle(frame))
      .catch((error) => console.error("handling a frame failed", error));
  }

  async handle(frame) {
    switch (frame.kind) {
      case Kind.PRESENCE:
        return this.presence(json(frame).bridges);
      case Kind.PAIRED:
        return this.paired(json(frame));
      case Kind.ERROR:
        if (frame.stream === 0) console.warn("relay error", json(frame));
        else this.dispatch(frame); // a terminal's frame was not delivered
        return undefined;
      default: {
        if (frame.kind < Kind.CMD_START) return undefined;
        // End to end: acted on only if it opens with this tab's channel to that bridge.
        const link = this.links.get(frame.peer);
        return link ? link.receive(frame) : undefined;
      }
    }
  }

  /** A frame from a bridge, opened; or a relay ERROR about a terminal's frame. */
  dispatch(frame) {
    if (frame.kind === Kind.PTY_LISTING) {
      for (const t of json(frame).terminals) this.reattach(frame.peer, t);
      return;
    }
    const tab = this.terminals.get(`${frame.peer}:${frame.stream}`);
    if (tab) tab.receive(frame);
  }

  async presence(connected) {
    this.live = new Set(connected.map((b) => b.peer));
    for (const bridge of this.bridges.values()) bridge.connected = this.live.has(bridge.peer);
    for (const b of connected) {
      const bridge = this.bridge(b.peer);
      Object.assign(bridge, { label: b.label, version: b.version, since: b.since, connected: true });
      await this.sighted(bridge, b.bridge_key);
    }
    this.secureLinks();
    this.refreshBridges();
  }

  /** PAIRED: a bridge redeemed one of this session's codes. */
  async paired(body) {
    if (!Number.isInteger(body.peer)) return;
    const bridge = this.bridge(body.peer);
    if (typeof body.label === "string") bridge.label = body.label;
    await this.sighted(bridge, body.bridge_key);
    this.pairing.paired(bridge, typeof body.code === "string" ? body.code : null);
    this.secureLinks();
    this.renderBridges();
  }

  /** The relay names `key` as this bridge's: pin it if none is (trust on first sight), else compare. */
  async sighted(bridge, key) {
    const identity = await this.identityReady;
    const named = publicKey(key);
    if (key !== undefined && key !== null && named === null) console.warn("the relay sent a malformed bridge key");
    let pin;
    try {
      pin = await this.pinOf(bridge.peer, named);
    } catch (error) {
      console.error("the pinned keys cannot be read", error);
      this.showProblem("no-pins", "This browser cannot keep the keys of your bridges (its site"
        + " storage is off, as in some private windows): nothing can be sent to them.");
      return;
    }
    if (named !== null) bridge.key = named;
    // Once seen with another key, a bridge stays refused until it is revoked.
    if (pin !== null && (publicKey(pin) === null || (named !== null && named !== pin))) {
      if (bridge.trust !== "key-changed") this.keyChanged(bridge);
    } else if (bridge.trust !== "key-changed") {
      bridge.trust = pin === null ? "unknown" : "pinned";
    }
    if (pin !== bridge.pin) {
      bridge.pin = pin;
      bridge.sas = null;
    }
    if (bridge.trust === "pinned" && !bridge.sas && identity) bridge.sas = await sas(identity.raw, unb64u(pin));
  }

  /** The relay named another key than the pinned one: nothing more goes to that bridge. */
  keyChanged(bridge) {
    bridge.trust = "key-changed";
    for (const tab of this.terminals.values()) {
      if (tab.peer === bridge.peer && tab.state !== "exited") tab.ended("[this bridge's key changed: disconnected]");
    }
  }

  /** The key pinned for `peer` (b64u) or null; `named` is pinned if none is yet. */
  async pinOf(peer, named) {
    let pin = this.pinned.has(peer) ? this.pinned.get(peer) : await this.pins.get(peer);
    if (pin === null && named !== null) pin = await this.pins.pinIfAbsent(peer, named);
    this.pinned.set(peer, pin);
    return pin;
  }

  /** One channel to each connected bridge whose key is pinned and unchanged; none to others. */
  secureLinks() {
    for (const [peer, link] of this.links) {
      const bridge = this.bridges.get(peer);
      if (!this.connection.open || !bridge || !bridge.connected || bridge.trust !== "pinned"
          || bridge.since !== link.since || bridge.pin !== link.pin) {
        link.stop();
        this.links.delete(peer);
      }
    }
    if (this.connection.open && this.identity) {
      for (const bridge of this.bridges.values()) {
        if (bridge.connected && bridge.trust === "pinned" && !this.links.has(bridge.peer)) this.link(bridge);
      }
    }
    this.renderBridges();
  }

  link(bridge) {
    const link = new BridgeLink({
      peer: bridge.peer,
      bridgeRaw: unb64u(bridge.pin),
      identity: this.identity,
      since: bridge.since,
      sendRaw: (frame) => this.connection.sendRaw(frame),
      on: {
        state: () => this.renderBridges(),
        secure: (secured) => secured.send(Kind.PTY_LIST), // re-attach to its running terminals
        frame: (frame) => this.dispatch(frame),
        problem: (failed, problem) => this.e2eProblem(failed.peer, problem),
      },
    });
    link.pin = bridge.pin;
    this.links.set(bridge.peer, link);
    link.start().catch((error) => {
      console.error("the key offer failed", error);
      link.retry();
    });
  }

  stopLinks() {
    for (const link of this.links.values()) link.stop();
    this.links.clear();
    this.renderBridges();
  }

  /** Send a terminal's frame to its bridge, sealed; false when there is no channel yet. */
  sendTo(peer, kind, fields, payload) {
    const link = this.links.get(peer);
    return link ? link.send(kind, fields, payload) : false;
  }

  e2eProblem(peer, { verdict, reason, message }) {
    const label = this.bridgeLabel(peer);
    if (verdict) {
      this.showProblem(verdict, `End-to-end check failed on ${label}: a frame was refused as`
        + ` “${verdict}” (${VERDICTS[verdict] || message}). Nothing in it was used; starting a new`
        + " secure channel.");
    } else if (VERDICTS[reason]) {
      this.showProblem(reason, `${label} refused a frame from this page as “${reason}”`
        + ` (${VERDICTS[reason]}). Nothing in it was used; starting a new secure channel.`);
    } else if (reason === "bad-signature") {
      this.showProblem(reason, `An answer for ${label} was not signed by its paired key: someone`
        + " may be intercepting. It was ignored.");
    } else {
      this.showProblem(reason, `${label} refused the secure channel (${reason}: ${message}).`
        + " Starting a new one.");
    }
  }

  showProblem(verdict, text) {
    const banner = $("#e2e-error");
    banner.dataset.verdict = verdict;
    $("#e2e-error-text").textContent = text;
    banner.hidden = false;
  }

  async refreshBridges() {
    const response = await fetch("/api/bridges").catch(() => null);
    if (!response || !response.ok) {
      this.renderBridges();
      return;
    }
    const { bridges } = await response.json();
    this.inbox = this.inbox.then(() => this.listed(bridges))
      .catch((error) => console.error("reading the bridges failed", error));
  }

  /** The paired bridges, from GET /api/bridges; PRESENCE alone says which are connected. */
  async listed(bridges) {
    const paired = new Set(bridges.map((b) => b.peer));
    for (const b of bridges) {
      const bridge = this.bridge(b.peer);
      bridge.label = b.label;
      bridge.version = b.version || bridge.version;
      await this.sighted(bridge, b.bridge_key);
    }
    for (const peer of [...this.bridges.keys()]) {
      if (!paired.has(peer) && !this.live.has(peer)) this.bridges.delete(peer);
    }
    this.secureLinks();
  }

  renderBridges() {
    const list = $("#bridges");
    list.replaceChildren();
    const usable = (bridge) => bridge && bridge.connected && bridge.trust !== "key-changed";
    if (this.selectedPeer !== null && !usable(this.bridges.get(this.selectedPeer))) this.selectedPeer = null;
    for (const [peer, bridge] of this.bridges) {
      if (this.selectedPeer === null && usable(bridge)) this.selectedPeer = peer;
      list.append(this.bridgeItem(bridge));
    }
    $("#no-bridges").hidden = this.bridges.size > 0;
    this.updateControls();
  }

  bridgeItem(bridge) {
    const { peer } = bridge;
    const span = (className, text) => {
      const element = document.createElement("span");
      element.className = className;
      element.textContent = text;
      return element;
    };
    const changed = bridge.trust === "key-changed";
    const link = this.links.get(peer);
    const item = document.createElement("li");
    item.className = "bridge";
    item.dataset.peer = peer;
    item.dataset.state = changed ? "key-changed" : bridge.connected ? "connected" : "disconnected";
    item.dataset.e2e = changed ? "refused" : link ? link.state : "none";
    item.setAttribute("aria-selected", String(peer === this.selectedPeer));
    item.append(
      span("label", bridge.label),
      span("state", bridge.connected
        ? `connected since ${new Date(bridge.since * 1000).toLocaleTimeString()}`
        : "disconnected: waiting for it to reconnect"),
      span("version", bridge.version ? `bridge ${bridge.version}` : ""),
    );
    if (changed) {
      item.append(span("warning", KEY_CHANGED));
    } else if (bridge.sas) {
      const code = span("sas", bridge.sas);
      code.title = "Verification code: check that “coder1-bridge pair” printed the same";
      item.append(code);
    } else if (bridge.trust === "unknown") {
      item.append(span("warning", "This bridge's key is unknown: pair it again."));
    }
    if (link && !changed) item.append(span("e2e", LINK_STATES[link.state] || ""));
    const revoke = document.createElement("button");
    revoke.type = "button";
    revoke.className = "revoke";
    revoke.dataset.armed = String(bridge.armed);
    revoke.textContent = bridge.armed ? "Confirm revoke" : "Revoke";
    revoke.addEventListener("click", (event) => {
      event.stopPropagation();
      this.revoke(peer);
    });
    item.append(revoke);
    item.addEventListener("click", () => {
      if (bridge.connected && !changed) {
        this.selectedPeer = peer;
        this.renderBridges();
      }
    });
    return item;
  }

  async revoke(peer) {
    const bridge = this.bridges.get(peer);
    if (!bridge) return;
    if (!bridge.armed) {
      bridge.armed = true;
      this.renderBridges();
      return;
    }
    await this.revokeNow(peer);
  }

  async revokeNow(peer) {
    const response = await fetch("/api/revoke", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ peer }),
    });
    if (response.ok) {
      this.bridges.delete(peer);
      this.links.get(peer)?.stop();
      this.links.delete(peer);
      this.pinned.delete(peer);
      await this.pins.delete(peer).catch((error) => console.warn("could not unpin", error));
      for (const tab of this.terminals.values()) {
        if (tab.peer === peer && tab.state !== "exited") tab.ended("[bridge revoked]");
      }
    }
    this.refreshBridges();
  }

  updateControls() {
    const link = this.links.get(this.selectedPeer);
    $("#new-terminal").disabled = !(this.connection.open && link && link.secure);
    $("#no-terminals").hidden = this.terminals.size > 0;
  }

  newStream() {
    const ids = new Uint32Array(1);
    do crypto.getRandomValues(ids);
    while (ids[0] === 0 || [...this.terminals.values()].some((t) => t.stream === ids[0]));
    return ids[0];
  }

  add(tab) {
    this.terminals.set(`${tab.peer}:${tab.stream}`, tab);
    this.select(tab);
    this.updateControls();
    return tab;
  }

  newTerminal() {
    if (!this.links.get(this.selectedPeer)?.secure) return;
    this.add(new TerminalTab(this, this.selectedPeer, this.newStream())).open();
  }

  reattach(peer, listed) {
    if (this.terminals.has(`${peer}:${listed.stream}`)) return;
    this.add(new TerminalTab(this, peer, listed.stream)).reattach(listed);
  }

  select(tab) {
    for (const other of this.terminals.values()) {
      other.element.setAttribute("aria-hidden", String(other !== tab));
      other.tab.setAttribute("aria-selected", String(other === tab));
    }
    this.current = tab;
    tab.fit.fit();
    tab.term.focus();
  }

  forget(tab) {
    this.terminals.delete(`${tab.peer}:${tab.stream}`);
    if (this.current === tab) {
      this.current = null;
      const next = [...this.terminals.values()].pop();
      if (next) this.select(next);
    }
    this.updateControls();
  }
}

window.coder1 = new App();
window.coder1.start();
