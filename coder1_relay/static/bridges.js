// The IDE page's paired bridges: what the bridge list says about each, and its keys.
import { RAW_KEY_SIZE, unb64u } from "./e2e.js";

export const KEY_CHANGED = "This bridge's key changed: someone may be intercepting. Revoke it and pair again.";
export const UNVERIFIED = "Not verified: compare its verification code before this browser uses it.";

/** What each verdict on a refused frame means, for people. */
export const VERDICTS = {
  tampered: "it was altered on the way",
  replayed: "it had already been received once",
  dropped: "frames before it never arrived",
};

/** What the bridge list says about each state of a bridge's channel. */
export const LINK_STATES = {
  idle: "",
  handshaking: "securing…",
  retrying: "securing… (retrying)",
  secure: "end-to-end encrypted",
  unsupported: "this bridge cannot encrypt end to end: update coder1-bridge on it",
};

/**
 * Whether `bridge` runs, as far as `app` knows, and how to say it: "unknown" while the page
 * itself has no connection to the relay (what it last heard may be stale), "connected",
 * "disconnected" (seen connected since the page loaded) or "not-started" (not seen yet).
 */
export function presenceOf(app, bridge) {
  if (!app.connection.open) {
    return ["unknown", "unknown while this page reconnects to the relay"];
  }
  if (bridge.connected) {
    return ["connected", `connected since ${new Date(bridge.since * 1000).toLocaleTimeString()}`];
  }
  if (bridge.since !== null) return ["disconnected", "disconnected: waiting for it to reconnect"];
  return ["not-started", "not running: on that machine, run coder1-bridge start"];
}

/** A b64u public key in the relay's words, if it is one (65 bytes, uncompressed). */
export function publicKey(text) {
  try {
    const raw = unb64u(text);
    return raw.length === RAW_KEY_SIZE && raw[0] === 4 ? text : null;
  } catch {
    return null;
  }
}

/**
 * The list item of `bridge` in `app`'s bridge list: its state, verification code, warnings,
 * and its Verify and Revoke buttons.
 */
export function bridgeItem(app, bridge) {
  const { peer } = bridge;
  const span = (className, text) => {
    const element = document.createElement("span");
    element.className = className;
    element.textContent = text;
    return element;
  };
  const button = (className, text, action) => {
    const element = document.createElement("button");
    element.type = "button";
    element.className = className;
    element.textContent = text;
    element.addEventListener("click", (event) => {
      event.stopPropagation();
      action();
    });
    return element;
  };
  const changed = bridge.trust === "key-changed";
  const verified = bridge.trust === "verified";
  const link = app.links.get(peer);
  const [presence, saying] = presenceOf(app, bridge);
  const item = document.createElement("li");
  item.className = "bridge";
  item.dataset.peer = peer;
  item.dataset.connected = String(bridge.connected);
  item.dataset.presence = presence;
  item.dataset.state = changed ? "key-changed" : !verified ? "unverified" : presence;
  item.dataset.e2e = changed ? "refused" : link ? link.state : "none";
  item.setAttribute("aria-selected", String(peer === app.selectedPeer));
  const label = span("label", bridge.label);
  // Two machines may share a label (or one machine paired twice): the number tells them apart.
  label.append(span("peer", `#${peer}`));
  item.append(
    label,
    span("state", saying),
    span("version", bridge.version ? `bridge ${bridge.version}` : ""),
  );
  if (changed) {
    item.append(span("warning", KEY_CHANGED));
  } else if (bridge.sas) {
    const code = span("sas", bridge.sas);
    code.dataset.verified = String(verified);
    code.title = verified
      ? "Verification code, confirmed: “coder1-bridge status” prints the same"
      : "Verification code: compare it with the one “coder1-bridge status” prints";
    item.append(code);
  }
  if (!changed && !verified) {
    if (bridge.sas) {
      item.append(span("warning", UNVERIFIED));
      item.append(button("verify", "Verify…", () => app.serially(() => app.verify(peer))));
    } else {
      item.append(span("warning", "This bridge's key is unknown: pair it again."));
    }
  }
  if (link && !changed) item.append(span("e2e", LINK_STATES[link.state] || ""));
  const revoke = button("revoke", bridge.armed ? "Confirm revoke" : "Revoke", () => app.revoke(peer));
  revoke.dataset.armed = String(bridge.armed);
  item.append(revoke);
  item.addEventListener("click", () => {
    if (bridge.connected && verified) {
      app.selectedPeer = peer;
      app.renderBridges();
    }
  });
  return item;
}
