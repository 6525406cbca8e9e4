// The two charts: a symbol's candles with volume, trade markers and the open position's stop
// and target lines; the portfolio's equity curve.
import {
  CandlestickSeries,
  HistogramSeries,
  LineSeries,
  LineStyle,
  createChart,
  createSeriesMarkers,
} from "lightweight-charts";
import { chartTime } from "./format.js";

const THEME = {
  layout: { background: { color: "#161c23" }, textColor: "#d6dde6" },
  grid: { vertLines: { color: "#1f2833" }, horzLines: { color: "#1f2833" } },
  timeScale: { timeVisible: true, secondsVisible: false, borderColor: "#263040" },
  rightPriceScale: { borderColor: "#263040" },
  autoSize: true,
};

export class CandleChart {
  constructor(element) {
    this.chart = createChart(element, THEME);
    this.candles = this.chart.addSeries(CandlestickSeries, {
      upColor: "#26a69a", downColor: "#ef5350", borderVisible: false,
      wickUpColor: "#26a69a", wickDownColor: "#ef5350",
    });
    this.volume = this.chart.addSeries(HistogramSeries, {
      priceFormat: { type: "volume" }, priceScaleId: "volume", color: "#3b4a5c",
    });
    this.chart.priceScale("volume").applyOptions({ scaleMargins: { top: 0.8, bottom: 0 } });
    this.markers = createSeriesMarkers(this.candles, []);
    this.bars = new Map(); // startMs -> bar (the newest revision)
    this.lines = [];
  }

  /** Replace every bar (a snapshot). */
  setBars(bars) {
    this.bars = new Map(bars.map((bar) => [bar.startMs, bar]));
    this.redraw();
    this.chart.timeScale().fitContent();
  }

  redraw() {
    const sorted = [...this.bars.values()].sort((a, b) => a.startMs - b.startMs);
    this.candles.setData(sorted.map(candle));
    this.volume.setData(sorted.map(volume));
  }

  /** A bar as it closes, or a revision replacing one. */
  upsert(bar) {
    const old = this.bars.get(bar.startMs);
    if (old && old.revision > bar.revision) return;
    const newest = Math.max(-Infinity, ...this.bars.keys());
    this.bars.set(bar.startMs, bar);
    if (bar.startMs >= newest) {
      this.candles.update(candle(bar));
      this.volume.update(volume(bar));
    } else {
      this.redraw(); // a revision of an older minute
    }
  }

  /** BUY/SELL markers of this symbol's trades. */
  setTrades(trades) {
    const markers = trades
      .map((trade) => ({
        time: chartTime(trade.tsET),
        position: trade.action === "BUY" ? "belowBar" : "aboveBar",
        color: trade.action === "BUY" ? "#26a69a" : "#ef5350",
        shape: trade.action === "BUY" ? "arrowUp" : "arrowDown",
        text: `${trade.action} ${trade.shares}`,
      }))
      .sort((a, b) => a.time - b.time);
    this.markers.setMarkers(markers);
  }

  /** The open position's stop and target (none when flat). */
  setPosition(position) {
    for (const line of this.lines) this.candles.removePriceLine(line);
    this.lines = [];
    if (!position || !position.shares) return;
    const add = (value, title, color) => {
      if (value == null) return;
      this.lines.push(this.candles.createPriceLine({
        price: value, color, lineWidth: 1, lineStyle: LineStyle.Dashed, axisLabelVisible: true, title,
      }));
    };
    add(position.entryPrice, "entry", "#7d8a99");
    add(position.stopPrice, "stop", "#ef5350");
    add(position.targetPrice, "target", "#26a69a");
  }
}

function candle(bar) {
  return { time: chartTime(bar.tsET), open: bar.open, high: bar.high, low: bar.low, close: bar.close };
}

function volume(bar) {
  return {
    time: chartTime(bar.tsET),
    value: bar.volume,
    color: bar.close >= bar.open ? "rgba(38,166,154,0.45)" : "rgba(239,83,80,0.45)",
  };
}

export class EquityChart {
  constructor(element) {
    this.chart = createChart(element, { ...THEME, rightPriceScale: { borderColor: "#263040" } });
    this.line = this.chart.addSeries(LineSeries, { color: "#4c8dff", lineWidth: 2 });
  }

  setPoints(points) {
    this.line.setData(points.map((point) => ({ time: chartTime(point.tsET), value: point.equity })));
  }
}
