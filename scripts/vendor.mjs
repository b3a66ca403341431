// Copies the npm-installed browser assets the IDE page needs next to it, into
// coder1_relay/static/vendor/ (ignored by git; shipped in the Python package).
import { copyFileSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const target = join(root, "coder1_relay", "static", "vendor");
const files = {
  "@xterm/xterm/lib/xterm.mjs": "xterm.mjs",
  "@xterm/xterm/css/xterm.css": "xterm.css",
  "@xterm/addon-fit/lib/addon-fit.mjs": "addon-fit.mjs",
};

mkdirSync(target, { recursive: true });
for (const [from, to] of Object.entries(files)) {
  copyFileSync(join(root, "node_modules", from), join(target, to));
  console.log(`vendor: ${from} -> coder1_relay/static/vendor/${to}`);
}
