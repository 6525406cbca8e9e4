// Bundle the front end into dist/ (served by the dashboard itself; nothing from a CDN):
// src/main.js with lightweight-charts into app.js, src/app.css into app.css, and index.html.
import { build } from "esbuild";
import { copyFile, mkdir } from "node:fs/promises";

const here = new URL(".", import.meta.url).pathname;
const dist = `${here}dist`;
await mkdir(dist, { recursive: true });
await build({
  entryPoints: [`${here}src/main.js`],
  bundle: true,
  minify: true,
  format: "iife",
  target: "es2020",
  legalComments: "eof",
  outfile: `${dist}/app.js`,
  logLevel: "warning",
});
await build({
  entryPoints: [`${here}src/app.css`],
  bundle: true,
  minify: true,
  outfile: `${dist}/app.css`,
  logLevel: "warning",
});
await copyFile(`${here}src/index.html`, `${dist}/index.html`);
console.log(`dashboard front end built in ${dist}`);
