"""The bar core's small parts: one symbol-minute's accumulator, the New York day that keeps a
symbol's closed minutes, and the bar derived from them.

nautilus_trader keeps its small ``BarBuilder`` apart from the aggregator that decides when a
bar closes; so does tickmesh. This module knows how one trade updates one minute
(:func:`apply_trade`) and how a closed minute, with the price-less minutes around it under a
folding policy, becomes a ``Bar`` (:meth:`Day.bar`). When minutes open and close, what is
late, the watermark and revisions belong to ``libs.common.market.aggregator``, whose hot loop
inlines :func:`apply_trade` for the common codes (change the two together).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import msgspec

from libs.common.market.policies import (
    CLOSING_AUCTION,
    EVERYTHING,
    HIGH_LOW,
    OPEN_CLOSE,
    OPENING_AUCTION,
    VOLUME,
)
from libs.common.market.sessions import MINUTE_MS, ts_et
from libs.common.schemas import Bar, Trade

NO_OPEN_TIME = 1 << 62
"""``Minute.open_t`` before any open-eligible trade: later than every event time."""
FORCED_OPEN_TIME = -(1 << 62)
"""``Minute.open_t`` once the opening auction print set the open: no trade can displace it."""


@dataclass
class BarCounters:
    """What the aggregator did, for metrics and reports."""

    trades_in: int = 0
    trades_ignored_by_policy: int = 0
    auction_prints_ignored: int = 0
    late_revised: int = 0
    late_dropped: int = 0
    too_old_dropped: int = 0
    bars_published: int = 0
    revisions_published: int = 0
    revisions_suppressed: int = 0
    unpriced_minutes_folded: int = 0
    unpriced_minutes_dropped: int = 0
    unpriced_volume_dropped: int = 0
    """Shares of closed minutes without a price that are in no bar: every such minute under a
    policy that does not fold, a day without any priced minute under one that does. Net: a
    late trade that prices such a minute takes its shares back out."""
    unpriced_trades_dropped: int = 0
    """The trades of those shares (net, like ``unpriced_volume_dropped``)."""
    volume_excluded: int = 0
    """Shares of trades the policy counts for no volume (ignored trades, auction prints after
    the first, trades that count for price only)."""
    volume_dropped: int = 0
    """Shares of trades dropped as late (``late_dropped``) or too old (``too_old_dropped``)."""
    primary_listing_unknown: int = 0
    """Days of the symbol whose primary listing exchange the reference data did not give (no
    auction print is recognised on them)."""

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)


class Day:
    """One New York day of one symbol: its session and its closed minutes."""

    __slots__ = (
        "changed",
        "close_ms",
        "closed",
        "closing_seen",
        "dropped_trades",
        "dropped_volume",
        "end",
        "open_ms",
        "opening_seen",
        "order",
        "priced_minutes",
        "primary",
        "published",
        "start",
        "unpriced_trades",
        "unpriced_volume",
    )

    def __init__(self, start: int, end: int, open_ms: int, close_ms: int) -> None:
        self.start = start
        self.end = end
        self.open_ms = open_ms
        self.close_ms = close_ms
        self.closed: dict[int, Minute] = {}
        self.order: list[int] = []
        """The starts of the closed minutes, ascending."""
        self.published: dict[int, Bar] = {}
        """The latest published version of each bar of the day, by minute start."""
        self.opening_seen = False
        self.closing_seen = False
        self.primary: int | None = None
        """The symbol's primary listing exchange this day (asked when first needed)."""
        self.priced_minutes = 0
        """Closed minutes with a price (a bar)."""
        self.unpriced_volume = 0
        self.unpriced_trades = 0
        """Shares and trades of the closed minutes without a price."""
        self.dropped_volume = 0
        self.dropped_trades = 0
        """What the aggregator's counters hold as dropped for this day (``settle``)."""
        self.changed: set[int] = set()
        """Closed minutes changed (closed, or revised by a late trade) since ``take_changed``."""

    def close(self, acc: Minute) -> None:
        """Keep ``acc`` (not yet kept) among the day's closed minutes."""
        self.closed[acc.start] = acc
        insort(self.order, acc.start)
        self.changed.add(acc.start)
        self.count(acc)

    def count(self, acc: Minute) -> None:
        """Add closed ``acc`` to the day's tallies (priced minutes, unpriced shares)."""
        if acc.priced:
            self.priced_minutes += 1
        else:
            self.unpriced_volume += acc.volume
            self.unpriced_trades += acc.trades

    def forget(self, acc: Minute) -> None:
        """Take closed ``acc`` out of the tallies before a late trade changes it."""
        if acc.priced:
            self.priced_minutes -= 1
        else:
            self.unpriced_volume -= acc.volume
            self.unpriced_trades -= acc.trades

    def unplaced(self, fold: bool) -> tuple[int, int]:
        """Shares and trades of the closed minutes that are in no bar: without folding, every
        unpriced minute's; with folding, only when no closed minute of the day has a price."""
        if fold and self.priced_minutes:
            return 0, 0
        return self.unpriced_volume, self.unpriced_trades

    def settle(self, fold: bool, counters: BarCounters) -> None:
        """Bring ``counters``' unpriced drops up to date with the day's closed minutes."""
        volume, trades = self.unplaced(fold)
        counters.unpriced_volume_dropped += volume - self.dropped_volume
        counters.unpriced_trades_dropped += trades - self.dropped_trades
        self.dropped_volume = volume
        self.dropped_trades = trades

    def take_changed(self) -> list[list[float]]:
        """The state of every closed minute changed since the last call
        (:meth:`Minute.state`, with its published revision), and forget them."""
        if not self.changed:
            return []
        published = self.published
        out = []
        for minute in sorted(self.changed):
            bar = published.get(minute)
            out.append(self.closed[minute].state(-1 if bar is None else bar.revision))
        self.changed = set()
        return out

    def restore(
        self,
        symbol: str,
        states: Iterable[Sequence[float]],
        *,
        fold: bool,
        opening_seen: bool = False,
        closing_seen: bool = False,
    ) -> None:
        """Take back closed minutes saved by :meth:`take_changed` (after a restart), with the
        bars published of them, so that a late trade revises them as if nothing happened."""
        self.opening_seen = self.opening_seen or opening_seen
        self.closing_seen = self.closing_seen or closing_seen
        revisions: dict[int, int] = {}
        for state in states:
            acc = Minute.from_state(state, self)
            if acc.start in self.closed:
                self.forget(self.closed[acc.start])
                self.closed[acc.start] = acc
                self.count(acc)
            else:
                self.close(acc)
            revisions[acc.start] = int(state[11])
        for minute, revision in revisions.items():
            bar = self.bar(symbol, minute, fold) if revision >= 0 else None
            if bar is not None:
                self.published[minute] = with_revision(bar, revision)
        self.changed = set()
        # what they hold in no bar was counted by the process that saw their trades
        self.dropped_volume, self.dropped_trades = self.unplaced(fold)

    def priced_neighbours(self, minute: int) -> tuple[int | None, int | None]:
        """The nearest closed minutes before and after closed ``minute`` that have a price."""
        order = self.order
        closed = self.closed
        index = bisect_left(order, minute)
        before = index - 1
        while before >= 0 and not closed[order[before]].priced:
            before -= 1
        after = index + 1
        while after < len(order) and not closed[order[after]].priced:
            after += 1
        return (
            order[before] if before >= 0 else None,
            order[after] if after < len(order) else None,
        )

    def bar(self, symbol: str, minute: int, fold: bool) -> Bar | None:
        """The bar of closed ``minute`` (``seq`` and ``revision`` 0), None when it has no price.

        ``fold``: the volume and trades of the price-less minutes after it (up to the next
        priced one) are its own, and so are those before it when no earlier minute of the day
        has a price.
        """
        acc = self.closed[minute]
        if not acc.priced:
            return None
        volume = acc.volume
        trades = acc.trades
        if fold:
            order = self.order
            closed = self.closed
            index = bisect_left(order, minute)
            after = index + 1
            while after < len(order) and not closed[order[after]].priced:
                volume += closed[order[after]].volume
                trades += closed[order[after]].trades
                after += 1
            before = index - 1
            carried_volume = carried_trades = 0
            while before >= 0 and not closed[order[before]].priced:
                carried_volume += closed[order[before]].volume
                carried_trades += closed[order[before]].trades
                before -= 1
            if before < 0:
                volume += carried_volume
                trades += carried_trades
        high = max(acc.high, acc.open, acc.close)
        low = min(acc.low, acc.open, acc.close)
        vwap = round(acc.pv / acc.pv_volume, 6) if acc.pv_volume else acc.close
        return Bar(
            seq=0,
            symbol=symbol,
            tsET=ts_et(minute),
            barId=(minute - self.open_ms) // MINUTE_MS + 1,
            open=acc.open,
            high=high,
            low=low,
            close=acc.close,
            volume=volume,
            vwap=vwap,
            trades=trades,
            startMs=minute,
            endMs=minute + MINUTE_MS,
            revision=0,
        )


class Minute:
    """Accumulator of one symbol-minute: running prices with their event times, volume and the
    sums behind the vwap."""

    __slots__ = (
        "close",
        "close_t",
        "day",
        "high",
        "low",
        "open",
        "open_t",
        "pv",
        "pv_volume",
        "regular",
        "start",
        "trades",
        "volume",
    )

    def __init__(self, start: int, day: Day) -> None:
        self.start = start
        self.day = day
        self.regular = day.open_ms <= start < day.close_ms
        self.open = 0.0
        self.open_t = NO_OPEN_TIME
        self.high = float("-inf")
        self.low = float("inf")
        self.close = 0.0
        self.close_t = -1
        self.volume = 0
        self.pv = 0.0
        self.pv_volume = 0
        self.trades = 0

    def store(
        self,
        o: float,
        ot: int,
        h: float,
        lo: float,
        c: float,
        ct: int,
        v: int,
        pv: float,
        pvv: int,
        n: int,
    ) -> None:
        """Write back the running values the aggregator's hot loop kept in local variables."""
        self.open = o
        self.open_t = ot
        self.high = h
        self.low = lo
        self.close = c
        self.close_t = ct
        self.volume = v
        self.pv = pv
        self.pv_volume = pvv
        self.trades = n

    @property
    def priced(self) -> bool:
        """Whether an open/close-eligible trade reached the minute (it has a bar)."""
        return self.close_t >= 0

    def state(self, revision: int) -> list[float]:
        """Everything the minute holds, as plain numbers (``revision``: of its bar, -1 when
        none was published); :meth:`from_state` reads it back."""
        return [
            self.start,
            self.open,
            self.open_t,
            self.high,
            self.low,
            self.close,
            self.close_t,
            self.volume,
            self.pv,
            self.pv_volume,
            self.trades,
            revision,
        ]

    @classmethod
    def from_state(cls, state: Sequence[float], day: Day) -> Minute:
        """The minute saved by :meth:`state`, in ``day``."""
        acc = cls(int(state[0]), day)
        acc.open = float(state[1])
        acc.open_t = int(state[2])
        acc.high = float(state[3])
        acc.low = float(state[4])
        acc.close = float(state[5])
        acc.close_t = int(state[6])
        acc.volume = int(state[7])
        acc.pv = float(state[8])
        acc.pv_volume = int(state[9])
        acc.trades = int(state[10])
        return acc


def apply_trade(acc: Minute, tr: Trade, code: int) -> None:
    """One trade with classification ``code`` into ``acc`` (the slow path's version of the
    aggregator's hot loop; an auction print counts for everything)."""
    t = tr.t
    p = tr.p
    s = tr.s
    auction = code & (OPENING_AUCTION | CLOSING_AUCTION)
    if auction:
        code = EVERYTHING
    if code:
        acc.trades += 1
    if code & VOLUME:
        acc.volume += s
    if code & HIGH_LOW:
        if p > acc.high:
            acc.high = p
        if p < acc.low:
            acc.low = p
        if code & VOLUME:
            acc.pv += p * s
            acc.pv_volume += s
    if code & OPEN_CLOSE:
        if t >= acc.close_t:
            acc.close = p
            acc.close_t = t
        if t < acc.open_t:
            acc.open = p
            acc.open_t = t
    if auction == OPENING_AUCTION:
        acc.open = p
        acc.open_t = FORCED_OPEN_TIME


def same_bar(a: Bar, b: Bar) -> bool:
    """Whether two versions of a bar carry the same values (a revision would change nothing)."""
    return (
        a.open == b.open
        and a.high == b.high
        and a.low == b.low
        and a.close == b.close
        and a.volume == b.volume
        and a.vwap == b.vwap
        and a.trades == b.trades
    )


def with_revision(bar: Bar, revision: int) -> Bar:
    """``bar`` as revision ``revision`` (bars are immutable once published)."""
    return msgspec.structs.replace(bar, revision=revision)


__all__ = [
    "FORCED_OPEN_TIME",
    "NO_OPEN_TIME",
    "BarCounters",
    "Day",
    "Minute",
    "apply_trade",
    "same_bar",
    "with_revision",
]
