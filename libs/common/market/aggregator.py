"""The one bar-aggregation core: one symbol's trades in, its closed 1-minute bars (and
corrections) out.

The condition policies it applies live in ``libs.common.market.policies``; the per-minute
accumulator, the day of closed minutes and the bar derived from them in
``libs.common.market.accumulator``. This module decides when minutes open and close, what is
late, and what is published again.

Used by the bars service (ticks from Redis, or from Kafka in shadow) and the reconciler, which
rebuilds the source's bars from the Kafka ticks (``build.rebuilding_aggregator``), always one
aggregator per symbol. Semantics (details and
evidence in ``docs/bars.md``):

* an aggregator aggregates one symbol; a trade of another symbol is a programming error:
  ``add`` raises ``ValueError`` and the aggregator is left unchanged;
* minutes are half-open ``[t, t + 60 s)`` of event time (``Trade.t``, epoch ms);
* a **condition policy** decides, per trade, whether it counts for open/close, high/low and
  volume (``algoseek``, ``polygon``, ``none``); suspicious prints, auction prints and minutes
  without a price-eligible trade are part of the policy;
* open and close go by event time, ties by arrival order; high/low are extremes;
* ``vwap`` is over trades counted for both volume and high/low; ``trades`` counts every trade
  that updated the bar in any way;
* the **watermark** is the newest event time of the symbol's trades seen so far, moved on by
  the path's progress (:meth:`BarAggregator.advance_to`: everything up to the feed's time was
  delivered) or, with ``wall_clock=True``, by the wall time elapsed since it was seen
  (:meth:`BarAggregator.advance`); it never goes back and other symbols never move it. A
  minute closes when ``watermark >= endMs + grace_ms`` (when the feed says it is idle: once it
  has started), so a quiet symbol's bar closes even if no further trade arrives;
* a trade is **late** when its minute has already closed, or when its minute's deadline had
  already passed when the batch carrying it arrived. ``late_policy="revise"`` updates the bar
  and publishes it again with ``revision + 1``; ``"drop"`` drops the trade and counts it;
* closed minutes of the symbol's current New York day are kept for revisions (at most 1440);
  a trade for an older day is dropped and counted;
* every trade's shares end in one bar or one counted drop (``BarCounters``).

The hot path is a batch loop with local variables; the policy's classification of a trade is
cached per distinct condition tuple, so it costs one dict lookup.
"""

# The hot loops compare rather than call max()/min(): a comparison is cheaper than a call.

from __future__ import annotations

import heapq
from collections.abc import Sequence
from datetime import timedelta
from operator import attrgetter
from typing import Literal

from libs.common.market.accumulator import (
    BarCounters,
    Day,
    Minute,
    apply_trade,
    same_bar,
    with_revision,
)
from libs.common.market.policies import (
    BY_EXCHANGE,
    CLOSING_AUCTION,
    EVERYTHING,
    HIGH_LOW,
    IGNORED,
    OPEN_CLOSE,
    OPENING_AUCTION,
    VOLUME,
    ConditionPolicy,
    _PolicyBase,
    get_policy,
)
from libs.common.market.sessions import MINUTE_MS, ny_date, ny_midnight_ms, session_for
from libs.common.runtime.clock import SYSTEM_CLOCK, Clock
from libs.common.schemas import Bar, Trade

LatePolicy = Literal["revise", "drop"]

_SYMBOL = attrgetter("sym")


class BarAggregator:
    """Builds the 1-minute bars of one symbol under one condition policy.

    ``add`` takes the symbol's trades and returns the bars that closed, plus revisions;
    ``advance`` moves the watermark with wall time so a quiet symbol's bars close; ``flush``
    closes everything (end of input). A trade of another symbol is a programming error:
    ``add`` raises ``ValueError`` before changing anything. Bars carry ``seq=0``; the publisher
    assigns the sequence. Output order is deterministic for the same input.
    """

    def __init__(
        self,
        symbol: str,
        policy: _PolicyBase | ConditionPolicy | str = "algoseek",
        grace_ms: int = 2_000,
        late_policy: LatePolicy | str = "revise",
        clock: Clock = SYSTEM_CLOCK,
        *,
        wall_clock: bool = True,
    ) -> None:
        if isinstance(policy, str):
            policy = get_policy(policy)
        if late_policy not in ("revise", "drop"):
            raise ValueError(f"late_policy must be 'revise' or 'drop', not {late_policy!r}")
        if grace_ms < 0:
            raise ValueError("grace_ms must not be negative")
        self.symbol = symbol
        self.policy = policy
        self.grace_ms = grace_ms
        self.late_policy = late_policy
        self.clock = clock
        self.counters = BarCounters()
        self._revise = late_policy == "revise"
        self._fold = bool(policy.fold_unpriced_volume)
        self._tape = 0
        """The tape the symbol's trades carry (a hint for its primary listing)."""
        self._open: dict[int, Minute] = {}
        self.open_minutes = self._open
        """The open minutes by start (the same dict: read it, never change it): empty when every
        minute is closed, cheaper to test than ``open_since() is None`` on a hot path."""
        self.changes = 0
        """Grows whenever a closed minute changes (it closes, or a late trade revises it): what
        ``Day.take_changed`` would return is new since a caller last saw this number."""
        self._heap: list[int] = []
        """Starts of the open minutes: a minute's deadline grows with its start."""
        self._days: dict[int, Day] = {}
        self._day: Day | None = None
        self._fast: tuple[dict[tuple[int, ...], int], dict[tuple[int, ...], int]] = ({}, {})
        self._full: dict[tuple[tuple[int, ...], int, bool, bool, int], int] = {}
        self._dirty: dict[tuple[int, int], None] = {}
        """(day start, minute) of closed minutes changed by late trades, in arrival order."""
        self._max_event = -1
        self._max_event_wall = 0
        self._watermark = -1
        self._batch_watermark = -1
        self._wall_clock = wall_clock
        """False: only trades and ``advance_to`` (the path's progress) move the watermark."""

    # -- watermark --

    @property
    def watermark_ms(self) -> int:
        """The event-time watermark (0 before any trade)."""
        return max(self._watermark, 0)

    def _advance_watermark(self, now_ms: int) -> int:
        if self._max_event >= 0:
            candidate = self._max_event
            if self._wall_clock:
                candidate += max(0, now_ms - self._max_event_wall)
            if candidate > self._watermark:
                self._watermark = candidate
        return self._watermark

    def open_since(self) -> int | None:
        """Start of the earliest minute not yet closed (None when all are closed)."""
        return min(self._open) if self._open else None

    # -- public API --

    def add(
        self, trades: Sequence[Trade], now_ms: int | None = None, *, symbol: str | None = None
    ) -> list[Bar]:
        """Aggregate ``trades`` (arrival order); return the bars that closed and revisions.

        ``now_ms`` is the wall time (the clock's when omitted). Every trade must be of the
        aggregator's symbol, else ``ValueError`` and nothing changes. ``symbol`` is the caller's
        word that every trade is of that symbol (a ``TickBatch.sym``): then only it is compared
        with the aggregator's, not each trade.
        """
        if symbol is None:
            if not all(map(self.symbol.__eq__, map(_SYMBOL, trades))):
                other = next(trade.sym for trade in trades if trade.sym != self.symbol)
                raise ValueError(f"a trade of {other!r} given to the aggregator of {self.symbol!r}")
        elif symbol != self.symbol:
            raise ValueError(f"trades of {symbol!r} given to the aggregator of {self.symbol!r}")
        if self._wall_clock:
            now = self.clock.now_ms() if now_ms is None else now_ms
            self._batch_watermark = self._advance_watermark(now)
        else:  # only trades and advance_to move the watermark: no clock
            now = 0
            if self._max_event > self._watermark:
                self._watermark = self._max_event
            self._batch_watermark = self._watermark
        if trades:
            newest = self._add_trades(trades)
            self.counters.trades_in += len(trades)
            if newest > self._max_event:
                self._max_event = newest
                self._max_event_wall = now
        if self._wall_clock:
            return self._close_due(self._advance_watermark(now))
        if self._max_event > self._watermark:
            self._watermark = self._max_event
        heap = self._heap  # a batch that closes nothing (most) costs no call of _close_due
        if self._dirty or (heap and heap[0] + MINUTE_MS + self.grace_ms <= self._watermark):
            return self._close_due(self._watermark)
        return []

    def advance(self, now_ms: int | None = None) -> list[Bar]:
        """Move the watermark with wall time and return the bars that closed (and revisions)."""
        now = self.clock.now_ms() if now_ms is None else now_ms
        return self._close_due(self._advance_watermark(now))

    def advance_to(self, feed_time_ms: int, *, idle: bool = False) -> list[Bar]:
        """The path has delivered every trade of the symbol up to ``feed_time_ms`` (a progress
        mark): move the watermark there and return the bars that closed (and revisions).
        ``idle``: the feed has nothing more for now (the end of a replayed day), so every
        minute that started by then closes."""
        if feed_time_ms > self._watermark:
            self._watermark = feed_time_ms
        if idle:
            # nothing more is coming now: close every minute that started by then (a trade
            # that comes later for one of them is late: a revision, by the late policy)
            return self._close_due(self._watermark + MINUTE_MS + self.grace_ms)
        return self._close_due(self._watermark)

    def flush(self) -> list[Bar]:
        """End of input: close every open minute now and return the bars."""
        return self._close_due(None)

    # -- hot path --

    def _add_trades(self, trades: Sequence[Trade]) -> int:
        """The hot loop: ``trades`` into their minutes; returns the newest event time."""
        if trades[0].z:
            self._tape = trades[0].z
        fast = self._fast
        get = fast[1].get
        cur: Minute | None = None
        start = end = 0
        newest = -1
        ignored = excluded = 0
        o = h = lo = c = pv = 0.0
        ot = ct = v = pvv = n = 0
        for tr in trades:
            t = tr.t
            if t >= end or t < start:
                if cur is not None:
                    cur.store(o, ot, h, lo, c, ct, v, pv, pvv, n)
                cur = self._open_minute(t - t % MINUTE_MS)
                if cur is None:
                    start = end = 0
                    self._slow(tr, None)
                    continue
                start = cur.start
                end = start + MINUTE_MS
                get = fast[cur.regular].get
                o = cur.open
                ot = cur.open_t
                h = cur.high
                lo = cur.low
                c = cur.close
                ct = cur.close_t
                v = cur.volume
                pv = cur.pv
                pvv = cur.pv_volume
                n = cur.trades
            if t > newest:
                newest = t
            code = get(tr.c)
            if code == EVERYTHING and not tr.suspicious:
                p = tr.p
                s = tr.s
                v += s
                n += 1
                pv += p * s
                pvv += s
                if p > h:
                    h = p
                if p < lo:
                    lo = p
                if t >= ct:
                    c = p
                    ct = t
                if t < ot:
                    o = p
                    ot = t
            elif code == VOLUME and not tr.suspicious:
                v += tr.s
                n += 1
            elif code == IGNORED and not tr.suspicious:
                ignored += 1
                excluded += tr.s
            elif code is not None and code < OPENING_AUCTION and not tr.suspicious:
                n += 1
                if code & VOLUME:
                    v += tr.s
                else:
                    excluded += tr.s
                if code & HIGH_LOW:
                    p = tr.p
                    if p > h:
                        h = p
                    if p < lo:
                        lo = p
                    if code & VOLUME:
                        pv += p * tr.s
                        pvv += tr.s
                if code & OPEN_CLOSE:
                    p = tr.p
                    if t >= ct:
                        c = p
                        ct = t
                    if t < ot:
                        o = p
                        ot = t
            else:
                assert cur is not None  # a trade with no open minute was skipped above
                cur.store(o, ot, h, lo, c, ct, v, pv, pvv, n)
                self._slow(tr, cur)
                o = cur.open
                ot = cur.open_t
                h = cur.high
                lo = cur.low
                c = cur.close
                ct = cur.close_t
                v = cur.volume
                pv = cur.pv
                pvv = cur.pv_volume
                n = cur.trades
        if cur is not None:
            cur.store(o, ot, h, lo, c, ct, v, pv, pvv, n)
        self.counters.trades_ignored_by_policy += ignored
        self.counters.volume_excluded += excluded
        return newest

    def _day_of(self, minute: int) -> Day | None:
        day = self._day
        if day is not None and day.start <= minute < day.end:
            return day
        for candidate in self._days.values():
            if candidate.start <= minute < candidate.end:
                return candidate
        calendar_day = ny_date(minute)
        start = ny_midnight_ms(calendar_day)
        if day is not None and start < day.start:
            return None
        session = session_for(calendar_day)
        new = Day(
            start,
            ny_midnight_ms(calendar_day + timedelta(days=1)),
            session.open_ms,
            session.close_ms,
        )
        self._days[start] = new
        self._day = new
        if self.policy.needs_listing:
            self.policy.warm_listing(self.symbol, calendar_day)
        return new

    def _open_minute(self, minute: int) -> Minute | None:
        """The open accumulator of ``minute``, created if new; None if the trade is late."""
        acc = self._open.get(minute)
        if acc is not None:
            return acc
        if minute + MINUTE_MS + self.grace_ms <= self._batch_watermark:
            return None
        day = self._day_of(minute)
        if day is None or minute in day.closed:
            return None
        acc = self._open[minute] = Minute(minute, day)
        heapq.heappush(self._heap, minute)
        return acc

    def _target(self, minute: int) -> tuple[Minute | None, bool]:
        """(accumulator, is_late) of ``minute``; (None, True) if it can take no trade."""
        acc = self._open_minute(minute)
        if acc is not None:
            return acc, False
        day = self._day_of(minute)
        if day is None:
            return None, True
        acc = day.closed.get(minute)
        if acc is None:
            acc = Minute(minute, day)
        return acc, True

    def _code(self, tr: Trade, acc: Minute) -> int:
        conditions = tr.c if isinstance(tr.c, tuple) else tuple(tr.c)
        regular = acc.regular
        policy = self.policy
        fast = self._fast[regular]
        quick = fast.get(conditions)
        if quick is None:
            quick = fast[conditions] = (
                BY_EXCHANGE
                if policy.depends_on_exchange(conditions)
                else policy.code(conditions, 0, False, regular, 0)
            )
        primary = self._primary_of(acc.day) if quick == BY_EXCHANGE else 0
        key = (conditions, tr.x, tr.suspicious, regular, primary)
        code = self._full.get(key)
        if code is None:
            code = self._full[key] = policy.code(conditions, tr.x, tr.suspicious, regular, primary)
        return code

    def _primary_of(self, day: Day) -> int:
        """The symbol's primary listing exchange on ``day`` (asked once per day)."""
        primary = day.primary
        if primary is None:
            primary = day.primary = self.policy.primary_exchange(
                self.symbol, self._tape, ny_date(day.start)
            )
            if not primary:
                self.counters.primary_listing_unknown += 1
        return primary

    def _slow(self, tr: Trade, acc: Minute | None) -> None:
        """Everything the hot loop does not: policy misses, suspicious prints, auction prints
        and late trades. ``acc`` is the trade's open minute (None when late)."""
        t = tr.t
        minute = t - t % MINUTE_MS
        late = acc is None
        counters = self.counters
        if acc is None:
            acc, late = self._target(minute)
            if acc is None:
                counters.too_old_dropped += 1
                counters.volume_dropped += tr.s
                return
        code = self._code(tr, acc)
        if code & (OPENING_AUCTION | CLOSING_AUCTION):
            day = acc.day
            if code & OPENING_AUCTION:
                first = not day.opening_seen
                day.opening_seen = True
                if not first or not day.open_ms <= t < day.open_ms + MINUTE_MS:
                    counters.auction_prints_ignored += 1
                    counters.volume_excluded += tr.s
                    return
            else:
                first = not day.closing_seen
                day.closing_seen = True
                if not first:
                    counters.auction_prints_ignored += 1
                    counters.volume_excluded += tr.s
                    return
                acc, late = self._target(day.close_ms - MINUTE_MS)
                if acc is None:
                    counters.too_old_dropped += 1
                    counters.volume_dropped += tr.s
                    return
        if late and not self._revise:
            counters.late_dropped += 1
            counters.volume_dropped += tr.s
            return
        if code == IGNORED:
            counters.trades_ignored_by_policy += 1
            counters.volume_excluded += tr.s
            return
        if not code & (VOLUME | OPENING_AUCTION | CLOSING_AUCTION):
            counters.volume_excluded += tr.s
        if not late:
            apply_trade(acc, tr, code)
            return
        counters.late_revised += 1
        day = acc.day
        closed = acc.start in day.closed
        if closed:
            day.forget(acc)
        apply_trade(acc, tr, code)
        if closed:
            day.count(acc)
        else:
            day.close(acc)
        day.changed.add(acc.start)
        self.changes += 1
        day.settle(self._fold, self.counters)
        self._dirty[(day.start, acc.start)] = None

    # -- closing and publishing --

    def _close_due(self, watermark: int | None) -> list[Bar]:
        out: list[Bar] = []
        heap = self._heap
        open_minutes = self._open
        span = MINUTE_MS + self.grace_ms  # from a minute's start to its deadline
        while heap and (watermark is None or heap[0] + span <= watermark):
            minute = heapq.heappop(heap)
            acc = open_minutes.pop(minute, None)
            if acc is None:
                continue
            day = acc.day
            day.close(acc)
            self.changes += 1
            if not acc.priced and acc.trades:
                if self._fold:
                    self.counters.unpriced_minutes_folded += 1
                else:
                    self.counters.unpriced_minutes_dropped += 1
            # the drops follow the day's closed minutes (a first priced one takes shares back)
            day.settle(self._fold, self.counters)
            self._publish_closed(day, acc, out)
            self._prune()
        if self._dirty:
            dirty = self._dirty
            self._dirty = {}
            for day_start, minute in dirty:
                dirty_day = self._days.get(day_start)
                if dirty_day is not None:
                    self._publish_around(dirty_day, minute, out)
        return out

    def _prune(self) -> None:
        days = self._days
        if len(days) < 2 or self._day is None:
            return
        newest = self._day.start
        for start in [start for start in days if start < newest]:
            end = days[start].end
            if not any(minute < end for minute in self._open):
                del days[start]

    def _publish_closed(self, day: Day, acc: Minute, out: list[Bar]) -> None:
        """Publish what closing ``acc`` changes: its own bar, or (folding policies) the bar its
        volume folds into; a neighbour only when it closed out of order."""
        if not self._fold or (acc.priced and day.order[-1] == acc.start):
            self._publish(day, acc.start, out)
        else:
            self._publish_around(day, acc.start, out)

    def _publish_around(self, day: Day, minute: int, out: list[Bar]) -> None:
        if not self._fold:
            self._publish(day, minute, out)
            return
        before, after = day.priced_neighbours(minute)
        if before is not None:
            self._publish(day, before, out)
        self._publish(day, minute, out)
        if after is not None:
            self._publish(day, after, out)

    def _publish(self, day: Day, minute: int, out: list[Bar]) -> None:
        bar = day.bar(self.symbol, minute, self._fold)
        if bar is None:
            return
        old = day.published.get(minute)
        if old is None:
            self.counters.bars_published += 1
        elif same_bar(old, bar):
            return
        elif not self._revise:
            self.counters.revisions_suppressed += 1
            return
        else:
            bar = with_revision(bar, old.revision + 1)
            self.counters.revisions_published += 1
        day.published[minute] = bar
        out.append(bar)

    # -- persistence (a restart keeps the day's closed minutes) --

    def retained_days(self) -> list[Day]:
        """The days whose closed minutes are kept (for revisions), oldest first."""
        return [self._days[start] for start in sorted(self._days)]

    def day_for(self, minute: int) -> Day | None:
        """The day of ``minute``, created if new (None: older than the current day)."""
        return self._day_of(minute)

    # -- introspection --

    def published(self) -> dict[int, Bar]:
        """The latest published version of each bar of the retained days, by minute start."""
        out: dict[int, Bar] = {}
        for day in self._days.values():
            out.update(day.published)
        return dict(sorted(out.items()))


__all__ = [
    "BarAggregator",
    "BarCounters",
    "LatePolicy",
]
