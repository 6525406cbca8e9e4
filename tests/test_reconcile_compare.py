"""The reconciler's core and report: planted mismatches of every kind are found and named."""

from __future__ import annotations

from datetime import date

import msgspec
import pytest

from libs.common.market.sessions import MINUTE_MS, bar_id, ny_epoch_ms, ts_et
from libs.common.schemas import Bar, VendorAggregate
from services.mirror.compare import SymbolComparison, Tolerance, compare_symbol, compare_vendor
from services.mirror.gate import DaySummary, evaluate_gate
from services.mirror.report import DayReport, build_section, to_json, to_markdown

DAY = date(2013, 10, 7)
OPEN_MS = ny_epoch_ms(DAY, 9, 30)


def bar(
    symbol: str,
    minute: int,
    *,
    close: float = 100.0,
    volume: int = 1_000,
    revision: int = 0,
    **fields: float,
) -> Bar:
    start = OPEN_MS + minute * MINUTE_MS
    values: dict[str, float] = {
        "open": 100.0,
        "high": 101.0,
        "low": 99.0,
        "close": close,
        "volume": volume,
        "vwap": 100.25,
        "trades": 10,
    }
    values.update(fields)
    return Bar(
        seq=0,
        symbol=symbol,
        tsET=ts_et(start),
        barId=bar_id(start),
        startMs=start,
        endMs=start + MINUTE_MS,
        revision=revision,
        **values,
    )  # type: ignore[arg-type]


def day_of(symbol: str, minutes: int = 10) -> dict[int, Bar]:
    bars = [bar(symbol, m, close=100.0 + m / 100) for m in range(minutes)]
    return {b.startMs: b for b in bars}


def test_identical_sides_match_fully() -> None:
    redis = day_of("SPY")
    result = compare_symbol("SPY", redis, list(redis.values()), Tolerance())
    assert (result.parity.matched, result.parity.compared, result.parity.parityPct) == (
        10,
        10,
        100.0,
    )
    assert not (result.mismatches or result.missingKafka or result.missingRedis)


def test_planted_problems_of_every_kind_are_found_and_named() -> None:
    redis = day_of("SPY")
    kafka = [b for b in redis.values()]

    def minute(m: int) -> int:
        return OPEN_MS + m * MINUTE_MS

    # 1. a mismatch in two fields
    kafka[2] = msgspec.structs.replace(
        kafka[2], close=kafka[2].close + 0.01, volume=kafka[2].volume - 100
    )
    # 2. missing in Kafka
    del kafka[5]
    # 3. missing in Redis: Kafka has a minute the bar store has not
    extra = bar("SPY", 42)
    kafka.append(extra)
    # 4. a duplicate: the same revision delivered twice
    kafka.append(kafka[0])
    # 5. a correction: revision 1 replaces revision 0 on both sides -> matches
    corrected = msgspec.structs.replace(redis[minute(7)], close=123.0, revision=1)
    redis[minute(7)] = corrected
    kafka.append(corrected)

    result = compare_symbol("SPY", redis, kafka, Tolerance())
    parity = result.parity
    assert (
        parity.matched,
        parity.mismatched,
        parity.missingKafka,
        parity.missingRedis,
        parity.duplicates,
        parity.corrections,
    ) == (8, 1, 1, 1, 1, 1)
    assert parity.parityPct == round(100 * 8 / 11, 4)
    mismatch = result.mismatches[0]
    assert mismatch.startMs == minute(2) and mismatch.barId == 3
    assert {(d.field, d.diff) for d in mismatch.fields} == {("close", 0.01), ("volume", -100.0)}
    assert [m.startMs for m in result.missingKafka] == [minute(5)]
    assert [m.startMs for m in result.missingRedis] == [extra.startMs]
    assert [(d.startMs, d.copies) for d in result.duplicates] == [(minute(0), 2)]

    markdown = to_markdown(_report([result]))
    assert "Mismatches: 1" in markdown
    assert "| SPY | 09:32 | 3 | close | 100.02 | 100.03 | +0.01 |" in markdown
    assert "| SPY | 09:32 | 3 | volume | 1,000 | 900 | -100 |" in markdown
    assert "## Missing in Kafka: 1" in markdown and "| SPY | 09:35 | 6 |" in markdown
    assert "## Missing in Redis: 1" in markdown and "| SPY | 10:12 | 43 |" in markdown
    assert "## Duplicates in Kafka: 1" in markdown and "| SPY | 09:30 | 0 | 2 |" in markdown


def test_tolerance_exact_by_default_configurable_per_field() -> None:
    redis = day_of("SPY", 1)
    only = next(iter(redis.values()))
    kafka = [msgspec.structs.replace(only, vwap=only.vwap + 0.00005, close=only.close + 0.004)]
    assert compare_symbol("SPY", redis, kafka, Tolerance()).parity.mismatched == 1
    assert compare_symbol("SPY", redis, kafka, Tolerance("0.01")).parity.matched == 1
    assert (
        compare_symbol("SPY", redis, kafka, Tolerance("price=0.005,vwap=0.0001")).parity.matched
        == 1
    )
    still = compare_symbol("SPY", redis, kafka, Tolerance("vwap=0.0001"))
    assert [d.field for d in still.mismatches[0].fields] == ["close"]
    assert Tolerance("price=0.01,default=1").limits["volume"] == 1
    with pytest.raises(ValueError, match="unknown field"):
        Tolerance("colour=1")
    with pytest.raises(ValueError, match="number"):
        Tolerance("open=abc")


def test_bars_younger_than_the_minimum_age_are_pending_not_missing() -> None:
    redis = day_of("SPY")
    kafka = list(redis.values())[:7]  # the last three are still in flight
    settled = OPEN_MS + 7 * MINUTE_MS
    result = compare_symbol("SPY", redis, kafka, Tolerance(), settled_before_ms=settled)
    assert (result.parity.matched, result.parity.missingKafka, result.parity.pending) == (7, 0, 3)
    assert result.parity.parityPct == 100.0


def test_report_summary_first_and_worst_symbols_first() -> None:
    good = compare_symbol("AAA", day_of("AAA"), list(day_of("AAA").values()), Tolerance())
    bad_redis = day_of("ZZZ")
    bad = compare_symbol("ZZZ", bad_redis, list(bad_redis.values())[:5], Tolerance())
    markdown = to_markdown(_report([good, bad]))
    lines = markdown.splitlines()
    assert lines[0] == "# Shadow-mode parity — 2013-10-07"
    assert lines[2].startswith("**Parity 75.000 %** (target 99.9 %, BELOW target)")
    symbols = markdown.index("## Symbols, worst first")
    assert markdown.index("| ZZZ | 50.000 %", symbols) < markdown.index("| AAA | 100 %", symbols)


def test_listings_are_capped_but_totals_are_complete() -> None:
    redis = day_of("SPY", 30)
    result = compare_symbol("SPY", redis, [], Tolerance())
    section = build_section([result], "exact", max_listed=5)
    assert section.totals.missingKafka == 30
    assert len(section.missingKafka) == 5
    assert section.truncated == {"missingKafka": 30}
    report = _report([result], max_listed=5)
    assert "## Missing in Kafka: 30 (first 5 of 30 listed)" in to_markdown(report)
    assert b'"missingKafka": 30' in to_json(report)


def test_vendor_check_compares_our_bars_with_the_vendor_aggregates() -> None:
    redis = day_of("SPY", 3)
    bars = list(redis.values())
    vendor = {
        b.startMs: VendorAggregate(
            sym="SPY",
            o=b.open,
            h=b.high,
            l=b.low,
            c=b.close,
            v=b.volume,
            vw=0.0,
            s=b.startMs,
            e=b.endMs,
        )
        for b in bars
    }
    first = bars[0].startMs
    vendor[first] = msgspec.structs.replace(vendor[first], h=bars[0].high + 0.02)
    extra = OPEN_MS + 50 * MINUTE_MS
    vendor[extra] = VendorAggregate(sym="SPY", o=1, h=1, l=1, c=1, v=1, s=extra, e=extra + 1)
    result = compare_vendor("SPY", redis, vendor, Tolerance())
    assert (result.parity.matched, result.parity.mismatched, result.parity.missingRedis) == (
        2,
        1,
        1,
    )
    assert [d.field for d in result.mismatches[0].fields] == ["high"]  # vw 0: not supplied
    report = _report([compare_symbol("SPY", redis, bars, Tolerance())], vendor=[result])
    markdown = to_markdown(report)
    assert "## Vendor check" in markdown
    assert "| SPY | 09:30 | 1 | high | 101 | 101.02 | +0.02 |" in markdown


def test_a_vendor_aggregate_the_feed_never_delivered_is_not_a_disagreement() -> None:
    """Minutes inside a feed gap have our (backfilled) bars but no vendor aggregate: the
    aggregate was sent while the feed was not read. Unknown, counted apart, not missing."""
    redis = day_of("SPY", 4)
    bars = list(redis.values())
    vendor = {
        b.startMs: VendorAggregate(
            sym="SPY", o=b.open, h=b.high, l=b.low, c=b.close, v=b.volume, s=b.startMs
        )
        for b in bars[:2]
    }
    gap = {bars[2].startMs}
    result = compare_vendor("SPY", redis, vendor, Tolerance(), not_received=gap)
    parity = result.parity
    assert (parity.matched, parity.notReceived, parity.missingKafka) == (2, 1, 1)
    assert [ref.startMs for ref in result.missingKafka] == [bars[3].startMs]
    report = _report([compare_symbol("SPY", redis, bars, Tolerance())], vendor=[result])
    assert "1 of our bars are of minutes whose vendor aggregate never reached us" in to_markdown(
        report
    )


def _summary(day: str, pct: float | None, compared: int = 390) -> DaySummary:
    matched = int(compared * (pct or 0) / 100)
    return DaySummary(day, pct, compared, matched, 0, completenessPct=100.0 if compared else None)


def test_gate_ready_after_five_consecutive_trading_days_at_target() -> None:
    days = ["2013-10-01", "2013-10-02", "2013-10-03", "2013-10-04", "2013-10-07"]
    gate = evaluate_gate(DAY, {d: _summary(d, 99.95) for d in days}, days=5, target_pct=99.9)
    assert gate.ready and gate.passing == 5
    assert [entry.day for entry in gate.window] == days  # the weekend is not a trading day
    assert "Kafka may become the source of truth" in gate.reasons[0]


def test_gate_not_ready_names_the_failing_and_missing_days() -> None:
    summaries = {
        d: _summary(d, 100.0) for d in ("2013-10-01", "2013-10-03", "2013-10-04", "2013-10-07")
    }
    summaries["2013-10-03"] = _summary("2013-10-03", 99.5)
    gate = evaluate_gate(DAY, summaries, days=5, target_pct=99.9)
    assert not gate.ready
    assert gate.passing == 2
    assert any("2013-10-02: no parity report" in reason for reason in gate.reasons)
    assert any("2013-10-03: parity below 99.9 %" in r for r in gate.reasons)


def test_a_trading_day_without_bars_fails_the_gate_and_holidays_come_from_the_calendar() -> None:
    """A weekday with no bars on either side is a failure, not a holiday: both paths may
    agree on nothing. Christmas 2013 is skipped because the exchange calendar says so."""
    days = ["2013-09-30", "2013-10-01", "2013-10-02", "2013-10-03", "2013-10-07"]
    summaries = {d: _summary(d, 100.0) for d in days}
    summaries["2013-10-04"] = _summary("2013-10-04", None, compared=0)
    gate = evaluate_gate(DAY, summaries, days=5, target_pct=99.9)
    assert not gate.ready and "2013-10-04" in [entry.day for entry in gate.window]
    assert any("2013-10-04: no bars on either path" in reason for reason in gate.reasons)
    christmas = ["2013-12-20", "2013-12-23", "2013-12-24", "2013-12-26", "2013-12-27"]
    gate = evaluate_gate(
        date(2013, 12, 27), {d: _summary(d, 100.0) for d in christmas}, days=5, target_pct=99.9
    )
    assert gate.ready and [entry.day for entry in gate.window] == christmas


def test_the_gate_needs_completeness_against_the_source_too() -> None:
    days = ["2013-10-01", "2013-10-02", "2013-10-03", "2013-10-04", "2013-10-07"]
    summaries = {d: _summary(d, 100.0) for d in days}
    summaries["2013-10-07"] = msgspec.structs.replace(summaries["2013-10-07"], completenessPct=91.0)
    gate = evaluate_gate(DAY, summaries, days=5, target_pct=99.9)
    assert not gate.ready and gate.passing == 0
    assert any("completeness 91.000 % below 99.9 %" in reason for reason in gate.reasons)
    # a day whose report did not judge completeness (no source read) proves nothing
    summaries["2013-10-07"] = msgspec.structs.replace(summaries["2013-10-07"], completenessPct=None)
    gate = evaluate_gate(DAY, summaries, days=5, target_pct=99.9)
    assert not gate.ready
    assert any("completeness against the source not judged" in r for r in gate.reasons)


def test_every_copy_of_a_bar_is_compared_and_a_revision_going_back_is_flagged() -> None:
    redis = day_of("SPY")
    kafka = list(redis.values())
    # minute 3: a second copy of revision 0 that disagrees with the first
    kafka.append(msgspec.structs.replace(kafka[3], close=kafka[3].close + 1))
    # minute 5: revision 1, then an older revision 0 after it
    kafka.append(msgspec.structs.replace(kafka[5], revision=1))
    kafka.append(msgspec.structs.replace(kafka[5], revision=0))
    redis[kafka[5].startMs] = msgspec.structs.replace(kafka[5], revision=1)
    result = compare_symbol("SPY", redis, kafka, Tolerance())
    assert result.parity.conflicts == 1 and result.parity.revisionsBackwards == 1
    assert result.parity.mismatched == 1  # the conflicting copies
    assert [m.startMs for m in result.mismatches] == [kafka[3].startMs]


def _report(
    comparisons: list[SymbolComparison],
    *,
    vendor: list[SymbolComparison] | None = None,
    max_listed: int = 50,
) -> DayReport:
    return DayReport(
        day=DAY.isoformat(),
        generatedAtMs=OPEN_MS,
        generatedAt=ts_et(OPEN_MS),
        targetPct=99.9,
        minAgeS=0,
        settledBeforeMs=None,
        parity=build_section(comparisons, "exact", max_listed),
        vendor=build_section(vendor, "exact", max_listed) if vendor else None,
    )
