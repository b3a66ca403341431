// The IDE page's pairing dialog: a pairing code, then the verification codes to compare.
import { codeLifetimeSeconds, retryAfterSeconds } from "./bounds.js";
import { b64u } from "./e2e.js";
import { KEY_CHANGED } from "./bridges.js";

const $ = (selector) => document.querySelector(selector);
/** Milliseconds a copy button says "Copied". */
const COPIED_FOR = 2000;

/** `word` as a POSIX shell reads it: quoted if need be, a leading `~/` left to expand. */
export function shellWord(word) {
  if (/^[\w@%+=:,./~-]+$/.test(word)) return word;
  const home = word.startsWith("~/") ? "~/" : "";
  return `${home}'${word.slice(home.length).replaceAll("'", "'\\''")}'`;
}

/** The command that redeems `code` at `relay`, trusting `caCert` (a path) if given. */
export function pairCommand(relay, code, caCert) {
  const words = ["coder1-bridge", "pair", "--relay", relay];
  if (caCert) words.push("--ca-cert", caCert);
  words.push(code);
  return words.map(shellWord).join(" ");
}

/** `button` copies what `text()` returns, and says it did (or how to copy by hand). */
function copyButton(button, text) {
  button.addEventListener("click", async () => {
    const label = button.textContent;
    try {
      await navigator.clipboard.writeText(text());
      button.textContent = "Copied";
      button.dataset.copied = "true";
    } catch {
      button.textContent = "Select and copy";
      button.dataset.copied = "false";
    }
    setTimeout(() => {
      button.textContent = label;
      delete button.dataset.copied;
    }, COPIED_FOR);
  });
}

/**
 * The pairing dialog: a code, its countdown and the command to run (each with a copy button);
 * then the verification view, where the user compares the bridge's verification code with the
 * one it prints. Only "They match" there lets the page use a bridge; "They differ" revokes it
 * and shows what to do next (the mismatch view).
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
    $("#pair-again").addEventListener("click", () => this.show());
    $("#pair-mismatch-close").addEventListener("click", () => this.close());
    copyButton($("#pair-code-copy"), () => $("#pair-code").dataset.code);
    copyButton($("#pair-command-copy"), () => $("#pair-command").textContent);
    copyButton($("#pair-unpair-copy"), () => $("#pair-unpair-command").textContent);
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

  /**
   * "code" (the code to type), "paired" (the verification code to compare) or "mismatch" (the
   * codes differed: what to do now).
   */
  view(name) {
    this.dialog.dataset.view = name;
    $("#pair-code-view").hidden = name !== "code";
    $("#pair-paired-view").hidden = name !== "paired";
    $("#pair-mismatch-view").hidden = name !== "mismatch";
    $("#pair-title").textContent = {
      paired: "Verify your machine",
      mismatch: "The verification codes differ",
    }[name] || "Pair your machine";
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
    $("#pair-code-copy").disabled = true;
    $("#pair-command-copy").disabled = true;
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
      const wait = retryAfterSeconds(response.headers.get("Retry-After"));
      this.message(`Too many codes requested. Try again in ${wait} seconds.`);
      return;
    }
    if (response.status === 401) {
      await this.app.renewSession();
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
    const caCert = typeof body.ca_cert === "string" ? body.ca_cert : null;
    $("#pair-command").textContent = pairCommand(body.relay, body.code, caCert);
    $("#pair-code-copy").disabled = false;
    $("#pair-command-copy").disabled = false;
    $("#pair-hint").textContent = caCert
      ? "This development relay's certificate is that file on the relay's machine: to pair"
        + " another machine, copy the file there first."
      : "";
    const deadline = performance.now() + codeLifetimeSeconds(body.expires_in) * 1000;
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
    this.comparing = { peer: bridge.peer, key: bridge.key };
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
    this.view("mismatch");
    if (!this.dialog.open) this.dialog.showModal();
    $("#pair-again").focus();
    if (comparing) await this.app.revokeNow(comparing.peer);
  }
}
