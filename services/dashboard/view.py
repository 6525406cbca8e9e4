"""The dashboard's picture of the mesh: pure, synchronous and clock-free (times come in).

``View`` takes decoded records — bars, executed trades, positions, the portfolio, heartbeats,
progress marks and the day's parity summary — and answers the ``Event`` each one means for a
browser. It keeps only what the page shows, bounded:

- per symbol, the day's first open and latest close (the symbol list) and the newest
  ``recent_bars`` bars (older ones are read from the bar store when a browser asks);
- the day's executed trades (the newest ``trades_kept``), the open positions, the
  portfolio's points of the day per portfolio (one per minute, a revision replaces it);
- the newest heartbeat per service, the newest progress mark, the day's parity summary.

The day is the New York day of the newest bar (or mark) seen; a record of a later day starts
a new one (``roll``), and a record of an earlier day is ignored. Invariants: a bar replaces
the bar of its minute only with a revision at least as high; nothing here grows without bound.
"""

from __future__ import annotations

from collections import deque
from datetime import date
from typing import Any, NamedTuple

from msgspec import Struct

from libs.common.market.sessions import ny_date, ts_et
from libs.common.schemas import (
    Bar,
    DaySummary,
    ExecutedTrade,
    Heartbeat,
    Portfolio,
    Position,
    Progress,
)

PORTFOLIO_POINTS = 2_000
"""Points kept per portfolio and day (a session has 960 minutes at most)."""


class Event(NamedTuple):
    """What one change means for the browsers.

    ``name`` is the server-sent event's name; ``key`` coalesces: a later event with the same
    key replaces one a slow browser has not been sent yet (None: never replaced); ``symbol``,
    when set, limits the event to browsers watching that symbol (the chart's bars)."""

    name: str
    data: Any
    key: tuple[object, ...] | None = None
    symbol: str | None = None


class Line(Struct, frozen=True):
    """One row of the symbol list."""

    symbol: str
    open: float
    last: float
    change: float
    changePct: float
    tsET: str
    firstMs: int
    lastMs: int


def day_of_et(ts_et_text: str) -> str:
    """The day (``YYYY-MM-DD``) of a ``tsET``."""
    return ts_et_text[:10]


def et_offset_s(ts_et_text: str) -> int:
    """The UTC offset of a ``tsET`` in seconds (``-04:00`` is -14400)."""
    tail = ts_et_text[-6:]
    if len(tail) == 6 and tail[0] in "+-" and tail[3] == ":":
        seconds = int(tail[1:3]) * 3600 + int(tail[4:6]) * 60
        return -seconds if tail[0] == "-" else seconds
    return 0


def line_of(symbol: str, first: Bar, last: Bar) -> Line:
    """The symbol list's row from the day's first and newest bars."""
    change = last.close - first.open
    pct = change / first.open * 100.0 if first.open else 0.0
    return Line(
        symbol,
        first.open,
        last.close,
        round(change, 4),
        round(pct, 3),
        last.tsET,
        first.startMs,
        last.startMs,
    )


class View:
    """What the browsers are shown, kept up to date record by record."""

    def __init__(self, *, recent_bars: int = 120, trades_kept: int = 1_000) -> None:
        self.recent_bars = recent_bars
        self.trades_kept = trades_kept
        self.day: date | None = None
        self.first: dict[str, Bar] = {}
        self.last: dict[str, Bar] = {}
        self.bars: dict[str, dict[int, Bar]] = {}
        self.trades: deque[ExecutedTrade] = deque(maxlen=trades_kept)
        self._trade_ids: set[str] = set()
        self.positions: dict[str, Position] = {}
        self._position_seqs: dict[str, int] = {}
        self.portfolio: dict[str, dict[str, Portfolio]] = {}
        self.heartbeats: dict[str, Heartbeat] = {}
        self.progress: Progress | None = None
        self.summary: DaySummary | None = None

    # -- the day -----------------------------------------------------------------------------

    def roll(self, day: date) -> bool:
        """Make ``day`` the current day if it is later; True when the day changed (every
        browser then needs a fresh snapshot)."""
        if self.day is not None and day <= self.day:
            return False
        self.day = day
        self.first.clear()
        self.last.clear()
        self.bars.clear()
        self.trades.clear()
        self._trade_ids.clear()
        self.portfolio.clear()
        self.summary = None
        return True

    def _is_today(self, day: date) -> bool:
        """True for the current day; a later day becomes the current one first."""
        if self.day is None or day > self.day:
            self.roll(day)
        return day == self.day

    # -- records -----------------------------------------------------------------------------

    def seed_line(self, first: Bar, last: Bar) -> None:
        """The symbol list's row from the bar store (at start), without events."""
        if self._is_today(ny_date(first.startMs)):
            self.first[first.symbol] = first
            self.last[last.symbol] = last

    def on_bar(self, bar: Bar) -> list[Event]:
        """A bar or a revision of one: the chart's bar and the symbol's row."""
        if not self._is_today(ny_date(bar.startMs)):
            return []
        symbol = bar.symbol
        kept = self.bars.setdefault(symbol, {})
        old = kept.get(bar.startMs)
        if old is not None and old.revision > bar.revision:
            return []
        kept[bar.startMs] = bar
        if len(kept) > self.recent_bars * 5 // 4:
            for start in sorted(kept)[: len(kept) - self.recent_bars]:
                del kept[start]
        events = [Event("bar", bar, ("bar", symbol, bar.startMs), symbol)]
        first, last = self.first.get(symbol), self.last.get(symbol)
        changed = False
        if first is None or bar.startMs < first.startMs or bar.startMs == first.startMs:
            self.first[symbol] = first = bar
            changed = True
        if last is None or bar.startMs >= last.startMs:
            self.last[symbol] = last = bar
            changed = True
        if changed:
            events.append(Event("quote", line_of(symbol, first, last), ("quote", symbol)))
        return events

    def on_trade(self, trade: ExecutedTrade) -> list[Event]:
        """An executed trade (once per ``tradeId``)."""
        if not self._is_today(date.fromisoformat(day_of_et(trade.tsET))):
            return []
        if trade.tradeId in self._trade_ids:
            return []
        if len(self.trades) == self.trades.maxlen:
            self._trade_ids.discard(self.trades[0].tradeId)
        self.trades.append(trade)
        self._trade_ids.add(trade.tradeId)
        return [Event("trade", trade)]

    def on_position(self, position: Position) -> list[Event]:
        """A position's state; a flat one leaves the table."""
        if position.seq < self._position_seqs.get(position.symbol, 0):
            return []  # older than what we showed (even a flat one that left the table)
        self._position_seqs[position.symbol] = position.seq
        if position.shares == 0:
            if self.positions.pop(position.symbol, None) is None:
                return []
        else:
            self.positions[position.symbol] = position
        return [Event("position", position, ("position", position.symbol))]

    def on_portfolio(self, portfolio: Portfolio) -> list[Event]:
        """One minute of the portfolio (the equity curve's point)."""
        if not self._is_today(date.fromisoformat(day_of_et(portfolio.tsET))):
            return []
        points = self.portfolio.setdefault(portfolio.portfolioId, {})
        points[portfolio.tsET] = portfolio
        if len(points) > PORTFOLIO_POINTS:
            del points[min(points)]
        return [Event("portfolio", portfolio, ("portfolio", portfolio.portfolioId, portfolio.tsET))]

    def on_heartbeat(self, heartbeat: Heartbeat) -> None:
        """The newest heartbeat of its service (the health strip reads them)."""
        old = self.heartbeats.get(heartbeat.service)
        if old is None or heartbeat.tsMs >= old.tsMs:
            self.heartbeats[heartbeat.service] = heartbeat

    def on_progress(self, progress: Progress) -> None:
        """The newest progress mark (the feed's time and connection)."""
        if self.progress is None or progress.seq > self.progress.seq:
            self.progress = progress
        if progress.feedTimeMs > 0 and not progress.live:
            self._is_today(ny_date(progress.feedTimeMs))

    def on_summary(self, summary: DaySummary | None) -> None:
        """The current day's parity summary (None while the reconciler has not judged it)."""
        self.summary = summary

    # -- what the page reads -----------------------------------------------------------------

    def lines(self) -> list[Line]:
        """The symbol list, by symbol."""
        return [
            line_of(symbol, self.first[symbol], self.last[symbol])
            for symbol in sorted(self.last)
            if symbol in self.first
        ]

    def chart_bars(self, symbol: str, stored: dict[int, Bar]) -> list[Bar]:
        """The day's bars of ``symbol``: the bar store's merged with the newest ones kept here
        (the highest revision of each minute), in time order."""
        merged = dict(stored)
        for start, bar in self.bars.get(symbol, {}).items():
            old = merged.get(start)
            if old is None or bar.revision >= old.revision:
                merged[start] = bar
        day = self.day
        return [
            merged[start]
            for start in sorted(merged)
            if day is None or ny_date(merged[start].startMs) == day
        ]

    def health(self, now_ms: int, stale_after_ms: int) -> dict[str, Any]:
        """The health strip: the feed, the lags, each service's heartbeat, the day's parity
        and completeness, and the promotion gate."""
        services = []
        for name in sorted(self.heartbeats):
            beat = self.heartbeats[name]
            age = max(0, now_ms - beat.tsMs) if beat.tsMs else None
            services.append(
                {
                    "service": name,
                    "status": beat.status,
                    "mode": beat.mode,
                    "lagMs": beat.lagMs,
                    "ageMs": age,
                    "stale": age is None or age > stale_after_ms,
                }
            )
        fresh = {entry["service"]: entry for entry in services if not entry["stale"]}
        progress = self.progress
        ingest = fresh.get("ingest")
        connected: bool | None = None
        if progress is not None:
            connected = progress.connected and ingest is not None
        elif "ingest" in self.heartbeats:
            connected = ingest is not None
        mirror = fresh.get("mirror")
        summary = self.summary
        return {
            "day": self.day.isoformat() if self.day is not None else None,
            "nowET": ts_et(now_ms),
            "feed": {
                "connected": connected,
                "live": progress.live if progress is not None else None,
                "idle": progress.idle if progress is not None else None,
                "feedTimeET": ts_et(progress.feedTimeMs)
                if progress and progress.feedTimeMs
                else None,
                "mode": ingest["mode"] if ingest is not None else None,
            },
            "lagMs": ingest["lagMs"] if ingest is not None else None,
            "mirrorLagMs": mirror["lagMs"] if mirror is not None else None,
            "services": services,
            "parity": None
            if summary is None
            else {
                "parityPct": summary.parityPct,
                "completenessPct": summary.completenessPct,
                "compared": summary.compared,
                "matched": summary.matched,
                "incompleteMinutes": summary.incompleteMinutes,
                "generatedET": ts_et(summary.generatedAtMs) if summary.generatedAtMs else None,
            },
            "gate": None
            if summary is None or summary.gateReady is None
            else {
                "ready": summary.gateReady,
                "passing": summary.gatePassing,
                "days": summary.gateDays,
                "targetPct": summary.gateTargetPct,
                "reasons": summary.gateReasons[:3],
            },
        }

    def snapshot(
        self, symbol: str | None, bars: list[Bar], health: dict[str, Any]
    ) -> dict[str, Any]:
        """Everything a browser needs to draw the page at once."""
        return {
            "day": self.day.isoformat() if self.day is not None else None,
            "symbol": symbol,
            "symbols": self.lines(),
            "bars": bars,
            "trades": list(self.trades),
            "positions": [self.positions[name] for name in sorted(self.positions)],
            "portfolio": {
                portfolio_id: [points[ts] for ts in sorted(points)]
                for portfolio_id, points in self.portfolio.items()
            },
            "health": health,
        }
