"""One identity per trade: the vendor's, kept end to end.

Polygon's trade id ``i`` is unique per ticker, exchange and TRF within a day (tick files use
the line number, unique per symbol and day), so a trade's identity within its symbol is
``(day, exchange, TRF, i)``. ``TradeIds`` remembers the identities seen per symbol and drops
a trade seen before, wherever it comes from (a reconnect overlap, a re-read, a backfill over
live data, a duplicate record): for a horizon of the feed's time after it arrived (a live
service's memory stays bounded), or, without one, for the last ``keep_days`` New York days
(the daily proof counts every duplicate of its day). A trade without an id cannot be told
apart from another and always passes.

Identities are held compactly, because a day or a horizon holds millions of them: an
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
_FOREVER = 1 << 62
"""A generation's end when there is no horizon (past any epoch ms)."""


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
    """The identities seen per symbol and day; see the module docstring.

    ``horizon_ms`` (0: no horizon) bounds how long an identity is remembered, in the feed's
    time: identities are kept in generations of half the horizon by when they arrived (the
    newest trade time seen so far), and a generation is forgotten once the feed has moved a
    whole horizon past its end. So a trade sent again within ``horizon_ms`` of feed time of its
    first copy is dropped, whatever its own time (a backfilled trade of an hour ago is
    remembered from its arrival), and memory holds one to one and a half horizons of trades
    instead of whole days. Without a horizon a symbol-day's identities are kept for the last
    ``keep_days`` New York days.
    """

    def __init__(self, keep_days: int = 2, horizon_ms: int = 0) -> None:
        if horizon_ms < 0:
            raise ValueError(f"horizon_ms must be 0 (none) or positive, not {horizon_ms}")
        self.keep_days = keep_days
        self.horizon_ms = horizon_ms
        self._span = (horizon_ms + 1) // 2
        """A generation's length in feed time (0 without a horizon)."""
        # symbol -> {day start -> identities}, of the current generation
        self._seen: dict[str, dict[int, DayIds]] = {}
        self._older: list[tuple[int, dict[str, dict[int, DayIds]]]] = []
        """The previous generations still within the horizon (number, identities), packed."""
        self._gen = 0
        self._gen_end = _FOREVER if not horizon_ms else 0
        """Feed time at which the next generation begins."""
        self._current: dict[str, tuple[int, int, DayIds, tuple[DayIds, ...]]] = {}
        """Per symbol: the day its last trade fell in ([start, end), its identities, and the
        same day's in older generations), so that a record of the same day costs no
        time-zone arithmetic."""
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

    def _advance(self, t: int) -> None:
        """The feed reached ``t``, past the current generation: start the next one and forget
        the generations a whole horizon behind."""
        number = t // self._span
        if self._seen:
            for days in self._seen.values():
                for ids in days.values():
                    ids.pack()
            self._older.append((self._gen, self._seen))
        self._seen = {}
        self._gen = number
        self._gen_end = (number + 1) * self._span
        # an identity of generation g arrived before (g + 1) * span and is kept until the
        # feed reaches (g + 3) * span: at least two spans, the horizon
        self._older = [(n, seen) for n, seen in self._older if n >= number - 2]
        self._current.clear()

    def _day(self, sym: str, day_start: int) -> tuple[DayIds, tuple[DayIds, ...]]:
        """The current generation's identities of ``sym``'s day (created if new), and that
        day's in the older generations."""
        days = self._seen.get(sym)
        if days is None:
            days = self._seen[sym] = {}
        ids = days.get(day_start)
        if ids is None:
            ids = days[day_start] = DayIds()
            if len(days) > self.keep_days:
                for old in sorted(days)[: len(days) - self.keep_days]:
                    del days[old]
        older = tuple(
            day for _, seen in self._older if (day := seen.get(sym, {}).get(day_start)) is not None
        )
        return ids, older

    def fresh(self, sym: str, trades: Sequence[TradeT]) -> Sequence[TradeT]:
        """The trades of ``trades`` (one symbol) not seen before, now remembered. Returns
        ``trades`` itself when none was a duplicate (the common case: no copy)."""
        out: list[TradeT] | None = None
        current = self._current.get(sym)
        older: tuple[DayIds, ...]
        if current is None:
            day_start = day_end = 0
            ids, older = DayIds(), ()  # replaced by the first trade's day
        else:
            day_start, day_end, ids, older = current
        gen_end = self._gen_end
        venues = self._venues
        for index, trade in enumerate(trades):
            t = trade.t
            if t >= gen_end:  # only with a horizon
                self._advance(t)
                gen_end = self._gen_end
                day_start = day_end = 0
            if t < day_start or t >= day_end:
                day_start, day_end = self._bounds
                if t < day_start or t >= day_end:
                    day_start, day_end = self._bounds = day_bounds(t)
                ids, older = self._day(sym, day_start)
                self._current[sym] = (day_start, day_end, ids, older)
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
                    if new and older:  # packed when their generation ended
                        for day in older:
                            if key <= day.packed_max.get(venue, -1) and day.packed(key):
                                new = False
                                break
                    if new:
                        recent.add(key)
                        if len(recent) >= PACK_AT:
                            ids.pack()
                else:
                    new = not any(day.has(venue, i) for day in older) and ids.add_other(venue, i)
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
        if not trade.i:
            return False
        day_start = day_bounds(trade.t)[0]
        venue = self._venue(trade)
        for _, seen in (*self._older, (self._gen, self._seen)):
            ids = seen.get(trade.sym, {}).get(day_start)
            if ids is not None and ids.has(venue, trade.i):
                return True
        return False

    def remember(self, trades: Iterable[Trade]) -> None:
        """Note identities seen elsewhere (trades read back from a stream)."""
        before = self.duplicates
        for trade in trades:
            self.fresh(trade.sym, (trade,))
        self.duplicates = before

    def held(self) -> int:
        """Identities held, over every symbol, day and generation."""
        return sum(
            len(ids)
            for _, seen in (*self._older, (self._gen, self._seen))
            for days in seen.values()
            for ids in days.values()
        )
