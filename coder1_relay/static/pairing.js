// The IDE page's pairing dialog: a pairing code, then the verification codes to compare.
import { b64u } from "./e2e.js";
import { KEY_CHANGED } from "./bridges.js";

const $ = (selector) => document.querySelector(selector);

/**
 * The pairing dialog: a code, its countdown and the command to run; then the verification view,
 * where the user compares the bridge's verification code with the one it prints. Only "They
 * match" there lets the page use a bridge.
 */
export class PairingDialog {
  constructor(app) {
    this.app = app;
    this.dialog = $("#pair-dialog");
    this.comparing = null; // {peer, key}: the bridge and key whose code the verification view shows
    $("#bridge-button").addEventListener("click", () => this.show());
    $("#pair-new-code").addEventListener("click", () => this.newCode());
    $("#pair-close").addEventListener("click", () => this.close());
    $("#pair-done").addEventListener("click", () => this.match());
    $("#pair-mismatch").addEventListener("click", () => this.mismatch());
    this.dialog.addEventListener("close", () => {
      clearInterval(this.ticker);
      this.comparing = null;
    });
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
    $("#pair-title").textContent = name === "paired" ? "Verify your machine" : "Pair your machine";
    if (name !== "paired") this.comparing = null;
  }

  close() {
    clearInterval(this.ticker);
    this.comparing = null;
    if (this.dialog.open) this.dialog.close();
  }

  message(text) {
    $("#pair-message").textContent = text;
  }

  /** Whether the dialog shows a code a bridge can still redeem. */
  get waiting() {
    return this.dialog.open && this.dialog.dataset.view === "code" && $("#pair-code").dataset.state === "live";
  }

  /** Whether a PAIRED naming `peer` and `code` is for the code this dialog shows. */
  expects(peer, code) {
    return this.waiting && !this.app.knownPeers.has(peer) && code !== null
      && code === $("#pair-code").dataset.code;
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

  /** A bridge redeemed the code shown (its key is pinned, unconfirmed): compare the codes. */
  paired(bridge) {
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
    this.compare(bridge);
  }

  /** The verification view for `bridge`: its code, to compare with the one it prints. */
  compare(bridge) {
    clearInterval(this.ticker);
    this.message("");
    this.view("paired");
    this.comparing = { peer: bridge.peer, key: bridge.sasKey };
    $("#pair-label").textContent = bridge.label;
    $("#pair-sas").textContent = bridge.sas;
    if (!this.dialog.open) this.dialog.showModal();
    $("#pair-done").focus();
  }

  /** "They match": the key whose code was shown is confirmed, and the page may use the bridge. */
  match() {
    const comparing = this.comparing;
    this.close();
    if (comparing) this.app.serially(() => this.app.confirm(comparing.peer, comparing.key));
  }

  /** The two verification codes differ: the pairing went through someone else's keys. */
  async mismatch() {
    const comparing = this.comparing;
    clearInterval(this.ticker);
    this.view("code");
    const code = $("#pair-code");
    code.textContent = "······";
    code.dataset.state = "used";
    $("#pair-command").textContent = "";
    $("#pair-countdown").textContent = "";
    if (!this.dialog.open) this.dialog.showModal();
    this.message("The codes differ: someone may be intercepting between this browser and your"
      + " machine. The bridge is revoked: run “coder1-bridge unpair” on it, then pair again.");
    if (comparing) await this.app.revokeNow(comparing.peer);
  }
}
