"""The bridge core without I/O: paper broker rules, strategies, minute buckets, records, state.

Every test here is pure: bars in, records out, no clock but the ``now_ms`` the test passes.
"""

from __future__ import annotations

from datetime import date

import msgspec
import pytest

from libs.common.schemas import (
    ExecutedTrade,
    Portfolio,
    Position,
    Signal,
    decode,
    encode,
)
from services.engine_bridge.backtest import encode_outputs
from services.engine_bridge.broker import BrokerConfig
from services.engine_bridge.core import BridgeCore, CoreConfig, Outputs, run_bars
from services.engine_bridge.model import (
    STATE_DECODER,
    STATE_ENCODER,
    EngineGap,
    EngineInput,
    EngineOutput,
    EngineSignal,
    Order,
)
from services.engine_bridge.strategies import BuiltinEngine, GoldenCross, ZScore
from tests.test_bridge_support import make_bar, series

NO_COSTS = BrokerConfig(slippage_bps=0.0, commission_per_share=0.0, stop_pct=0.0, target_pct=0.0)


class Scripted:
    """An engine that returns what the test scripted per barId (and records its inputs)."""

    def __init__(self, script: dict[int, EngineOutput]) -> None:
        self.script = script
        self.inputs: list[EngineInput] = []

    def decide(self, engine_input: EngineInput) -> EngineOutput:
        self.inputs.append(engine_input)
        return self.script.get(engine_input.barId, EngineOutput())


def buy(symbol: str = "SPY", **kwargs: object) -> EngineOutput:
    return EngineOutput(orders=[Order(symbol, "BUY", **kwargs)])  # type: ignore[arg-type]


def sell(symbol: str = "SPY", **kwargs: object) -> EngineOutput:
    return EngineOutput(orders=[Order(symbol, "SELL", **kwargs)])  # type: ignore[arg-type]


def of_type(outputs: Outputs, kind: type) -> list:  # type: ignore[type-arg]
    return [record for _, record in outputs if isinstance(record, kind)]


def core_with(broker: BrokerConfig = NO_COSTS, **options: object) -> BridgeCore:
    values: dict[str, object] = {"symbols": ("SPY",), "broker": broker}
    values.update(options)
    return BridgeCore(CoreConfig(**values))  # type: ignore[arg-type]


# -- paper broker ------------------------------------------------------------------------------


def test_an_order_fills_at_the_close_with_slippage_and_commission() -> None:
    config = BrokerConfig(
        slippage_bps=10.0,
        commission_per_share=0.01,
        commission_min=1.5,
        stop_pct=0.0,
        target_pct=0.0,
        shares_per_trade=100,
    )
    core = core_with(config)
    bars = series("SPY", [100.0, 101.0, 102.0])
    outputs = run_bars(core, Scripted({1: buy(), 3: sell()}), bars)
    entry, exit_ = of_type(outputs, ExecutedTrade)
    assert (entry.action, entry.shares, entry.price) == ("BUY", 100, 100.1)  # 100 + 10 bps
    assert entry.commission == 1.5  # the minimum beats 100 × 0.01
    assert (exit_.action, exit_.price) == ("SELL", 101.898)  # 102 - 10 bps
    assert exit_.realizedPnl == pytest.approx((101.898 - 100.1) * 100 - 1.5, abs=0.01)
    final = of_type(outputs, Portfolio)[-1]
    assert final.realizedPnl == pytest.approx((101.898 - 100.1) * 100 - 3.0, abs=0.01)
    assert final.equity == pytest.approx(100_000 + final.realizedPnl, abs=0.01)


def test_notional_sizing_buys_whole_shares_for_the_notional() -> None:
    core = core_with(
        msgspec.structs.replace(NO_COSTS, sizing="notional", notional_per_trade=10_000.0)
    )
    outputs = run_bars(core, Scripted({1: buy()}), series("SPY", [333.0]))
    assert of_type(outputs, ExecutedTrade)[0].shares == 30


def test_a_buy_beyond_the_cash_is_cut_to_what_the_cash_allows() -> None:
    core = core_with(msgspec.structs.replace(NO_COSTS, initial_cash=1_000.0))
    outputs = run_bars(core, Scripted({1: buy(shares=50)}), series("SPY", [30.0]))
    assert of_type(outputs, ExecutedTrade)[0].shares == 33
    assert of_type(outputs, Portfolio)[-1].cash == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("bar", "reason", "price"),
    [
        ({"open_": 99.8, "high": 100.0, "low": 98.9, "close": 99.5}, "stop", 99.0),
        ({"open_": 98.0, "high": 98.5, "low": 97.0, "close": 98.2}, "stop", 98.0),  # gap down
        ({"open_": 100.5, "high": 102.5, "low": 100.4, "close": 101.0}, "target", 102.0),
        ({"open_": 103.0, "high": 103.5, "low": 102.9, "close": 103.2}, "target", 103.0),
        ({"open_": 100.0, "high": 102.5, "low": 98.5, "close": 100.0}, "stop", 99.0),  # both
    ],
)
def test_stop_and_target_exits_follow_the_bar(
    bar: dict[str, float], reason: str, price: float
) -> None:
    config = msgspec.structs.replace(NO_COSTS, stop_pct=1.0, target_pct=2.0)
    core = core_with(config)
    bars = [make_bar("SPY", 1, 100.0), make_bar("SPY", 2, **bar)]
    outputs = run_bars(core, Scripted({1: buy()}), bars)
    entry, exit_ = of_type(outputs, ExecutedTrade)
    assert (entry.stopPrice, entry.targetPrice) == (99.0, 102.0)
    assert (exit_.action, exit_.reason, exit_.price) == ("SELL", reason, price)
    assert exit_.barId == 2


def test_the_entry_bar_never_triggers_its_own_stop() -> None:
    config = msgspec.structs.replace(NO_COSTS, stop_pct=0.1)
    core = core_with(config)
    bars = [make_bar("SPY", 1, 100.0, low=90.0, high=100.0, open_=100.0)]
    outputs = run_bars(core, Scripted({1: buy()}), bars)
    assert len(of_type(outputs, ExecutedTrade)) == 1


def test_bars_held_counts_the_bars_since_entry() -> None:
    core = core_with(flatten_at_close=False)
    outputs = run_bars(core, Scripted({3: buy()}), series("SPY", [100.0] * 8))
    held = [(p.barId, p.barsHeld) for p in of_type(outputs, Position)]
    assert held == [(3, 0), (4, 1), (5, 2), (6, 3), (7, 4), (8, 5)]


def test_positions_carry_unrealized_pnl_and_close_with_a_flat_record() -> None:
    core = core_with()
    bars = series("SPY", [100.0, 101.5, 103.0, 102.0])
    outputs = run_bars(core, Scripted({1: buy(shares=10), 3: sell()}), bars)
    positions = of_type(outputs, Position)
    assert [(p.barId, p.shares, p.unrealizedPnl, p.lastPrice) for p in positions] == [
        (1, 10, 0.0, 100.0),
        (2, 10, 15.0, 101.5),
        (3, 0, 0.0, 103.0),
    ]
    portfolios = of_type(outputs, Portfolio)
    assert [p.openPositions for p in portfolios] == [1, 1, 0, 0]
    assert portfolios[1].exposure == 1015.0 and portfolios[1].unrealizedPnl == 15.0


def test_direction_orders_do_not_pyramid_and_sell_only_what_is_held() -> None:
    core = core_with()
    script = {1: buy(), 2: buy(), 3: sell(), 4: sell()}
    outputs = run_bars(core, Scripted(script), series("SPY", [100.0] * 4))
    trades = of_type(outputs, ExecutedTrade)
    assert [(t.action, t.shares, t.barId) for t in trades] == [("BUY", 100, 1), ("SELL", 100, 3)]
    assert core.stats.rejected == 0  # already long / already flat are no-ops, not rejections


def test_short_selling_only_when_allowed() -> None:
    outputs = run_bars(core_with(), Scripted({1: sell(shares=5)}), series("SPY", [100.0]))
    assert of_type(outputs, ExecutedTrade) == []
    config = msgspec.structs.replace(NO_COSTS, allow_short=True)
    core = core_with(config)
    outputs = run_bars(core, Scripted({1: sell(), 2: buy()}), series("SPY", [100.0, 99.0, 98.0]))
    short, flip = of_type(outputs, ExecutedTrade)
    assert (short.action, short.shares) == ("SELL", 100)
    assert (flip.action, flip.shares, flip.realizedPnl) == ("BUY", 200, 100.0)  # cover + go long
    assert core.state.broker.positions["SPY"].shares == 100


def test_everything_is_flattened_at_the_session_close() -> None:
    core = core_with()
    bars = [make_bar("SPY", 385, 100.0), make_bar("SPY", 390, 101.0)]
    outputs = run_bars(core, Scripted({385: buy(), 390: buy()}), bars)
    trades = of_type(outputs, ExecutedTrade)
    assert [(t.action, t.barId, t.reason) for t in trades] == [
        ("BUY", 385, ""),
        ("SELL", 390, "eod"),
    ]
    assert core.rejections == [("SPY", "BUY", "session close")]
    assert of_type(outputs, Portfolio)[-1].realizedPnl == 100.0


def test_trade_ids_are_derived_from_content_and_unique() -> None:
    core = core_with(msgspec.structs.replace(NO_COSTS, stop_pct=1.0))
    bars = [make_bar("SPY", 1, 100.0), make_bar("SPY", 2, 98.0, low=97.0, open_=99.5)]
    outputs = run_bars(core, Scripted({1: buy(), 2: buy()}), bars)
    ids = [t.tradeId for t in of_type(outputs, ExecutedTrade)]
    assert ids == ["paper-20131007-SPY-1-1", "paper-20131007-SPY-2-2", "paper-20131007-SPY-2-3"]


# -- records ----------------------------------------------------------------------------------


def test_records_carry_new_york_time_with_the_offset_and_the_session_bar_id() -> None:
    summer = run_bars(core_with(), Scripted({301: buy()}), [make_bar("SPY", 301, 100.0)])
    winter_bar = make_bar("SPY", 301, 100.0, day=date(2013, 12, 2))
    winter = run_bars(core_with(), Scripted({301: buy()}), [winter_bar])
    for outputs, offset in ((summer, "-04:00"), (winter, "-05:00")):
        for _, record in outputs:
            assert record.tsET.endswith("T14:30:00" + offset)  # type: ignore[attr-defined]
            assert record.barId == 301  # type: ignore[attr-defined]


def test_every_record_decodes_with_the_contract_structs() -> None:
    engine = BuiltinEngine(GoldenCross(3, 6))
    closes = [100, 101, 102, 103, 104, 105, 104, 102, 100, 99, 101, 104, 107, 106, 103, 100]
    outputs = run_bars(core_with(), engine, series("SPY", [float(c) for c in closes]))
    kinds = {Signal: 0, ExecutedTrade: 0, Position: 0, Portfolio: 0}
    for _, record in outputs:
        data = encode(record)
        assert data.startswith(b'{"seq":0,')
        assert decode(data, type(record)) == record
        kinds[type(record)] += 1
    assert all(kinds.values()), kinds


# -- strategies --------------------------------------------------------------------------------


def test_golden_cross_signals_on_each_cross_and_trades_the_crosses() -> None:
    engine = BuiltinEngine(GoldenCross(2, 4))
    closes = [10, 10, 10, 10, 11, 12, 13, 12, 10, 9, 8, 9, 11, 13]
    outputs = run_bars(
        core_with(flatten_at_close=False), engine, series("SPY", [float(c) for c in closes])
    )
    signals = [(s.barId, s.signal) for s in of_type(outputs, Signal)]
    assert signals == [(4, "NEUTRAL"), (5, "BULLISH"), (9, "BEARISH"), (13, "BULLISH")]
    assert {s.strategy for s in of_type(outputs, Signal)} == {"golden_cross"}
    trades = [(t.barId, t.action) for t in of_type(outputs, ExecutedTrade)]
    assert trades == [(5, "BUY"), (9, "SELL"), (13, "BUY")]


def test_golden_cross_every_bar_mode_signals_each_minute_after_warm_up() -> None:
    engine = BuiltinEngine(GoldenCross(2, 4), signals_every_bar=True)
    outputs = run_bars(core_with(), engine, series("SPY", [float(c) for c in range(10, 20)]))
    assert [s.barId for s in of_type(outputs, Signal)] == list(range(4, 11))


def test_zscore_buys_a_stretch_down_and_exits_when_it_reverts() -> None:
    strategy = ZScore(return_window=1, window=10, entry=2.0, exit=0.5)
    engine = BuiltinEngine(strategy)
    closes = [
        100.0,
        100.1,
        100.0,
        100.1,
        100.0,
        100.1,
        100.0,
        100.1,
        100.0,
        100.1,
        100.0,
        100.1,
        97.0,
        97.1,
        97.0,
        97.1,
        97.05,
    ]
    outputs = run_bars(core_with(flatten_at_close=False), engine, series("SPY", closes))
    signals = [(s.barId, s.signal) for s in of_type(outputs, Signal)]
    assert signals[0][1] == "NEUTRAL"
    assert (13, "BULLISH") in signals
    trades = [(t.barId, t.action, t.reason.split(":")[0]) for t in of_type(outputs, ExecutedTrade)]
    assert trades[0] == (13, "BUY", "zscore BULLISH")
    assert trades[1][1] == "SELL" and trades[1][0] > 13


def test_strategy_state_round_trips_through_a_snapshot() -> None:
    engine = BuiltinEngine(ZScore(2, 5, 1.5, 0.2))
    run_bars(core_with(), engine, series("SPY", [100.0 + (i % 3) for i in range(12)]))
    copy = BuiltinEngine(ZScore(2, 5, 1.5, 0.2))
    copy.restore(msgspec.json.decode(msgspec.json.encode(engine.snapshot())))
    assert copy.symbols == engine.symbols


# -- minute buckets ----------------------------------------------------------------------------


def test_a_minute_waits_for_every_symbol_then_goes_out_sorted_by_symbol() -> None:
    core = BridgeCore(CoreConfig(symbols=("SPY", "IBM", "AIG"), broker=NO_COSTS))
    assert core.offer(make_bar("SPY", 1, 1.0), 0) == "pending"
    assert core.offer(make_bar("AIG", 1, 1.0), 0) == "pending"
    assert core.ready(0) is None
    core.offer(make_bar("IBM", 1, 1.0), 0)
    bucket = core.ready(0)
    assert bucket is not None and [b.symbol for b in bucket.bars] == ["AIG", "IBM", "SPY"]


def test_a_symbol_with_a_later_bar_releases_the_minute_it_skipped() -> None:
    core = BridgeCore(CoreConfig(symbols=("SPY", "IBM"), broker=NO_COSTS))
    core.offer(make_bar("SPY", 1, 1.0), 0)
    core.offer(make_bar("IBM", 2, 1.0), 0)  # IBM had no trade in minute 1
    bucket = core.ready(0)
    assert bucket is not None and [b.symbol for b in bucket.bars] == ["SPY"]
    assert core.ready(0) is None  # minute 2 still waits for SPY


def test_a_quiet_symbol_releases_the_minute_after_the_timeout() -> None:
    core = BridgeCore(CoreConfig(symbols=("SPY", "IBM"), broker=NO_COSTS, bucket_timeout_ms=3_000))
    core.offer(make_bar("SPY", 1, 1.0), 1_000)
    assert core.ready(3_999) is None
    bucket = core.ready(4_000)
    assert bucket is not None and bucket.timedOut and core.stats.timed_out == 1


def test_a_minute_restored_from_a_snapshot_still_times_out() -> None:
    config = CoreConfig(symbols=("SPY", "IBM"), broker=NO_COSTS, bucket_timeout_ms=3_000)
    core = BridgeCore(config)
    core.offer(make_bar("SPY", 1, 1.0), 0)
    state = STATE_DECODER.decode(STATE_ENCODER.encode(core.snapshot()))
    restored = BridgeCore(config, state)
    assert restored.pending_minutes() == 1
    assert restored.ready(50_000) is None  # the wait starts now
    bucket = restored.ready(53_000)
    assert bucket is not None and bucket.timedOut and [b.symbol for b in bucket.bars] == ["SPY"]


def test_late_bars_are_processed_on_their_own_and_duplicates_are_dropped() -> None:
    core = BridgeCore(CoreConfig(symbols=("SPY", "IBM"), broker=NO_COSTS, bucket_timeout_ms=1))
    engine = Scripted({})
    core.offer(make_bar("SPY", 1, 1.0), 0)
    core.process(core.ready(10), engine.decide)  # type: ignore[arg-type]
    assert core.offer(make_bar("IBM", 1, 1.0), 20) == "late"
    late = core.ready(20)
    assert late is not None and late.late and [b.symbol for b in late.bars] == ["IBM"]
    core.process(late, engine.decide)
    assert core.offer(make_bar("IBM", 1, 1.0), 30) == "duplicate"
    assert core.offer(make_bar("SPY", 1, 1.0), 30) == "duplicate"


def test_a_correction_reaches_the_engine_with_the_next_minute_and_never_trades_again() -> None:
    engine = Scripted({1: buy()})
    core = core_with()
    run_bars(core, engine, [make_bar("SPY", 1, 100.0)])
    assert core.offer(make_bar("SPY", 1, 100.5, revision=1), 0) == "correction"
    assert core.offer(make_bar("SPY", 1, 100.5, revision=1), 0) == "duplicate"
    outputs = run_bars(core, engine, [make_bar("SPY", 2, 101.0)])
    assert [c.close for c in engine.inputs[-1].corrections] == [100.5]
    assert of_type(outputs, ExecutedTrade) == []


def test_a_pending_bar_is_replaced_by_its_correction() -> None:
    core = BridgeCore(CoreConfig(symbols=("SPY", "IBM"), broker=NO_COSTS))
    core.offer(make_bar("SPY", 1, 100.0), 0)
    assert core.offer(make_bar("SPY", 1, 100.7, revision=1), 0) == "correction"
    core.offer(make_bar("IBM", 1, 50.0), 0)
    bucket = core.ready(0)
    assert bucket is not None and bucket.bars[1].close == 100.7


def test_bars_outside_the_regular_session_and_other_symbols_are_skipped() -> None:
    core = core_with()
    assert core.offer(make_bar("SPY", 0, 1.0), 0) == "outside"  # 09:29
    assert core.offer(make_bar("SPY", 391, 1.0), 0) == "outside"  # 16:00
    assert core.offer(make_bar("IBM", 5, 1.0), 0) == "ignored"
    extended = core_with(extended_hours=True)
    assert extended.offer(make_bar("SPY", -100, 1.0), 0) == "pending"


def test_orders_for_a_symbol_without_a_bar_this_minute_are_rejected() -> None:
    core = BridgeCore(CoreConfig(symbols=("SPY", "IBM"), broker=NO_COSTS))
    engine = Scripted({2: buy("IBM")})
    outputs = run_bars(core, engine, [make_bar("SPY", 2, 1.0), make_bar("IBM", 3, 1.0)])
    assert of_type(outputs, ExecutedTrade) == []
    assert core.stats.rejected == 1


# -- determinism and state ----------------------------------------------------------------------


def _day(symbols: tuple[str, ...] = ("SPY", "IBM")) -> list:  # type: ignore[type-arg]
    bars = []
    for minute in range(1, 391):
        for index, symbol in enumerate(symbols):
            wave = ((minute * (7 + index)) % 23 - 11) / 10
            bars.append(make_bar(symbol, minute, 100.0 + index * 50 + wave + minute / 100))
    return bars


def test_the_same_bars_give_byte_identical_outputs() -> None:
    def once() -> bytes:
        core = BridgeCore(
            CoreConfig(symbols=("SPY", "IBM"), broker=BrokerConfig(stop_pct=0.3, target_pct=0.6))
        )
        return encode_outputs(run_bars(core, BuiltinEngine(ZScore(3, 20, 1.5, 0.3)), _day()))

    first, second = once(), once()
    assert first == second and first.count(b"\n") > 390


def test_arrival_order_across_symbols_does_not_change_the_outputs() -> None:
    bars = _day()
    by_symbol = sorted(bars, key=lambda b: (b.symbol, b.startMs))  # all IBM, then all SPY

    def run(order: list) -> bytes:  # type: ignore[type-arg]
        core = BridgeCore(CoreConfig(symbols=("SPY", "IBM")))
        return encode_outputs(run_bars(core, BuiltinEngine(GoldenCross(5, 15)), order))

    assert run(bars) == run(by_symbol)


def test_a_core_restored_from_its_snapshot_continues_like_an_uninterrupted_one() -> None:
    bars = _day()
    config = CoreConfig(symbols=("SPY", "IBM"), broker=BrokerConfig(stop_pct=0.2, target_pct=0.4))
    whole = encode_outputs(run_bars(BridgeCore(config), BuiltinEngine(GoldenCross(5, 15)), bars))

    first_core, first_engine = BridgeCore(config), BuiltinEngine(GoldenCross(5, 15))
    half = len(bars) // 2 + 1  # mid-minute: one SPY bar is left pending
    first = run_bars(first_core, first_engine, bars[:half], flush=False)
    saved = STATE_ENCODER.encode(first_core.snapshot(first_engine.snapshot()))

    state = STATE_DECODER.decode(saved)
    second_core, second_engine = BridgeCore(config, state), BuiltinEngine(GoldenCross(5, 15))
    second_engine.restore(state.engine)
    # the input delivers some bars again after the restart: they must be recognised
    second = run_bars(second_core, second_engine, bars[half - 6 :])
    assert encode_outputs(first) + encode_outputs(second) == whole


def test_the_engine_sees_positions_after_this_minutes_exits() -> None:
    engine = Scripted(
        {
            1: EngineOutput(
                orders=[Order("SPY", "BUY", stopPrice=99.0)],
                signals=[EngineSignal("SPY", "BULLISH", 150.0)],
            )
        }
    )
    core = core_with()
    bars = [
        make_bar("SPY", 1, 100.0),
        make_bar("SPY", 2, 100.0, low=98.0),
        make_bar("SPY", 3, 100.0),
    ]
    outputs = run_bars(core, engine, bars)
    assert [len(i.positions) for i in engine.inputs] == [0, 0, 0]
    assert of_type(outputs, Signal)[0].confidence == 100.0  # clamped to the contract's range
    assert of_type(outputs, Signal)[0].strategy == "builtin"


def test_engine_gaps_are_reported_once_the_engine_answers_again() -> None:
    core = core_with()
    for minute in (1, 2, 3):
        core.offer(make_bar("SPY", minute, 100.0), 0)
        core.begin(core.ready(0))  # type: ignore[arg-type]
        records = core.finish(
            None, gap_reason="crash" if minute == 1 else "timeout", engine_restarts=0
        )
        assert not [r for c, r in records if c == "sentio.engine.gaps.v1"]
    core.offer(make_bar("SPY", 4, 100.0), 0)
    core.begin(core.ready(0))  # type: ignore[arg-type]
    records = core.finish(EngineOutput(), engine_restarts=1)
    (gap,) = [r for c, r in records if isinstance(r, EngineGap)]
    assert (gap.fromBarId, gap.toBarId, gap.minutes) == (1, 3, 3)
    assert (gap.reason, gap.restarts, gap.timeouts) == ("crash+timeout", 1, 2)
