// One terminal tab of the IDE page: an xterm.js terminal attached to a PTY on a bridge.
import { Terminal } from "./vendor/xterm.mjs";
import { FitAddon } from "./vendor/addon-fit.mjs";
import { terminalSize } from "./bounds.js";
import { Kind, json } from "./wire.js";
import { InputStream, OutputStream, sequencedType } from "./streams.js";

const $ = (selector) => document.querySelector(selector);
const utf8 = new TextEncoder();

/** One terminal tab attached to a PTY on a bridge. */
export class TerminalTab {
  constructor(app, peer, stream) {
    this.app = app;
    this.peer = peer;
    this.stream = stream;
    this.state = "opening";
    // Where its output has got to (resumed from there after a new channel), and what it sent:
    // numbered, kept until the bridge confirms it, and what waits for a channel.
    this.output = new OutputStream(stream);
    this.sender = new InputStream((kind, seq, payload) => app.sendReady(peer, kind, { stream, seq }, payload));
    this.written = 0; // bytes of PTY_OUTPUT written to the terminal
    this.noticeShown = false; // the last line written is our "not sent" notice
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
    this.term.onData((data) => this.input(utf8.encode(data)));
    this.term.onBinary((data) => this.input(Uint8Array.from(data, (c) => c.charCodeAt(0))));
    this.term.onResize(({ cols, rows }) => this.resized({ cols, rows }));
    this.resizer = new ResizeObserver(() => this.visible && this.fit.fit());
    this.resizer.observe(this.element);
  }

  get visible() {
    return this.element.getAttribute("aria-hidden") === "false";
  }

  /** Keystrokes: sent now, or kept until the channel is resumed (after what was kept before). */
  input(bytes) {
    if (this.state === "exited") return;
    if (!this.sender.input(bytes)) this.notice();
  }

  resized(size) {
    if (this.state !== "exited") this.sender.resize(size);
  }

  /**
   * The bridge resumed a new channel and expects input number `next` (undefined: it does not
   * know the stream): resend what it lacks, then what was kept while there was no channel.
   */
  resume(next) {
    if (this.state === "exited") return;
    const { missing } = this.sender.resume(next);
    if (missing) {
      this.note(`[${missing} frames of input sent before the connection broke may not have reached`
        + " your machine]");
    }
  }

  /** Say how much typed input was not sent (one line, kept up to date while nothing else is written). */
  notice() {
    const text = `\x1b[2m[${this.sender.backlog.lost} bytes of input were not sent: the connection to your`
      + " machine was being re-secured]\x1b[0m\r\n";
    this.term.write(this.noticeShown ? `\x1b[1A\r\x1b[2K${text}` : `\r\n${text}`);
    this.noticeShown = true;
  }

  /** A dim line of the page's own. */
  note(text, end) {
    this.write(`\r\n\x1b[2m${text}\x1b[0m\r\n`, end);
  }

  /** Write to xterm.js; once it has parsed it, the output up to `end` counts as taken in. */
  write(data, end) {
    this.noticeShown = false;
    this.term.write(data, end === undefined ? undefined : () => this.app.took(this, end));
  }

  open() {
    this.fit.fit();
    this.sender.transmit(Kind.PTY_OPEN, { cols: this.term.cols, rows: this.term.rows });
  }

  reattach(listed) {
    this.state = "running";
    const { cols, rows } = terminalSize(listed);
    this.term.resize(cols, rows);
    this.fit.fit();
  }

  /**
   * A frame for this terminal, opened. Sequenced ones are taken from `next` on (duplicates
   * after a resume dropped); `legacy`: a bridge older than resume, whose `seq` counts frames.
   */
  receive(frame, legacy = false) {
    if (frame.kind === Kind.PTY_ERROR) {
      // "stream-in-use" answers a PTY_OPEN sent again for a terminal that runs: it goes on.
      const refusal = json(frame);
      if (refusal.error !== "stream-in-use" || this.state === "opening") this.ended(`[${refusal.message}]`);
      return;
    }
    if (sequencedType(frame.kind) !== "pty") return;
    const got = legacy ? { kind: frame.kind, payload: frame.payload } : this.output.take(frame);
    if (!got) return;
    switch (got.kind) {
      case Kind.PTY_OUTPUT:
        this.written += got.payload.length;
        this.write(got.payload.slice(), got.end);
        break;
      case Kind.PTY_OPENED:
        this.state = "running";
        this.write("", got.end);
        break;
      default: {
        const end = json(got);
        const how = end.signal ? `killed by signal ${end.signal}` : `exited with code ${end.exit_code}`;
        this.ended(`[process ${how}]`, got.end);
        break;
      }
    }
  }

  /** GAP: output was dropped on the bridge while no page followed the terminal. */
  gap(body) {
    const lost = this.output.gap(body);
    if (lost) this.note(`[${lost.bytes} bytes of output were dropped while this page was away]`, lost.end);
  }

  ended(message, end) {
    const unsent = this.sender.end();
    this.note(message, end);
    if (unsent) this.write(`\x1b[2m[${unsent} bytes of input were not sent: the terminal ended first]\x1b[0m\r\n`);
    this.state = "exited";
    this.tab.dataset.state = "exited";
    this.element.dataset.state = "exited";
  }

  close() {
    // Sent when the channel is resumed again if it is not now, so the terminal does not live on.
    if (this.state !== "exited") {
      this.sender.close();
      this.app.closeLater(this);
    } else {
      // Its program has ended: the PTY_CLOSE (if it can go now) lets the bridge forget its
      // output at once rather than keep it for a page that comes back (protocol.md 5.7).
      this.sender.transmit(Kind.PTY_CLOSE);
    }
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
