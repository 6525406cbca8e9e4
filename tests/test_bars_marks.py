"""The bar builder's restart state in a real Redis: marks and closed minutes saved in one
script call, read back whole."""

from __future__ import annotations

import asyncio
from datetime import date

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from devstack.localstack import RedisServer
from libs.common.market.aggregator import BarAggregator
from libs.common.market.sessions import MINUTE_MS, ny_epoch_ms
from libs.common.names import Keys
from libs.common.runtime.clock import ManualClock
from libs.common.schemas import Bar, Progress, TickBatch, Trade
from services.bars.builder import BarBuilder, TickWork
from services.bars.marks import SNAPSHOT_TTL_S, ClosedMinutes, MinuteSnapshot
from tests.test_bars_builder import FakeSource

DAY = date(2013, 10, 7)
OPEN = ny_epoch_ms(DAY, 9, 30)


def bar(symbol: str, minute: int) -> Bar:
    start = OPEN + minute * MINUTE_MS
    return Bar(
        0, symbol, "", minute, 10.0, 10.5, 9.5, 10.25, 100, 10.1, 3, start, start + MINUTE_MS
    )


def snapshot(symbol: str, minutes: list[int], position: int) -> MinuteSnapshot:
    states = [
        [float(OPEN + m * MINUTE_MS), 10.0 + m, 11.0, 9.0, 10.5, 100.0 * (m + 1)] for m in minutes
    ]
    return MinuteSnapshot(symbol, DAY, states, {f"ticks.{symbol}": position}, True, False)


async def test_a_thousand_symbols_close_in_one_call_and_read_back_whole(
    redis_client,
    unique_name,  # type: ignore[no-untyped-def]
) -> None:
    # more symbols than one HSET of the script takes (500 pairs): the marks hash is chunked
    symbols = [f"{unique_name('M')}{i}" for i in range(1_200)]
    keys = Keys(unique_name("k") + ":")
    closed = ClosedMinutes(redis_client, keys, "shard0")
    for i, symbol in enumerate(symbols):
        closed.note_published(symbol, 10 + i)
    calls_before = await evalsha_calls(redis_client)
    await closed.save(
        [bar(symbol, 0) for symbol in symbols],
        [snapshot(symbol, [0], 7 + i) for i, symbol in enumerate(symbols)],
    )
    assert await evalsha_calls(redis_client) == calls_before + 1

    await redis_client.script_flush()  # as after a server restart: loaded again, applied once
    later = symbols[:3]
    await closed.save([bar(symbol, 1) for symbol in later], [snapshot(later[0], [0, 1], 99)])

    loaded = ClosedMinutes(redis_client, keys, "shard0")
    await loaded.load()
    assert len(loaded.restored) == len(symbols)
    for i, symbol in enumerate(symbols):
        minute = 1 if symbol in later else 0
        assert loaded.restored[symbol] == OPEN + (minute + 1) * MINUTE_MS
        assert loaded.seqs[symbol] == 10 + i
    snapshots = await loaded.load_snapshots(symbols)
    assert len(snapshots) == len(symbols)
    first = snapshots[later[0]]
    assert [state[0] for state in first.states] == [OPEN, OPEN + MINUTE_MS]
    assert first.positions == {f"ticks.{later[0]}": 99}
    assert (first.opening_seen, first.closing_seen) == (True, False)
    last = snapshots[symbols[-1]]
    assert last.states == snapshot(symbols[-1], [0], 0).states
    assert last.positions == {f"ticks.{symbols[-1]}": 7 + len(symbols) - 1}
    ttl = await redis_client.ttl(loaded._snapshot_key(symbols[-1], DAY))
    assert SNAPSHOT_TTL_S - 60 < ttl <= SNAPSHOT_TTL_S


async def test_marks_alone_or_minutes_alone_are_saved(
    redis_client,
    unique_name,  # type: ignore[no-untyped-def]
) -> None:
    keys = Keys(unique_name("k") + ":")
    closed = ClosedMinutes(redis_client, keys, "solo")
    symbol = unique_name("S")
    await closed.save([], [snapshot(symbol, [5], 3)])  # minutes, no mark yet
    await closed.save([bar(symbol, 5)])  # a mark, no minute
    loaded = ClosedMinutes(redis_client, keys, "solo")
    await loaded.load()
    assert loaded.restored == {symbol: OPEN + 6 * MINUTE_MS}
    assert loaded.seqs == {symbol: 0}
    assert [s[0] for s in (await loaded.load_snapshots([symbol]))[symbol].states] == [
        OPEN + 5 * MINUTE_MS
    ]


async def evalsha_calls(redis_client) -> int:  # type: ignore[no-untyped-def]
    stats = await redis_client.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


async def test_a_redis_restart_between_a_close_and_its_save_publishes_nothing_twice() -> None:
    """The shadow's bars go to Kafka, then their marks to Redis. Redis restarts right after the
    sink (as in the soak's restart at a minute's close): the save waits for it and goes
    through, so the builder does not restart and publish the bars a second time."""
    server = RedisServer().start()
    client = aioredis.Redis.from_url(server.url)
    restarted: list[asyncio.Task[object]] = []
    sent: list[list[str]] = []

    async def sink(bars: list[Bar]) -> None:
        sent.append([b.symbol for b in bars])
        if not restarted:  # down now, back in a moment: the save comes in between
            await asyncio.to_thread(server.stop)
            restarted.append(asyncio.create_task(asyncio.to_thread(server.restart)))

    clock = ManualClock(10**13)
    closed = ClosedMinutes(client, Keys("restart:"), "shadow")
    builder = BarBuilder(
        "unit.builder",
        lambda symbol: BarAggregator(symbol, "none", grace_ms=1_000, clock=clock),
        FakeSource(),
        sink,
        closed,
        tick_interval_ms=10_000,
        clock=clock,
        registry=CollectorRegistry(),
        close_on="progress",
    )
    await builder.start()
    try:
        start = OPEN + 30 * MINUTE_MS
        trade = Trade(sym="A", p=10.0, s=100, t=start + 1_000, x=4, i="1", z=3)
        mark = Progress(0, "ingest", start + 61_000, {"ticks.A": 1}, False)
        await builder.post(TickWork([("ticks.A", 1, TickBatch(1, "A", [trade]))]))
        await builder.post(TickWork([("sentio.progress.v1", 1, mark)]))
        await builder.barrier(timeout_s=20)
        assert sent == [["A"]]
        assert builder.incarnation == 1  # rode the restart out: no rebuild, no second copy
        assert await client.hget(closed.key, "A") == str(start + MINUTE_MS).encode()
    finally:
        await builder.stop()
        await asyncio.gather(*restarted, return_exceptions=True)
        await client.aclose()
        server.stop()
