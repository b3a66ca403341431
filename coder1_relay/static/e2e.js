// End-to-end encryption between this page and a bridge (docs/e2e.md): identities, pins, the
// short authentication string, the KEY_OFFER / KEY_ANSWER handshake and sealed frames.
//
// WebCrypto only (globalThis.crypto.subtle), so this module runs in the browser and in Node 20
// (tests/js/e2e_interop.mjs). The IndexedDB part, at the end, is browser-only; Node never calls it.

import { HEADER_SIZE, encode } from "./wire.js";

const subtle = globalThis.crypto.subtle;
const encoder = new TextEncoder();

const ECDSA = { name: "ECDSA", namedCurve: "P-256" };
const ECDSA_SHA256 = { name: "ECDSA", hash: "SHA-256" };
const ECDH = { name: "ECDH", namedCurve: "P-256" };

export const RAW_KEY_SIZE = 65; // uncompressed SEC1 point: 04 || X || Y
export const SIGNATURE_SIZE = 64; // IEEE P1363 r || s
export const NONCE_SIZE = 16;
export const TAG_SIZE = 16;
/** u32(C) || u64(n) in front of every sealed payload. */
export const SEAL_PREFIX_SIZE = 12;
export const UP = 0; // browser -> bridge
export const DOWN = 1; // bridge -> browser

const SAS_LABEL = "coder1-sas-v1";
const OFFER_LABEL = "coder1-offer-v1";
const ANSWER_LABEL = "coder1-answer-v1";
const HKDF_INFO = "coder1-e2e-v1";
const CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

// ---------------------------------------------------------------------------------------------
// Bytes

/** base64url without padding. */
export function b64u(bytes) {
  const view = toBytes(bytes);
  let binary = "";
  for (let i = 0; i < view.length; i += 0x8000) {
    binary += String.fromCharCode(...view.subarray(i, i + 0x8000));
  }
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** The bytes of a base64url string (no padding); throws on anything else. */
export function unb64u(text) {
  if (typeof text !== "string" || !/^[A-Za-z0-9_-]*$/.test(text) || text.length % 4 === 1) {
    throw new TypeError("not base64url");
  }
  const binary = atob(text.replace(/-/g, "+").replace(/_/g, "/"));
  const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
  // One spelling per value (no non-zero spare bits), as the bridge requires too.
  if (b64u(bytes) !== text) throw new TypeError("not canonical base64url");
  return bytes;
}

/** A Uint8Array over an ArrayBuffer, a typed array or a DataView (no copy). */
export function toBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError("expected bytes");
}

export function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

export function u32(n) {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, n);
  return out;
}

export function u64(n) {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, BigInt(n));
  return out;
}

function label(text) {
  return concat(encoder.encode(text), new Uint8Array([0]));
}

function sameBytes(a, b) {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

async function sha256(...parts) {
  return new Uint8Array(await subtle.digest("SHA-256", concat(...parts)));
}

function randomBytes(n) {
  return globalThis.crypto.getRandomValues(new Uint8Array(n));
}

// ---------------------------------------------------------------------------------------------
// Errors

/** A sealed frame refused: `verdict` is "tampered", "replayed" or "dropped". */
export class IntegrityError extends Error {
  constructor(verdict, message, { missing = 0 } = {}) {
    super(message);
    this.name = "IntegrityError";
    this.verdict = verdict;
    this.missing = missing; // for "dropped": how many frames are missing
  }
}

/** A KEY_ANSWER that does not complete the handshake (bad signature, malformed, ...). */
export class HandshakeError extends Error {
  constructor(reason, message) {
    super(message);
    this.name = "HandshakeError";
    this.reason = reason;
  }
}

// ---------------------------------------------------------------------------------------------
// Identities and the short authentication string

/** An ECDSA P-256 key pair; `raw` is the public key as 65 bytes. */
export class Identity {
  constructor(privateKey, publicKey, raw) {
    this.privateKey = privateKey;
    this.publicKey = publicKey;
    this.raw = raw;
  }

  /** A new identity; its private key cannot be exported. */
  static async generate() {
    const pair = await subtle.generateKey(ECDSA, false, ["sign", "verify"]);
    return Identity.fromKeys(pair.privateKey, pair.publicKey);
  }

  static async fromKeys(privateKey, publicKey) {
    return new Identity(privateKey, publicKey, new Uint8Array(await subtle.exportKey("raw", publicKey)));
  }

  /** ECDSA-SHA256 of `data`, as 64 bytes r || s. */
  async sign(data) {
    return new Uint8Array(await subtle.sign(ECDSA_SHA256, this.privateKey, toBytes(data)));
  }
}

/** Whether `sig` (64 bytes r || s) is a valid signature of `data` by the public key `raw`. */
export async function verifySignature(raw, sig, data) {
  let key;
  try {
    key = await subtle.importKey("raw", toBytes(raw), ECDSA, false, ["verify"]);
  } catch {
    return false;
  }
  const signature = toBytes(sig);
  if (signature.length !== SIGNATURE_SIZE) return false;
  return subtle.verify(ECDSA_SHA256, key, signature, toBytes(data));
}

/** The short authentication string both ends show, as XXXX-XXXX-XXXX. */
export async function sas(browserRaw, bridgeRaw) {
  const digest = await sha256(label(SAS_LABEL), toBytes(browserRaw), toBytes(bridgeRaw));
  const bits = new DataView(digest.buffer).getBigUint64(0) >> 4n; // the first 60 bits
  let chars = "";
  for (let i = 11; i >= 0; i -= 1) chars += CROCKFORD[Number((bits >> BigInt(5 * i)) & 31n)];
  return `${chars.slice(0, 4)}-${chars.slice(4, 8)}-${chars.slice(8)}`;
}

// ---------------------------------------------------------------------------------------------
// The handshake

/** The bytes the browser signs: "coder1-offer-v1" 0 || u32(C) || u32(peer) || Eb || Nb || bridge key. */
export function offerTranscript({ channel, peer, eph, nonce, bridgeRaw }) {
  return concat(label(OFFER_LABEL), u32(channel), u32(peer), eph, nonce, bridgeRaw);
}

/** The bytes the bridge signs: "coder1-answer-v1" 0 || SHA-256(offer) || Er || Nr. */
export async function answerTranscript(offer, eph, nonce) {
  return concat(label(ANSWER_LABEL), await sha256(offer), eph, nonce);
}

/** A random channel id: non-zero, and never starting with "{" so no JSON payload looks like ours. */
export function randomChannelId() {
  const id = new Uint32Array(1);
  do globalThis.crypto.getRandomValues(id);
  while (id[0] === 0 || id[0] >>> 24 === 0x7b);
  return id[0];
}

/** The channel id (u32 prefix) of a sealed payload, or null when it is too short to be sealed. */
export function channelOf(payload) {
  const bytes = toBytes(payload);
  if (bytes.length < SEAL_PREFIX_SIZE + TAG_SIZE) return null;
  return new DataView(bytes.buffer, bytes.byteOffset, 4).getUint32(0);
}

/**
 * The channel both ends derive from the ECDH secret and the two signed transcripts.
 * `role` is "browser" (seals with k_up, opens with k_down) or "bridge" (the reverse).
 */
export async function deriveChannel(role, channel, shared, offer, answer) {
  const salt = await sha256(offer, answer);
  const ikm = await subtle.importKey("raw", toBytes(shared), "HKDF", false, ["deriveBits"]);
  const okm = new Uint8Array(await subtle.deriveBits(
    { name: "HKDF", hash: "SHA-256", salt, info: encoder.encode(HKDF_INFO) }, ikm, 512,
  ));
  const aes = (bytes, usage) => subtle.importKey("raw", bytes, { name: "AES-GCM" }, false, [usage]);
  const [up, down] = [okm.slice(0, 32), okm.slice(32, 64)];
  okm.fill(0);
  if (role === "browser") {
    return new SecureChannel(channel, await aes(up, "encrypt"), await aes(down, "decrypt"), UP);
  }
  return new SecureChannel(channel, await aes(down, "encrypt"), await aes(up, "decrypt"), DOWN);
}

/** A fresh ECDH P-256 key pair and its raw public key. */
export async function ephemeral() {
  const pair = await subtle.generateKey(ECDH, false, ["deriveBits"]);
  return { privateKey: pair.privateKey, raw: new Uint8Array(await subtle.exportKey("raw", pair.publicKey)) };
}

/** ECDH(our private key, their raw public key): the 32-byte X coordinate. */
export async function ecdh(privateKey, theirRaw) {
  const theirs = await subtle.importKey("raw", toBytes(theirRaw), ECDH, false, []);
  return new Uint8Array(await subtle.deriveBits({ name: "ECDH", public: theirs }, privateKey, 256));
}

/** One handshake, browser side: `offer()`, send it as KEY_OFFER, then `accept(KEY_ANSWER payload)`. */
export class Initiator {
  /**
   * @param identity  this browser's Identity
   * @param bridgeRaw the bridge's public key as pinned by this page (65 bytes)
   * @param peer      the bridge's number in the session
   */
  constructor(identity, bridgeRaw, peer) {
    this.identity = identity;
    this.bridgeRaw = toBytes(bridgeRaw);
    this.peer = peer;
    this.channel = randomChannelId();
    this.transcript = null;
    this.eph = null;
  }

  /** The KEY_OFFER payload, as an object to send as JSON. */
  async offer() {
    if (this.transcript) throw new Error("this handshake has already made its offer");
    this.eph = await ephemeral();
    const nonce = randomBytes(NONCE_SIZE);
    this.transcript = offerTranscript({
      channel: this.channel, peer: this.peer, eph: this.eph.raw, nonce, bridgeRaw: this.bridgeRaw,
    });
    const sig = await this.identity.sign(this.transcript);
    return { v: 1, channel: this.channel, eph: b64u(this.eph.raw), nonce: b64u(nonce), sig: b64u(sig) };
  }

  /**
   * Check a KEY_ANSWER payload (a JSON string, its UTF-8 bytes or the parsed object) and derive
   * the channel. Throws a HandshakeError if it is not a valid answer to this offer.
   */
  async accept(answer) {
    if (!this.eph) throw new HandshakeError("no-offer", "no offer was made, or it was already answered");
    let body = answer;
    try {
      if (typeof body !== "string" && !(body && body.constructor === Object)) {
        body = new TextDecoder("utf-8", { fatal: true }).decode(toBytes(body));
      }
      if (typeof body === "string") body = JSON.parse(body);
    } catch {
      throw new HandshakeError("malformed", "the answer is not JSON");
    }
    if (!body || typeof body !== "object" || Array.isArray(body)
        || Object.keys(body).sort().join() !== "channel,eph,nonce,sig,v") {
      throw new HandshakeError("malformed", "the answer must have exactly the fields channel, eph, nonce, sig, v");
    }
    if (body.v !== 1) throw new HandshakeError("version", "the answer is for another protocol version");
    if (body.channel !== this.channel) throw new HandshakeError("channel", "the answer is for another channel");
    let eph;
    let nonce;
    let sig;
    try {
      [eph, nonce, sig] = [unb64u(body.eph), unb64u(body.nonce), unb64u(body.sig)];
    } catch {
      throw new HandshakeError("malformed", "the answer's fields are not base64url");
    }
    if (eph.length !== RAW_KEY_SIZE || eph[0] !== 4 || nonce.length !== NONCE_SIZE || sig.length !== SIGNATURE_SIZE) {
      throw new HandshakeError("malformed", "the answer's fields have the wrong sizes");
    }
    const transcript = await answerTranscript(this.transcript, eph, nonce);
    if (!(await verifySignature(this.bridgeRaw, sig, transcript))) {
      throw new HandshakeError("bad-signature", "the answer is not signed by the pinned bridge key");
    }
    let shared;
    try {
      shared = await ecdh(this.eph.privateKey, eph);
    } catch {
      throw new HandshakeError("malformed", "the answer's ephemeral key is not a P-256 point");
    }
    this.eph = null; // one answer per offer; the ephemeral private key goes with it
    try {
      return await deriveChannel("browser", this.channel, shared, this.transcript, transcript);
    } finally {
      shared.fill(0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Sealed frames

/**
 * One direction pair of AES-256-GCM keys and their frame counters. `seal` and `open` may be
 * called without waiting: each runs after the previous one of its kind, in call order.
 */
export class SecureChannel {
  constructor(id, sealKey, openKey, direction) {
    this.id = id;
    this.sealKey = sealKey;
    this.openKey = openKey;
    this.sealDirection = direction;
    this.openDirection = 1 - direction;
    this.sent = 0n; // the next n to seal
    this.expected = 0n; // the next n to accept
    this.sealing = Promise.resolve();
    this.opening = Promise.resolve();
  }

  /** AES-256-GCM parameters: iv = u32(direction) || u64(n), aad = header || u32(C) || u64(n). */
  static gcm(direction, n, aad) {
    return { name: "AES-GCM", iv: concat(u32(direction), u64(n)), additionalData: aad, tagLength: 128 };
  }

  /**
   * The whole frame, header and sealed payload, as an ArrayBuffer.
   * `plaintext`: a Uint8Array, a string (UTF-8) or an object (JSON), as wire.encode takes.
   */
  seal(kind, { peer = 0, stream = 0, seq = 0 } = {}, plaintext = new Uint8Array()) {
    const n = this.sent;
    if (n > 0xffff_ffff_ffff_ffffn) throw new Error("this channel has sealed all the frames it can");
    this.sent += 1n;
    const header = new Uint8Array(encode(kind, { peer, stream, seq }));
    const bytes = plaintextBytes(plaintext);
    const prefix = concat(u32(this.id), u64(n));
    const result = this.sealing.then(async () => {
      const gcm = SecureChannel.gcm(this.sealDirection, n, concat(header, prefix));
      const sealed = await subtle.encrypt(gcm, this.sealKey, bytes);
      return concat(header, prefix, new Uint8Array(sealed)).buffer;
    });
    this.sealing = result.catch(() => {});
    return result;
  }

  /**
   * The plaintext of a whole received frame (ArrayBuffer or Uint8Array), or an IntegrityError.
   * A refused frame changes nothing: the next genuine frame still opens.
   */
  open(frame) {
    const bytes = toBytes(frame).slice();
    const result = this.opening.then(() => this.openNow(bytes));
    this.opening = result.catch(() => {});
    return result;
  }

  async openNow(bytes) {
    if (bytes.length < HEADER_SIZE + SEAL_PREFIX_SIZE + TAG_SIZE) {
      throw new IntegrityError("tampered", "the sealed frame is too short");
    }
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (view.getUint32(HEADER_SIZE) !== this.id) {
      throw new IntegrityError("tampered", "the frame is sealed for another channel");
    }
    const n = view.getBigUint64(HEADER_SIZE + 4);
    const aadEnd = HEADER_SIZE + SEAL_PREFIX_SIZE;
    let plaintext;
    try {
      const gcm = SecureChannel.gcm(this.openDirection, n, bytes.subarray(0, aadEnd));
      plaintext = await subtle.decrypt(gcm, this.openKey, bytes.subarray(aadEnd));
    } catch {
      throw new IntegrityError("tampered", "the frame's authentication tag does not verify");
    }
    if (n < this.expected) {
      throw new IntegrityError("replayed", `frame ${n} was already received (expected ${this.expected})`);
    }
    if (n > this.expected) {
      const missing = n - this.expected;
      throw new IntegrityError("dropped", `${missing} frame(s) missing before frame ${n}`,
        { missing: Number(missing) });
    }
    this.expected += 1n;
    return new Uint8Array(plaintext);
  }
}

function plaintextBytes(payload) {
  if (typeof payload === "string") return encoder.encode(payload);
  if (payload instanceof ArrayBuffer || ArrayBuffer.isView(payload)) return toBytes(payload).slice();
  return encoder.encode(JSON.stringify(payload));
}

// ---------------------------------------------------------------------------------------------
// Browser only: the identity and the pins, in IndexedDB (database "coder1").

const DB_NAME = "coder1";
// 2: pins keyed by the bridge's key, not by its number (version 1's pins are migrated).
const DB_VERSION = 2;
const KEYS = "keys";
const PINS = "pins";
const IDENTITY = "identity";

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function transaction(db, store, mode, body) {
  return new Promise((resolve, reject) => {
    const tx = db.transaction(store, mode);
    let result;
    Promise.resolve(body(tx.objectStore(store))).then((value) => { result = value; }, reject);
    tx.oncomplete = () => resolve(result);
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error || new Error("IndexedDB transaction aborted"));
  });
}

let database = null;

/** The page's IndexedDB database, with its `keys` and `pins` stores. */
export function openDatabase() {
  if (!database) {
    database = new Promise((resolve, reject) => {
      const open = indexedDB.open(DB_NAME, DB_VERSION);
      open.onupgradeneeded = (event) => {
        const db = open.result;
        if (!db.objectStoreNames.contains(KEYS)) db.createObjectStore(KEYS);
        if (!db.objectStoreNames.contains(PINS)) db.createObjectStore(PINS);
        else if (event.oldVersion < 2) migratePins(open.transaction.objectStore(PINS));
      };
      open.onsuccess = () => resolve(open.result);
      open.onerror = () => reject(open.error);
      open.onblocked = () => reject(new Error("the key store is blocked by another tab"));
    });
    database.catch(() => { database = null; });
  }
  return database;
}

/**
 * This browser's identity: made once, its private key non-extractable, kept in IndexedDB.
 * Two tabs that start at once both make one, and the first one stored wins.
 */
export async function loadIdentity() {
  const db = await openDatabase();
  const stored = await transaction(db, KEYS, "readonly", (store) => request(store.get(IDENTITY)));
  if (stored) return Identity.fromKeys(stored.privateKey, stored.publicKey);
  const fresh = await Identity.generate();
  try {
    await transaction(db, KEYS, "readwrite", (store) => request(store.add(
      { privateKey: fresh.privateKey, publicKey: fresh.publicKey, created: Date.now() }, IDENTITY,
    )));
    return fresh;
  } catch (error) {
    const winner = await transaction(db, KEYS, "readonly", (store) => request(store.get(IDENTITY)));
    if (!winner) throw error;
    return Identity.fromKeys(winner.privateKey, winner.publicKey);
  }
}

/**
 * Version 1 kept a pin per bridge number, `"<origin> <peer>"` -> `{key, confirmed}` (or a bare
 * key string, unconfirmed): each confirmed one becomes the confirmation of its key; the rest,
 * which confirm nothing, go.
 */
function migratePins(store) {
  const ids = store.getAllKeys();
  const values = store.getAll();
  values.onsuccess = () => ids.result.forEach((id, i) => {
    const numbered = /^(.*) \d+$/.exec(id);
    if (!numbered) return;
    store.delete(id);
    const value = values.result[i];
    if (value?.confirmed === true && typeof value.key === "string") {
      store.put({ confirmed: true }, `${numbered[1]} ${value.key}`);
    }
  });
}

/**
 * The bridge keys whose verification code the user confirmed in this browser profile:
 * `"<origin> <key>"` -> `{confirmed: true}`, `key` the b64u raw bridge key. Only a bridge the
 * relay names with a confirmed key is ever used. Kept by the key itself, never by the bridge's
 * number: the relay numbers bridges per browser session, from 1 in each, so a number names
 * another bridge in another session.
 */
export class PinStore {
  constructor(origin) {
    this.origin = origin;
  }

  id(key) {
    return `${this.origin} ${key}`;
  }

  /** Whether the user confirmed `key`'s verification code. */
  async confirmed(key) {
    const db = await openDatabase();
    const value = await transaction(db, PINS, "readonly", (store) => request(store.get(this.id(key))));
    return value?.confirmed === true;
  }

  /** The user compared `key`'s verification code, and it matches. */
  async confirm(key) {
    const db = await openDatabase();
    await transaction(db, PINS, "readwrite", (store) => request(store.put({ confirmed: true }, this.id(key))));
  }

  async forget(key) {
    const db = await openDatabase();
    await transaction(db, PINS, "readwrite", (store) => request(store.delete(this.id(key))));
  }
}
