// Loading the IDE page's modules (coder1_relay/static/*.js) in Node, for the tests in this folder.
import { register } from "node:module";

// The page's modules are plain .js ES modules served to browsers; tell Node they are modules
// (the repository's package.json has no "type": it only vendors browser assets).
register(
  "data:text/javascript," + encodeURIComponent(
    "export async function resolve(specifier, context, next) {" +
    "  const found = await next(specifier, context);" +
    "  return found.url.includes('/coder1_relay/static/') && found.url.endsWith('.js')" +
    "    ? { ...found, format: 'module' } : found;" +
    "}",
  ),
);
if (!globalThis.crypto?.subtle) globalThis.crypto = (await import("node:crypto")).webcrypto;

const static_ = new URL("../../coder1_relay/static/", import.meta.url);

/** One of the page's modules, by file name ("e2e.js"). */
export function pageModule(name) {
  return import(new URL(name, static_).href);
}
