"""The one bar-aggregation core: trades in, closed 1-minute bars (and corrections) out.

The condition policies it applies live in ``libs.common.market.policies``; the per-minute
accumulator, the day of closed minutes and the bar derived from them in
``libs.common.market.accumulator``.

Used three ways: the bars service reading ticks from Redis, the same service reading ticks
from Kafka (shadow), and the offline backfill. Semantics (details and evidence in
``docs/bars.md``):

* minutes are half-open ``[t, t + 60 s)`` of event time (``Trade.t``, epoch ms);
* a **condition policy** decides, per trade, whether it counts for open/close, high/low and
  volume (``algoseek``, ``polygon``, ``none``); suspicious prints, auction prints and minutes
  without a price-eligible trade are part of the policy;
* open and close go by event time, ties by arrival order; high/low are extremes;
* ``vwap`` is over trades counted for both volume and high/low; ``trades`` counts every trade
  that updated the bar in any way;
* the **watermark** is the newest event time seen by this aggregator (any symbol), advanced by
  the wall time elapsed since it was seen, and never goes back; a minute closes when
  ``watermark >= endMs + grace_ms``, so a quiet symbol's bar closes within the grace period
  after its minute even if no further trade arrives (call :meth:`BarAggregator.advance`);
* a trade is **late** when its minute has already closed, or when its minute's deadline had
  already passed when the batch carrying it arrived. ``late_policy="revise"`` updates the bar
  and publishes it again with ``revision + 1``; ``"drop"`` drops the trade and counts it;
* closed minutes of each symbol's current New York day are kept for revisions (at most 1440
  per symbol); a trade for an older day is dropped and counted.

The hot path is a per-symbol batch loop with local variables; the policy's classification of a
trade is cached per distinct condition tuple, so it costs one dict lookup.
"""

# The hot loops compare rather than call max()/min(): a comparison is cheaper than a call.

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from itertools import groupby
from operator import attrgetter
from typing import Literal

from libs.common.market.accumulator import Day, Minute, apply_trade, same_bar, with_revision
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
from libs.common.runtime.clock import SYSTEM_CLOCK, Clock, ManualClock
from libs.common.schemas import Bar, Trade

LatePolicy = Literal["revise", "drop"]

_SYMBOL = attrgetter("sym")


# --- state ------------------------------------------------------------------------------------


class _Symbol:
    """One symbol's open minutes and retained days."""

    __slots__ = ("day", "days", "open", "primary", "sym")

    def __init__(self, sym: str, primary: int) -> None:
        self.sym = sym
        self.primary = primary
        self.open: dict[int, Minute] = {}
        self.days: dict[int, Day] = {}
        self.day: Day | None = None


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

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)


# --- the aggregator ---------------------------------------------------------------------------


class BarAggregator:
    """Builds 1-minute bars for many symbols under one condition policy.

    ``add`` takes trades (any symbols; a batch of one symbol is the fast path) and returns the
    bars that closed, plus revisions; ``advance`` moves the watermark with wall time so quiet
    symbols' bars close; ``flush`` closes everything (end of input). Bars carry ``seq=0``; the
    publisher assigns the sequence. Output order is deterministic for the same input.
    """

    def __init__(
        self,
        policy: _PolicyBase | ConditionPolicy | str = "algoseek",
        grace_ms: int = 2_000,
        late_policy: LatePolicy | str = "revise",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if isinstance(policy, str):
            policy = get_policy(policy)
        if late_policy not in ("revise", "drop"):
            raise ValueError(f"late_policy must be 'revise' or 'drop', not {late_policy!r}")
        if grace_ms < 0:
            raise ValueError("grace_ms must not be negative")
        self.policy = policy
        self.grace_ms = grace_ms
        self.late_policy = late_policy
        self.clock = clock
        self.counters = BarCounters()
        self._revise = late_policy == "revise"
        self._fold = bool(policy.fold_unpriced_volume)
        self._symbols: dict[str, _Symbol] = {}
        self._heap: list[tuple[int, str, int]] = []
        self._fast: tuple[dict[tuple[int, ...], int], dict[tuple[int, ...], int]] = ({}, {})
        self._full: dict[tuple[tuple[int, ...], int, bool, bool, int], int] = {}
        self._dirty: dict[tuple[str, int, int], None] = {}
        self._max_event = -1
        self._max_event_wall = 0
        self._watermark = -1
        self._batch_watermark = -1

    # -- watermark --

    @property
    def watermark_ms(self) -> int:
        """The event-time watermark (0 before any trade)."""
        return max(self._watermark, 0)

    def _advance_watermark(self, now_ms: int) -> int:
        if self._max_event >= 0:
            candidate = self._max_event + max(0, now_ms - self._max_event_wall)
            if candidate > self._watermark:
                self._watermark = candidate
        return self._watermark

    def open_since(self, symbol: str) -> int | None:
        """Start of ``symbol``'s earliest minute not yet closed (None when all are closed)."""
        state = self._symbols.get(symbol)
        if state is None or not state.open:
            return None
        return min(state.open)

    # -- public API --

    def add(
        self, trades: Sequence[Trade], now_ms: int | None = None, *, symbol: str | None = None
    ) -> list[Bar]:
        """Aggregate ``trades`` (arrival order); return the bars that closed and revisions.

        ``now_ms`` is the wall time (the clock's when omitted). Pass ``symbol`` when the caller
        knows every trade is of that symbol (a feed frame, a tick batch) to skip the check.
        """
        now = self.clock.now_ms() if now_ms is None else now_ms
        self._batch_watermark = self._advance_watermark(now)
        if trades:
            if symbol is None:
                first = trades[0].sym
                if all(map(first.__eq__, map(_SYMBOL, trades))):
                    groups: Sequence[tuple[str, Sequence[Trade]]] = ((first, trades),)
                else:
                    groups = [(sym, list(group)) for sym, group in groupby(trades, _SYMBOL)]
            else:
                groups = ((symbol, trades),)
            newest = -1
            for sym, group in groups:
                group_newest = self._add_symbol(sym, group)
                if group_newest > newest:
                    newest = group_newest
            self.counters.trades_in += len(trades)
            if newest > self._max_event:
                self._max_event = newest
                self._max_event_wall = now
        return self._close_due(self._advance_watermark(now))

    def advance(self, now_ms: int | None = None) -> list[Bar]:
        """Move the watermark with wall time and return the bars that closed (and revisions)."""
        now = self.clock.now_ms() if now_ms is None else now_ms
        return self._close_due(self._advance_watermark(now))

    def flush(self) -> list[Bar]:
        """End of input: close every open minute now and return the bars."""
        return self._close_due(None)

    # -- hot path --

    def _state(self, sym: str, first: Trade) -> _Symbol:
        state = self._symbols.get(sym)
        if state is None:
            state = self._symbols[sym] = _Symbol(sym, self.policy.primary_exchange(sym, first.z))
        return state

    def _add_symbol(self, sym: str, trades: Sequence[Trade]) -> int:
        state = self._state(sym, trades[0])
        fast = self._fast
        get = fast[1].get
        cur: Minute | None = None
        start = end = 0
        newest = -1
        ignored = 0
        o = h = lo = c = pv = 0.0
        ot = ct = v = pvv = n = 0
        for tr in trades:
            t = tr.t
            if t >= end or t < start:
                if cur is not None:
                    cur.open = o
                    cur.open_t = ot
                    cur.high = h
                    cur.low = lo
                    cur.close = c
                    cur.close_t = ct
                    cur.volume = v
                    cur.pv = pv
                    cur.pv_volume = pvv
                    cur.trades = n
                cur = self._open_minute(state, t - t % MINUTE_MS)
                if cur is None:
                    start = end = 0
                    self._slow(state, tr, None)
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
            elif code is not None and code < OPENING_AUCTION and not tr.suspicious:
                n += 1
                if code & VOLUME:
                    v += tr.s
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
                cur.open = o
                cur.open_t = ot
                cur.high = h
                cur.low = lo
                cur.close = c
                cur.close_t = ct
                cur.volume = v
                cur.pv = pv
                cur.pv_volume = pvv
                cur.trades = n
                self._slow(state, tr, cur)
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
            cur.open = o
            cur.open_t = ot
            cur.high = h
            cur.low = lo
            cur.close = c
            cur.close_t = ct
            cur.volume = v
            cur.pv = pv
            cur.pv_volume = pvv
            cur.trades = n
        self.counters.trades_ignored_by_policy += ignored
        return newest

    def _day_of(self, state: _Symbol, minute: int) -> Day | None:
        day = state.day
        if day is not None and day.start <= minute < day.end:
            return day
        for candidate in state.days.values():
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
        state.days[start] = new
        state.day = new
        return new

    def _open_minute(self, state: _Symbol, minute: int) -> Minute | None:
        """The open accumulator of ``minute``, created if new; None if the trade is late."""
        acc = state.open.get(minute)
        if acc is not None:
            return acc
        deadline = minute + MINUTE_MS + self.grace_ms
        if deadline <= self._batch_watermark:
            return None
        day = self._day_of(state, minute)
        if day is None or minute in day.closed:
            return None
        acc = state.open[minute] = Minute(minute, day)
        heapq.heappush(self._heap, (deadline, state.sym, minute))
        return acc

    def _target(self, state: _Symbol, minute: int) -> tuple[Minute | None, bool]:
        """(accumulator, is_late) of ``minute``; (None, True) if it can take no trade."""
        acc = self._open_minute(state, minute)
        if acc is not None:
            return acc, False
        day = self._day_of(state, minute)
        if day is None:
            return None, True
        acc = day.closed.get(minute)
        if acc is None:
            acc = Minute(minute, day)
        return acc, True

    def _code(self, state: _Symbol, tr: Trade, regular: bool) -> int:
        conditions = tr.c if isinstance(tr.c, tuple) else tuple(tr.c)
        key = (conditions, tr.x, tr.suspicious, regular, state.primary)
        code = self._full.get(key)
        if code is None:
            policy = self.policy
            code = self._full[key] = policy.code(
                conditions, tr.x, tr.suspicious, regular, state.primary
            )
            fast = self._fast[regular]
            if conditions not in fast:
                fast[conditions] = (
                    BY_EXCHANGE
                    if policy.depends_on_exchange(conditions)
                    else policy.code(conditions, 0, False, regular, 0)
                )
        return code

    def _slow(self, state: _Symbol, tr: Trade, acc: Minute | None) -> None:
        """Everything the hot loop does not: policy misses, suspicious prints, auction prints
        and late trades. ``acc`` is the trade's open minute (None when late)."""
        t = tr.t
        minute = t - t % MINUTE_MS
        late = acc is None
        if acc is None:
            acc, late = self._target(state, minute)
            if acc is None:
                self.counters.too_old_dropped += 1
                return
        code = self._code(state, tr, acc.regular)
        if code & (OPENING_AUCTION | CLOSING_AUCTION):
            day = acc.day
            if code & OPENING_AUCTION:
                first = not day.opening_seen
                day.opening_seen = True
                if not first or not day.open_ms <= t < day.open_ms + MINUTE_MS:
                    self.counters.auction_prints_ignored += 1
                    return
            else:
                first = not day.closing_seen
                day.closing_seen = True
                if not first:
                    self.counters.auction_prints_ignored += 1
                    return
                acc, late = self._target(state, day.close_ms - MINUTE_MS)
                if acc is None:
                    self.counters.too_old_dropped += 1
                    return
        if late and not self._revise:
            self.counters.late_dropped += 1
            return
        if code == IGNORED:
            self.counters.trades_ignored_by_policy += 1
            return
        apply_trade(acc, tr, code)
        if late:
            self.counters.late_revised += 1
            day = acc.day
            if acc.start not in day.closed:
                day.close(acc)
            self._dirty[(state.sym, day.start, acc.start)] = None

    # -- closing and publishing --

    def _close_due(self, watermark: int | None) -> list[Bar]:
        out: list[Bar] = []
        heap = self._heap
        symbols = self._symbols
        while heap and (watermark is None or heap[0][0] <= watermark):
            _deadline, sym, minute = heapq.heappop(heap)
            state = symbols[sym]
            acc = state.open.pop(minute, None)
            if acc is None:
                continue
            day = acc.day
            day.close(acc)
            if not acc.priced and acc.volume:
                if self._fold:
                    self.counters.unpriced_minutes_folded += 1
                else:
                    self.counters.unpriced_minutes_dropped += 1
                    self.counters.unpriced_volume_dropped += acc.volume
            self._publish_closed(state, day, acc, out)
            self._prune(state)
        if self._dirty:
            dirty = self._dirty
            self._dirty = {}
            for sym, day_start, minute in dirty:
                state = symbols[sym]
                dirty_day = state.days.get(day_start)
                if dirty_day is not None:
                    self._publish_around(state, dirty_day, minute, out)
        return out

    def _prune(self, state: _Symbol) -> None:
        if len(state.days) < 2 or state.day is None:
            return
        newest = state.day.start
        for start in [start for start in state.days if start < newest]:
            end = state.days[start].end
            if not any(minute < end for minute in state.open):
                del state.days[start]

    def _publish_closed(self, state: _Symbol, day: Day, acc: Minute, out: list[Bar]) -> None:
        """Publish what closing ``acc`` changes: its own bar, or (folding policies) the bar its
        volume folds into; a neighbour only when it closed out of order."""
        if not self._fold or (acc.priced and day.order[-1] == acc.start):
            self._publish(state, day, acc.start, out)
        else:
            self._publish_around(state, day, acc.start, out)

    def _publish_around(self, state: _Symbol, day: Day, minute: int, out: list[Bar]) -> None:
        if not self._fold:
            self._publish(state, day, minute, out)
            return
        before, after = day.priced_neighbours(minute)
        if before is not None:
            self._publish(state, day, before, out)
        self._publish(state, day, minute, out)
        if after is not None:
            self._publish(state, day, after, out)

    def _publish(self, state: _Symbol, day: Day, minute: int, out: list[Bar]) -> None:
        bar = day.bar(state.sym, minute, self._fold)
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

    # -- introspection --

    def symbols(self) -> list[str]:
        """Symbols seen so far."""
        return sorted(self._symbols)

    def published(self, symbol: str) -> dict[int, Bar]:
        """The latest published version of each bar of ``symbol``'s retained days."""
        state = self._symbols.get(symbol)
        if state is None:
            return {}
        out: dict[int, Bar] = {}
        for day in state.days.values():
            out.update(day.published)
        return dict(sorted(out.items()))


def build_bars(
    trades: Sequence[Trade],
    policy: _PolicyBase | ConditionPolicy | str = "algoseek",
    *,
    grace_ms: int = 0,
    symbol: str | None = None,
) -> list[Bar]:
    """Bars of a finished, in-memory trade sequence (backfill, tests): the latest revision of
    every bar, ordered by symbol then minute."""
    aggregator = BarAggregator(
        policy, grace_ms=grace_ms, late_policy="revise", clock=ManualClock(0)
    )
    aggregator.add(trades, 0, symbol=symbol)
    aggregator.flush()
    out: list[Bar] = []
    for sym in aggregator.symbols():
        out.extend(aggregator.published(sym).values())
    return out


__all__ = [
    "BarAggregator",
    "BarCounters",
    "LatePolicy",
    "build_bars",
]
