"""The one bar-aggregation core: trades in, closed 1-minute bars (and corrections) out.

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
from bisect import bisect_left, insort
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from itertools import groupby
from operator import attrgetter
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

from libs.common import clock as clock_module
from libs.common.clock import MINUTE_MS, SYSTEM_CLOCK, Clock, ny_date, ny_midnight_ms, session_for
from libs.common.schemas import Bar, Trade

# --- classification codes ---------------------------------------------------------------------

OPEN_CLOSE = 1
HIGH_LOW = 2
VOLUME = 4
EVERYTHING = OPEN_CLOSE | HIGH_LOW | VOLUME
IGNORED = 0
OPENING_AUCTION = 8
"""The primary listing's opening auction print: it is the open of the session's first bar."""
CLOSING_AUCTION = 16
"""The primary listing's closing auction print: it is the close of the session's last bar."""
BY_EXCHANGE = 32
"""Cache marker: this condition tuple's classification depends on the exchange."""

LatePolicy = Literal["revise", "drop"]

_NO_OPEN_TIME = 1 << 62
_FORCED_OPEN_TIME = -(1 << 62)
_SYMBOL = attrgetter("sym")


class Classification(NamedTuple):
    """What a trade counts for under a policy."""

    counts_for_open_close: bool
    counts_for_high_low: bool
    counts_for_volume: bool
    auction: Literal["", "open", "close"] = ""


def classification_of(code: int) -> Classification:
    """The readable form of a classification code."""
    if code & OPENING_AUCTION:
        return Classification(True, True, True, "open")
    if code & CLOSING_AUCTION:
        return Classification(True, True, True, "close")
    return Classification(bool(code & OPEN_CLOSE), bool(code & HIGH_LOW), bool(code & VOLUME))


# --- policies ---------------------------------------------------------------------------------


class ConditionPolicy(Protocol):
    """Decides what each trade counts for. Implementations must be pure functions of their
    arguments so that the core may cache the answer."""

    name: str
    fold_unpriced_volume: bool
    """True: the volume of a minute without any open/close-eligible trade goes to the previous
    bar of the day (to the next one when there is none); False: no bar, volume dropped."""

    def code(
        self,
        conditions: tuple[int, ...],
        exchange: int,
        suspicious: bool,
        regular_session: bool,
        primary_exchange: int,
    ) -> int:
        """The classification code (bits of ``OPEN_CLOSE``, ``HIGH_LOW``, ``VOLUME``, or one
        of ``OPENING_AUCTION``/``CLOSING_AUCTION``) of one trade."""
        ...

    def depends_on_exchange(self, conditions: tuple[int, ...]) -> bool:
        """Whether ``code`` looks at the exchange (or primary listing) for these conditions."""
        ...

    def primary_exchange(self, symbol: str, tape: int) -> int:
        """Polygon id of ``symbol``'s primary listing exchange (0 when unknown)."""
        ...


class _PolicyBase:
    name = "base"
    fold_unpriced_volume = False

    if TYPE_CHECKING:
        # Every subclass defines it; declared here only so the checker knows a policy has one.
        def code(
            self,
            conditions: tuple[int, ...],
            exchange: int,
            suspicious: bool,
            regular_session: bool,
            primary_exchange: int,
        ) -> int: ...

    def classify(
        self,
        conditions: tuple[int, ...],
        exchange: int = 0,
        suspicious: bool = False,
        regular_session: bool = True,
        primary_exchange: int = 0,
    ) -> Classification:
        """What a trade with these attributes counts for (readable form of ``code``)."""
        return classification_of(
            self.code(tuple(conditions), exchange, suspicious, regular_session, primary_exchange)
        )

    def depends_on_exchange(self, conditions: tuple[int, ...]) -> bool:
        """Whether the exchange matters for these conditions (not by default)."""
        return False

    def primary_exchange(self, symbol: str, tape: int) -> int:
        """Primary listing from the reference table of ``tickfiles``, else from the tape."""
        from libs.common.tickfiles import primary_exchange_id

        return primary_exchange_id(symbol, tape)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class NonePolicy(_PolicyBase):
    """Plain OHLCV: every trade counts for everything, whatever its conditions."""

    name = "none"

    def code(
        self,
        conditions: tuple[int, ...],
        exchange: int,
        suspicious: bool,
        regular_session: bool,
        primary_exchange: int,
    ) -> int:
        """Always ``EVERYTHING``."""
        return EVERYTHING


class AlgoseekPolicy(_PolicyBase):
    """The rule of AlgoSeek's minute bars (the vendor of Lean's US-equity data), found from the
    data; evidence in ``docs/bars.md``. Works on Polygon condition ids (``docs/conditions.md``).

    * suspicious prints, and official open/close reports, count for nothing;
    * an opening (closing) print counts only if it is the primary listing exchange's: the first
      one of the day opens the session's first bar when it prints within that minute, the first
      closing print closes the session's last bar (15:59) whenever it prints; the others, and
      every other venue's opening/closing prints (e.g. Nasdaq's cross in a NYSE stock), count
      for nothing;
    * any other trade counts for volume, and for price (open, high, low, close) unless it
      carries an excluding condition (Intermarket Sweep, Trade Thru Exempt, Odd Lot) and none
      of the including ones (Regular, Cash, Next Day, Seller, Form T / Extended Hours); Trade
      Thru Exempt alone implies Regular, which Polygon's feed does not send;
    * a minute with volume but no price-eligible trade has no bar of its own: its volume goes
      to the previous bar of the day.
    """

    name = "algoseek"
    fold_unpriced_volume = True

    INCLUDING = frozenset({0, 7, 20, 29, 12, 13})
    """Regular Sale, Cash Sale, Next Day, Seller, Form T/Extended Hours, Extended Hours (Sold
    Out Of Sequence)."""
    EXCLUDING = frozenset({14, 41, 37})
    """Intermarket Sweep, Trade Thru Exempt, Odd Lot Trade."""
    OPENING = frozenset({25, 17})
    """Opening Prints (CTA), Market Center Opening Trade (UTP)."""
    CLOSING = frozenset({8, 19})
    """Closing Prints (CTA), Market Center Closing Trade (UTP)."""
    OFFICIAL = frozenset({15, 16})
    """Market Center Official Close / Open: reports of the auction, not trades."""
    IMPLIED_REGULAR = frozenset({41})
    """Polygon's feed leaves the Regular condition out: a trade whose only condition is Trade
    Thru Exempt is a regular sale that is trade-through exempt (AlgoSeek: Regular + TTE)."""

    def code(
        self,
        conditions: tuple[int, ...],
        exchange: int,
        suspicious: bool,
        regular_session: bool,
        primary_exchange: int,
    ) -> int:
        """See the class docstring."""
        if suspicious:
            return IGNORED
        kinds = frozenset(conditions)
        if kinds & self.OFFICIAL:
            return IGNORED
        if kinds & self.OPENING:
            return OPENING_AUCTION if exchange == primary_exchange else IGNORED
        if kinds & self.CLOSING:
            return CLOSING_AUCTION if exchange == primary_exchange else IGNORED
        if kinds & self.INCLUDING or not kinds & self.EXCLUDING or kinds <= self.IMPLIED_REGULAR:
            return EVERYTHING
        return VOLUME

    def depends_on_exchange(self, conditions: tuple[int, ...]) -> bool:
        """Opening and closing prints depend on the exchange being the primary listing."""
        kinds = frozenset(conditions)
        return bool(kinds & (self.OPENING | self.CLOSING)) and not kinds & self.OFFICIAL


class PolygonPolicy(_PolicyBase):
    """Polygon's consolidated update rules (``conditions_table.polygon_rules``): a trade updates
    a field only if all its conditions allow it; unknown ids restrict nothing. Outside the
    regular session Form T (12) does not restrict prices (Polygon's extended-hours minute bars
    take prices from Form T trades). Suspicious prints count for nothing. A minute without an
    open/close-eligible trade has no bar, as Polygon emits none."""

    name = "polygon"
    fold_unpriced_volume = False

    def __init__(self, kind: str = "consolidated") -> None:
        from libs.common.conditions_table import FORM_T_EXTENDED_HOURS, combine_rules

        self._combine = combine_rules
        self._kind = kind
        self._extended_ignore = frozenset({FORM_T_EXTENDED_HOURS})

    def code(
        self,
        conditions: tuple[int, ...],
        exchange: int,
        suspicious: bool,
        regular_session: bool,
        primary_exchange: int,
    ) -> int:
        """AND of the conditions' consolidated rules."""
        if suspicious:
            return IGNORED
        ignore = frozenset() if regular_session else self._extended_ignore
        rule = self._combine(conditions, self._kind, ignore=ignore).rule
        return (
            (OPEN_CLOSE if rule.updates_open_close else 0)
            | (HIGH_LOW if rule.updates_high_low else 0)
            | (VOLUME if rule.updates_volume else 0)
        )


POLICIES: dict[str, Callable[[], _PolicyBase]] = {
    "algoseek": AlgoseekPolicy,
    "polygon": PolygonPolicy,
    "none": NonePolicy,
}


def get_policy(name: str) -> _PolicyBase:
    """A policy by name: ``algoseek``, ``polygon`` or ``none``."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown bar policy {name!r}; expected one of {sorted(POLICIES)}"
        ) from None
    return factory()


# --- state ------------------------------------------------------------------------------------


class _Day:
    """One New York day of one symbol: its session and its closed minutes."""

    __slots__ = (
        "close_ms",
        "closed",
        "closing_seen",
        "end",
        "open_ms",
        "opening_seen",
        "order",
        "published",
        "start",
    )

    def __init__(self, start: int, end: int, open_ms: int, close_ms: int) -> None:
        self.start = start
        self.end = end
        self.open_ms = open_ms
        self.close_ms = close_ms
        self.closed: dict[int, _Minute] = {}
        self.order: list[int] = []
        self.published: dict[int, Bar] = {}
        self.opening_seen = False
        self.closing_seen = False


class _Minute:
    """Accumulator of one symbol-minute."""

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

    def __init__(self, start: int, day: _Day) -> None:
        self.start = start
        self.day = day
        self.regular = day.open_ms <= start < day.close_ms
        self.open = 0.0
        self.open_t = _NO_OPEN_TIME
        self.high = float("-inf")
        self.low = float("inf")
        self.close = 0.0
        self.close_t = -1
        self.volume = 0
        self.pv = 0.0
        self.pv_volume = 0
        self.trades = 0

    @property
    def priced(self) -> bool:
        return self.close_t >= 0


class _Symbol:
    __slots__ = ("day", "days", "open", "primary", "sym")

    def __init__(self, sym: str, primary: int) -> None:
        self.sym = sym
        self.primary = primary
        self.open: dict[int, _Minute] = {}
        self.days: dict[int, _Day] = {}
        self.day: _Day | None = None


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
        cur: _Minute | None = None
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

    def _day_of(self, state: _Symbol, minute: int) -> _Day | None:
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
        new = _Day(
            start,
            ny_midnight_ms(calendar_day + timedelta(days=1)),
            session.open_ms,
            session.close_ms,
        )
        state.days[start] = new
        state.day = new
        return new

    def _open_minute(self, state: _Symbol, minute: int) -> _Minute | None:
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
        acc = state.open[minute] = _Minute(minute, day)
        heapq.heappush(self._heap, (deadline, state.sym, minute))
        return acc

    def _target(self, state: _Symbol, minute: int) -> tuple[_Minute | None, bool]:
        """(accumulator, is_late) of ``minute``; (None, True) if it can take no trade."""
        acc = self._open_minute(state, minute)
        if acc is not None:
            return acc, False
        day = self._day_of(state, minute)
        if day is None:
            return None, True
        acc = day.closed.get(minute)
        if acc is None:
            acc = _Minute(minute, day)
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

    def _slow(self, state: _Symbol, tr: Trade, acc: _Minute | None) -> None:
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
        _apply(acc, tr, code)
        if late:
            self.counters.late_revised += 1
            day = acc.day
            if acc.start not in day.closed:
                day.closed[acc.start] = acc
                insort(day.order, acc.start)
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
            day.closed[minute] = acc
            insort(day.order, minute)
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

    def _publish_closed(self, state: _Symbol, day: _Day, acc: _Minute, out: list[Bar]) -> None:
        """Publish what closing ``acc`` changes: its own bar, or (folding policies) the bar its
        volume folds into; a neighbour only when it closed out of order."""
        order = day.order
        if not self._fold or (acc.priced and order[-1] == acc.start):
            self._publish(state, day, acc.start, out)
        else:
            self._publish_around(state, day, acc.start, out)

    def _publish_around(self, state: _Symbol, day: _Day, minute: int, out: list[Bar]) -> None:
        if not self._fold:
            self._publish(state, day, minute, out)
            return
        order = day.order
        closed = day.closed
        index = bisect_left(order, minute)
        before = index - 1
        while before >= 0 and not closed[order[before]].priced:
            before -= 1
        after = index + 1
        while after < len(order) and not closed[order[after]].priced:
            after += 1
        if before >= 0:
            self._publish(state, day, order[before], out)
        self._publish(state, day, minute, out)
        if after < len(order):
            self._publish(state, day, order[after], out)

    def _publish(self, state: _Symbol, day: _Day, minute: int, out: list[Bar]) -> None:
        bar = self._derive(state, day, minute)
        if bar is None:
            return
        old = day.published.get(minute)
        if old is None:
            self.counters.bars_published += 1
        elif _same_bar(old, bar):
            return
        elif not self._revise:
            self.counters.revisions_suppressed += 1
            return
        else:
            bar = _with_revision(bar, old.revision + 1)
            self.counters.revisions_published += 1
        day.published[minute] = bar
        out.append(bar)

    def _derive(self, state: _Symbol, day: _Day, minute: int) -> Bar | None:
        acc = day.closed[minute]
        if not acc.priced:
            return None
        volume = acc.volume
        trades = acc.trades
        if self._fold:
            order = day.order
            closed = day.closed
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
            symbol=state.sym,
            tsET=clock_module.ts_et(minute),
            barId=(minute - day.open_ms) // MINUTE_MS + 1,
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


def _apply(acc: _Minute, tr: Trade, code: int) -> None:
    """One trade into an accumulator (the slow path's version of the hot loop)."""
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
        acc.open_t = _FORCED_OPEN_TIME


def _same_bar(a: Bar, b: Bar) -> bool:
    return (
        a.open == b.open
        and a.high == b.high
        and a.low == b.low
        and a.close == b.close
        and a.volume == b.volume
        and a.vwap == b.vwap
        and a.trades == b.trades
    )


def _with_revision(bar: Bar, revision: int) -> Bar:
    import msgspec

    return msgspec.structs.replace(bar, revision=revision)


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
        policy, grace_ms=grace_ms, late_policy="revise", clock=clock_module.ManualClock(0)
    )
    aggregator.add(trades, 0, symbol=symbol)
    aggregator.flush()
    out: list[Bar] = []
    for sym in aggregator.symbols():
        out.extend(aggregator.published(sym).values())
    return out


__all__ = [
    "POLICIES",
    "AlgoseekPolicy",
    "BarAggregator",
    "BarCounters",
    "Classification",
    "ConditionPolicy",
    "NonePolicy",
    "PolygonPolicy",
    "build_bars",
    "classification_of",
    "get_policy",
]
