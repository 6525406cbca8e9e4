"""The exchange calendar where it matters: the day after Thanksgiving 2013 closes at 13:00 and
Christmas Day 2013 does not trade, for the sessions and barId, the bar core's auction rule,
the engine's flat-at-close, the simulator's synthetic days and the promotion gate."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from libs.common.market.build import build_bars
from libs.common.market.listings import Listings
from libs.common.market.policies import get_policy
from libs.common.market.sessions import bar_id, last_bar_id, ny_epoch_ms, session_for
from libs.common.schemas import ExecutedTrade, Trade
from services.engine_bridge.core import run_bars
from services.ingest.simulator.settings import SyntheticFeed
from services.ingest.simulator.synthetic_day import synthetic_day_trades
from services.mirror.gate import DaySummary, evaluate_gate
from tests.test_bridge_core import Scripted, buy, core_with, of_type
from tests.test_bridge_support import make_bar

FRIDAY = date(2013, 11, 29)  # the day after Thanksgiving: NYSE closes at 13:00
THANKSGIVING = date(2013, 11, 28)
CHRISTMAS = date(2013, 12, 25)
NORMAL = date(2013, 10, 7)
NYSE, NASDAQ = 10, 12


def at(day: date, hour: int, minute: int, second: float = 0.0) -> int:
    return ny_epoch_ms(day, hour, minute, round(second * 1000))


def test_the_sessions_follow_the_exchange_calendar() -> None:
    friday = session_for(FRIDAY)
    assert friday.trading and friday.close_ms == at(FRIDAY, 13, 0)
    assert friday.last_bar_id == 210 and last_bar_id(at(FRIDAY, 10, 0)) == 210
    assert bar_id(at(FRIDAY, 12, 59)) == 210 and bar_id(at(FRIDAY, 13, 0)) == 211
    assert friday.phase(at(FRIDAY, 12, 59, 59)) == "regular"
    assert friday.phase(at(FRIDAY, 13, 0)) == "post"
    assert session_for(NORMAL).last_bar_id == 390
    for closed in (THANKSGIVING, CHRISTMAS, date(2013, 12, 28)):  # holidays and a Saturday
        session = session_for(closed)
        assert not session.trading and session.last_bar_id == 0
        assert session.phase(at(closed, 12, 0)) == "post"  # no regular session at all
        assert bar_id(at(closed, 9, 30)) == 1  # barId still orders the day


def test_the_closing_print_closes_12_59_on_an_early_close() -> None:
    trades = [
        Trade("IBM", 180.0, 100, at(FRIDAY, 12, 59, 10), NASDAQ, (0,)),
        Trade("IBM", 180.5, 300, at(FRIDAY, 13, 0, 2), NASDAQ, (12,)),  # extended hours now
        Trade("IBM", 181.0, 50_000, at(FRIDAY, 13, 0, 9), NYSE, (8,)),  # NYSE's closing print
        Trade("IBM", 179.0, 100, at(FRIDAY, 15, 59, 0), NASDAQ, (12,)),
    ]
    bars = {bar.barId: bar for bar in build_bars(trades, "algoseek")}
    assert sorted(bars) == [210, 211, 390]
    last = bars[210]
    assert (last.tsET, last.close, last.volume) == ("2013-11-29T12:59:00-05:00", 181.0, 50_100)
    assert (bars[211].close, bars[211].volume) == (180.5, 300)  # 13:00 is after hours
    assert bars[390].volume == 100  # 15:59 is an after-hours minute on that day


def test_the_engine_flattens_at_12_59_on_an_early_close_and_trades_nothing_after() -> None:
    core = core_with()
    bars = [
        make_bar("SPY", 200, 100.0, day=FRIDAY),
        make_bar("SPY", 210, 101.0, day=FRIDAY),
        make_bar("SPY", 211, 102.0, day=FRIDAY),  # 13:00: after the close
        make_bar("SPY", 380, 103.0, day=FRIDAY),
    ]
    outputs = run_bars(core, Scripted({200: buy(), 210: buy(), 211: buy(), 380: buy()}), bars)
    trades = of_type(outputs, ExecutedTrade)
    assert [(t.action, t.barId, t.reason) for t in trades] == [
        ("BUY", 200, ""),
        ("SELL", 210, "eod"),
    ]
    assert core.rejections == [("SPY", "BUY", "session close")]
    assert core.stats.outside == 2


def test_the_engine_trades_nothing_on_a_holiday() -> None:
    core = core_with()
    outputs = run_bars(core, Scripted({100: buy()}), [make_bar("SPY", 100, 100.0, day=CHRISTMAS)])
    assert of_type(outputs, ExecutedTrade) == [] and core.stats.outside == 1


def write_listing(folder: Path, symbol: str, letter: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{symbol.lower()}.csv").write_text(f"20501231,{symbol.lower()},{letter}\n")


def test_a_synthetic_early_close_day_ends_its_session_at_13_00(tmp_path: Path) -> None:
    feed = SyntheticFeed(symbols=3, rate_per_s=0.5, seed=5, day=FRIDAY)
    trades = synthetic_day_trades(feed)
    assert trades and all(trades[i].t <= trades[i + 1].t for i in range(len(trades) - 1))
    friday = session_for(FRIDAY)
    assert friday.premarket_ms <= trades[0].t and trades[-1].t < friday.end_ms
    closing = [trade for trade in trades if 8 in trade.c]
    opening = [trade for trade in trades if 25 in trade.c]
    assert len(closing) == len(opening) == 3  # one auction of each kind per symbol
    assert all(friday.close_ms <= trade.t < friday.close_ms + 60_000 for trade in closing)
    assert all(friday.open_ms <= trade.t < friday.open_ms + 60_000 for trade in opening)
    # outside the regular session every trade is Form T, as on the tape
    outside = [
        t
        for t in trades
        if not friday.open_ms <= t.t < friday.close_ms and t.c[:1] not in ((25,), (8,))
    ]
    assert outside and all(12 in trade.c for trade in outside)
    # the symbols' listings: S0002 is on tape B, named by a map file; A and C by the tape
    write_listing(tmp_path, "S0002", "P")
    policy = get_policy("algoseek", listings=Listings([tmp_path], packaged=False))
    for symbol in ("S0001", "S0002", "S0003"):
        mine = [trade for trade in trades if trade.sym == symbol]
        bars = {bar.barId: bar for bar in build_bars(mine, policy, symbol=symbol)}
        print_ = next(trade for trade in closing if trade.sym == symbol)
        assert bars[210].close == print_.p  # the closing print closes 12:59
        assert max(bars) > 210  # after-hours bars follow, as after any close
    assert policy.listings.missing == 0


def test_a_synthetic_holiday_publishes_nothing() -> None:
    assert synthetic_day_trades(SyntheticFeed(symbols=3, seed=5, day=CHRISTMAS)) == []
    assert synthetic_day_trades(SyntheticFeed(symbols=3, seed=5, day=THANKSGIVING)) == []


def summary(day: str, pct: float | None = 100.0, compared: int = 390) -> DaySummary:
    matched = int(compared * (pct or 0) / 100)
    return DaySummary(day, pct, compared, matched, 0, completenessPct=100.0 if compared else None)


def test_the_gate_counts_the_early_close_and_not_christmas() -> None:
    days = ["2013-11-25", "2013-11-26", "2013-11-27", "2013-11-29", "2013-12-02"]
    gate = evaluate_gate(
        date(2013, 12, 2), {day: summary(day) for day in days}, days=5, target_pct=99.9
    )
    assert gate.ready and [entry.day for entry in gate.window] == days  # not Thanksgiving
    around = ["2013-12-20", "2013-12-23", "2013-12-24", "2013-12-26", "2013-12-27"]
    stored = {day: summary(day) for day in around}
    stored["2013-12-25"] = summary("2013-12-25", None, compared=0)  # nothing that day
    gate = evaluate_gate(date(2013, 12, 27), stored, days=5, target_pct=99.9)
    assert gate.ready and "2013-12-25" not in [entry.day for entry in gate.window]
    # the early close is a trading day: without a report it fails the window
    del stored["2013-12-24"]
    gate = evaluate_gate(date(2013, 12, 27), stored, days=5, target_pct=99.9)
    assert not gate.ready and any("2013-12-24: no parity report" in r for r in gate.reasons)


async def test_the_simulator_serves_a_synthetic_day_and_nothing_on_christmas() -> None:
    from libs.common.runtime.settings import Secret
    from services.ingest.simulator import PolygonSimulator, SimulatorSettings
    from services.ingest.simulator.cli import build_parser, settings_from_args

    args = build_parser().parse_args(["--synthetic-day", "2013-11-29", "--rate", "0.2"])
    parsed = settings_from_args(args, environ={})
    assert isinstance(parsed.feed, SyntheticFeed) and parsed.feed.day == FRIDAY
    for day, expected in ((CHRISTMAS, 0), (FRIDAY, len(synthetic_day_trades(parsed.feed)))):
        feed = SyntheticFeed(symbols=parsed.feed.symbols, rate_per_s=0.2, day=day)
        settings = SimulatorSettings(api_key=Secret("k"), port=0, feed=feed)
        async with PolygonSimulator(settings) as sim:
            sim._start_feed()
            await sim.feed_done.wait()
            sent = sum(sim.history.count(symbol) for symbol in sim.history.symbols())
            assert sent == expected, day
            assert sim.stats.events_generated >= expected
    assert expected > 10_000


async def test_the_scheduled_reconciler_reports_nothing_on_christmas(
    redis_client: object, redis_url: str, unique_name: object
) -> None:
    """On Christmas Day the timer makes no report: nothing is published (Kafka is never
    reached), nothing is stored for the gate."""
    import redis.asyncio as aioredis
    from prometheus_client import CollectorRegistry

    from libs.common.runtime.clock import ManualClock
    from libs.common.runtime.settings import load_settings
    from services.mirror.config import MirrorSettings
    from services.mirror.gate import GateStore
    from services.mirror.reconciler import ScheduledReconciler

    assert isinstance(redis_client, aioredis.Redis)
    prefix = f"{unique_name('xmas')}:"  # type: ignore[operator]
    settings = load_settings(
        MirrorSettings,
        {
            "MIRROR_REDIS_URL": redis_url,
            "MIRROR_KAFKA_BOOTSTRAP": "127.0.0.1:9",  # never reached on Christmas
            "MIRROR_KEY_PREFIX": prefix,
            "MIRROR_RECONCILE_INTERVAL_S": "3600",
        },
    )
    clock = ManualClock(at(CHRISTMAS, 12, 0))
    actor = ScheduledReconciler(settings, redis_client, registry=CollectorRegistry(), clock=clock)
    await actor.tick()
    await actor.tick()
    assert actor.last_report is None and actor.skipped == CHRISTMAS
    stored = await GateStore(redis_client, actor.reconciler.keys).get_many([CHRISTMAS])
    assert stored == {}
    await actor.reconciler.close()
