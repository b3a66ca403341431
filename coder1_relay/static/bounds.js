// The numbers the page takes from the relay (and, sealed, from a bridge), each kept to a sane
// range: no value can make the page spin, stop noticing a dead connection, or size a terminal
// beyond what a bridge allows (docs/protocol.md, section 9). No DOM here: Node tests it.

/** Seconds between the page's PINGs: the WELCOME's `heartbeat`, kept within these (as the bridge). */
export const MIN_HEARTBEAT = 5;
export const MAX_HEARTBEAT = 30;
/** Seconds a 429's `Retry-After` may ask the user to wait; 60 when it says no number of seconds. */
export const MAX_RETRY_AFTER = 3600;
export const DEFAULT_RETRY_AFTER = 60;
/** Seconds a pairing code may be shown as live; the relay's own lifetime when it says none. */
export const MAX_CODE_LIFETIME = 3600;
export const DEFAULT_CODE_LIFETIME = 300;
/** Bytes of a RESUMED's `window`: at least the bridge's smallest `--send-window`. */
export const MIN_WINDOW = 4 * 1024;
export const MAX_WINDOW = 1024 * 1024 * 1024;
/** Columns and rows of a listed terminal, as the bridge allows them. */
export const MIN_SIZE = 1;
export const MAX_SIZE = 1000;

/** `value` kept within [min, max]; null when it is not a number at all (NaN, text, null). */
export function bounded(value, min, max) {
  if (typeof value !== "number" || Number.isNaN(value)) return null;
  return Math.min(Math.max(value, min), max);
}

/** The ping interval a WELCOME's `heartbeat` asks for, in bounds; null: keep the one in use. */
export function heartbeatSeconds(value) {
  return bounded(value, MIN_HEARTBEAT, MAX_HEARTBEAT);
}

/** The seconds a `Retry-After` header says, in bounds (an HTTP date or junk: the default). */
export function retryAfterSeconds(header) {
  const text = typeof header === "string" ? header.trim() : "";
  return /^\d{1,10}$/.test(text) ? bounded(Number(text), 1, MAX_RETRY_AFTER) : DEFAULT_RETRY_AFTER;
}

/** The seconds a new pairing code stays live, from the relay's `expires_in`, in bounds. */
export function codeLifetimeSeconds(value) {
  return bounded(value, 0, MAX_CODE_LIFETIME) ?? DEFAULT_CODE_LIFETIME;
}

/** A RESUMED's send window in bytes, in bounds; null when it names none. */
export function windowBytes(value) {
  const bytes = bounded(value, MIN_WINDOW, MAX_WINDOW);
  return bytes === null ? null : Math.floor(bytes);
}

/** A listed terminal's `{cols, rows}`, whole and in bounds (80 × 24 for what is not a number). */
export function terminalSize(size) {
  const whole = (value, otherwise) => Math.round(bounded(value, MIN_SIZE, MAX_SIZE) ?? otherwise);
  return { cols: whole(size?.cols, 80), rows: whole(size?.rows, 24) };
}
