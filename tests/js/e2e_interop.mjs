// The IDE page's end-to-end code (coder1_relay/static/e2e.js and wire.js) in Node, driven over
// stdin/stdout by tests/test_e2e_interop.py against the Python implementation (coder1_wire/e2e.py).
//
// One JSON object per line each way: a request {"op": ..., ...} gets exactly one answer,
// {"ok": true, ...} or {"ok": false, "error": "...", "verdict"?: "...", "reason"?: "..."}.
// Binary values travel as base64url, frames whole (header and payload).
import { createInterface } from "node:readline";
import { pageModule } from "./page.mjs";

const e2e = await pageModule("e2e.js");
const wire = await pageModule("wire.js");
const { Backlog, BridgeLink, MAX_BACKLOG } = await pageModule("link.js");
const { b64u, unb64u } = e2e;

let identity = null;
const initiators = new Map(); // name -> Initiator
const channels = new Map(); // name -> SecureChannel
const links = new Map(); // name -> {link, events}: the page's BridgeLink and what it did
const backlogs = new Map(); // name -> Backlog: what a terminal keeps while there is no channel

function named(map, name, what) {
  const found = map.get(name);
  if (!found) throw new Error(`no ${what} named ${name}`);
  return found;
}

const ops = {
  async identity() {
    identity = await e2e.Identity.generate();
    return { public: b64u(identity.raw), extractable: identity.privateKey.extractable };
  },

  async sign({ data }) {
    return { sig: b64u(await identity.sign(unb64u(data))) };
  },

  async verify({ public: raw, sig, data }) {
    return { valid: await e2e.verifySignature(unb64u(raw), unb64u(sig), unb64u(data)) };
  },

  async sas({ browser, bridge }) {
    return { sas: await e2e.sas(unb64u(browser), unb64u(bridge)) };
  },

  /** A KEY_OFFER frame, as the page sends it, to the bridge `peer` whose key is `bridge`. */
  async offer({ name, bridge, peer }) {
    const initiator = new e2e.Initiator(identity, unb64u(bridge), peer);
    initiators.set(name, initiator);
    const offer = await initiator.offer();
    const frame = wire.encode(wire.Kind.KEY_OFFER, { peer, payload: offer });
    return { channel: initiator.channel, frame: b64u(frame) };
  },

  /** Accept a KEY_ANSWER frame for the offer `name`. */
  async accept({ name, frame }) {
    const decoded = wire.decode(unb64u(frame).buffer);
    if (decoded.kind !== wire.Kind.KEY_ANSWER) throw new Error(`kind ${decoded.kind} is no KEY_ANSWER`);
    const channel = await named(initiators, name, "offer").accept(decoded.payload);
    channels.set(name, channel);
    return { channel: channel.id };
  },

  async seal({ name, kind, peer, stream, seq, data }) {
    const channel = named(channels, name, "channel");
    const frame = await channel.seal(kind, { peer, stream, seq: BigInt(seq) }, unb64u(data));
    return { frame: b64u(frame) };
  },

  /** Open a whole frame; the header fields come from wire.decode, the plaintext from open(). */
  async open({ name, frame }) {
    const bytes = unb64u(frame);
    const decoded = wire.decode(bytes.slice().buffer);
    const plaintext = await named(channels, name, "channel").open(bytes);
    return {
      kind: decoded.kind, peer: decoded.peer, stream: decoded.stream, seq: String(decoded.seq),
      data: b64u(plaintext),
    };
  },

  async channel_of({ frame }) {
    return { channel: e2e.channelOf(wire.decode(unb64u(frame).buffer).payload) };
  },

  // The page's BridgeLink (link.js), its frames and callbacks recorded as events:
  // {type: "sent", frame}, {type: "state", state}, {type: "secure", channel},
  // {type: "frame", kind, peer, stream, seq, data},
  // {type: "problem", verdict? | reason?, message, kept, after?}.

  async link_start({ name, bridge, peer, timeout }) {
    const events = [];
    const link = new BridgeLink({
      peer,
      bridgeRaw: unb64u(bridge),
      identity,
      since: 1,
      timeout,
      sendRaw: (frame) => events.push({ type: "sent", frame: b64u(frame) }) > 0,
      on: {
        state: (l) => events.push({ type: "state", state: l.state }),
        secure: (l) => events.push({ type: "secure", channel: l.channel.id }),
        frame: (f) => events.push({
          type: "frame", kind: f.kind, peer: f.peer, stream: f.stream, seq: String(f.seq),
          data: b64u(f.payload),
        }),
        problem: (_, problem) => events.push({ type: "problem", ...problem }),
      },
    });
    links.set(name, { link, events });
    await link.start();
    return {};
  },

  async link_receive({ name, frame }) {
    const bytes = unb64u(frame);
    const decoded = wire.decode(bytes.buffer);
    decoded.raw = bytes.buffer;
    await named(links, name, "link").link.receive(decoded);
    return {};
  },

  async link_send({ name, kind, stream, seq, data }) {
    return { sealed: named(links, name, "link").link.send(kind, { stream, seq }, unb64u(data)) };
  },

  /** What the link did since the last call; first waits (up to `wait` s) for an event of `until`. */
  async link_events({ name, until, wait = 0 }) {
    const { link, events } = named(links, name, "link");
    const deadline = Date.now() + wait * 1000;
    while (until && !events.some((e) => e.type === until) && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    return { events: events.splice(0), state: link.state };
  },

  async link_stop({ name }) {
    named(links, name, "link").link.stop();
    return {};
  },

  // A terminal's Backlog (link.js): inputs in base64url, sizes as {cols, rows}.

  async backlog_new({ name, limit }) {
    backlogs.set(name, limit === undefined ? new Backlog() : new Backlog(limit));
    return { limit: named(backlogs, name, "backlog").limit, default: MAX_BACKLOG };
  },

  async backlog_input({ name, data }) {
    const backlog = named(backlogs, name, "backlog");
    return { kept: backlog.input(unb64u(data)), lost: backlog.lost, empty: backlog.empty };
  },

  async backlog_resize({ name, cols, rows }) {
    const backlog = named(backlogs, name, "backlog");
    backlog.resize({ cols, rows });
    return { empty: backlog.empty };
  },

  async backlog_take({ name }) {
    const backlog = named(backlogs, name, "backlog");
    const { size, inputs, lost } = backlog.take();
    return { size, inputs: inputs.map(b64u), lost, empty: backlog.empty };
  },
};

async function answer(line) {
  let request;
  try {
    request = JSON.parse(line);
    const op = ops[request.op];
    if (!op) throw new Error(`unknown op ${request.op}`);
    return { ok: true, ...(await op(request)) };
  } catch (error) {
    return {
      ok: false,
      error: `${error.name}: ${error.message}`,
      ...(error.verdict ? { verdict: error.verdict } : {}),
      ...(error.reason ? { reason: error.reason } : {}),
    };
  }
}

// Requests are answered one at a time, in order.
let queue = Promise.resolve();
const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
lines.on("line", (line) => {
  queue = queue.then(async () => process.stdout.write(`${JSON.stringify(await answer(line))}\n`));
});
lines.on("close", () => queue.then(() => process.exit(0)));
