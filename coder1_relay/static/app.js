// The Coder1 IDE page: pairing dialog, paired bridges, and terminals on the paired machine.
// Every end-to-end frame is sealed for the bridge (docs/e2e.md; e2e.js, link.js): the relay
// forwards what it cannot read. This module wires the page together (App); the IDE WebSocket
// is in connection.js, a terminal tab in terminal.js, the pairing dialog in pairing.js and
// the bridge list's items in bridges.js.
import { Kind, json } from "./wire.js";
import { PinStore, loadIdentity, sas, unb64u } from "./e2e.js";
import { BridgeLink } from "./link.js";
import { Acknowledger, newClientId, positions } from "./streams.js";
import { RelayConnection } from "./connection.js";
import { TerminalTab } from "./terminal.js";
import { PairingDialog } from "./pairing.js";
import { VERDICTS, bridgeItem, publicKey } from "./bridges.js";

const $ = (selector) => document.querySelector(selector);
/** Closed tabs per bridge whose PTY_CLOSE is kept for resending. */
const MAX_CLOSING = 64;

/** The page: its bridges, their channels and terminals, and the frames between them. */
class App {
  constructor() {
    // peer -> {peer, label, version, since, connected, key, trust, sas, armed}
    // key: the key the relay named for that number (in this session, since this page loaded);
    // sas: the verification code of this browser's key and that one.
    // trust: "verified" (the user confirmed that key's code, in this tab or another): the only
    // state in which the page uses a bridge; "unverified" (a key, not confirmed by the user);
    // "unknown" (no key at all); "key-changed" (the relay named another key for that number:
    // never used again while the page stays open).
    this.bridges = new Map();
    this.live = new Set(); // connected peers, as of the latest PRESENCE
    this.knownPeers = new Set();
    this.terminals = new Map(); // `${peer}:${stream}` -> TerminalTab
    // peer -> (stream -> InputStream) of tabs closed here whose PTY_CLOSE the bridge has not
    // confirmed: sent (again) on the next channel, forgotten once confirmed or not listed.
    this.closing = new Map();
    this.closed = new Set(); // `${peer}:${stream}` of tabs closed here: not re-attached
    this.links = new Map(); // peer -> BridgeLink, on the current IDE connection
    this.acks = new Map(); // peer -> Acknowledger of the output its tabs have taken in
    this.client = newClientId(); // this page load, in RESUME: its input is told from others'
    this.pins = new PinStore(location.origin);
    // Other tabs of this browser say when they confirm or forget a key.
    this.pinNews = typeof BroadcastChannel === "function" ? new BroadcastChannel("coder1-pins") : null;
    if (this.pinNews) this.pinNews.onmessage = (event) => this.serially(() => this.pinChanged(event.data?.key));
    this.inbox = Promise.resolve(); // frames and pin changes are handled one at a time, in order
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
      () => this.renewSession(),
    );
    $("#new-terminal").addEventListener("click", () => this.newTerminal());
    $("#e2e-error-close").addEventListener("click", () => { $("#e2e-error").hidden = true; });
    window.addEventListener("resize", () => this.current && this.current.fit.fit());
  }

  async start() {
    await this.renewSession();
    this.connection.connect();
    this.refreshBridges();
  }

  /**
   * Make sure of this browser's session (POST /api/session): the relay starts one only when the
   * browser has none. Loading the page never does (a link from another site arrives without the
   * SameSite=Strict cookie, and would replace the session). A new session has bridges of its
   * own, numbered from 1: the old one's are forgotten here.
   */
  async renewSession() {
    const response = await fetch("/api/session", { method: "POST" }).catch(() => null);
    const body = response && response.ok ? await response.json().catch(() => ({})) : {};
    if (body.new === true && this.bridges.size > 0) await this.serially(() => this.forgetSession());
  }

  /** A new session: the old one's bridges, and their terminals, are out of reach. */
  forgetSession() {
    this.stopLinks();
    for (const tab of this.terminals.values()) {
      if (tab.state !== "exited") tab.ended("[this browser's session was renewed: pair this machine again]");
    }
    this.bridges.clear();
    this.live.clear();
    this.closing.clear();
    this.acks.clear();
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
        key: null, trust: "unknown", sas: null, armed: false,
      });
    }
    return this.bridges.get(peer);
  }

  /** Run `task` after everything queued before it (frames, pin changes), one at a time. */
  serially(task) {
    const done = this.inbox.then(task);
    this.inbox = done.catch((error) => console.error("handling an event failed", error));
    return done;
  }

  receive(frame) {
    this.serially(() => this.handle(frame));
  }

  async handle(frame) {
    switch (frame.kind) {
      case Kind.PRESENCE:
        return this.presence(json(frame).bridges);
      case Kind.PAIRED:
        return this.paired(json(frame));
      case Kind.ERROR:
        // A frame was not delivered (its bridge just left): a terminal's is kept until the
        // bridge confirms it, and resent on the next channel.
        console.warn("relay error", json(frame));
        return undefined;
      default: {
        if (frame.kind < Kind.CMD_START) return undefined;
        // End to end: acted on only if it opens with this tab's channel to that bridge.
        const link = this.links.get(frame.peer);
        return link ? link.receive(frame) : undefined;
      }
    }
  }

  /** A frame from a bridge, opened on `link`. */
  dispatch(frame, link) {
    switch (frame.kind) {
      case Kind.RESUMED:
        return this.resumed(link, json(frame));
      case Kind.INPUT_ACK:
        return this.inputAcked(link.peer, json(frame));
      case Kind.PTY_LISTING:
        return this.listing(link, json(frame));
      case Kind.UNSUPPORTED:
        if (json(frame).kind === Kind.RESUME) this.legacy(link);
        return undefined;
      default: {
        const tab = this.terminals.get(`${frame.peer}:${frame.stream}`);
        if (!tab) return undefined;
        if (frame.kind === Kind.GAP) {
          const body = json(frame);
          if (body.type === "pty") tab.gap(body);
          return undefined;
        }
        return tab.receive(frame, link.legacy);
      }
    }
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

  /**
   * PAIRED: a bridge redeemed one of this session's codes. If it is the code this tab shows, the
   * dialog asks the user to compare the codes; any other PAIRED only adds the bridge, unverified.
   */
  async paired(body) {
    if (!Number.isInteger(body.peer)) return;
    const bridge = this.bridge(body.peer);
    if (typeof body.label === "string") bridge.label = body.label;
    const ours = this.pairing.expects(bridge.peer, typeof body.code === "string" ? body.code : null);
    await this.sighted(bridge, body.bridge_key);
    if (ours) this.pairing.paired(bridge);
    this.secureLinks();
    // A machine paired again revoked its earlier pairing first: the list drops it.
    this.refreshBridges();
  }

  /**
   * The relay names `key` as this bridge's (undefined: no new word): the first key named for a
   * number is that bridge's for as long as the page is open; its trust is whether the user
   * confirmed that key's verification code.
   */
  async sighted(bridge, key) {
    const identity = await this.identityReady;
    const named = publicKey(key);
    if (key !== undefined && key !== null && named === null) console.warn("the relay sent a malformed bridge key");
    // Once seen with another key, a bridge stays refused until it is revoked.
    if (bridge.trust === "key-changed") return;
    if (named !== null && bridge.key !== null && named !== bridge.key) {
      this.keyChanged(bridge);
      return;
    }
    if (named !== null) bridge.key = named;
    let confirmed = false;
    try {
      confirmed = bridge.key !== null && await this.pins.confirmed(bridge.key);
    } catch (error) {
      this.pinsUnavailable(error);
      return;
    }
    bridge.trust = confirmed ? "verified" : bridge.key !== null ? "unverified" : "unknown";
    if (bridge.key !== null && !bridge.sas && identity) bridge.sas = await sas(identity.raw, unb64u(bridge.key));
  }

  pinsUnavailable(error) {
    console.error("the pinned keys cannot be read", error);
    this.showProblem("no-pins", "This browser cannot keep the keys of your bridges (its site"
      + " storage is off, as in some private windows): nothing can be sent to them.");
  }

  /** Another tab confirmed or forgot `key`. */
  async pinChanged(key) {
    for (const bridge of this.bridges.values()) {
      if (bridge.key === key) await this.sighted(bridge);
    }
    this.secureLinks();
  }

  /** The relay named another key for a bridge than it did before: nothing more goes to it. */
  keyChanged(bridge) {
    bridge.trust = "key-changed";
    for (const tab of this.terminals.values()) {
      if (tab.peer === bridge.peer && tab.state !== "exited") tab.ended("[this bridge's key changed: disconnected]");
    }
  }

  /** `.verify`: ask the user to compare the verification code of the key the relay names. */
  async verify(peer) {
    const bridge = this.bridges.get(peer);
    if (!bridge || bridge.key === null) return;
    await this.sighted(bridge);
    this.renderBridges();
    if (bridge.trust === "unverified" && bridge.sas) this.pairing.compare(bridge);
  }

  /**
   * "They match" for `key` of `peer`: from now on the page uses that bridge (unless the relay
   * has named another key for it meanwhile).
   */
  async confirm(peer, key) {
    const bridge = this.bridges.get(peer);
    if (!bridge || bridge.key !== key || bridge.trust === "key-changed") return;
    try {
      await this.pins.confirm(key);
      this.pinNews?.postMessage({ key });
    } catch (error) {
      this.pinsUnavailable(error);
      return;
    }
    await this.sighted(bridge);
    this.secureLinks();
  }

  /** One channel to each connected, verified bridge; none to any other. */
  secureLinks() {
    for (const [peer, link] of this.links) {
      const bridge = this.bridges.get(peer);
      if (!this.connection.open || !bridge || !bridge.connected || bridge.trust !== "verified"
          || bridge.since !== link.since || bridge.key !== link.bridgeKey) {
        link.stop();
        this.links.delete(peer);
      }
    }
    if (this.connection.open && this.identity) {
      for (const bridge of this.bridges.values()) {
        if (bridge.connected && bridge.trust === "verified" && !this.links.has(bridge.peer)) this.link(bridge);
      }
    }
    this.renderBridges();
  }

  link(bridge) {
    const link = new BridgeLink({
      peer: bridge.peer,
      bridgeRaw: unb64u(bridge.key),
      identity: this.identity,
      since: bridge.since,
      sendRaw: (frame) => this.connection.sendRaw(frame),
      on: {
        state: () => this.renderBridges(),
        secure: (secured) => this.secured(secured),
        frame: (frame) => this.dispatch(frame, link),
        problem: (failed, problem) => this.e2eProblem(failed.peer, problem),
      },
    });
    link.bridgeKey = bridge.key;
    this.links.set(bridge.peer, link);
    link.start().catch((error) => {
      console.error("the key offer failed", error);
      link.retry();
    });
  }

  /**
   * A new channel to a bridge: say where each of its terminals' output has got to (RESUME),
   * then ask for its terminals (PTY_LIST). Input waits until the RESUMED.
   */
  secured(link) {
    this.resume(link);
    link.send(Kind.PTY_LIST);
  }

  /** RESUME: every terminal of that bridge still running here, each from its `next`. */
  resume(link) {
    const outputs = this.tabsOf(link.peer).filter((tab) => tab.state !== "exited").map((tab) => tab.output);
    const streams = this.acknowledger(link.peer).resume(outputs);
    link.send(Kind.RESUME, {}, { client: this.client, streams });
  }

  /**
   * RESUMED: the bridge's window, and the next input number it expects on each stream. The
   * first on a channel lets the tabs send again: what the bridge lacks, then what was kept.
   */
  resumed(link, body) {
    const first = !link.resumed;
    link.resumed = true;
    this.acknowledger(link.peer).setWindow(body.window);
    const expected = positions(body.input);
    // Streams the bridge has no log of: it restarted, the terminal ended too long ago, or
    // another tab closed it (its log goes once this bridge has no page to keep it for).
    const gone = new Set((Array.isArray(body.unknown) ? body.unknown : [])
      .filter((u) => u && u.type === "pty").map((u) => `pty:${u.stream}`));
    for (const tab of this.tabsOf(link.peer)) {
      if (gone.has(tab.output.key) && tab.state !== "exited") {
        tab.ended("[this terminal is gone: its machine's bridge restarted, it ended long ago,"
          + " or another tab closed it]");
        continue;
      }
      const next = expected.get(tab.output.key);
      if (first) tab.resume(next);
      else if (next !== undefined) tab.sender.confirm(next);
    }
    for (const [stream, sender] of this.closing.get(link.peer) || []) {
      const next = expected.get(`pty:${stream}`);
      if (first) sender.resume(next);
      else if (next !== undefined) sender.confirm(next);
    }
    this.updateControls();
  }

  /** INPUT_ACK: the bridge has the input numbered below `next`: the tabs forget it. */
  inputAcked(peer, body) {
    const expected = positions(body.input);
    for (const tab of this.tabsOf(peer)) {
      const next = expected.get(tab.output.key);
      if (next !== undefined) tab.sender.confirm(next);
    }
    const closing = this.closing.get(peer);
    for (const [stream, sender] of closing || []) {
      const next = expected.get(`pty:${stream}`);
      if (next !== undefined) sender.confirm(next);
      if (sender.closed) closing.delete(stream);
    }
  }

  /**
   * A bridge older than resume answered RESUME with UNSUPPORTED: its `seq` counts frames, it
   * neither confirms input nor takes acknowledgements. Send what was kept, as before.
   */
  legacy(link) {
    if (link.resumed) return;
    link.legacy = true;
    link.resumed = true;
    for (const tab of this.tabsOf(link.peer)) if (tab.state !== "exited") tab.sender.flush();
    for (const sender of (this.closing.get(link.peer) || new Map()).values()) sender.flush();
    this.updateControls();
  }

  /** PTY_LISTING: a tab for each listed terminal not shown here, resumed from 0 (its scrollback). */
  listing(link, body) {
    const listed = new Set(body.terminals.map((t) => t.stream));
    const closing = this.closing.get(link.peer);
    for (const [stream, sender] of closing || []) {
      if (sender.closeSeq !== null && !listed.has(stream)) closing.delete(stream);
    }
    const fresh = body.terminals.map((t) => [this.reattach(link.peer, t), t]).filter(([tab]) => tab);
    if (fresh.length === 0) return;
    // RESUME before anything of the new tabs (their size) goes out.
    this.resume(link);
    for (const [tab, listedAs] of fresh) {
      this.add(tab);
      tab.reattach(listedAs);
    }
  }

  /** The Acknowledger of `peer`'s output: its ACKs go on the bridge's resumed channel. */
  acknowledger(peer) {
    if (!this.acks.has(peer)) {
      this.acks.set(peer, new Acknowledger((body) => this.sendReady(peer, Kind.ACK, {}, body)));
    }
    return this.acks.get(peer);
  }

  /** xterm.js has parsed `tab`'s output up to `end`. */
  took(tab, end) {
    tab.output.took(end);
    this.acknowledger(tab.peer).progress(tab.output);
  }

  tabsOf(peer) {
    return [...this.terminals.values()].filter((tab) => tab.peer === peer);
  }

  /** A tab closed before the bridge confirmed its PTY_CLOSE: sent again with the next channel. */
  closeLater(tab) {
    if (!this.closing.has(tab.peer)) this.closing.set(tab.peer, new Map());
    const closing = this.closing.get(tab.peer);
    closing.set(tab.stream, tab.sender);
    // Bounded: the oldest are given up (the bridge's grace period ends them in the end).
    while (closing.size > MAX_CLOSING) closing.delete(closing.keys().next().value);
  }

  stopLinks() {
    for (const link of this.links.values()) link.stop();
    this.links.clear();
    this.renderBridges();
  }

  /**
   * Send a frame of a terminal (or an ACK) to its bridge, sealed; false when the bridge has
   * no channel yet, or one whose RESUMED has not come (input would overtake what is resent).
   */
  sendReady(peer, kind, fields, payload) {
    const link = this.links.get(peer);
    if (!link || !link.ready || (kind === Kind.ACK && link.legacy)) return false;
    return link.send(kind, fields, payload);
  }

  e2eProblem(peer, { verdict, reason, message, kept, after }) {
    const label = this.bridgeLabel(peer);
    const onward = kept ? "The secure channel goes on." : "Starting a new secure channel.";
    if (verdict && after) {
      // The frame refused before was the one missing: report that, the cause.
      this.showProblem(after, `End-to-end check failed on ${label}: a frame was refused as`
        + ` “${after}” (${VERDICTS[after]}), and the frames after it could not be opened without`
        + ` it. Nothing in them was used. ${onward}`);
    } else if (verdict) {
      this.showProblem(verdict, `End-to-end check failed on ${label}: a frame was refused as`
        + ` “${verdict}” (${VERDICTS[verdict] || message}). Nothing in it was used. ${onward}`);
    } else if (VERDICTS[reason]) {
      this.showProblem(reason, `${label} refused a frame from this page as “${reason}”`
        + ` (${VERDICTS[reason]}): what it carried was not used. ${onward}`);
    } else if (reason === "bad-signature") {
      this.showProblem(reason, `An answer for ${label} was not signed by its paired key: someone`
        + " may be intercepting. It was ignored.");
    } else {
      this.showProblem(reason, `${label} refused the secure channel (${reason}: ${message}). ${onward}`);
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
    this.serially(() => this.listed(bridges));
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
    const usable = (bridge) => bridge && bridge.connected && bridge.trust === "verified";
    if (this.selectedPeer !== null && !usable(this.bridges.get(this.selectedPeer))) this.selectedPeer = null;
    for (const [peer, bridge] of this.bridges) {
      if (this.selectedPeer === null && usable(bridge)) this.selectedPeer = peer;
    }
    for (const bridge of this.bridges.values()) list.append(bridgeItem(this, bridge));
    $("#no-bridges").hidden = this.bridges.size > 0;
    this.updateControls();
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
    }).catch(() => null);
    if (response && response.ok) {
      const { key } = this.bridges.get(peer) || {};
      this.bridges.delete(peer);
      this.links.get(peer)?.stop();
      this.links.delete(peer);
      this.closing.delete(peer);
      // Its key is no bridge's any more (a bridge that pairs again makes a new one).
      if (key) {
        await this.pins.forget(key).then(
          () => this.pinNews?.postMessage({ key }),
          (error) => console.warn("could not forget the key", error),
        );
      }
      for (const tab of this.terminals.values()) {
        if (tab.peer === peer && tab.state !== "exited") tab.ended("[bridge revoked]");
      }
    }
    this.refreshBridges();
  }

  updateControls() {
    const link = this.links.get(this.selectedPeer);
    $("#new-terminal").disabled = !(this.connection.open && link && link.ready);
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
    const bridge = this.bridges.get(this.selectedPeer);
    if (!bridge || bridge.trust !== "verified" || !this.links.get(this.selectedPeer)?.ready) return;
    const tab = this.add(new TerminalTab(this, this.selectedPeer, this.newStream()));
    // The bridge sends a terminal opened on a channel to that channel, from 0.
    this.acknowledger(tab.peer).follow(tab.output);
    tab.open();
  }

  /** A tab for a listed terminal, unless it has one or was closed here; null if not. */
  reattach(peer, listed) {
    const id = `${peer}:${listed.stream}`;
    if (this.terminals.has(id) || this.closed.has(id)) return null;
    const tab = new TerminalTab(this, peer, listed.stream);
    this.terminals.set(id, tab);
    return tab;
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
    this.acks.get(tab.peer)?.leave(tab.output);
    this.closed.add(`${tab.peer}:${tab.stream}`);
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
