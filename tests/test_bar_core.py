"""The bar core: windows, watermark and grace, ordering, late trades, sessions, policies."""

from __future__ import annotations

from datetime import date

import pytest

from libs.common.market import sessions as clock
from libs.common.market.aggregator import BarAggregator
from libs.common.market.build import build_bars
from libs.common.market.policies import (
    EVERYTHING,
    HIGH_LOW,
    IGNORED,
    OPEN_CLOSE,
    VOLUME,
    AlgoseekPolicy,
    AlgoseekRules,
    Classification,
    NonePolicy,
    get_policy,
)
from libs.common.market.sessions import ny_epoch_ms
from libs.common.runtime.clock import ManualClock
from libs.common.schemas import Bar, Trade

DAY = date(2013, 10, 7)  # EDT
WINTER = date(2013, 11, 4)  # EST, the Monday after the change
NYSE, ARCA, NASDAQ, FINRA = 10, 11, 12, 4
REGULAR, ISO, TTE, FORM_T = (0,), (14, 41), (41,), (12,)


def at(hour: int, minute: int, second: float = 0.0, day: date = DAY) -> int:
    return ny_epoch_ms(day, hour, minute, round(second * 1000))


def trade(
    t: int,
    p: float,
    s: int = 100,
    c: tuple[int, ...] = REGULAR,
    x: int = NASDAQ,
    sym: str = "IBM",
    suspicious: bool = False,
) -> Trade:
    return Trade(sym, p, s, t, x, c, "", 1, 0, suspicious)


def ohlcv(bar: Bar) -> tuple[float, float, float, float, int]:
    return (bar.open, bar.high, bar.low, bar.close, bar.volume)


def aggregator(
    policy: str = "algoseek",
    grace_ms: int = 2_000,
    late: str = "revise",
    start: int = 0,
    symbol: str = "IBM",
) -> tuple[BarAggregator, ManualClock]:
    manual = ManualClock(start)
    return BarAggregator(symbol, policy, grace_ms=grace_ms, late_policy=late, clock=manual), manual


# --- windows, grace and the watermark --------------------------------------------------------


def test_a_bar_closes_when_the_watermark_passes_its_end_plus_grace() -> None:
    agg, _manual = aggregator(grace_ms=2_000, start=at(10, 0, 30))
    assert agg.add([trade(at(10, 0, 10), 10.0), trade(at(10, 0, 50), 11.0)]) == []
    assert agg.add([trade(at(10, 1, 1.999), 12.0)], now_ms=at(10, 0, 30)) == []
    (bar,) = agg.add([trade(at(10, 1, 2), 12.5)], now_ms=at(10, 0, 30))
    assert (bar.startMs, bar.endMs) == (at(10, 0), at(10, 1))
    assert ohlcv(bar) == (10.0, 11.0, 10.0, 11.0, 200)
    assert bar.trades == 2 and bar.revision == 0 and bar.seq == 0
    assert bar.vwap == 10.5


def test_minutes_are_half_open() -> None:
    bars = build_bars(
        [trade(at(10, 0, 0), 1.0), trade(at(10, 0, 59.999), 2.0), trade(at(10, 1, 0), 3.0)], "none"
    )
    assert [(b.startMs, b.close, b.volume) for b in bars] == [
        (at(10, 0), 2.0, 200),
        (at(10, 1), 3.0, 100),
    ]


def test_a_quiet_symbol_closes_within_the_grace_period_by_wall_time() -> None:
    agg, manual = aggregator(grace_ms=2_000, start=at(10, 0, 30))
    assert agg.add([trade(at(10, 0, 30), 10.0)]) == []
    manual.set(at(10, 1, 1.999))
    assert agg.advance() == []
    manual.set(at(10, 1, 2))
    (bar,) = agg.advance()
    assert bar.startMs == at(10, 0) and bar.close == 10.0
    assert agg.watermark_ms == at(10, 1, 2)


def test_each_symbol_has_its_own_watermark_so_a_busy_symbol_does_not_close_a_quiet_one() -> None:
    """One aggregator per symbol: BAC's newer trade does not move AIG's watermark (when one
    aggregator took every symbol, it closed AIG's minute here); AIG's minute closes by AIG's
    own watermark, moved by wall time."""
    quiet, manual = aggregator(grace_ms=1_000, start=0, symbol="AIG")
    busy = BarAggregator("BAC", "algoseek", grace_ms=1_000, clock=manual)
    assert quiet.add([trade(at(10, 0, 5), 10.0, sym="AIG")], now_ms=0) == []
    assert busy.add([trade(at(10, 1, 1), 20.0, sym="BAC")], now_ms=0) == []
    assert quiet.advance(now_ms=0) == [] and quiet.open_since() == at(10, 0)
    assert busy.watermark_ms == at(10, 1, 1) and quiet.watermark_ms == at(10, 0, 5)
    (bar,) = quiet.advance(now_ms=56_000)  # 10:00:05 + 56 s = 10:01:01, the end plus grace
    assert (bar.symbol, bar.startMs) == ("AIG", at(10, 0))


def test_a_trade_of_another_symbol_is_refused_and_changes_nothing() -> None:
    agg, _ = aggregator(grace_ms=0)
    agg.add([trade(at(10, 0, 1), 10.0)], now_ms=0)
    with pytest.raises(ValueError, match="'BAC'"):
        agg.add([trade(at(10, 1, 1), 11.0), trade(at(10, 1, 2), 12.0, sym="BAC")], now_ms=0)
    with pytest.raises(ValueError, match="'BAC'"):
        agg.add([trade(at(10, 1, 1), 11.0, sym="BAC")], now_ms=0, symbol="BAC")
    assert agg.open_since() == at(10, 0) and agg.watermark_ms == at(10, 0, 1)
    assert agg.counters.trades_in == 1 and agg.published() == {}
    (bar,) = agg.flush()
    assert ohlcv(bar) == (10.0, 10.0, 10.0, 10.0, 100)


def test_the_wall_clock_watermark_counts_from_when_the_newest_trade_was_seen() -> None:
    agg, manual = aggregator(grace_ms=0, start=5_000_000)
    agg.add([trade(at(10, 0, 50), 10.0)])  # seen at wall 5_000_000, whatever its event time
    manual.advance(9_999)
    assert agg.advance() == []
    manual.advance(1)
    assert len(agg.advance()) == 1


def test_the_watermark_never_goes_back() -> None:
    agg, manual = aggregator(grace_ms=0, start=0)
    agg.add([trade(at(10, 0, 0), 1.0)])
    manual.advance(30_000)
    agg.advance()
    mark = agg.watermark_ms
    agg.add([trade(at(10, 0, 10), 1.0)])  # newer than the old max, older than the mark
    assert agg.watermark_ms >= mark


def test_open_since_reports_the_earliest_open_minute() -> None:
    agg, _ = aggregator(grace_ms=5_000)
    assert agg.open_since() is None
    agg.add([trade(at(10, 0, 1), 1.0), trade(at(10, 1, 1), 1.0)], now_ms=0)
    assert agg.open_since() == at(10, 0)
    agg.add([trade(at(10, 1, 5), 1.0)], now_ms=0)
    assert agg.open_since() == at(10, 1)
    agg.flush()
    assert agg.open_since() is None


# --- ordering ---------------------------------------------------------------------------------


def test_out_of_order_trades_within_grace_land_by_event_time() -> None:
    agg, _ = aggregator(grace_ms=5_000)
    agg.add([trade(at(10, 0, 30), 10.0), trade(at(10, 0, 10), 9.0)], now_ms=0)
    agg.add([trade(at(10, 1, 1), 20.0)], now_ms=0)
    agg.add([trade(at(10, 0, 59), 11.0)], now_ms=0)  # after the minute, inside the grace
    (bar,) = agg.add([trade(at(10, 1, 6), 20.0)], now_ms=0)
    assert ohlcv(bar) == (9.0, 11.0, 9.0, 11.0, 300)
    assert agg.counters.late_revised == agg.counters.late_dropped == 0


def test_ties_in_event_time_go_by_arrival_order() -> None:
    same = at(10, 0, 30)
    bars = build_bars([trade(same, 1.0), trade(same, 2.0), trade(same, 3.0)], "none")
    assert (bars[0].open, bars[0].close) == (1.0, 3.0)
    agg, _ = aggregator(grace_ms=5_000)
    agg.add([trade(at(10, 0, 40), 5.0)], now_ms=0)
    agg.add([trade(same, 6.0)], now_ms=0)
    agg.add([trade(same, 7.0)], now_ms=0)
    (bar,) = agg.flush()
    assert (bar.open, bar.close) == (6.0, 5.0)


def test_the_same_input_gives_the_same_output() -> None:
    trades = [
        trade(at(10, m, s), 10 + m + s / 100, c=ISO if s % 3 else REGULAR, sym=sym)
        for m in range(5)
        for s in range(0, 60, 7)
        for sym in ("AIG", "BAC")
    ]

    def run() -> list[Bar]:
        # as the builder does: one aggregator per symbol, each batch split by symbol
        manual = ManualClock(0)
        cores = {sym: BarAggregator(sym, grace_ms=1_000, clock=manual) for sym in ("AIG", "BAC")}
        out: list[Bar] = []
        for index in range(0, len(trades), 7):
            for sym, core in cores.items():
                batch = [t for t in trades[index : index + 7] if t.sym == sym]
                out += core.add(batch, now_ms=0, symbol=sym)
        for core in cores.values():
            out += core.flush()
        return out

    assert run() == run()


def test_batch_boundaries_do_not_change_the_final_bars() -> None:
    trades = [
        trade(at(10, m, s), 10 + (m * 7 + s) % 5, s=100 + s, c=ISO if s % 2 else REGULAR)
        for m in range(6)
        for s in range(0, 60, 5)
    ]
    whole = build_bars(trades)
    agg, _ = aggregator(grace_ms=0)
    for index in range(0, len(trades), 3):
        agg.add(trades[index : index + 3], now_ms=0)
    agg.flush()
    assert list(agg.published().values()) == whole


def test_build_bars_splits_a_sequence_of_several_symbols_by_symbol() -> None:
    bars = build_bars(
        [
            trade(at(10, 0, 1), 1.0, sym="AIG"),
            trade(at(10, 0, 2), 2.0, sym="BAC"),
            trade(at(10, 0, 3), 3.0, sym="AIG"),
        ],
        "none",
    )
    assert [(bar.symbol, bar.close, bar.volume) for bar in bars] == [
        ("AIG", 3.0, 200),
        ("BAC", 2.0, 100),
    ]


# --- late trades ------------------------------------------------------------------------------


def closed_bar(late: str) -> tuple[BarAggregator, Bar]:
    agg, _ = aggregator(grace_ms=1_000, late=late)
    agg.add([trade(at(10, 0, 10), 10.0), trade(at(10, 0, 20), 11.0)], now_ms=0)
    (bar,) = agg.add([trade(at(10, 1, 5), 12.0)], now_ms=0)
    return agg, bar


def test_a_late_trade_publishes_a_revision_under_the_revise_policy() -> None:
    agg, first = closed_bar("revise")
    (revised,) = agg.add([trade(at(10, 0, 59), 9.0, s=50)], now_ms=0)
    assert revised.startMs == first.startMs and revised.revision == 1
    assert ohlcv(revised) == (10.0, 11.0, 9.0, 9.0, 250)
    assert revised.trades == 3
    assert agg.counters.late_revised == 1 and agg.counters.revisions_published == 1
    (again,) = agg.add([trade(at(10, 0, 0), 8.0)], now_ms=0)
    assert again.revision == 2 and again.open == 8.0


def test_a_late_trade_is_dropped_and_counted_under_the_drop_policy() -> None:
    agg, first = closed_bar("drop")
    assert agg.add([trade(at(10, 0, 59), 9.0)], now_ms=0) == []
    assert agg.counters.late_dropped == 1
    assert agg.published()[first.startMs] == first


def test_a_late_trade_for_a_minute_never_seen_is_a_new_bar_or_is_dropped() -> None:
    agg, _ = closed_bar("revise")
    (bar,) = agg.add([trade(at(9, 59, 30), 7.0)], now_ms=0)
    assert bar.startMs == at(9, 59) and bar.revision == 0
    agg, _ = closed_bar("drop")
    assert agg.add([trade(at(9, 59, 30), 7.0)], now_ms=0) == []
    assert agg.counters.late_dropped == 1


def test_a_trade_of_a_day_no_longer_kept_is_dropped() -> None:
    agg, _ = aggregator(grace_ms=0)
    agg.add([trade(at(10, 0, 1), 1.0)], now_ms=0)
    agg.add([trade(at(10, 0, 1, day=date(2013, 10, 8)), 2.0)], now_ms=0)
    assert agg.add([trade(at(10, 0, 2), 3.0)], now_ms=0) == []
    assert agg.counters.too_old_dropped == 1


# --- sessions and daylight saving -------------------------------------------------------------


@pytest.mark.parametrize(
    ("day", "hour", "minute", "ts_et", "bar_id"),
    [
        (DAY, 14, 30, "2013-10-07T14:30:00-04:00", 301),
        (WINTER, 9, 30, "2013-11-04T09:30:00-05:00", 1),
        (WINTER, 14, 30, "2013-11-04T14:30:00-05:00", 301),
    ],
)
def test_bars_carry_new_york_time_and_bar_id_across_daylight_saving(
    day: date, hour: int, minute: int, ts_et: str, bar_id: int
) -> None:
    (bar,) = build_bars([trade(at(hour, minute, 5, day=day), 10.0)])
    assert bar.tsET == ts_et and bar.barId == bar_id
    assert bar.startMs == ny_epoch_ms(day, hour, minute)
    assert bar.barId == clock.bar_id(bar.startMs) and bar.tsET == clock.ts_et(bar.startMs)


def test_winter_and_summer_bars_are_an_hour_apart_in_utc() -> None:
    (summer,) = build_bars([trade(at(9, 30, 1), 1.0)])
    (winter,) = build_bars([trade(at(9, 30, 1, day=WINTER), 1.0)])
    assert (summer.startMs // 3_600_000) % 24 == 13 and (winter.startMs // 3_600_000) % 24 == 14


@pytest.mark.parametrize(
    ("hour", "minute", "bar_id"),
    [(4, 0, -329), (9, 29, 0), (9, 30, 1), (15, 59, 390), (16, 0, 391), (19, 59, 630)],
)
def test_session_boundaries_get_their_minute_ids(hour: int, minute: int, bar_id: int) -> None:
    for day in (DAY, WINTER):
        (bar,) = build_bars([trade(at(hour, minute, 30, day=day), 10.0)], "none")
        assert bar.barId == bar_id == clock.bar_id(bar.startMs)
        assert bar.tsET.startswith(f"{day.isoformat()}T{hour:02d}:{minute:02d}:00")


def test_the_session_phase_reaches_the_policy() -> None:
    seen: list[bool] = []

    class Recording(NonePolicy):
        def code(self, conditions, exchange, suspicious, regular_session, primary_exchange):
            seen.append(regular_session)
            return EVERYTHING

    build_bars(
        [
            trade(at(9, 29, 59), 1.0, c=(99,)),
            trade(at(9, 30, 0), 1.0, c=(98,)),
            trade(at(15, 59, 59), 1.0, c=(97,)),
            trade(at(16, 0, 0), 1.0, c=(96,)),
        ],
        Recording(),
    )
    assert seen[::2] == [False, True, True, False]


# --- policies ---------------------------------------------------------------------------------


def test_policies_by_name() -> None:
    assert get_policy("algoseek").name == "algoseek"
    assert get_policy("none").name == "none"
    with pytest.raises(ValueError, match="unknown bar policy"):
        get_policy("vendor")
    with pytest.raises(ValueError):
        BarAggregator("IBM", "none", late_policy="ignore")


def test_the_algoseek_classification() -> None:
    policy = AlgoseekPolicy()
    assert policy.classify(REGULAR) == Classification(True, True, True)
    assert policy.classify(ISO) == Classification(False, False, True)
    assert policy.classify((14,)) == Classification(False, False, True)
    assert policy.classify((37,)) == Classification(False, False, True)
    assert policy.classify((14, 12, 41)) == Classification(True, True, True)  # Form T includes
    assert policy.classify((0, 41)) == Classification(True, True, True)
    assert policy.classify((20, 41)) == Classification(True, True, True)  # Next Day includes
    assert policy.classify((7, 41)) == Classification(True, True, True)  # Cash includes
    assert policy.classify((2,)) == Classification(True, True, True)  # Average Price alone
    assert policy.classify((2, 41)) == Classification(False, False, True)
    assert policy.classify(()) == Classification(True, True, True)
    assert policy.classify(TTE) == Classification(True, True, True)  # Polygon omits Regular
    assert policy.classify(REGULAR, suspicious=True) == Classification(False, False, True)
    assert policy.classify((29, 41)) == Classification(False, False, True)  # Seller is neutral
    assert policy.classify((29,)) == Classification(True, True, True)
    assert policy.classify((16,)) == Classification(False, False, False)
    assert policy.classify((0, 15)) == Classification(False, False, False)
    assert policy.classify((25,), exchange=NYSE, primary_exchange=NYSE).auction == "open"
    assert policy.classify((8,), exchange=NYSE, primary_exchange=NYSE).auction == "close"
    assert policy.classify((25, 9, 41), exchange=NASDAQ, primary_exchange=NYSE) == (
        Classification(False, False, False)
    )


def test_the_classification_is_computed_once_per_distinct_key() -> None:
    calls: list[tuple[int, ...]] = []

    class Counting(AlgoseekPolicy):
        def code(self, conditions, exchange, suspicious, regular_session, primary_exchange):
            calls.append(conditions)
            return super().code(conditions, exchange, suspicious, regular_session, primary_exchange)

    trades = [trade(at(10, 0, s), 10.0, c=ISO if s % 2 else REGULAR) for s in range(60)]
    build_bars(trades, Counting())
    assert sorted(calls) == sorted([ISO, ISO, REGULAR, REGULAR])  # full key + fast key each


def test_suspicious_prints_count_for_volume_only_under_algoseek_and_fully_under_none() -> None:
    trades = [trade(at(10, 0, 1), 10.0), trade(at(10, 0, 2), 99.0, s=500, suspicious=True)]
    (vendor,) = build_bars(trades, "algoseek")
    (plain,) = build_bars(trades, "none")
    assert ohlcv(vendor) == (10.0, 10.0, 10.0, 10.0, 600)  # an excluded tick keeps its volume
    assert ohlcv(plain) == (10.0, 99.0, 10.0, 99.0, 600)
    (engine,) = build_bars(trades, AlgoseekPolicy(AlgoseekRules(suspicious="nothing")))
    assert ohlcv(engine) == (10.0, 10.0, 10.0, 10.0, 100)  # Lean's engine drops them


def test_the_documented_rule_alone_treats_auctions_and_reports_as_included_trades() -> None:
    """Without the data's clauses: official reports, opening and closing prints are included
    trades like any other, and a minute without a price drops its volume."""
    documented = AlgoseekPolicy(AlgoseekRules.documented())
    assert documented.classify((16,)) == Classification(True, True, True)
    assert documented.classify((25, 41), exchange=NASDAQ, primary_exchange=NYSE) == (
        Classification(True, True, True)
    )
    assert documented.classify((8, 41), exchange=NYSE, primary_exchange=NYSE).auction == ""
    assert not documented.fold_unpriced_volume and not documented.needs_listing
    assert AlgoseekRules().describe() == ", ".join(AlgoseekRules.DATA_CLAUSES)
    assert AlgoseekRules.documented().describe() == "documented clauses only"
    bars = build_bars(
        [
            trade(at(16, 0, 5), 10.0, s=1_000, c=(8, 41), x=NYSE),
            trade(at(15, 59, 1), 9.0),
            trade(at(16, 1, 1), 9.5, s=200, c=ISO),
        ],
        documented,
    )
    assert [(bar.tsET[11:16], bar.close, bar.volume) for bar in bars] == [
        ("15:59", 9.0, 100),
        ("16:00", 10.0, 1_000),  # the closing print in its own minute; 16:01 dropped
    ]


def test_excluded_prints_count_for_volume_only_under_algoseek() -> None:
    trades = [
        trade(at(10, 0, 1), 10.0),
        trade(at(10, 0, 2), 12.0, s=300, c=ISO),
        trade(at(10, 0, 3), 11.0),
    ]
    (bar,) = build_bars(trades)
    assert ohlcv(bar) == (10.0, 11.0, 10.0, 11.0, 500)
    assert bar.trades == 3 and bar.vwap == 10.5


def test_a_minute_with_only_volume_eligible_trades_folds_into_the_previous_bar() -> None:
    agg, _ = aggregator(grace_ms=0)
    agg.add([trade(at(10, 0, 1), 10.0)], now_ms=0)
    (first,) = agg.add([trade(at(10, 2, 1), 10.5, s=1_500, c=ISO)], now_ms=0)
    (revised,) = agg.add([trade(at(10, 3, 5), 11.0)], now_ms=0)
    assert (first.startMs, first.volume, first.revision) == (at(10, 0), 100, 0)
    assert (revised.startMs, revised.volume, revised.revision) == (at(10, 0), 1_600, 1)
    (last,) = agg.flush()
    assert (last.startMs, last.volume) == (at(10, 3), 100)
    assert set(agg.published()) == {at(10, 0), at(10, 3)}
    assert agg.counters.unpriced_minutes_folded == 1


def test_a_volume_only_minute_before_any_bar_of_the_day_goes_to_the_next_bar() -> None:
    bars = build_bars([trade(at(4, 0, 1), 10.0, s=50, c=ISO), trade(at(4, 1, 1), 10.1)])
    assert [(bar.startMs, bar.volume) for bar in bars] == [(at(4, 1), 150)]


def test_a_late_price_trade_turns_a_folded_minute_back_into_its_own_bar() -> None:
    agg, _ = aggregator(grace_ms=0)
    agg.add([trade(at(10, 0, 1), 10.0), trade(at(10, 1, 1), 10.5, s=900, c=ISO)], now_ms=0)
    agg.add([trade(at(10, 2, 5), 11.0)], now_ms=0)
    bars = agg.add([trade(at(10, 1, 30), 10.4)], now_ms=0)
    assert {(bar.startMs, bar.volume, bar.revision) for bar in bars} == {
        (at(10, 0), 100, 2),
        (at(10, 1), 1_000, 0),
    }


def test_the_none_policy_gives_a_volume_only_minute_its_own_bar() -> None:
    bars = build_bars([trade(at(10, 0, 1), 10.0), trade(at(10, 1, 1), 10.5, c=ISO)], "none")
    assert [bar.startMs for bar in bars] == [at(10, 0), at(10, 1)]


def test_the_drop_policy_suppresses_fold_revisions() -> None:
    agg, _ = aggregator(grace_ms=0, late="drop")
    agg.add([trade(at(10, 0, 1), 10.0)], now_ms=0)
    agg.add([trade(at(10, 1, 1), 10.5, c=ISO)], now_ms=0)
    agg.add([trade(at(10, 2, 1), 10.5)], now_ms=0)
    assert agg.published()[at(10, 0)].revision == 0
    assert agg.counters.revisions_suppressed == 1


# --- auctions (algoseek) ----------------------------------------------------------------------


def test_the_primary_opening_print_opens_the_first_regular_bar() -> None:
    trades = [
        trade(at(9, 30, 0.1), 182.0, c=(12,), x=ARCA),  # Form T before the open
        trade(at(9, 30, 0.7), 182.3, s=1200, c=(25, 9, 41), x=NASDAQ),  # Nasdaq cross: nothing
        trade(at(9, 30, 0.8), 182.3, s=1200, c=(16,), x=NASDAQ),  # official open: nothing
        trade(at(9, 30, 1), 181.85, s=111),
        trade(at(9, 30, 16), 182.0, s=138_862, c=(25,), x=NYSE),  # the opening auction
        trade(at(9, 30, 17), 182.2, s=100),
    ]
    (bar,) = build_bars(trades)
    assert ohlcv(bar) == (182.0, 182.2, 181.85, 182.2, 100 + 111 + 138_862 + 100)


def test_only_the_first_opening_print_counts_and_only_within_the_first_minute() -> None:
    pieces = [
        trade(at(9, 30, 0.5), 167.43, s=1750, c=(25, 41), x=ARCA, sym="SPY"),
        trade(at(9, 30, 0.6), 167.43, s=9000, c=(25, 41), x=ARCA, sym="SPY"),
        trade(at(9, 30, 2), 167.40, sym="SPY"),
    ]
    (bar,) = build_bars(pieces)
    assert (bar.open, bar.volume) == (167.43, 1750 + 100)
    late = [
        trade(at(9, 30, 5), 49.04),
        trade(at(9, 31, 13), 49.0, s=48_146, c=(25,), x=NYSE, sym="IBM"),
        trade(at(9, 31, 20), 48.96),
    ]
    bars = build_bars(late)
    assert [(bar.open, bar.volume) for bar in bars] == [(49.04, 100), (48.96, 100)]


def test_the_closing_print_closes_the_last_regular_bar_with_a_revision() -> None:
    agg, _ = aggregator(grace_ms=2_000)
    agg.add([trade(at(15, 59, 50), 48.78), trade(at(15, 59, 58), 48.72)], now_ms=0)
    (bar_1559,) = agg.add([trade(at(16, 0, 3), 48.72, s=42, c=(15,))], now_ms=0)
    assert bar_1559.close == 48.72 and bar_1559.revision == 0
    bars = agg.add([trade(at(16, 0, 7), 48.73, s=253_146, c=(8,), x=NYSE)], now_ms=0)
    (revised,) = bars
    assert revised.startMs == at(15, 59) and revised.revision == 1
    assert ohlcv(revised) == (48.78, 48.78, 48.72, 48.73, 200 + 253_146)
    agg.add([trade(at(16, 1, 25), 48.70, s=1000, c=(8,), x=NYSE)], now_ms=0)  # second: nothing
    final = agg.flush()
    assert final == []
    assert agg.counters.auction_prints_ignored == 1
    assert set(agg.published()) == {at(15, 59)}  # the 16:00 minute held no eligible trade


def test_the_closing_print_is_dropped_when_the_bar_closed_and_late_trades_are_dropped() -> None:
    agg, _ = aggregator(grace_ms=2_000, late="drop")
    agg.add([trade(at(15, 59, 50), 48.78)], now_ms=0)
    agg.add([trade(at(16, 0, 5), 48.7)], now_ms=0)
    assert agg.add([trade(at(16, 0, 7), 48.73, s=5, c=(8,), x=NYSE)], now_ms=0) == []
    assert agg.counters.late_dropped == 1


# --- the polygon policy ------------------------------------------------------------------------


def test_the_polygon_policy_follows_polygons_condition_table() -> None:
    pytest.importorskip("libs.common.market.conditions_table")
    policy = get_policy("polygon")
    assert policy.classify(()) == Classification(True, True, True)
    assert policy.classify((14,)) == Classification(True, True, True)  # ISO updates everything
    assert policy.classify((37,)) == Classification(False, False, True)  # odd lot: volume
    assert policy.classify((14, 37)) == Classification(False, False, True)  # one "no" wins
    assert policy.classify((10,)) == Classification(False, True, True)  # derivatively priced
    assert policy.classify((16,)) == Classification(False, False, False)
    assert policy.classify((12,), regular_session=True) == Classification(False, False, True)
    assert policy.classify((12,), regular_session=False) == Classification(True, True, True)


def test_the_polygon_policy_drops_a_minute_without_price_eligible_trades() -> None:
    pytest.importorskip("libs.common.market.conditions_table")
    agg, _ = aggregator("polygon", grace_ms=0)
    bars = agg.add([trade(at(10, 0, 1), 10.0), trade(at(10, 1, 1), 10.5, s=35, c=(37,))], now_ms=0)
    bars += agg.add([trade(at(10, 2, 1), 10.6)], now_ms=0)
    assert [(bar.startMs, bar.volume) for bar in bars] == [(at(10, 0), 100)]
    assert agg.counters.unpriced_minutes_dropped == 1
    assert agg.counters.unpriced_volume_dropped == 35


def test_a_high_low_only_trade_moves_high_and_low_but_not_open_or_close() -> None:
    pytest.importorskip("libs.common.market.conditions_table")
    trades = [
        trade(at(10, 0, 1), 10.0),
        trade(at(10, 0, 2), 12.0, c=(10,)),
        trade(at(10, 0, 3), 10.5),
    ]
    (bar,) = build_bars(trades, "polygon")
    assert ohlcv(bar) == (10.0, 12.0, 10.0, 10.5, 300)


def test_codes_are_bit_sets() -> None:
    assert EVERYTHING == OPEN_CLOSE | HIGH_LOW | VOLUME and IGNORED == 0
