"""Completeness against the source: the reconciler's second core, pure (no I/O, no clock).

Parity says the two paths agree; this says they agree with what the feed gave. Per symbol and
minute it holds the source ledger (what ingest published, ``sentio.ledger.v1``) against the
trades the Kafka path holds (unique by their identity), and each path's bars against the bars
rebuilt from those trades with the same core and policy (``expected``). A minute is complete
on a path when its trades all arrived and its bar is exactly the rebuilt one; a minute with
trades and no bar is a failure of that path; a minute inside a feed gap that nothing filled is
incomplete on every path (the feed may have had trades there that nobody got).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date, timedelta

import msgspec
from msgspec import Struct

from libs.common.market.aggregator import BarAggregator
from libs.common.market.build import rebuilding_aggregator
from libs.common.market.identity import TradeIds
from libs.common.market.policies import _PolicyBase, get_policy
from libs.common.market.sessions import (
    MINUTE_MS,
    bar_id,
    ny_date,
    ny_midnight_ms,
    session_for,
    ts_et,
)
from libs.common.schemas import Bar, FeedGap, Ledger, TickBatch, Trade

BAR_FIELDS = ("open", "high", "low", "close", "volume", "vwap", "trades")

Counts = dict[int, list[int]]
"""minute start -> [trades, volume]"""


class MinuteIssue(Struct, frozen=True):
    """One incomplete symbol-minute and why."""

    symbol: str
    startMs: int
    tsET: str
    barId: int
    what: str


class SymbolCompleteness(Struct):
    """How complete one symbol's day is, on each path, against the source."""

    symbol: str
    ledgerTrades: int = 0
    ledgerVolume: int = 0
    kafkaTrades: int = 0
    """Unique trades the Kafka tick topics hold for the day."""
    missingTrades: int = 0
    extraTrades: int = 0
    duplicateTrades: int = 0
    minutes: int = 0
    """Symbol-minutes judged: with trades in the ledger or on Kafka, an expected bar, a bar on
    either path, or in a gap."""
    ticksComplete: int = 0
    redisComplete: int = 0
    kafkaComplete: int = 0
    gapMinutes: int = 0
    pending: int = 0
    ticksPct: float | None = None
    redisPct: float | None = None
    kafkaPct: float | None = None

    def finish(self) -> SymbolCompleteness:
        """Compute the percentages (None when nothing was judged)."""
        if self.minutes:
            self.ticksPct = round(100.0 * self.ticksComplete / self.minutes, 4)
            self.redisPct = round(100.0 * self.redisComplete / self.minutes, 4)
            self.kafkaPct = round(100.0 * self.kafkaComplete / self.minutes, 4)
        return self

    @property
    def worst_pct(self) -> float | None:
        """The lowest of the three percentages."""
        values = [v for v in (self.ticksPct, self.redisPct, self.kafkaPct) if v is not None]
        return min(values) if values else None


def add_ledger_counts(out: dict[str, Counts], ledgers: Iterable[Ledger], day_ordinal: int) -> None:
    """Add ``ledgers``' trades and volume of one New York day to ``out`` (per symbol and
    minute)."""
    for ledger in ledgers:
        for entry in ledger.entries:
            if ny_date(entry.minuteMs).toordinal() != day_ordinal:
                continue
            minutes = out.setdefault(entry.sym, {})
            counts = minutes.setdefault(entry.minuteMs, [0, 0])
            counts[0] += entry.trades
            counts[1] += entry.volume


class TickTally:
    """The unique trades of one day on a path, per symbol: their per-minute counts, and the
    bars rebuilt from them as they are read (``bars``). Each symbol's trades go through an
    aggregator of their own, batch by batch, which gives the bars one batch of all of them
    would (``build_bars``; any batch split gives the same bars), so a report holds a few
    hundred bytes a symbol-minute instead of every trade of the day. The trades wait in
    per-symbol batches (up to ``PENDING_MAX`` in all) for their aggregator: one record's
    trade or two at a time, the aggregator's cost per call would be most of the read.
    ``keep_trades`` also keeps the trades themselves (``trades``: the soak matches them one
    by one)."""

    PENDING_MAX = 20_000
    """Trades waiting for their symbol's aggregator, in all, before they are handed over."""

    def __init__(
        self,
        day_ordinal: int,
        policy: _PolicyBase | str = "algoseek",
        *,
        keep_trades: bool = False,
    ) -> None:
        self.day_ordinal = day_ordinal
        day = date.fromordinal(day_ordinal)
        self._day_start = ny_midnight_ms(day)
        self._day_end = ny_midnight_ms(day + timedelta(days=1))
        self.policy = get_policy(policy) if isinstance(policy, str) else policy
        self.keep_trades = keep_trades
        self.ids = TradeIds(keep_days=1)
        self.trades: dict[str, list[Trade]] = {}
        """With ``keep_trades``: each symbol's unique trades, in the order read."""
        self.counts: dict[str, Counts] = {}
        self.duplicates: dict[str, int] = {}
        self._aggregators: dict[str, BarAggregator] = {}
        self._pending: dict[str, list[Trade]] = {}
        self._pending_count = 0

    def add(self, batch: TickBatch) -> None:
        """Count one tick record (its trades of other days are ignored)."""
        start, end = self._day_start, self._day_end
        ticks = [t for t in batch.ticks if start <= t.t < end]
        if not ticks:
            return
        sym = batch.sym
        before = self.ids.duplicates
        fresh = self.ids.fresh(sym, ticks)
        if self.ids.duplicates > before:
            self.duplicates[sym] = self.duplicates.get(sym, 0) + self.ids.duplicates - before
        if not fresh:
            return
        if self.keep_trades:
            self.trades.setdefault(sym, []).extend(fresh)
        pending = self._pending.get(sym)
        if pending is None:
            pending = self._pending[sym] = []
        pending.extend(fresh)
        self._pending_count += len(fresh)
        if self._pending_count >= self.PENDING_MAX:
            self._aggregate()
        minutes = self.counts.setdefault(sym, {})
        for trade in fresh:
            minute = trade.t - trade.t % MINUTE_MS
            counts = minutes.get(minute)
            if counts is None:
                counts = minutes[minute] = [0, 0]
            counts[0] += 1
            counts[1] += trade.s

    def _aggregate(self) -> None:
        """Hand every symbol's waiting trades to its aggregator, as one batch."""
        for sym, pending in self._pending.items():
            aggregator = self._aggregators.get(sym)
            if aggregator is None:
                aggregator = self._aggregators[sym] = rebuilding_aggregator(sym, self.policy)
            aggregator.add(pending, 0, symbol=sym)
        self._pending = {}
        self._pending_count = 0

    def bars(self, symbol: str) -> list[Bar]:
        """The bars of ``symbol``'s trades read so far (the latest revision of each): the
        values ``build_bars`` gives (a bar revised by a later batch counts that in its
        ``revision``, which completeness does not compare); call once every trade is read."""
        if self._pending:
            self._aggregate()
        aggregator = self._aggregators.get(symbol)
        if aggregator is None:
            return []
        aggregator.flush()
        return list(aggregator.published().values())


def gap_minutes(
    gaps: Iterable[FeedGap], day_ordinal: int, symbol: str, *, backfilled: bool = False
) -> set[int]:
    """The minutes of the day inside a feed gap of ``symbol`` that nothing filled (with
    ``backfilled``: filled ones too), within the day's 04:00-20:00 sessions; the latest
    record of each gap decides."""
    latest: dict[str, FeedGap] = {}
    for gap in gaps:
        latest[gap.gapId] = gap
    out: set[int] = set()
    for gap in latest.values():
        if gap.status == "backfilled" and not backfilled:
            continue
        if "*" not in gap.symbols and symbol not in gap.symbols:
            continue
        start = gap.startMs
        if not start:
            continue
        day = ny_date(start)
        if day.toordinal() > day_ordinal:
            continue
        session = session_for(day)
        end = gap.endMs or session.end_ms  # still open: to the end of that day's sessions
        first = max(start - start % MINUTE_MS, session.premarket_ms)
        for minute in range(first, min(end, session.end_ms), MINUTE_MS):
            if ny_date(minute).toordinal() == day_ordinal:
                out.add(minute)
    return out


def _same(bar: Bar | None, expected: Bar) -> bool:
    return bar is not None and all(
        getattr(bar, field) == getattr(expected, field) for field in BAR_FIELDS
    )


def judge_symbol(
    symbol: str,
    *,
    ledger: Mapping[int, list[int]],
    kafka_ticks: Mapping[int, list[int]],
    duplicates: int,
    expected: Mapping[int, Bar],
    redis_bars: Mapping[int, Bar],
    kafka_bars: Mapping[int, Bar],
    gaps: set[int],
    settled_before_ms: int | None = None,
) -> tuple[SymbolCompleteness, list[MinuteIssue]]:
    """Judge one symbol's minutes; see the module docstring."""
    result = SymbolCompleteness(symbol, duplicateTrades=duplicates)
    issues: list[MinuteIssue] = []
    for counts in ledger.values():
        result.ledgerTrades += counts[0]
        result.ledgerVolume += counts[1]
    for counts in kafka_ticks.values():
        result.kafkaTrades += counts[0]
    minutes = sorted(
        set(ledger) | set(expected) | set(kafka_ticks) | gaps | set(redis_bars) | set(kafka_bars)
    )
    for minute in minutes:
        if settled_before_ms is not None and minute + MINUTE_MS > settled_before_ms:
            result.pending += 1
            continue
        result.minutes += 1
        source = ledger.get(minute, [0, 0])
        held = kafka_ticks.get(minute, [0, 0])
        problems: list[str] = []
        in_gap = minute in gaps
        if in_gap:
            result.gapMinutes += 1
            problems.append("inside a feed gap nothing filled")
        if held[0] < source[0]:
            result.missingTrades += source[0] - held[0]
            problems.append(f"{source[0] - held[0]} trades missing in Kafka")
        elif held[0] > source[0]:
            result.extraTrades += held[0] - source[0]
            problems.append(f"{held[0] - source[0]} trades in Kafka the ledger lacks")
        ticks_ok = held[0] == source[0] and held[1] == source[1] and not in_gap
        if ticks_ok:
            result.ticksComplete += 1
        bar = expected.get(minute)
        for name, bars in (("redis", redis_bars), ("kafka", kafka_bars)):
            theirs = bars.get(minute)
            if bar is None:
                ok = theirs is None  # nothing to build here (a volume-only minute, folded)
                if not ok:
                    problems.append(f"{name} has a bar the source does not make")
            else:
                ok = _same(theirs, bar)
                if not ok:
                    problems.append(f"no {name} bar" if theirs is None else f"{name} bar differs")
            if ok and ticks_ok:
                if name == "redis":
                    result.redisComplete += 1
                else:
                    result.kafkaComplete += 1
        if problems:
            issues.append(
                MinuteIssue(symbol, minute, ts_et(minute), bar_id(minute), "; ".join(problems))
            )
    return result.finish(), issues


class CompletenessTotals(Struct):
    """Completeness over every symbol of the day."""

    symbols: int = 0
    minutes: int = 0
    ledgerTrades: int = 0
    kafkaTrades: int = 0
    missingTrades: int = 0
    extraTrades: int = 0
    duplicateTrades: int = 0
    gapMinutes: int = 0
    ticksPct: float | None = None
    redisPct: float | None = None
    kafkaPct: float | None = None
    deadLetters: int = 0

    @property
    def worst_pct(self) -> float | None:
        """The lowest of the three percentages."""
        values = [v for v in (self.ticksPct, self.redisPct, self.kafkaPct) if v is not None]
        return min(values) if values else None


class CompletenessSection(Struct):
    """The completeness part of a day's report."""

    totals: CompletenessTotals
    symbols: list[SymbolCompleteness]
    incomplete: list[MinuteIssue]
    gaps: list[FeedGap] = msgspec.field(default_factory=list)
    truncated: int = 0


def build_completeness(
    judged: list[tuple[SymbolCompleteness, list[MinuteIssue]]],
    gaps: list[FeedGap],
    dead_letters: int,
    max_listed: int,
    day_ordinal: int | None = None,
) -> CompletenessSection:
    """Totals, symbols worst first, incomplete minutes up to ``max_listed``; the feed gaps
    (latest record of each) that touch the day ``day_ordinal`` (every one when None): those
    that started on or before it and ended on or after it, or are still open."""
    totals = CompletenessTotals(symbols=len(judged), deadLetters=dead_letters)
    ticks = redis = kafka = 0
    for symbol, _ in judged:
        totals.minutes += symbol.minutes
        totals.ledgerTrades += symbol.ledgerTrades
        totals.kafkaTrades += symbol.kafkaTrades
        totals.missingTrades += symbol.missingTrades
        totals.extraTrades += symbol.extraTrades
        totals.duplicateTrades += symbol.duplicateTrades
        totals.gapMinutes += symbol.gapMinutes
        ticks += symbol.ticksComplete
        redis += symbol.redisComplete
        kafka += symbol.kafkaComplete
    if totals.minutes:
        totals.ticksPct = round(100.0 * ticks / totals.minutes, 4)
        totals.redisPct = round(100.0 * redis / totals.minutes, 4)
        totals.kafkaPct = round(100.0 * kafka / totals.minutes, 4)
    ordered = sorted(
        judged,
        key=lambda item: (
            item[0].worst_pct if item[0].worst_pct is not None else 101.0,
            item[0].symbol,
        ),
    )
    issues = [issue for _, found in ordered for issue in found]
    latest: dict[str, FeedGap] = {}
    for gap in gaps:
        latest[gap.gapId] = gap
    if day_ordinal is not None:
        latest = {
            gap_id: gap
            for gap_id, gap in latest.items()
            if ny_date(gap.startMs).toordinal() <= day_ordinal
            and (not gap.endMs or ny_date(gap.endMs).toordinal() >= day_ordinal)
        }
    return CompletenessSection(
        totals=totals,
        symbols=[symbol for symbol, _ in ordered],
        incomplete=issues[:max_listed],
        gaps=sorted(latest.values(), key=lambda gap: gap.startMs),
        truncated=len(issues) if len(issues) > max_listed else 0,
    )
