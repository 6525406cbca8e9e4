"""One identity per trade: the vendor's, kept end to end.

Polygon's trade id ``i`` is unique per ticker, exchange and TRF within a day (tick files use
the line number, unique per symbol and day), so a trade's identity within its symbol is
``(day, exchange, TRF, i)``. ``TradeIds`` remembers the identities seen per symbol for the
last ``keep_days`` New York days and drops a trade seen before, wherever it comes from (a
reconnect overlap, a re-read, a backfill over live data, a duplicate record). A trade without
an id cannot be told apart from another and always passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from libs.common.market.sessions import ny_date, ny_midnight_ms
from libs.common.schemas import Trade

TradeT = TypeVar("TradeT", bound=Trade)

_EXCHANGE_KEYS = {x: f"{x}:" for x in range(256)}


def _key(trade: Trade) -> str:
    if trade.trfi:
        return f"{trade.x}:{trade.trfi}"
    return _EXCHANGE_KEYS.get(trade.x) or f"{trade.x}:"


def day_bounds(t_ms: int) -> tuple[int, int]:
    """[start, end) of the New York day of ``t_ms``, in epoch ms."""
    day = ny_date(t_ms)
    return ny_midnight_ms(day), ny_midnight_ms(day.fromordinal(day.toordinal() + 1))


class TradeIds:
    """The identities seen per symbol and day; see the module docstring."""

    def __init__(self, keep_days: int = 2) -> None:
        self.keep_days = keep_days
        # symbol -> {day start -> {exchange key -> ids}}
        self._seen: dict[str, dict[int, dict[str, set[str]]]] = {}
        self._current: dict[str, tuple[int, int, dict[str, set[str]]]] = {}
        """Per symbol: the day its last trade fell in ([start, end), its identities), so that a
        record of the same day costs no time-zone arithmetic."""
        self._bounds = (0, 0)
        """The New York day last worked out ([start, end)), shared by every symbol."""
        self.duplicates = 0
        """Trades dropped so far."""

    def _day(self, sym: str, day_start: int) -> dict[str, set[str]]:
        days = self._seen.get(sym)
        if days is None:
            days = self._seen[sym] = {}
        ids = days.get(day_start)
        if ids is None:
            ids = days[day_start] = {}
            if len(days) > self.keep_days:
                for old in sorted(days)[: len(days) - self.keep_days]:
                    del days[old]
        return ids

    def fresh(self, sym: str, trades: Sequence[TradeT]) -> Sequence[TradeT]:
        """The trades of ``trades`` (one symbol) not seen before, now remembered. Returns
        ``trades`` itself when none was a duplicate (the common case: no copy)."""
        out: list[TradeT] | None = None
        current = self._current.get(sym)
        if current is None:
            day_start = day_end = 0
            ids: dict[str, set[str]] = {}
        else:
            day_start, day_end, ids = current
        for index, trade in enumerate(trades):
            t = trade.t
            if t < day_start or t >= day_end:
                day_start, day_end = self._bounds
                if t < day_start or t >= day_end:
                    day_start, day_end = self._bounds = day_bounds(t)
                ids = self._day(sym, day_start)
                self._current[sym] = (day_start, day_end, ids)
            i = trade.i
            if i:
                key = None if trade.trfi else _EXCHANGE_KEYS.get(trade.x)
                if key is None:
                    key = _key(trade)
                bucket = ids.get(key)
                if bucket is None:
                    bucket = ids[key] = set()
                if i in bucket:
                    self.duplicates += 1
                    if out is None:
                        out = list(trades[:index])
                    continue
                bucket.add(i)
            if out is not None:
                out.append(trade)
        return trades if out is None else out

    def seen(self, trade: Trade) -> bool:
        """True when ``trade``'s identity was seen (without remembering it)."""
        days = self._seen.get(trade.sym)
        if not days:
            return False
        ids = days.get(day_bounds(trade.t)[0])
        if not ids:
            return False
        return trade.i in ids.get(_key(trade), ())

    def remember(self, trades: Iterable[Trade]) -> None:
        """Note identities seen elsewhere (trades read back from a stream)."""
        for trade in trades:
            if trade.i:
                ids = self._day(trade.sym, day_bounds(trade.t)[0])
                ids.setdefault(_key(trade), set()).add(trade.i)
