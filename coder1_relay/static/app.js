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

/** The pairing dialog: a code, its countdown, the command to run. */
class PairingDialog {
  constructor(app) {
    this.app = app;
    this.dialog = $("#pair-dialog");
    $("#bridge-button").addEventListener("click", () => this.show());
    $("#pair-new-code").addEventListener("click", () => this.newCode());
    $("#pair-close").addEventListener("click", () => this.close());
    this.dialog.addEventListener("close", () => clearInterval(this.ticker));
  }

  show() {
    if (!this.dialog.open) this.dialog.showModal();
    this.newCode();
  }

  close() {
    clearInterval(this.ticker);
    if (this.dialog.open) this.dialog.close();
  }

  message(text) {
    $("#pair-message").textContent = text;
  }

  async newCode() {
    clearInterval(this.ticker);
    this.message("");
    const code = $("#pair-code");
    code.dataset.state = "loading";
    let response;
    try {
      response = await fetch("/api/pairing-codes", { method: "POST" });
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

  /** A bridge that was not there when the code was shown has connected: it used the code. */
  bridgeConnected(peer) {
    if (this.dialog.open && $("#pair-code").dataset.state === "live" && !this.app.knownPeers.has(peer)) {
      this.close();
    }
  }
}

class App {
  constructor() {
    this.bridges = new Map(); // peer -> {label, version, since, connected}
    this.knownPeers = new Set();
    this.terminals = new Map(); // `${peer}:${stream}` -> TerminalTab
    this.listed = new Set(); // peers asked for their running terminals on this connection
    this.selectedPeer = null;
    this.current = null;
    this.pairing = new PairingDialog(this);
    this.connection = new RelayConnection(
      (frame) => this.receive(frame),
      (state) => this.connectionState(state),
    );
    $("#new-terminal").addEventListener("click", () => this.newTerminal());
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
    if (state !== "connected") this.listed.clear();
    this.updateControls();
  }

  bridgeLabel(peer) {
    const bridge = this.bridges.get(peer);
    return bridge ? bridge.label : `bridge ${peer}`;
  }

  receive(frame) {
    if (frame.kind === Kind.PRESENCE) {
      this.presence(json(frame).bridges);
    } else if (frame.kind === Kind.PTY_LISTING) {
      for (const t of json(frame).terminals) this.reattach(frame.peer, t);
    } else if (frame.kind === Kind.ERROR && frame.stream === 0) {
      console.warn("relay error", json(frame));
    } else {
      const tab = this.terminals.get(`${frame.peer}:${frame.stream}`);
      if (tab) tab.receive(frame);
    }
  }

  presence(connected) {
    const live = new Map(connected.map((b) => [b.peer, b]));
    for (const [peer, bridge] of this.bridges) bridge.connected = live.has(peer);
    for (const b of connected) {
      this.bridges.set(b.peer, { label: b.label, version: b.version, since: b.since, connected: true });
      this.pairing.bridgeConnected(b.peer);
      if (!this.listed.has(b.peer)) {
        this.listed.add(b.peer);
        this.connection.send(Kind.PTY_LIST, { peer: b.peer, stream: 0 });
      }
    }
    for (const peer of [...this.listed]) if (!live.has(peer)) this.listed.delete(peer);
    this.refreshBridges();
  }

  async refreshBridges() {
    const response = await fetch("/api/bridges").catch(() => null);
    if (response && response.ok) {
      const { bridges } = await response.json();
      const paired = new Set(bridges.map((b) => b.peer));
      for (const b of bridges) {
        const known = this.bridges.get(b.peer) || {};
        this.bridges.set(b.peer, {
          label: b.label,
          version: b.version || known.version,
          since: b.since || known.since,
          connected: b.connected,
        });
      }
      for (const peer of [...this.bridges.keys()]) if (!paired.has(peer)) this.bridges.delete(peer);
    }
    this.renderBridges();
  }

  renderBridges() {
    const list = $("#bridges");
    list.replaceChildren();
    if (this.selectedPeer !== null && !this.bridges.get(this.selectedPeer)?.connected) this.selectedPeer = null;
    for (const [peer, bridge] of this.bridges) {
      if (this.selectedPeer === null && bridge.connected) this.selectedPeer = peer;
      const item = document.createElement("li");
      item.className = "bridge";
      item.dataset.peer = peer;
      item.dataset.state = bridge.connected ? "connected" : "disconnected";
      item.setAttribute("aria-selected", String(peer === this.selectedPeer));
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = bridge.label;
      const state = document.createElement("span");
      state.className = "state";
      state.textContent = bridge.connected
        ? `connected since ${new Date(bridge.since * 1000).toLocaleTimeString()}`
        : "disconnected: waiting for it to reconnect";
      const version = document.createElement("span");
      version.className = "version";
      version.textContent = bridge.version ? `bridge ${bridge.version}` : "";
      const revoke = document.createElement("button");
      revoke.type = "button";
      revoke.className = "revoke";
      revoke.textContent = "Revoke";
      revoke.addEventListener("click", (event) => {
        event.stopPropagation();
        this.revoke(peer, revoke);
      });
      item.append(label, state, version, revoke);
      item.addEventListener("click", () => {
        if (bridge.connected) {
          this.selectedPeer = peer;
          this.renderBridges();
        }
      });
      list.append(item);
    }
    $("#no-bridges").hidden = this.bridges.size > 0;
    this.updateControls();
  }

  async revoke(peer, button) {
    if (button.dataset.armed !== "true") {
      button.dataset.armed = "true";
      button.textContent = "Confirm revoke";
      return;
    }
    const response = await fetch("/api/revoke", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ peer }),
    });
    if (response.ok) {
      this.bridges.delete(peer);
      for (const tab of this.terminals.values()) {
        if (tab.peer === peer && tab.state !== "exited") tab.ended("[bridge revoked]");
      }
    }
    this.refreshBridges();
  }

  updateControls() {
    const bridge = this.bridges.get(this.selectedPeer);
    $("#new-terminal").disabled = !(this.connection.open && bridge && bridge.connected);
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
    if (this.selectedPeer === null) return;
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
