"""The reconciler against real Redis (bar store, vendor streams) and Kafka (shadow bars)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from libs.common import names
from libs.common.io.barstore import BarStore
from libs.common.io.kafka_io import read_from_beginning
from libs.common.io.redis_io import Publisher
from libs.common.market.build import build_bars
from libs.common.market.sessions import bar_id, ny_epoch_ms, ts_et
from libs.common.market.tickfiles import read_lean_minute_bars
from libs.common.names import Keys
from libs.common.runtime.clock import ManualClock
from libs.common.runtime.settings import load_settings
from libs.common.schemas import (
    AggregateBatch,
    Bar,
    Ledger,
    LedgerEntry,
    ParityReport,
    TickBatch,
    Trade,
    VendorAggregate,
    encode,
)
from services.mirror.config import MirrorSettings
from services.mirror.gauges import ParityGauges
from services.mirror.reconciler import Reconciler, ScheduledReconciler
from services.mirror.sides import SideReader
from tests.helpers import eventually, run_reconcile

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parent.parent
DEMO_DAY = date(2013, 10, 7)


def env_for(redis_url: str, kafka_bootstrap: str, name: str) -> dict[str, str]:
    return {
        "MIRROR_REDIS_URL": redis_url,
        "MIRROR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "MIRROR_KEY_PREFIX": f"{name}:",
        "MIRROR_KAFKA_BARS_TOPIC": f"bars-{name}.{{symbol}}.1m",
        "MIRROR_PARITY_TOPIC": f"parity-{name}",
        "MIRROR_KAFKA_IDLE_MS": "1000",
    }


def demo_bars(shared_data: Path, symbol: str, day: date = DEMO_DAY) -> list[Bar]:
    """The vendor's minute bars of a real day, as our Bar records."""
    path = shared_data / "minute" / symbol.lower() / f"{day:%Y%m%d}_trade.zip"
    bars = []
    for minute in read_lean_minute_bars(path, day):
        vwap = round((minute.open + minute.high + minute.low + minute.close) / 4, 4)
        bars.append(
            Bar(
                seq=0,
                symbol=symbol,
                tsET=ts_et(minute.start_ms),
                barId=bar_id(minute.start_ms),
                open=minute.open,
                high=minute.high,
                low=minute.low,
                close=minute.close,
                volume=minute.volume,
                vwap=vwap,
                trades=max(1, minute.volume // 100),
                startMs=minute.start_ms,
                endMs=minute.start_ms + 60_000,
            )
        )
    return bars


def synthetic_bars(symbol: str, day: date, minutes: int = 30) -> list[Bar]:
    start = ny_epoch_ms(day, 9, 30)
    return [
        Bar(
            seq=0,
            symbol=symbol,
            tsET=ts_et(start + m * 60_000),
            barId=bar_id(start + m * 60_000),
            open=10.0,
            high=11.0,
            low=9.0,
            close=10.0 + m / 100,
            volume=100 + m,
            vwap=10.1,
            trades=3,
            startMs=start + m * 60_000,
            endMs=start + (m + 1) * 60_000,
        )
        for m in range(minutes)
    ]


async def produce_bars(
    kafka_bootstrap: str, topic_of: Callable[[str], str], bars: list[Bar]
) -> None:
    """What the shadow bar builder would have produced."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for bar in bars:
            await producer.send(topic_of(bar.symbol), encode(bar), key=bar.symbol.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def publish_source(
    client: aioredis.Redis,
    keys: Keys,
    kafka_bootstrap: str,
    trades: list[Trade],
    tick_topic: str | None = None,
) -> list[Bar]:
    """What ingest and the mirror would have written for ``trades``: the source ledger on
    Redis and the ticks on Kafka (``ticks.<SYM>``, or ``tick_topic`` for every symbol).
    Returns the bars the policy ``none`` makes of them."""
    entries: dict[tuple[str, int], list[int]] = {}
    for trade in trades:
        counts = entries.setdefault((trade.sym, trade.t - trade.t % 60_000), [0, 0])
        counts[0] += 1
        counts[1] += trade.s
    ledger = Ledger(0, "ingest", [LedgerEntry(s, m, c[0], c[1]) for (s, m), c in entries.items()])
    await Publisher(client, keys=keys).publish(names.LEDGER, ledger)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for seq, trade in enumerate(trades, 1):
            batch = TickBatch(seq, trade.sym, [trade])
            topic = tick_topic or names.channel(names.TICKS, trade.sym)
            await producer.send(topic, encode(batch), key=trade.sym.encode())
        await producer.flush()
    finally:
        await producer.stop()
    return build_bars(trades, "none")


def synthetic_trades(symbol: str, day: date, minutes: int = 5) -> list[Trade]:
    start = ny_epoch_ms(day, 9, 30)
    return [
        Trade(
            symbol,
            10.0 + m / 100 + n / 1000,
            100 + n,
            start + m * 60_000 + n * 7_000,
            4,
            (),
            f"{m}.{n}",
        )
        for m in range(minutes)
        for n in range(3)
    ]


async def publish_vendor(client: aioredis.Redis, keys: Keys, bars: list[Bar]) -> None:
    """The vendor's AM aggregates on aggs.<SYM>.1m, one per minute."""
    publisher = Publisher(client, keys=keys)
    await publisher.publish_many(
        [
            (
                f"aggs.{bar.symbol}.1m",
                AggregateBatch(
                    seq=0,
                    sym=bar.symbol,
                    aggs=[
                        VendorAggregate(
                            sym=bar.symbol,
                            o=bar.open,
                            h=bar.high,
                            l=bar.low,
                            c=bar.close,
                            v=bar.volume,
                            s=bar.startMs,
                            e=bar.endMs,
                        )
                    ],
                ),
            )
            for bar in bars
        ]
    )


@pytest.fixture
def name(unique_name: Callable[[str], str]) -> str:
    return unique_name("R").replace("-", "")[-40:]


async def test_reconcile_over_an_undisturbed_demo_day_prints_100_percent(
    redis_client: aioredis.Redis,
    redis_url: str,
    kafka_bootstrap: str,
    name: str,
    shared_data: Path,
    tmp_path: Path,
) -> None:
    env = env_for(redis_url, kafka_bootstrap, name)
    settings = load_settings(MirrorSettings, env)
    keys = Keys(settings.key_prefix)
    bars = demo_bars(shared_data, "SPY") + demo_bars(shared_data, "IBM")
    await BarStore(redis_client, keys).put_many(bars)
    await produce_bars(kafka_bootstrap, lambda s: f"bars-{name}.{s}.1m", bars)
    await publish_vendor(redis_client, keys, bars)

    out = tmp_path / "report.json"
    done = await asyncio.to_thread(
        run_reconcile, *("--date", "2013-10-07", "--out", str(out), "--quiet"), env=env, timeout=90
    )
    report = done.stdout
    first = report.splitlines()
    assert first[0] == "# Shadow-mode parity — 2013-10-07"
    assert first[2].startswith(
        f"**Parity 100 %** (target 99.9 %, at target): "
        f"{len(bars):,} of {len(bars):,} symbol-minutes match across "
        f"2 symbols"
    )
    assert "**Agreement 100 %**" in report  # the vendor check
    assert "Mismatches" not in report and "Missing in" not in report
    data = msgspec.json.decode(out.read_bytes())
    assert data["parity"]["totals"]["parityPct"] == 100.0
    assert data["parity"]["totals"]["matched"] == len(bars)

    published = []
    async for chunk in read_from_beginning(settings, [settings.parity_topic]):
        published.extend(chunk)
    assert [record.key for record in published] == [b"2013-10-07"]
    record = msgspec.json.decode(published[0].value, type=ParityReport)
    assert (record.day, record.parityPct, record.matched, record.promotionReady) == (
        "2013-10-07",
        100.0,
        len(bars),
        False,
    )  # one day is not five


async def test_a_disturbed_day_is_reported_kind_by_kind(
    redis_client: aioredis.Redis, redis_url: str, kafka_bootstrap: str, name: str
) -> None:
    settings = load_settings(MirrorSettings, env_for(redis_url, kafka_bootstrap, name))
    keys = Keys(settings.key_prefix)
    day = DEMO_DAY
    redis_side = synthetic_bars("AAA", day) + synthetic_bars("BBB", day)
    kafka_side = list(redis_side)
    kafka_side[3] = msgspec.structs.replace(kafka_side[3], high=11.5)  # mismatch (AAA 09:33)
    del kafka_side[10]  # missing in Kafka (AAA 09:40)
    kafka_side.append(kafka_side[40])  # duplicate (BBB 09:40)
    kafka_only = synthetic_bars("CCC", day, minutes=2)  # missing in Redis (a whole symbol)
    await BarStore(redis_client, keys).put_many(redis_side)
    await produce_bars(kafka_bootstrap, lambda s: f"bars-{name}.{s}.1m", kafka_side + kafka_only)

    registry = CollectorRegistry()
    reconciler = Reconciler(settings, redis_client, gauges=ParityGauges(registry, 5))
    report = await reconciler.run(day, min_age_s=0, publish=False)
    await reconciler.close()
    totals = report.parity.totals
    assert (
        totals.matched,
        totals.mismatched,
        totals.missingKafka,
        totals.missingRedis,
        totals.duplicates,
    ) == (58, 1, 1, 2, 1)
    assert [p.symbol for p in report.parity.symbols] == ["CCC", "AAA", "BBB"]  # worst first
    mismatch = report.parity.mismatches[0]
    assert (mismatch.symbol, mismatch.tsET[11:16], [d.field for d in mismatch.fields]) == (
        "AAA",
        "09:33",
        ["high"],
    )
    assert [(m.symbol, m.tsET[11:16]) for m in report.parity.missingKafka] == [("AAA", "09:40")]
    assert [m.symbol for m in report.parity.missingRedis] == ["CCC", "CCC"]
    assert [(d.symbol, d.copies) for d in report.parity.duplicates] == [("BBB", 2)]
    assert (
        registry.get_sample_value("tickmesh_parity_percent", {"symbol": "CCC", "day": "2013-10-07"})
        == 0.0
    )
    assert (
        registry.get_sample_value(
            "tickmesh_parity_minutes", {"day": "2013-10-07", "outcome": "mismatched"}
        )
        == 1
    )


async def test_five_trading_days_at_target_make_the_gate_ready(
    redis_client: aioredis.Redis, redis_url: str, kafka_bootstrap: str, name: str
) -> None:
    """Five trading days at target in parity and in completeness against the source (ledger
    and Kafka ticks) make the gate ready on the fifth, and not before."""
    env = env_for(redis_url, kafka_bootstrap, name) | {"MIRROR_BARS_POLICY": "none"}
    settings = load_settings(MirrorSettings, env)
    keys = Keys(settings.key_prefix)
    days = [date(2013, 10, 1) + timedelta(days=offset) for offset in range(7)]
    trading = [day for day in days if day.weekday() < 5]
    symbol = f"G{name[-8:].upper()}"  # a tick topic of its own on the shared broker
    for day in trading:
        bars = await publish_source(
            redis_client, keys, kafka_bootstrap, synthetic_trades(symbol, day)
        )
        await BarStore(redis_client, keys).put_many(bars)
        await produce_bars(kafka_bootstrap, lambda s: f"bars-{name}.{s}.1m", bars)
    registry = CollectorRegistry()
    reconciler = Reconciler(settings, redis_client, gauges=ParityGauges(registry, 5))
    reports = [
        await reconciler.run(day, min_age_s=0, publish=False, vendor=False) for day in trading
    ]
    await reconciler.close()
    assert [r.gate.ready for r in reports] == [False, False, False, False, True]
    assert reports[-1].gate.passing == 5
    assert registry.get_sample_value("tickmesh_parity_promotion_ready") == 1
    assert registry.get_sample_value("tickmesh_parity_gate_passing_days") == 5


async def test_single_topic_mode_counts_each_symbols_ticks_from_the_one_tick_topic(
    redis_client: aioredis.Redis, redis_url: str, kafka_bootstrap: str, name: str
) -> None:
    """``TOPIC_MODE=single``: completeness against the source reads the symbol's records in
    ``sentio.ticks.v1`` and parity the shadow's bars in ``sentio.bars.v1`` (both shared with
    other symbols, which are not counted); the same day read as per-symbol topics finds no
    ticks and no Kafka bars at all."""
    symbol, other = f"S{name[-8:].upper()}", f"O{name[-8:].upper()}"
    env = env_for(redis_url, kafka_bootstrap, name) | {
        "MIRROR_BARS_POLICY": "none",
        "MIRROR_KAFKA_BARS_TOPIC": "",  # where the topic mode puts the shadow's bars
    }
    keys = Keys(f"{name}:")
    day = DEMO_DAY
    bars = await publish_source(
        redis_client,
        keys,
        kafka_bootstrap,
        synthetic_trades(symbol, day) + synthetic_trades(other, day, minutes=2),
        tick_topic=names.TICKS_SINGLE_TOPIC,
    )
    mine = [bar for bar in bars if bar.symbol == symbol]
    await BarStore(redis_client, keys).put_many(mine)
    others = [bar for bar in bars if bar.symbol == other]
    await produce_bars(kafka_bootstrap, lambda _: names.BARS_SINGLE_TOPIC, mine + others)
    reports = {}
    for mode in ("single", "per-symbol"):
        settings = load_settings(MirrorSettings, env | {"MIRROR_TOPIC_MODE": mode})
        reconciler = Reconciler(settings, redis_client, gauges=ParityGauges(CollectorRegistry(), 5))
        reports[mode] = await reconciler.run(
            day, symbols=[symbol], min_age_s=0, publish=False, vendor=False
        )
        await reconciler.close()
    single = reports["single"].completeness
    assert single is not None
    assert [(c.symbol, c.ticksPct) for c in single.symbols] == [(symbol, 100.0)]
    assert single.totals.minutes == len(mine)
    parity = reports["single"].parity.totals
    assert (parity.matched, parity.missingKafka, parity.duplicates) == (len(mine), 0, 0)
    per_symbol = reports["per-symbol"].completeness
    assert per_symbol is not None
    assert [(c.symbol, c.ticksPct) for c in per_symbol.symbols] == [(symbol, 0.0)]
    parity = reports["per-symbol"].parity.totals
    assert (parity.matched, parity.missingKafka) == (0, len(mine))


async def test_the_timer_ignores_bars_still_in_flight(
    redis_client: aioredis.Redis, redis_url: str, kafka_bootstrap: str, name: str
) -> None:
    env = env_for(redis_url, kafka_bootstrap, name)
    env.update({"MIRROR_RECONCILE_INTERVAL_S": "0.2", "MIRROR_RECONCILE_MIN_AGE_S": "120"})
    settings = load_settings(MirrorSettings, env)
    keys = Keys(settings.key_prefix)
    bars = synthetic_bars("AAA", DEMO_DAY, minutes=10)
    await BarStore(redis_client, keys).put_many(bars)
    await produce_bars(kafka_bootstrap, lambda s: f"bars-{name}.{s}.1m", bars[:7])
    # "now" is 09:41:30: bars ending after 09:39:30 may still be in flight
    clock = ManualClock(ny_epoch_ms(DEMO_DAY, 9, 41) + 30_000)
    registry = CollectorRegistry()
    actor = ScheduledReconciler(settings, redis_client, registry=registry, clock=clock)
    await actor.start()
    try:
        await eventually(lambda: actor.last_report is not None, timeout=20)
    finally:
        await actor.stop()
    totals = actor.last_report.parity.totals
    assert (totals.matched, totals.missingKafka, totals.pending) == (7, 2, 1)
    assert (
        registry.get_sample_value(
            "tickmesh_parity_minutes", {"day": "2013-10-07", "outcome": "pending"}
        )
        == 1
    )


async def test_a_days_later_reports_read_only_the_ticks_that_came_since(
    redis_client: aioredis.Redis, redis_url: str, kafka_bootstrap: str, name: str
) -> None:
    """The timed reports of a day carry on from the previous read: the ticks tallied once,
    a trade sent again counted as one duplicate (not the whole first read again), and the
    bars rebuilt equal those of one read of everything."""
    symbol = f"R{name[-8:].upper()}"
    settings = load_settings(MirrorSettings, env_for(redis_url, kafka_bootstrap, name))
    reader = SideReader(settings, redis_client, read_share=0.25)
    trades = synthetic_trades(symbol, DEMO_DAY, minutes=5)
    first, then = trades[:7], trades[7:]
    topic = names.channel(names.TICKS, symbol)

    async def send(batch: list[Trade]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for trade in batch:
                await producer.send(topic, encode(TickBatch(0, symbol, [trade])))
            await producer.flush()
        finally:
            await producer.stop()

    keys = Keys(f"{name}:")

    async def ledger(batch: list[Trade]) -> None:
        entries = [LedgerEntry(symbol, t.t - t.t % 60_000, 1, t.s) for t in batch]
        await Publisher(redis_client, keys=keys).publish(names.LEDGER, Ledger(0, "i", entries))

    async def source_trades() -> int:
        counts = (await reader.ledger(DEMO_DAY, resume=True)).get(symbol, {})
        return sum(c[0] for c in counts.values())

    await send(first)
    await ledger(first)
    assert await source_trades() == 7
    tally = await reader.kafka_ticks([symbol], DEMO_DAY, resume=True)
    assert sum(c[0] for c in tally.counts[symbol].values()) == 7
    early = tally.bars(symbol)  # a report in between: its minutes are flushed
    assert early
    await send([*then, first[2]])  # the rest of the day, and one trade sent again
    await ledger(then)
    assert await source_trades() == len(trades)  # counted once, not the first part again
    again = await reader.kafka_ticks([symbol], DEMO_DAY, resume=True)
    assert again is tally
    assert sum(c[0] for c in tally.counts[symbol].values()) == len(trades)
    assert tally.duplicates == {symbol: 1}
    # beside the forwarder a report reads at a quarter of the loop: it waited three times
    # as long as it worked; on its own it does not wait
    assert reader.busy_s > 0 and reader.rested_s == pytest.approx(3 * reader.busy_s)
    alone = SideReader(settings, redis_client)
    whole = await alone.kafka_ticks([symbol], DEMO_DAY)
    assert alone.busy_s > 0 and alone.rested_s == 0
    assert whole is not tally and whole.counts == tally.counts
    values = [msgspec.structs.replace(bar, revision=0) for bar in tally.bars(symbol)]
    assert values == whole.bars(symbol) == build_bars(trades, settings.bars_policy)


async def test_the_timer_says_when_its_reports_fall_behind_the_feed(
    redis_client: aioredis.Redis, redis_url: str, kafka_bootstrap: str, name: str
) -> None:
    """Alone in its process, the reconciler's heartbeat carries how old its newest report's
    view is, and ``behind`` once a report took longer than the interval (its reading at its
    share of a core no longer keeps up with the feed)."""
    env = env_for(redis_url, kafka_bootstrap, name)
    env["MIRROR_RECONCILE_INTERVAL_S"] = "60"
    settings = load_settings(MirrorSettings, env)
    clock = ManualClock(ny_epoch_ms(DEMO_DAY, 11, 0))
    actor = ScheduledReconciler(settings, redis_client, registry=CollectorRegistry(), clock=clock)
    took_s = [20.0, 95.0, 30.0]

    async def run(day: date, **_: object) -> object:
        clock.advance(int(took_s.pop(0) * 1000))
        return object()

    actor.reconciler.run = run  # type: ignore[method-assign]
    assert (actor.lag_ms(), actor.status()) == (0, "ok")  # no report yet
    await actor.tick()
    assert (actor.lag_ms(), actor.status()) == (20_000, "ok")
    clock.advance(40_000)  # the next tick, 60 s after the first began
    await actor.tick()  # 95 s: longer than the interval
    assert (actor.lag_ms(), actor.status()) == (95_000, "behind")
    clock.advance(5_000)
    assert actor.lag_ms() == 100_000
    await actor.tick()  # 30 s: caught up again
    assert (actor.lag_ms(), actor.status()) == (30_000, "ok")
