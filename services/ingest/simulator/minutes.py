"""The simulator's ``AM`` minute aggregates: its own from every trade it sends, or the data
vendor's minute bars for a file feed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import structlog

from libs.common.market.sessions import MINUTE_MS
from libs.common.schemas import Trade
from services.ingest.protocol import (
    MinuteAggEvent,
)

log = structlog.get_logger("ingest.simulator")


@dataclass(slots=True)
class _MinuteAcc:
    open: float
    high: float
    low: float
    close: float
    volume: int = 0
    notional: float = 0.0
    trades: int = 0


@dataclass(slots=True)
class _DayAcc:
    open: float
    volume: int = 0
    notional: float = 0.0


class MinuteAggregator:
    """The simulator's own ``AM`` events, from *all* trades it sends (no condition filtering).

    Feed trades in time order with ``add``; ``advance(t)`` closes the minutes before the minute
    of ``t`` and returns their ``AM`` events (symbols without trades get none, as on Polygon).
    ``op`` is the first price the simulator sent for the symbol, ``av``/``a`` accumulate from
    there.
    """

    def __init__(self) -> None:
        self._minute: int | None = None
        self._bars: dict[str, _MinuteAcc] = {}
        self._days: dict[str, _DayAcc] = {}

    def advance(self, t_ms: int) -> list[MinuteAggEvent]:
        """Close the open minute if ``t_ms`` is in a later one; return its aggregates."""
        minute = t_ms - t_ms % MINUTE_MS
        if self._minute is None:
            self._minute = minute
            return []
        if minute <= self._minute:
            return []
        closed = self.flush()
        self._minute = minute
        return closed

    def add(self, trades: Iterable[Trade]) -> None:
        """Account trades of the open minute."""
        bars = self._bars
        days = self._days
        for trade in trades:
            price = trade.p
            size = trade.s
            bar = bars.get(trade.sym)
            if bar is None:
                bar = bars[trade.sym] = _MinuteAcc(price, price, price, price)
            else:
                if price > bar.high:
                    bar.high = price
                if price < bar.low:
                    bar.low = price
                bar.close = price
            bar.volume += size
            bar.notional += price * size
            bar.trades += 1
            day = days.get(trade.sym)
            if day is None:
                day = days[trade.sym] = _DayAcc(price)
            day.volume += size
            day.notional += price * size

    def flush(self) -> list[MinuteAggEvent]:
        """The aggregates of the open minute (and forget it)."""
        if self._minute is None or not self._bars:
            self._bars = {}
            return []
        start = self._minute
        out = []
        for sym, bar in self._bars.items():
            day = self._days[sym]
            out.append(
                MinuteAggEvent(
                    sym=sym,
                    v=bar.volume,
                    av=day.volume,
                    op=day.open,
                    vw=round(bar.notional / bar.volume, 4) if bar.volume else bar.close,
                    o=bar.open,
                    c=bar.close,
                    h=bar.high,
                    l=bar.low,
                    a=round(day.notional / day.volume, 4) if day.volume else bar.close,
                    z=bar.volume // bar.trades,
                    s=start,
                    e=start + MINUTE_MS,
                )
            )
        self._bars = {}
        return out


class VendorMinutes:
    """``AM`` events from the data vendor's own minute bars (the Lean ``minute/`` files).

    A real feed's ``AM`` is the vendor's aggregate, built by the vendor's rules, so a file feed
    that has the vendor's bars sends those (without VWAP, which the files lack), each once the
    feed has moved past its minute. Same interface as ``MinuteAggregator``.
    """

    def __init__(self, events: Sequence[MinuteAggEvent]) -> None:
        self._events = sorted(events, key=lambda event: (event.s, event.sym))
        self._next = 0

    def advance(self, t_ms: int) -> list[MinuteAggEvent]:
        """The vendor bars of the minutes that ended at or before the minute of ``t_ms``."""
        minute = t_ms - t_ms % MINUTE_MS
        start = self._next
        while self._next < len(self._events) and self._events[self._next].e <= minute:
            self._next += 1
        return self._events[start : self._next]

    def add(self, trades: Iterable[Trade]) -> None:
        """Nothing to account: the vendor already did."""

    def flush(self) -> list[MinuteAggEvent]:
        """The vendor bars not sent yet."""
        rest = self._events[self._next :]
        self._next = len(self._events)
        return rest
