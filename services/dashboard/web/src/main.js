// The dashboard page: one EventSource on /events?symbol=..., a snapshot first, then live
// events (bar, quote, trade, position, portfolio, health). The browser reconnects by itself
// with Last-Event-ID and is sent what it missed, or a fresh snapshot.
import { CandleChart, EquityChart } from "./charts.js";
import {
  SymbolTable,
  drawHealth,
  drawPortfolio,
  drawPositions,
  drawStream,
  drawTrades,
} from "./tables.js";

const state = {
  symbol: decodeURIComponent(location.hash.slice(1)).toUpperCase() || "SPY",
  chosen: location.hash.length > 1,
  trades: new Map(), // tradeId -> trade, in arrival order
  positions: new Map(),
  portfolio: new Map(), // portfolioId -> Map(tsET -> point)
  source: null,
};

const candles = new CandleChart(document.getElementById("chart"));
const equity = new EquityChart(document.getElementById("equity"));
const symbols = new SymbolTable(document.getElementById("symbols"), (symbol) => select(symbol, true));
const tradesTable = document.getElementById("trades");
const positionsTable = document.getElementById("positions");

function symbolTrades() {
  return [...state.trades.values()].filter((trade) => trade.symbol === state.symbol);
}

function drawSymbol() {
  document.getElementById("chart-title").textContent = state.symbol;
  symbols.select(state.symbol);
  candles.setTrades(symbolTrades());
  candles.setPosition(state.positions.get(state.symbol));
}

function drawEquity() {
  const ids = [...state.portfolio.keys()];
  const id = ids[ids.length - 1];
  const points = id ? [...state.portfolio.get(id).values()].sort((a, b) => a.tsET.localeCompare(b.tsET)) : [];
  equity.setPoints(points);
  drawPortfolio(points[points.length - 1], id);
}

function addPortfolio(point) {
  if (!state.portfolio.has(point.portfolioId)) state.portfolio.set(point.portfolioId, new Map());
  state.portfolio.get(point.portfolioId).set(point.tsET, point);
}

/** Until the user picks a symbol: SPY when it is there, else the first symbol listed. */
function autoSelect() {
  if (state.chosen || !symbols.rows.size) return false;
  const names = [...symbols.rows.keys()].sort();
  const wanted = symbols.rows.has("SPY") ? "SPY" : names[0];
  if (symbols.rows.has(state.symbol) && state.symbol === wanted) return false;
  if (symbols.rows.has(state.symbol) && !symbols.rows.has("SPY")) return false;
  select(wanted, false);
  return true;
}

const handlers = {
  snapshot(data) {
    symbols.reset(data.symbols);
    if (autoSelect()) return;
    candles.setBars(data.bars);
    state.trades = new Map(data.trades.map((trade) => [trade.tradeId, trade]));
    state.positions = new Map(data.positions.map((position) => [position.symbol, position]));
    state.portfolio = new Map();
    for (const points of Object.values(data.portfolio)) points.forEach(addPortfolio);
    drawTrades(tradesTable, state.trades.values());
    drawPositions(positionsTable, state.positions);
    drawEquity();
    drawSymbol();
    drawHealth(data.health);
    document.body.dataset.snapshots = String(Number(document.body.dataset.snapshots || 0) + 1);
  },
  bar(bar) {
    if (bar.symbol !== state.symbol) return;
    candles.upsert(bar);
    document.body.dataset.liveBars = String(Number(document.body.dataset.liveBars || 0) + 1);
  },
  quote(line) {
    symbols.upsert(line);
    autoSelect();
  },
  trade(trade) {
    state.trades.set(trade.tradeId, trade);
    drawTrades(tradesTable, state.trades.values());
    if (trade.symbol === state.symbol) candles.setTrades(symbolTrades());
  },
  position(position) {
    if (position.shares) state.positions.set(position.symbol, position);
    else state.positions.delete(position.symbol);
    drawPositions(positionsTable, state.positions);
    if (position.symbol === state.symbol) candles.setPosition(state.positions.get(state.symbol));
  },
  portfolio(point) {
    addPortfolio(point);
    drawEquity();
  },
  health: drawHealth,
};

function connect() {
  if (state.source) state.source.close();
  const source = new EventSource(`/events?symbol=${encodeURIComponent(state.symbol)}`);
  state.source = source;
  for (const [name, handle] of Object.entries(handlers)) {
    source.addEventListener(name, (event) => handle(JSON.parse(event.data)));
  }
  source.onopen = () => drawStream("live", "ok");
  source.onerror = () => drawStream(source.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting…", "warn");
}

function select(symbol, chosen) {
  if (chosen) state.chosen = true;
  if (symbol === state.symbol && state.source) return;
  state.symbol = symbol;
  history.replaceState(null, "", `#${encodeURIComponent(symbol)}`);
  drawSymbol();
  connect();
}

connect();

// For the browser test and the curious: the page's state and its candle chart.
window.tickmeshDashboard = { state, candles };
