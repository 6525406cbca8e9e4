// Drive Debian's chromium through playwright-core against a running dashboard and check what a
// person would see. Run by tests/test_dashboard_browser.py (and the slow mesh test):
//
//   node tests/browser/dashboard_check.mjs '<json options>'
//
// Options: url, screenshot (path of the PNG), symbol (the chart the page must show),
// historyBars (bars the first snapshot must draw), firstBarET ("HH:MM" the chart's first bar
// must read), liveBars (bars that must then arrive live), tradeTimesET (every executed trade's
// "HH:MM:SS ET" that the trade table must show once the feed is done),
// positions (open positions the table must show at the end), timeoutMs.
//
// Protocol with the caller on stdout: "LOADED <bars>" once the page drew its first snapshot
// (the caller then starts the feed), "RESULT <json>" at the end. Exit 0 when every check held.
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const web = join(here, "..", "..", "services", "dashboard", "web");
const { chromium } = createRequire(join(web, "package.json"))("playwright-core");

const options = JSON.parse(process.argv[2]);
const timeoutMs = options.timeoutMs ?? 60_000;
const flags = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const failures = [];
const problems = [];
function check(condition, message) {
  if (!condition) failures.push(message);
}

async function until(page, what, predicate, arg) {
  try {
    await page.waitForFunction(predicate, arg, { timeout: timeoutMs, polling: 100 });
    return true;
  } catch {
    failures.push(`timed out waiting for ${what}`);
    return false;
  }
}

const profile = mkdtempSync(join(tmpdir(), "tickmesh-chromium-"));
// A fresh profile, and a zone far from New York: the page must still read in ET.
const context = await chromium.launchPersistentContext(profile, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: flags,
  timezoneId: "Asia/Tokyo",
  viewport: { width: 1400, height: 900 },
});
const result = {};
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (message) => {
    if (message.type() === "error") problems.push(`console: ${message.text()}`);
  });
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  page.on("requestfailed", (request) => {
    if (!request.url().includes("/events")) problems.push(`request failed: ${request.url()}`);
  });
  const external = [];
  page.on("request", (request) => {
    if (!request.url().startsWith(new URL(options.url).origin)) external.push(request.url());
  });

  await page.goto(options.url, { waitUntil: "load" });
  const loaded = await until(
    page,
    `the first snapshot with ${options.historyBars} bars of ${options.symbol}`,
    ({ symbol, bars }) => {
      const board = window.tickmeshDashboard;
      return board && board.state.symbol === symbol && board.candles.bars.size >= bars
        && Number(document.body.dataset.snapshots || 0) >= 1;
    },
    { symbol: options.symbol, bars: options.historyBars },
  );
  const historyBars = await page.evaluate(() => window.tickmeshDashboard.candles.bars.size);
  result.historyBars = historyBars;
  console.log(`LOADED ${historyBars}`);

  if (loaded && options.firstBarET) {
    // The chart draws its axis in UTC; the page shifts times so that it reads ET.
    const first = await page.evaluate(() => window.tickmeshDashboard.candles.candles.data()[0].time);
    result.firstBarAxis = new Date(first * 1000).toISOString().slice(11, 16);
    check(result.firstBarAxis === options.firstBarET,
      `chart axis reads ${result.firstBarAxis} for the first bar, not ${options.firstBarET} ET`);
  }

  if (loaded) {
    await until(page, `${options.liveBars} live bars`,
      (count) => Number(document.body.dataset.liveBars || 0) >= count, options.liveBars);
    const expected = options.tradeTimesET ?? [];
    await until(page, `${expected.length} trades in the table`,
      (count) => document.querySelectorAll("#trades tbody tr").length >= count, expected.length);
    await until(page, "a trade marker on the chart",
      () => window.tickmeshDashboard.candles.markers.markers().length > 0);
    await until(page, `${options.positions} open positions`,
      (count) => document.querySelectorAll("#positions tbody tr").length === count, options.positions);
    await page.waitForTimeout(300); // let the last frame paint

    result.liveBars = await page.evaluate(() => Number(document.body.dataset.liveBars || 0));
    result.markers = await page.evaluate(() => window.tickmeshDashboard.candles.markers.markers().length);
    const times = await page.$$eval("#trades tbody tr td:first-child", (cells) => cells.map((cell) => cell.textContent));
    result.tradeTimes = times.slice().reverse();
    const sorted = (list) => JSON.stringify(list.slice().sort());
    check(sorted(result.tradeTimes) === sorted(expected),
      `trade times ${JSON.stringify(result.tradeTimes.slice(0, 5))}... are not the ET times ${JSON.stringify(expected.slice(0, 5))}...`);
    result.positions = await page.$$eval("#positions tbody tr", (rows) => rows.map((row) => [...row.children].map((cell) => cell.textContent)));
    result.symbols = await page.$$eval("#symbols tbody tr", (rows) => rows.map((row) => row.dataset.symbol));
    result.health = await page.$eval("#health", (element) => element.textContent.replace(/\s+/g, " ").trim());
    result.equity = await page.$eval("#p-equity", (element) => element.textContent);
    check(result.equity !== "–", "no portfolio equity shown");
  }

  mkdirSync(dirname(options.screenshot), { recursive: true });
  await page.screenshot({ path: options.screenshot, fullPage: true });
  result.screenshot = options.screenshot;
  check(external.length === 0, `the page fetched from elsewhere: ${external.join(", ")}`);
  check(problems.length === 0, `browser errors: ${problems.join(" | ")}`);
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
result.failures = failures;
console.log(`RESULT ${JSON.stringify(result)}`);
process.exit(failures.length ? 1 : 0);
