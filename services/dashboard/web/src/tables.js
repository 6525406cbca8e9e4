// The tables and the health strip, drawn from the page's state.
import { duration, etClock, money, percent, price, signed, tone } from "./format.js";

function cells(row, values) {
  row.replaceChildren(
    ...values.map(([text, className]) => {
      const cell = document.createElement("td");
      cell.textContent = text;
      if (className) cell.className = className;
      return cell;
    }),
  );
}

/** The symbol list: one row per symbol, updated in place; clicking one selects it. */
export class SymbolTable {
  constructor(table, onSelect) {
    this.body = table.tBodies[0];
    this.rows = new Map();
    this.onSelect = onSelect;
    this.selected = null;
  }

  upsert(line) {
    let row = this.rows.get(line.symbol);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.symbol = line.symbol;
      row.addEventListener("click", () => this.onSelect(line.symbol));
      this.rows.set(line.symbol, row);
      const after = [...this.rows.keys()].sort().find((symbol) => symbol > line.symbol);
      this.body.insertBefore(row, after ? this.rows.get(after) : null);
      row.classList.toggle("selected", line.symbol === this.selected);
    }
    cells(row, [
      [line.symbol],
      [price(line.last)],
      [signed(line.change), tone(line.change)],
      [signed(line.changePct), tone(line.change)],
      [etClock(line.tsET).slice(0, 5), "muted"],
    ]);
  }

  reset(lines) {
    this.rows.clear();
    this.body.replaceChildren();
    for (const line of lines) this.upsert(line);
  }

  select(symbol) {
    this.selected = symbol;
    for (const [name, row] of this.rows) row.classList.toggle("selected", name === symbol);
  }
}

export function drawPositions(table, positions) {
  const rows = [...positions.values()]
    .sort((a, b) => a.symbol.localeCompare(b.symbol))
    .map((position) => {
      const row = document.createElement("tr");
      row.dataset.symbol = position.symbol;
      cells(row, [
        [position.symbol],
        [String(position.shares)],
        [price(position.entryPrice)],
        [price(position.lastPrice)],
        [money(position.unrealizedPnl), tone(position.unrealizedPnl)],
        [String(position.barsHeld)],
        [price(position.stopPrice)],
        [price(position.targetPrice)],
      ]);
      return row;
    });
  table.tBodies[0].replaceChildren(...rows);
}

export function drawTrades(table, trades) {
  // newest first, by time (the engine decides symbols independently, so arrival order is not)
  const ordered = [...trades].sort((a, b) => a.tsET.localeCompare(b.tsET) || a.seq - b.seq);
  const rows = ordered.reverse().map((trade) => {
    const row = document.createElement("tr");
    row.dataset.tradeId = trade.tradeId;
    cells(row, [
      [`${etClock(trade.tsET)} ET`],
      [trade.symbol],
      [trade.action, trade.action === "BUY" ? "buy" : "sell"],
      [String(trade.shares)],
      [price(trade.price)],
      [price(trade.stopPrice)],
      [price(trade.targetPrice)],
      [trade.action === "SELL" ? money(trade.realizedPnl) : "", tone(trade.realizedPnl)],
      [trade.reason, "reason"],
    ]);
    row.lastElementChild.title = trade.reason;
    return row;
  });
  table.tBodies[0].replaceChildren(...rows);
}

export function drawPortfolio(point, id) {
  document.getElementById("portfolio-id").textContent = id ? `${id} · ${etClock(point?.tsET)} ET` : "";
  const set = (name, text, value) => {
    const cell = document.getElementById(name);
    cell.textContent = text;
    cell.className = value == null ? "" : tone(value);
  };
  set("p-equity", money(point?.equity));
  set("p-cash", money(point?.cash));
  set("p-realized", money(point?.realizedPnl), point?.realizedPnl);
  set("p-unrealized", money(point?.unrealizedPnl), point?.unrealizedPnl);
  set("p-exposure", money(point?.exposure));
  set("p-open", point ? String(point.openPositions) : "–");
}

function show(id, text, state) {
  const element = document.getElementById(id);
  element.textContent = text;
  element.className = `item ${state ?? ""}`;
}

/** The health strip: feed, lags, parity and completeness of the day, the gate, services. */
export function drawHealth(health) {
  if (!health) return;
  const feed = health.feed || {};
  show("h-day", `day ${health.day ?? "–"}`);
  const feedText = feed.connected == null ? "feed –" : feed.connected ? "feed connected" : "feed down";
  const feedTime = feed.feedTimeET ? ` · ${etClock(feed.feedTimeET)} ET` : "";
  show("h-feed", `${feedText}${feedTime}${feed.idle ? " (idle)" : ""}`, feed.connected == null ? "muted" : feed.connected ? "ok" : "bad");
  const replayed = feed.mode !== "live" && health.lagMs > 3_600_000;
  show("h-lag", replayed ? "lag – (replayed day)" : `lag ${duration(health.lagMs)}`, health.lagMs > 5000 && !replayed ? "warn" : "");
  show("h-mirror", `mirror lag ${duration(health.mirrorLagMs)}`, health.mirrorLagMs > 5000 ? "warn" : "");
  const parity = health.parity;
  show("h-parity", `parity ${parity ? percent(parity.parityPct) : "–"}`, parity ? (parity.parityPct >= 99.99 ? "ok" : "warn") : "muted");
  show("h-complete", `completeness ${parity ? percent(parity.completenessPct) : "–"}`, parity && parity.completenessPct != null ? (parity.completenessPct >= 99.99 ? "ok" : "warn") : "muted");
  const gate = health.gate;
  show("h-gate", gate ? `gate ${gate.ready ? "ready" : "not ready"} (${gate.passing}/${gate.days} days)` : "gate –", gate ? (gate.ready ? "ok" : "warn") : "muted");
  if (gate && gate.reasons.length) document.getElementById("h-gate").title = gate.reasons.join("\n");
  const services = health.services || [];
  const element = document.getElementById("h-services");
  element.replaceChildren(
    ...services.map((entry) => {
      const span = document.createElement("span");
      span.textContent = `● ${entry.service} `;
      span.className = entry.stale ? "bad" : entry.status === "ok" || entry.status === "done" || entry.status === "replaying" ? "ok" : "warn";
      span.title = `${entry.status}, ${entry.mode}, last heartbeat ${duration(entry.ageMs)} ago`;
      return span;
    }),
  );
}

export function drawStream(text, state) {
  show("h-stream", text, state);
}
