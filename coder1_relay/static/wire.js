// The envelope (docs/protocol.md): a 20-byte big-endian header, then the payload.
//   version u8 | kind u8 | flags u16 | peer u32 | stream u32 | seq u64

export const WIRE_VERSION = 1;
export const HEADER_SIZE = 20;

export const Kind = Object.freeze({
  WELCOME: 0x02, PRESENCE: 0x03, ERROR: 0x04, PING: 0x05, PONG: 0x06, PAIRED: 0x08,
  CMD_START: 0x10, CMD_STDIN: 0x11, CMD_CANCEL: 0x12,
  CMD_STDOUT: 0x18, CMD_STDERR: 0x19, CMD_EXIT: 0x1a, CMD_ERROR: 0x1b,
  PTY_OPEN: 0x20, PTY_INPUT: 0x21, PTY_RESIZE: 0x22, PTY_CLOSE: 0x23, PTY_LIST: 0x24,
  PTY_OUTPUT: 0x28, PTY_EXIT: 0x29, PTY_OPENED: 0x2a, PTY_ERROR: 0x2b, PTY_LISTING: 0x2c,
  KEY_OFFER: 0x30, KEY_ANSWER: 0x38, KEY_ERROR: 0x39,
  RESUME: 0x40, ACK: 0x41, RESUMED: 0x48, INPUT_ACK: 0x49, GAP: 0x4a,
  UNSUPPORTED: 0x7f,
});

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** One frame as an ArrayBuffer; `payload` is a Uint8Array, a string (UTF-8) or an object (JSON). */
export function encode(kind, { peer = 0, stream = 0, seq = 0, payload = new Uint8Array() } = {}) {
  let bytes = payload;
  if (typeof payload === "string") bytes = encoder.encode(payload);
  else if (!(payload instanceof Uint8Array)) bytes = encoder.encode(JSON.stringify(payload));
  const frame = new Uint8Array(HEADER_SIZE + bytes.length);
  const view = new DataView(frame.buffer);
  view.setUint8(0, WIRE_VERSION);
  view.setUint8(1, kind);
  view.setUint16(2, 0);
  view.setUint32(4, peer);
  view.setUint32(8, stream);
  view.setBigUint64(12, BigInt(seq));
  frame.set(bytes, HEADER_SIZE);
  return frame.buffer;
}

/** The header fields and the payload (a Uint8Array view) of a received frame. */
export function decode(buffer) {
  if (buffer.byteLength < HEADER_SIZE) throw new Error("frame shorter than the header");
  const view = new DataView(buffer);
  if (view.getUint8(0) !== WIRE_VERSION) throw new Error("unsupported wire version");
  return {
    kind: view.getUint8(1),
    peer: view.getUint32(4),
    stream: view.getUint32(8),
    seq: view.getBigUint64(12),
    payload: new Uint8Array(buffer, HEADER_SIZE),
  };
}

/** A frame's payload as JSON (control and structured frames). */
export function json(frame) {
  return JSON.parse(decoder.decode(frame.payload));
}
