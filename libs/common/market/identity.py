"""One identity per trade: the vendor's, kept end to end.

Polygon's trade id ``i`` is unique per ticker, exchange and TRF within a day (tick files use
the line number, unique per symbol and day), so a trade's identity within its symbol is
``(day, exchange, TRF, i)``. ``TradeIds`` remembers the identities seen per symbol for the
last ``keep_days`` New York days and drops a trade seen before, wherever it comes from (a
reconnect overlap, a re-read, a backfill over live data, a duplicate record). A trade without
an id cannot be told apart from another and always passes.

A day's identities are held compactly, because a builder keeps every one of them all day: an
id written as a plain decimal number below 10^16 (Polygon's and the tick files' are) becomes
one 64-bit integer with its venue (exchange and TRF) in the top bits, exact, no hashing. The
newest few hundred of a symbol-day sit in a Python set; then they are packed into sorted
int64 arrays (8 bytes an identity instead of about 140 as a string in a set), merged in
doubling sizes so that a day costs O(n log n) in all, and a venue's packed maximum lets a new,
higher id skip the arrays. Any other id (letters, leading zeros, longer) stays as a string.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

import numpy as np

from libs.common.market.sessions import ny_date, ny_midnight_ms
from libs.common.schemas import Trade

TradeT = TypeVar("TradeT", bound=Trade)

PACK_AT = 256
"""Identities a symbol-day keeps as Python integers before packing them into an array."""
_VENUE_SHIFT = 56
_VENUES = 128
"""Venues (exchange and TRF pairs) a ``TradeIds`` packs; ids of any further venue stay strings."""
_DIGITS = 16
"""Longest decimal id packed (10^16 < 2^56)."""


def packed_key(venue: int, i: str) -> int | None:
    """``i`` at ``venue`` as one integer, or None when ``i`` is not a plain decimal below 10^16."""
    if venue < _VENUES and i.isdigit() and len(i) <= _DIGITS and i.isascii():
        if i[0] != "0" or len(i) == 1:
            return (venue << _VENUE_SHIFT) | int(i)
    return None


def day_bounds(t_ms: int) -> tuple[int, int]:
    """[start, end) of the New York day of ``t_ms``, in epoch ms."""
    day = ny_date(t_ms)
    return ny_midnight_ms(day), ny_midnight_ms(day.fromordinal(day.toordinal() + 1))


class DayIds:
    """One symbol's identities of one day: recent integers, packed arrays, other strings."""

    __slots__ = ("levels", "other", "packed_max", "recent")

    def __init__(self) -> None:
        self.recent: set[int] = set()
        self.levels: list[np.ndarray] = []
        """Sorted, disjoint int64 arrays, each at least twice the size of the next."""
        self.packed_max: dict[int, int] = {}
        """Per venue: its largest packed identity."""
        self.other: set[str] = set()

    def has(self, venue: int, i: str) -> bool:
        key = packed_key(venue, i)
        if key is None:
            return f"{venue}:{i}" in self.other
        return key in self.recent or self.packed(key)

    def add_other(self, venue: int, i: str) -> bool:
        """Remember an id that is not packed; False when it was seen before."""
        text = f"{venue}:{i}"
        if text in self.other:
            return False
        self.other.add(text)
        return True

    def packed(self, key: int) -> bool:
        for level in self.levels:
            if level[0] <= key <= level[-1]:
                at = int(level.searchsorted(key))
                if level[at] == key:
                    return True
        return False

    def pack(self) -> None:
        """Move the recent identities into the sorted arrays."""
        recent = self.recent
        if not recent:
            return
        packed_max = self.packed_max
        for key in recent:
            venue = key >> _VENUE_SHIFT
            if key > packed_max.get(venue, -1):
                packed_max[venue] = key
        merged = np.fromiter(recent, dtype=np.int64, count=len(recent))
        merged.sort()
        levels = self.levels
        while levels and len(levels[-1]) <= 2 * len(merged):
            merged = np.concatenate((levels.pop(), merged))
            merged.sort(kind="stable")  # two sorted runs: merged in linear time
        levels.append(merged)
        self.recent = set()

    def __len__(self) -> int:
        return len(self.recent) + sum(len(level) for level in self.levels) + len(self.other)


class TradeIds:
    """The identities seen per symbol and day; see the module docstring."""

    def __init__(self, keep_days: int = 2) -> None:
        self.keep_days = keep_days
        # symbol -> {day start -> identities}
        self._seen: dict[str, dict[int, DayIds]] = {}
        self._current: dict[str, tuple[int, int, DayIds]] = {}
        """Per symbol: the day its last trade fell in ([start, end), its identities), so that a
        record of the same day costs no time-zone arithmetic."""
        self._bounds = (0, 0)
        """The New York day last worked out ([start, end)), shared by every symbol."""
        self._venues: dict[int, int] = {}
        """An exchange's venue number (``x`` without a TRF)."""
        self._trf_venues: dict[tuple[int, int], int] = {}
        self.duplicates = 0
        """Trades dropped so far."""

    def _venue(self, trade: Trade) -> int:
        """A small number per (exchange, TRF) pair, in the order first seen."""
        if trade.trfi:
            pair = (trade.x, trade.trfi)
            venue = self._trf_venues.get(pair)
            if venue is None:
                venue = self._trf_venues[pair] = len(self._venues) + len(self._trf_venues)
            return venue
        venue = self._venues.get(trade.x)
        if venue is None:
            venue = self._venues[trade.x] = len(self._venues) + len(self._trf_venues)
        return venue

    def _day(self, sym: str, day_start: int) -> DayIds:
        days = self._seen.get(sym)
        if days is None:
            days = self._seen[sym] = {}
        ids = days.get(day_start)
        if ids is None:
            ids = days[day_start] = DayIds()
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
            ids = DayIds()  # replaced by the first trade's day
        else:
            day_start, day_end, ids = current
        venues = self._venues
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
                venue = None if trade.trfi else venues.get(trade.x)
                if venue is None:
                    venue = self._venue(trade)
                # packed_key(venue, i), inlined: this runs once a trade in every builder
                if (
                    venue < _VENUES
                    and i.isdigit()
                    and len(i) <= _DIGITS
                    and i.isascii()
                    and (i[0] != "0" or len(i) == 1)
                ):
                    key = (venue << _VENUE_SHIFT) | int(i)
                    recent = ids.recent
                    new = key not in recent and not (
                        key <= ids.packed_max.get(venue, -1) and ids.packed(key)
                    )
                    if new:
                        recent.add(key)
                        if len(recent) >= PACK_AT:
                            ids.pack()
                else:
                    new = ids.add_other(venue, i)
                if not new:
                    self.duplicates += 1
                    if out is None:
                        out = list(trades[:index])
                    continue
            if out is not None:
                out.append(trade)
        return trades if out is None else out

    def seen(self, trade: Trade) -> bool:
        """True when ``trade``'s identity was seen (without remembering it)."""
        days = self._seen.get(trade.sym)
        if not days or not trade.i:
            return False
        ids = days.get(day_bounds(trade.t)[0])
        return ids is not None and ids.has(self._venue(trade), trade.i)

    def remember(self, trades: Iterable[Trade]) -> None:
        """Note identities seen elsewhere (trades read back from a stream)."""
        before = self.duplicates
        for trade in trades:
            self.fresh(trade.sym, (trade,))
        self.duplicates = before

    def held(self) -> int:
        """Identities held, over every symbol and day."""
        return sum(len(ids) for days in self._seen.values() for ids in days.values())
