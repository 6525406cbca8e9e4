"""Completeness against the source: two paths that agree on wrong data must fail."""

from __future__ import annotations

from datetime import date

import msgspec

from libs.common.market.build import build_bars
from libs.common.market.sessions import MINUTE_MS, ny_epoch_ms
from libs.common.schemas import Bar, FeedGap, Ledger, LedgerEntry, TickBatch, Trade
from services.mirror.completeness import (
    TickTally,
    add_ledger_counts,
    build_completeness,
    gap_minutes,
    judge_symbol,
)

DAY = date(2013, 10, 7)
T0 = ny_epoch_ms(DAY, 10, 0)


def trades(symbol: str, minutes: int, per_minute: int = 3) -> list[Trade]:
    return [
        Trade(symbol, 100.0 + m + n / 10, 100, T0 + m * MINUTE_MS + n * 1_000, 4, (), f"{m}-{n}")
        for m in range(minutes)
        for n in range(per_minute)
    ]


def by_minute(bars: list[Bar]) -> dict[int, Bar]:
    return {bar.startMs: bar for bar in bars}


def ledger_of(day_trades: list[Trade]) -> dict[str, dict[int, list[int]]]:
    entries: dict[tuple[str, int], list[int]] = {}
    for trade in day_trades:
        minute = trade.t - trade.t % MINUTE_MS
        counts = entries.setdefault((trade.sym, minute), [0, 0])
        counts[0] += 1
        counts[1] += trade.s
    record = Ledger(1, "ingest", [LedgerEntry(s, m, c[0], c[1]) for (s, m), c in entries.items()])
    out: dict[str, dict[int, list[int]]] = {}
    add_ledger_counts(out, [record], DAY.toordinal())
    return out


def judge(source: list[Trade], held: list[Trade], redis: list[Bar], kafka: list[Bar], gaps=()):  # type: ignore[no-untyped-def]
    tally = TickTally(DAY.toordinal(), "none", keep_trades=True)
    for trade in held:
        tally.add(TickBatch(0, trade.sym, [trade]))
    expected = by_minute(tally.bars("SPY"))
    # rebuilt as they were read: the bars of one batch of the same unique trades
    assert expected == by_minute(build_bars(tally.trades.get("SPY", []), "none"))
    return judge_symbol(
        "SPY",
        ledger=ledger_of(source).get("SPY", {}),
        kafka_ticks=tally.counts.get("SPY", {}),
        duplicates=tally.duplicates.get("SPY", 0),
        expected=expected,
        redis_bars=by_minute(redis),
        kafka_bars=by_minute(kafka),
        gaps=gap_minutes(list(gaps), DAY.toordinal(), "SPY"),
    )


def test_paths_that_hold_the_source_are_complete() -> None:
    day = trades("SPY", 5)
    bars = build_bars(day, "none")
    result, issues = judge(day, day, bars, bars)
    assert (result.ticksPct, result.redisPct, result.kafkaPct) == (100.0, 100.0, 100.0)
    assert result.ledgerTrades == result.kafkaTrades == 15 and not issues


def test_two_paths_agreeing_on_incomplete_data_fail() -> None:
    """Both paths lost the same trades (a hole upstream of both): parity would be 100 %, but
    the ledger says the feed gave more."""
    day = trades("SPY", 5)
    lost = [t for t in day if not (t.t >= T0 + 2 * MINUTE_MS and t.t < T0 + 3 * MINUTE_MS)]
    bars = build_bars(lost, "none")
    result, issues = judge(day, lost, bars, bars)
    assert result.missingTrades == 3 and result.ticksComplete == 4
    assert result.redisPct == result.kafkaPct == 80.0
    assert "3 trades missing in Kafka" in issues[0].what


def test_a_missing_or_different_bar_fails_only_its_path() -> None:
    day = trades("SPY", 4)
    bars = build_bars(day, "none")
    kafka = [*bars[:1], *bars[2:]]  # minute 1 missing on Kafka
    redis = [bars[0], bars[1], msgspec.structs.replace(bars[2], close=1.0), bars[3]]
    result, issues = judge(day, day, redis, kafka)
    assert result.ticksPct == 100.0
    assert result.redisComplete == 3 and result.kafkaComplete == 3
    whats = {issue.startMs: issue.what for issue in issues}
    assert whats[T0 + MINUTE_MS] == "no kafka bar"
    assert whats[T0 + 2 * MINUTE_MS] == "redis bar differs"


def test_bars_the_source_does_not_make_fail_both_paths() -> None:
    """Both paths hold a bar for a minute where the source (ledger and Kafka ticks) has no
    trade: they agree, and both are wrong."""
    day = trades("SPY", 3)
    bars = build_bars(day, "none")
    ghost = msgspec.structs.replace(bars[-1], startMs=bars[-1].startMs + 5 * MINUTE_MS)
    result, issues = judge(day, day, [*bars, ghost], [*bars, ghost])
    assert result.minutes == 4 and result.redisComplete == result.kafkaComplete == 3
    assert issues[0].startMs == ghost.startMs
    assert "redis has a bar the source does not make" in issues[0].what
    assert "kafka has a bar the source does not make" in issues[0].what


def test_duplicate_trades_in_kafka_are_counted_and_not_double_counted() -> None:
    day = trades("SPY", 2)
    held = [*day, day[0], day[4]]
    bars = build_bars(day, "none")
    result, _ = judge(day, held, bars, bars)
    assert result.duplicateTrades == 2 and result.kafkaTrades == 6 and result.ticksPct == 100.0


def test_minutes_inside_an_unfilled_gap_are_incomplete_everywhere() -> None:
    day = trades("SPY", 5)
    held = [t for t in day if not T0 + MINUTE_MS <= t.t < T0 + 3 * MINUTE_MS]
    source = held  # the feed never gave ingest those trades: the ledger lacks them too
    bars = build_bars(held, "none")
    gap = FeedGap(1, "g1", "ingest", "drop", ["*"], T0 + MINUTE_MS, T0 + 3 * MINUTE_MS, "closed")
    result, _ = judge(source, held, bars, bars, gaps=[gap])
    assert result.gapMinutes == 2 and result.minutes == 5
    assert result.ticksPct == result.redisPct == result.kafkaPct == 60.0
    backfilled = FeedGap(1, "g1", "ingest", "drop", ["*"], gap.startMs, gap.endMs, "backfilled")
    result, _ = judge(source, held, bars, bars, gaps=[gap, backfilled])
    assert result.gapMinutes == 0


def test_totals_put_the_worst_symbol_first() -> None:
    day = trades("SPY", 3)
    bars = build_bars(day, "none")
    good = judge(day, day, bars, bars)
    bad = judge(day, day[3:], build_bars(day[3:], "none"), build_bars(day[3:], "none"))
    section = build_completeness([good, bad], [], dead_letters=4, max_listed=10)
    assert section.totals.missingTrades == 3 and section.totals.deadLetters == 4
    assert section.symbols[0].missingTrades == 3


def test_the_report_lists_the_gaps_that_touch_its_day() -> None:
    def gap(gap_id: str, start: date, end: date | None) -> FeedGap:
        end_ms = ny_epoch_ms(end, 10, 5) if end else 0
        status = "closed" if end else "open"
        return FeedGap(
            1, gap_id, "ingest", "drop", ["*"], ny_epoch_ms(start, 10, 0), end_ms, status
        )

    before, after = date(2013, 10, 4), date(2013, 10, 8)
    gaps = [
        gap("earlier", before, before),
        gap("across", before, DAY),
        gap("same", DAY, DAY),
        gap("open", before, None),
        gap("later", after, after),
    ]
    section = build_completeness(
        [], gaps, dead_letters=0, max_listed=10, day_ordinal=DAY.toordinal()
    )
    assert [item.gapId for item in section.gaps] == ["across", "open", "same"]
    assert len(build_completeness([], gaps, dead_letters=0, max_listed=10).gaps) == 5


def test_a_tally_rebuilds_the_bars_as_it_reads_without_keeping_the_trades() -> None:
    """Records as Kafka gives them: each symbol in order, then a backfill of earlier minutes,
    copies of records, and trades of the day before. The bars rebuilt while reading equal the
    bars of one batch of the day's unique trades, and no trade is kept."""
    import random

    rng = random.Random(7)
    day_before = ny_epoch_ms(date(2013, 10, 4), 15, 59)
    records: list[TickBatch] = []
    unique: dict[str, list[Trade]] = {}
    for symbol in ("SPY", "IBM", "AIG"):
        stream = trades(symbol, 30, per_minute=7)
        rng.shuffle(stream)  # out of order within the symbol too (several venues)
        live, backfill = stream[40:], stream[:40]
        batches = [live[n : n + 5] for n in range(0, len(live), 5)]
        batches.append(backfill)  # filled later from REST: late trades that revise bars
        batches.insert(3, batches[1])  # a record delivered twice
        old = Trade(symbol, 50.0, 100, day_before, 4, (), "old")
        batches.insert(5, [old])
        records.extend(TickBatch(0, symbol, list(batch)) for batch in batches)
        unique[symbol] = live + backfill
    rng.shuffle(records)  # symbols interleave (one topic, many partitions)
    tally = TickTally(DAY.toordinal(), "algoseek")
    tally.PENDING_MAX = 7  # handed to the aggregators in many batches
    for record in records:
        tally.add(record)
    for symbol, held in unique.items():
        order = [t for r in records if r.sym == symbol for t in r.ticks]
        first_seen = list({t.i: t for t in reversed(order) if t.t >= T0}.values())[::-1]
        assert sorted(first_seen, key=lambda t: t.i) == sorted(held, key=lambda t: t.i)
        rebuilt = tally.bars(symbol)
        # revised as the backfill came (their revision numbers count that), the same values
        assert any(bar.revision for bar in rebuilt)
        assert [msgspec.structs.replace(bar, revision=0) for bar in rebuilt] == build_bars(
            first_seen, "algoseek", symbol=symbol
        )
        assert tally.duplicates[symbol] == 5
    assert tally.trades == {} and tally.bars("BAC") == []
