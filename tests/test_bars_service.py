"""The bars service against a real redis-server and the real Kafka-protocol broker (Tansu).

The builder and its sources are built as ``services.bars.__main__.build`` builds them, on the
runtime's own registry and a key prefix of the test's own; one test runs the service as an OS
process (``python -m services.bars run``) and SIGKILLs it mid-minute. Ticks are synthetic
trades of a few symbols (unique per test) on a 2024 morning, published the way ingest
publishes them (one ``TickBatch`` per symbol and second, sequenced, pub/sub + stream) or
produced the way the mirror produces them (JSON ``TickBatch``, key symbol, headers
``tm-channel``/``tm-seq``). What comes out is compared with the core's offline bars of the
same trades (``build_bars``: what an uninterrupted run must end with).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import date
from pathlib import Path
from uuid import uuid4

import msgspec
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from libs.common import names
from libs.common.io.barstore import BarStore
from libs.common.io.kafka_io import (
    TopicAdmin,
    TopicSpec,
    list_topics,
    read_from_beginning,
    sequence_headers,
)
from libs.common.io.redis_io import Publisher
from libs.common.market.build import build_bars
from libs.common.market.sessions import MINUTE_MS, ny_epoch_ms
from libs.common.names import Keys
from libs.common.runtime.service import ServiceRuntime
from libs.common.schemas import BAR_DECODER, ENCODER, Bar, DeadLetter, TickBatch, Trade, decode
from services.bars.__main__ import build
from services.bars.builder import BarBuilder
from services.bars.kafka_source import KafkaTickSource


def shard_of(symbol: str, shard_count: int) -> int:
    """The shard of ``symbol`` among ``shard_count`` (as ``BarsSettings.owns`` decides)."""
    return next(
        index
        for index in range(shard_count)
        if BarsSettings(shard_index=index, shard_count=shard_count).owns(symbol)
    )


def bar_channel(symbol: str) -> str:
    return names.channel(names.BARS, symbol)


from services.bars.config import BarsSettings
from tests.helpers import BarKey, BarValue, eventually, final_bars

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parent.parent
DAY = date(2024, 3, 4)  # a Monday, New York winter time
SPY_DAY = date(2013, 10, 7)
GRACE_MS = 1_000
TICK_TOPIC_CONFIGS = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}


# -- ticks -------------------------------------------------------------------------------------


def symbols_for(count: int, shards: int = 1) -> tuple[str, list[str]]:
    """A glob and ``count`` symbols unique to this test; with ``shards``, each shard owns at
    least one."""
    tag = "Z" + uuid4().hex[:5].upper()
    candidates = [f"{tag}{chr(ord('A') + i // 26)}{chr(ord('A') + i % 26)}" for i in range(200)]
    chosen: list[str] = []
    for shard in range(shards):  # one per shard first, then whatever comes
        chosen.append(
            next(s for s in candidates if shard_of(s, shards) == shard and s not in chosen)
        )
    chosen += [s for s in candidates if s not in chosen][: count - len(chosen)]
    return f"ticks.{tag}*", sorted(chosen)


def make_trades(
    symbols: Sequence[str],
    start: tuple[int, int],
    minutes: int,
    seed: int = 11,
    per_minute: int = 40,
) -> list[Trade]:
    """Trades of each symbol over ``minutes`` minutes from ``start`` (h, m), by time. A few are
    sweeps (volume only under ``algoseek``); each minute has a trade 200 ms after its start
    and its last one in its last second (59.5 s), so that frames straddle the minutes and the
    bars' closing time is known."""
    rng = random.Random(seed)
    first = ny_epoch_ms(DAY, *start)
    trades: list[Trade] = []
    for number, symbol in enumerate(symbols):
        price = 50.0 + 10 * number
        for minute in range(minutes):
            base = first + minute * MINUTE_MS
            offsets = sorted(
                [200, *(rng.randrange(500, 59_000) for _ in range(per_minute - 2)), 59_500]
            )
            for index, offset in enumerate(offsets):
                price = round(max(1.0, price + rng.choice((-0.02, -0.01, 0.0, 0.01, 0.02))), 2)
                conditions = (14, 41) if rng.random() < 0.15 else ()
                trades.append(
                    Trade(
                        sym=symbol,
                        p=price,
                        s=rng.choice((100, 200, 300, 50)),
                        t=base + offset,
                        x=rng.choice((4, 11, 12)),
                        c=conditions,
                        i=f"{minute}-{index}",
                        z=3,
                    )
                )
    trades.sort(key=lambda trade: (trade.t, trade.sym))
    return trades


def frames(trades: Iterable[Trade], frame_ms: int = 1_000, offset_ms: int = 500) -> list[TickBatch]:
    """One batch per symbol and ``frame_ms`` of event time, in time order (a feed's frames).
    Frames start ``offset_ms`` into a second, so the one around a minute's start holds trades
    of both minutes (a batch whose position can only be committed once both are closed)."""
    out: list[TickBatch] = []
    current: dict[str, list[Trade]] = {}
    frame = None
    for trade in trades:
        this = (trade.t - offset_ms) // frame_ms
        if frame is not None and this != frame:
            out += [TickBatch(0, sym, ticks) for sym, ticks in current.items()]
            current = {}
        frame = this
        current.setdefault(trade.sym, []).append(trade)
    out += [TickBatch(0, sym, ticks) for sym, ticks in current.items()]
    return out


async def publish(
    publisher: Publisher, batches: Sequence[TickBatch], chunk: int = 20, pause_s: float = 0.0
) -> list[int]:
    """Publish on ``ticks.<SYM>`` as ingest does; returns the sequences."""
    seqs: list[int] = []
    for index in range(0, len(batches), chunk):
        part = batches[index : index + chunk]
        seqs += await publisher.publish_many([(f"ticks.{b.sym}", b) for b in part])
        if pause_s:
            await asyncio.sleep(pause_s)
    return seqs


def expected_bars(trades: Sequence[Trade]) -> dict[BarKey, BarValue]:
    """The final bars an uninterrupted run ends with (the core, offline)."""
    return final_bars(build_bars(trades, "algoseek", grace_ms=0))


# -- reading what the service published -------------------------------------------------------


async def stream_records(client: object, prefix: str, channel: str) -> list[bytes]:
    entries = await client.xrange(Keys(prefix).stream(channel))  # type: ignore[attr-defined]
    return [fields[b"d"] for _, fields in entries]


async def published_bars(client: object, prefix: str, symbols: Iterable[str]) -> list[Bar]:
    """Every bar record on the symbols' Redis bar channels, in order, checking that each
    channel's sequence is gapless."""
    out: list[Bar] = []
    for symbol in symbols:
        bars = [
            BAR_DECODER.decode(p) for p in await stream_records(client, prefix, bar_channel(symbol))
        ]
        assert [bar.seq for bar in bars] == list(range(1, len(bars) + 1)), symbol
        out += bars
    return out


def assert_published_once(bars: Sequence[Bar]) -> None:
    """No (symbol, minute) published twice as revision 0, and revisions count up by one."""
    seen: dict[BarKey, list[int]] = {}
    for bar in bars:
        seen.setdefault((bar.symbol, bar.startMs), []).append(bar.revision)
    twice = {
        key: revisions
        for key, revisions in seen.items()
        if revisions != list(range(len(revisions)))
    }
    assert not twice, f"published twice or out of order: {twice}"


async def store_bars(
    client: object, prefix: str, symbols: Iterable[str], day: date = DAY
) -> dict[BarKey, BarValue]:
    store = BarStore(client, Keys(prefix))  # type: ignore[arg-type]
    out: list[Bar] = []
    for symbol in symbols:
        out += (await store.day(symbol, day)).values()
    return final_bars(out)


# -- running the service in-process ---------------------------------------------------------


def settings_for(redis_url: str, prefix: str, pattern: str, **overrides: object) -> BarsSettings:
    values: dict[str, object] = {
        "redis_url": redis_url,
        "key_prefix": prefix,
        "tick_pattern": pattern,
        "http_host": "127.0.0.1",
        "http_port": 0,
        "grace_ms": GRACE_MS,
        "tick_interval_ms": 50,
        "heartbeat_interval_ms": 1_000,
        "run_id": "test",
        "kafka_session_timeout_ms": 1_000,
        "kafka_heartbeat_interval_ms": 200,
        "kafka_rebalance_timeout_ms": 1_000,
        "stop_deadline_s": 5.0,
        # these tests publish ticks without an ingest (no progress marks): minutes close on
        # the wall clock; tests/test_e2e_mesh.py runs the progress path with a real ingest
        "close_on": "wall",
    }
    values.update(overrides)
    return msgspec.convert(values, BarsSettings)


@asynccontextmanager
async def service(settings: BarsSettings) -> AsyncIterator[ServiceRuntime]:
    """The service as ``run`` wires it, in this event loop; stopped (drained) at the end."""
    runtime = ServiceRuntime("bars", settings)
    await build(runtime)
    task = asyncio.create_task(runtime.run())
    try:
        yield runtime
    finally:
        runtime.supervisor.stop()
        assert await asyncio.wait_for(task, 30) == 0


def builder_of(runtime: ServiceRuntime) -> BarBuilder:
    (builder,) = [c for c in runtime.supervisor.children if isinstance(c, BarBuilder)]
    return builder


def metric(runtime: ServiceRuntime, name: str, **labels: str) -> float:
    return runtime.registry.get_sample_value(name, labels) or 0.0


async def wait_for_bars(
    client: object, prefix: str, expected: dict[BarKey, BarValue], timeout: float = 30.0
) -> dict[BarKey, BarValue]:
    symbols = sorted({symbol for symbol, _ in expected})

    async def complete() -> dict[BarKey, BarValue] | None:
        got = final_bars(await published_bars(client, prefix, symbols))
        return got if set(got) >= set(expected) else None

    return await eventually(
        complete, timeout=timeout, interval=0.1, message=f"bars of {symbols} incomplete"
    )


# -- Redis source ------------------------------------------------------------------------------


async def test_redis_ticks_become_bars_on_the_channels_and_in_the_store(
    redis_url: str, redis_client: object, unique_name: object
) -> None:
    """Three symbols over four minutes: every bar on ``bars.<SYM>.1m`` (gapless sequences,
    once each) and in the bar store equals the offline bars; bad records go to the dead
    letters and the rest flows; the last minute closes on wall time alone, within the grace
    after its end, with no further trade."""
    prefix = f"{unique_name('bars')}:"  # type: ignore[operator]
    pattern, symbols = symbols_for(3)
    trades = make_trades(symbols, (10, 0), 4)
    batches = frames(trades)
    expected = expected_bars(trades)
    publisher = Publisher(redis_client, keys=Keys(prefix))  # type: ignore[arg-type]
    last_minute = ny_epoch_ms(DAY, 10, 3)
    newest = max(trade.t for trade in trades)
    async with service(settings_for(redis_url, prefix, pattern)) as runtime:
        await publish(publisher, batches[: len(batches) // 2])
        # bad records in the middle: undecodable, wrong symbol for the channel, no sequence
        await publisher.publish(f"ticks.{symbols[0]}", b'{"seq":0,"sym":"X","ticks":"nope"}')
        await publisher.publish(f"ticks.{symbols[1]}", TickBatch(0, symbols[2], []))
        await redis_client.publish(f"ticks.{symbols[0]}", b"not json")  # type: ignore[attr-defined]
        await publish(publisher, batches[len(batches) // 2 :])
        published_at = time.monotonic()
        # ... and one as the very last record of a channel: its position must be committed too
        last_seq = await publisher.publish(f"ticks.{symbols[2]}", b'{"seq":0,"oops":1}')

        async def last_minute_closed() -> float | None:
            got = final_bars(await published_bars(redis_client, prefix, symbols))
            done = all((symbol, last_minute) in got for symbol in symbols)
            return time.monotonic() - published_at if done else None

        waited = await eventually(last_minute_closed, timeout=20, interval=0.02)
        deadline_s = (last_minute + MINUTE_MS + GRACE_MS - newest) / 1000
        assert deadline_s - 0.05 <= waited <= deadline_s + 3.0, (waited, deadline_s)
        builder = builder_of(runtime)
        await eventually(lambda: not any(builder._positions._pending.values()), timeout=5)
        assert (
            metric(runtime, "tickmesh_dead_letters_total", service="bars", source_kind="ticks") == 4
        )
        assert metric(runtime, "tickmesh_bars_published_total", source="redis") == len(expected)
        positions = await redis_client.hgetall(  # type: ignore[attr-defined]
            Keys(prefix).state("positions:bars-redis-0of1")
        )
    bars = await published_bars(redis_client, prefix, symbols)
    assert_published_once(bars)
    assert final_bars(bars) == expected
    assert await store_bars(redis_client, prefix, symbols) == expected
    assert all(bar.revision == 0 for bar in bars)  # nothing was late
    assert {bar.tsET[:16] for bar in bars} == {f"2024-03-04T10:0{m}" for m in range(4)}
    assert {bar.barId for bar in bars} == {31, 32, 33, 34}
    letters = [
        decode(p, DeadLetter)
        for p in await stream_records(redis_client, prefix, names.DEAD_LETTERS)
    ]
    assert sorted(letter.source for letter in letters) == sorted(
        [f"ticks.{symbols[0]}", f"ticks.{symbols[0]}", f"ticks.{symbols[1]}", f"ticks.{symbols[2]}"]
    )
    assert b"not json" in [letter.raw for letter in letters]
    assert int(positions[f"ticks.{symbols[2]}".encode()]) == last_seq


async def test_a_crash_between_publishing_and_saving_publishes_nothing_twice(
    redis_url: str, redis_client: object, unique_name: object
) -> None:
    """The sink fails right after publishing the 10:01 bars (before they are noted and the
    positions committed): the supervisor restarts the builder, which re-reads the uncommitted
    ticks, finds the 10:01 bars in the streams and neither aggregates their ticks again nor
    sends them again."""
    prefix = f"{unique_name('crash')}:"  # type: ignore[operator]
    pattern, symbols = symbols_for(3)
    trades = make_trades(symbols, (10, 0), 4, seed=5)
    expected = expected_bars(trades)
    publisher = Publisher(redis_client, keys=Keys(prefix))  # type: ignore[arg-type]
    crash_minute = ny_epoch_ms(DAY, 10, 1)
    failed: list[int] = []
    async with service(settings_for(redis_url, prefix, pattern)) as runtime:
        runtime.supervisor.backoff.initial_s = 0.05
        builder = builder_of(runtime)
        real_sink = builder.sink

        async def sink_that_dies_once(bars: list[Bar]) -> None:
            await real_sink(bars)
            if not failed and any(bar.startMs == crash_minute for bar in bars):
                failed.append(len(bars))
                raise RuntimeError("crashed after publishing, before saving")

        builder.sink = sink_that_dies_once
        await publish(publisher, frames(trades), pause_s=0.01)
        await wait_for_bars(redis_client, prefix, expected)
        assert failed and builder.incarnation == 2
        assert metric(runtime, "tickmesh_actor_restarts_total", actor=builder.name) == 1
        # the re-read ticks of 10:00 and 10:01 (published) are not aggregated again
        assert metric(runtime, "tickmesh_bars_ticks_skipped_total", source="redis") >= 1
        assert builder.closed.recovered >= failed[0]  # type: ignore[attr-defined]
    bars = await published_bars(redis_client, prefix, symbols)
    assert_published_once(bars)
    assert final_bars(bars) == expected
    assert await store_bars(redis_client, prefix, symbols) == expected


async def test_a_backlog_read_channel_by_channel_is_not_late(
    redis_url: str, redis_client: object, unique_name: object
) -> None:
    """Ten symbols' five minutes published before the service starts (what a restart after
    downtime finds): the consumer reads the streams a channel at a time, more than one batch
    of them. Each symbol keeps its own watermark, so one channel's backlog does not make the
    others' trades late: every bar comes out once, revision 0, equal to the offline bars."""
    prefix = f"{unique_name('backlog')}:"  # type: ignore[operator]
    pattern, symbols = symbols_for(10)
    trades = make_trades(symbols, (10, 0), 5, seed=13, per_minute=70)
    batches = frames(trades, frame_ms=500)
    assert len(batches) > 2_000  # more than one read of the consumer (batch_max)
    expected = expected_bars(trades)
    await publish(Publisher(redis_client, keys=Keys(prefix)), batches, chunk=200)  # type: ignore[arg-type]
    async with service(settings_for(redis_url, prefix, pattern)) as runtime:
        await wait_for_bars(redis_client, prefix, expected)
        assert (
            metric(runtime, "tickmesh_bars_late_trades_total", source="redis", action="revised")
            == 0
        )
    bars = await published_bars(redis_client, prefix, symbols)
    assert [bar for bar in bars if bar.revision] == []
    assert final_bars(bars) == expected


def process_env(redis_url: str, prefix: str, pattern: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "BARS_REDIS_URL": redis_url,
        "BARS_KEY_PREFIX": prefix,
        "BARS_TICK_PATTERN": pattern,
        "BARS_HTTP_HOST": "127.0.0.1",
        "BARS_HTTP_PORT": "0",
        "BARS_GRACE_MS": str(GRACE_MS),
        "BARS_TICK_INTERVAL_MS": "50",
        "BARS_LOG_FORMAT": "json",
        "TICKMESH_RUN_ID": "restart-test",
        "TICKMESH_HEARTBEAT_INTERVAL_MS": "1000",
        "BARS_CLOSE_ON": "wall",  # no ingest here: no progress marks
    }


async def start_process(env: dict[str, str], log_path: Path) -> asyncio.subprocess.Process:
    with log_path.open("ab") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.bars", "run", cwd=REPO, env=env, stdout=log, stderr=log
        )


async def test_a_process_killed_mid_minute_restarts_without_losing_or_repeating_a_bar(
    redis_url: str, redis_client: object, unique_name: object, tmp_path: Path
) -> None:
    """``python -m services.bars run``, SIGKILLed with 10:03 half aggregated (its ticks up to
    10:03:20 in memory, uncommitted); the rest of 10:03 and 10:04 are published while it is
    down; a new process must end with the bars of one uninterrupted run, each published once
    (revision 0), on gapless channels."""
    prefix = f"{unique_name('kill')}:"  # type: ignore[operator]
    pattern, symbols = symbols_for(3)
    trades = make_trades(symbols, (10, 0), 5, seed=3)
    expected = expected_bars(trades)
    cut = ny_epoch_ms(DAY, 10, 3, 20_000)
    before = frames(t for t in trades if t.t < cut)
    after = frames(t for t in trades if t.t >= cut)
    publisher = Publisher(redis_client, keys=Keys(prefix))  # type: ignore[arg-type]
    env = process_env(redis_url, prefix, pattern)
    log_path = tmp_path / "bars.log"
    processes: list[asyncio.subprocess.Process] = []

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-3_000:]

    async def have(keys: Iterable[BarKey]) -> bool:
        got = final_bars(await published_bars(redis_client, prefix, symbols))
        return set(keys) <= set(got)

    try:
        processes.append(await start_process(env, log_path))
        await publish(publisher, before, pause_s=0.005)
        upto_1002 = [key for key in expected if key[1] <= ny_epoch_ms(DAY, 10, 2)]
        await eventually(lambda: have(upto_1002), timeout=30, message=log_tail)
        processes[0].send_signal(signal.SIGKILL)
        assert await processes[0].wait() == -signal.SIGKILL
        assert not await have([(symbols[0], ny_epoch_ms(DAY, 10, 3))])  # it was mid-minute
        await publish(publisher, after)  # ingest goes on while bars is down
        processes.append(await start_process(env, log_path))
        await eventually(lambda: have(expected), timeout=30, message=log_tail)
        await asyncio.sleep(GRACE_MS / 1000)  # nothing more may come
        processes[1].send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(processes[1].wait(), 20) == 0, log_tail()
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
    bars = await published_bars(redis_client, prefix, symbols)
    assert_published_once(bars)
    assert final_bars(bars) == expected
    assert await store_bars(redis_client, prefix, symbols) == expected
    started = [line for line in log_path.read_text().splitlines() if "bars.builder_started" in line]
    assert len(started) == 2, log_tail()


async def test_a_late_trade_after_a_restart_revises_a_minute_published_before_it(
    redis_url: str, redis_client: object, unique_name: object, tmp_path: Path
) -> None:
    """Five minutes published; then late trades for 10:01 and 10:02 arrive (a backfill): the
    first half while the process runs, then it is SIGKILLed with them just aggregated, and
    the second half is published while it is down. The new process takes the day's closed
    minutes back and revises 10:01 and 10:02 with the late trades, without counting the
    re-read ones twice: the bars end equal to the core's over all the trades."""
    prefix = f"{unique_name('late')}:"  # type: ignore[operator]
    pattern, symbols = symbols_for(2)
    trades = make_trades(symbols, (10, 0), 5, seed=8)
    late: list[Trade] = []
    for number, symbol in enumerate(symbols):
        for minute, price in ((1, 500.0), (2, 1.0)):  # a new high, a new low
            base = ny_epoch_ms(DAY, 10, minute)
            late += [
                Trade(
                    sym=symbol,
                    p=price,
                    s=700,
                    t=base + 30_000 + n,
                    x=4,
                    i=f"late-{minute}-{n}",
                    z=3,
                )
                for n in range(2 + number)
            ]
    half = len(late) // 2
    expected = expected_bars([*trades, *late])
    publisher = Publisher(redis_client, keys=Keys(prefix))  # type: ignore[arg-type]
    env = process_env(redis_url, prefix, pattern)
    log_path = tmp_path / "bars.log"
    processes: list[asyncio.subprocess.Process] = []

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-3_000:]

    async def current() -> dict[BarKey, BarValue]:
        return final_bars(await published_bars(redis_client, prefix, symbols))

    try:
        processes.append(await start_process(env, log_path))
        await publish(publisher, frames(trades))
        on_time = expected_bars(trades)
        await eventually(lambda: _has_all(current, on_time.keys()), timeout=30, message=log_tail)
        await publish(publisher, frames(late[:half]))  # read, then killed with them
        await eventually(
            lambda: _revised(redis_client, prefix, symbols), timeout=30, message=log_tail
        )
        processes[0].send_signal(signal.SIGKILL)
        assert await processes[0].wait() == -signal.SIGKILL
        await publish(publisher, frames(late[half:]))  # arrives while bars is down
        processes.append(await start_process(env, log_path))

        async def done() -> bool:
            return await current() == expected

        await eventually(done, timeout=30, message=log_tail)
        await asyncio.sleep(GRACE_MS / 1000)  # nothing more may come
        processes[1].send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(processes[1].wait(), 20) == 0, log_tail()
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert await current() == expected
    assert await store_bars(redis_client, prefix, symbols) == expected
    assert expected != expected_bars(trades)  # the late trades changed the bars
    restarted = [
        json.loads(line)
        for line in log_path.read_text().splitlines()
        if "bars.builder_started" in line
    ]
    assert len(restarted) == 2 and restarted[1]["restored_minutes"] > 0, log_tail()


async def _has_all(current, keys) -> bool:  # type: ignore[no-untyped-def]
    return set(keys) <= set(await current())


async def _revised(client: object, prefix: str, symbols: Sequence[str]) -> bool:
    return any(bar.revision for bar in await published_bars(client, prefix, symbols))


async def test_two_shards_publish_exactly_what_one_instance_publishes(
    redis_url: str, redis_client: object, unique_name: object
) -> None:
    """Ten symbols: one instance (prefix A) and two shards of it (prefix B, BARS_SHARD_COUNT=2,
    index 0 and 1) over the same ticks publish the same bars; each shard only its own."""
    pattern, symbols = symbols_for(10, shards=2)
    trades = make_trades(symbols, (10, 0), 3, seed=8, per_minute=20)
    batches = frames(trades)
    expected = expected_bars(trades)
    single = f"{unique_name('single')}:"  # type: ignore[operator]
    sharded = f"{unique_name('sharded')}:"  # type: ignore[operator]

    async with service(settings_for(redis_url, single, pattern)):
        await publish(Publisher(redis_client, keys=Keys(single)), batches)  # type: ignore[arg-type]
        await wait_for_bars(redis_client, single, expected)
    shard_settings = [
        settings_for(redis_url, sharded, pattern, shard_count=2, shard_index=index)
        for index in (0, 1)
    ]
    async with service(shard_settings[0]) as shard0, service(shard_settings[1]) as shard1:
        await publish(Publisher(redis_client, keys=Keys(sharded)), batches)  # type: ignore[arg-type]
        await wait_for_bars(redis_client, sharded, expected)
        per_shard = [
            metric(runtime, "tickmesh_bars_published_total", source="redis")
            for runtime in (shard0, shard1)
        ]
        symbols_seen = [set(builder_of(runtime).symbols()) for runtime in (shard0, shard1)]

    def bar_set(bars: Iterable[Bar]) -> set[tuple[object, ...]]:
        return {
            (
                bar.symbol,
                bar.startMs,
                bar.open,
                bar.high,
                bar.low,
                bar.close,
                bar.volume,
                bar.revision,
            )
            for bar in bars
        }

    one = await published_bars(redis_client, single, symbols)
    two = await published_bars(redis_client, sharded, symbols)
    assert bar_set(one) == bar_set(two)
    assert final_bars(one) == final_bars(two) == expected
    assert_published_once(two)
    assert all(count > 0 for count in per_shard) and sum(per_shard) == len(expected)
    for index, seen in enumerate(symbols_seen):
        assert seen and all(shard_of(symbol, 2) == index for symbol in seen)
    assert symbols_seen[0] | symbols_seen[1] == set(symbols)


# -- Kafka source ------------------------------------------------------------------------------


async def produce_like_the_mirror(
    bootstrap: str,
    batches: Sequence[TickBatch],
    seqs: Sequence[int],
    resend: Iterable[int] = (),
    topic: str | None = None,
) -> None:
    """Produce each batch (with its Redis sequence) to ``ticks.<SYM>`` (or to ``topic``, as
    ``TOPIC_MODE=single`` does), keyed by symbol, with the mirror's headers; the batches at the
    indexes in ``resend`` are sent again a little later (as after a failed produce request), so
    they arrive after newer ones."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    await producer.start()
    try:
        again = set(resend)
        pending: list[tuple[TickBatch, int]] = []
        futures = []
        for index, (batch, seq) in enumerate(zip(batches, seqs, strict=True)):
            for old_batch, old_seq in pending:
                futures.append(await _send(producer, old_batch, old_seq, topic))
            pending = []
            futures.append(await _send(producer, batch, seq, topic))
            if index in again:
                pending.append((batch, seq))
        for old_batch, old_seq in pending:
            futures.append(await _send(producer, old_batch, old_seq, topic))
        for future in futures:
            await future
    finally:
        await producer.stop()


async def _send(  # type: ignore[no-untyped-def]
    producer: AIOKafkaProducer, batch: TickBatch, seq: int, topic: str | None
):
    channel = f"ticks.{batch.sym}"
    payload = ENCODER.encode(msgspec.structs.replace(batch, seq=seq))
    return await producer.send(
        topic or channel, payload, key=batch.sym.encode(), headers=sequence_headers(channel, seq)
    )


def numbered(batches: Sequence[TickBatch]) -> list[int]:
    """The per-channel sequences the Redis publisher gives these batches."""
    counters: dict[str, int] = {}
    out = []
    for batch in batches:
        counters[batch.sym] = counters.get(batch.sym, 0) + 1
        out.append(counters[batch.sym])
    return out


async def create_tick_topics(settings: BarsSettings, symbols: Iterable[str]) -> None:
    admin = TopicAdmin(settings)
    try:
        await admin.ensure(
            TopicSpec(f"ticks.{symbol}", 1, 1, TICK_TOPIC_CONFIGS) for symbol in symbols
        )
    finally:
        await admin.close()


async def kafka_bars(settings: BarsSettings, symbols: Iterable[str]) -> list[Bar]:
    """The shadow's bars of ``symbols`` where its topic mode puts them."""
    wanted = set(symbols)
    topic = names.shadow_bars_topic(settings.topic_mode)
    out: list[Bar] = []
    async for records in read_from_beginning(
        settings, sorted({names.channel(topic, s) for s in wanted}), idle_ms=500
    ):
        out += [BAR_DECODER.decode(record.value) for record in records]
    return [bar for bar in out if bar.symbol in wanted]


async def shadows_published(members: Sequence[ServiceRuntime], count: int) -> None:
    """Wait until the shadow instances ``members`` published ``count`` bars between them."""

    def published() -> float:
        return sum(metric(m, "tickmesh_bars_published_total", source="kafka") for m in members)

    await eventually(
        lambda: published() >= count,
        timeout=30,
        message=lambda: f"{published()} of {count} bars",
    )


async def test_kafka_ticks_become_kafka_bars_equal_to_the_redis_paths_and_duplicates_drop(
    redis_url: str, redis_client: object, kafka_bootstrap: str, unique_name: object
) -> None:
    """The same ticks through Redis (primary) and through Kafka topics as the mirror writes
    them (shadow, consumer group), with some records sent twice: the shadow's bars on Kafka
    ``bars.<SYM>.1m`` equal the primary's, and the duplicates are dropped."""
    prefix = f"{unique_name('shadow')}:"  # type: ignore[operator]
    pattern, symbols = symbols_for(4)
    trades = make_trades(symbols, (10, 0), 3, seed=21, per_minute=30)
    batches = frames(trades)
    seqs = numbered(batches)
    expected = expected_bars(trades)
    resend = set(range(3, len(batches), 17))
    redis_settings = settings_for(redis_url, prefix, pattern)
    kafka_settings = settings_for(
        redis_url,
        prefix,
        pattern,
        source="kafka",
        kafka_bootstrap=kafka_bootstrap,
        kafka_group=unique_name("group"),
    )  # type: ignore[operator]
    await create_tick_topics(kafka_settings, symbols)
    async with service(redis_settings), service(kafka_settings) as shadow:
        source = builder_of(shadow).source
        assert isinstance(source, KafkaTickSource)
        await eventually(lambda: source.assigned, timeout=20, message="no partitions")
        await asyncio.gather(
            publish(Publisher(redis_client, keys=Keys(prefix)), batches),  # type: ignore[arg-type]
            produce_like_the_mirror(kafka_bootstrap, batches, seqs, resend),
        )
        redis_map = await wait_for_bars(redis_client, prefix, expected)
        await eventually(
            lambda: (
                metric(shadow, "tickmesh_bars_published_total", source="kafka") >= len(expected)
            ),
            timeout=30,
            message="shadow bars incomplete",
        )
        assert source.duplicates == len(resend)
        assert metric(shadow, "tickmesh_bars_duplicate_batches_total") == len(resend)
    shadow_bars = await kafka_bars(kafka_settings, symbols)
    assert_published_once(shadow_bars)
    assert final_bars(shadow_bars) == redis_map == expected


async def test_the_shadow_reads_on_while_a_topic_listing_is_stuck(
    redis_url: str, kafka_bootstrap: str, unique_name: object
) -> None:
    """The shadow lists the topics now and then (new symbols' topics); the broker's answer
    about a thousand topics is slow under load, and the reads must not wait for it: with
    every listing held, the ticks still become every bar."""
    prefix = f"{unique_name('listing')}:"  # type: ignore[operator]
    pattern, symbols = symbols_for(2)
    trades = make_trades(symbols, (10, 0), 3, seed=8, per_minute=20)
    batches = frames(trades)
    expected = expected_bars(trades)
    settings = settings_for(
        redis_url,
        prefix,
        pattern,
        source="kafka",
        kafka_bootstrap=kafka_bootstrap,
        kafka_group=unique_name("group"),  # type: ignore[operator]
        discover_interval_ms=50,
    )
    await create_tick_topics(settings, symbols)
    async with service(settings) as shadow:
        source = builder_of(shadow).source
        assert isinstance(source, KafkaTickSource)
        await eventually(lambda: len(source.assigned) == len(symbols), timeout=20)
        consumer = source.consumer
        assert consumer is not None
        held = asyncio.Event()

        async def stuck_listing() -> set[str]:
            held.set()
            await asyncio.Event().wait()  # never answers
            return set()

        consumer.topics = stuck_listing  # type: ignore[method-assign]
        await asyncio.wait_for(held.wait(), 10)
        await produce_like_the_mirror(kafka_bootstrap, batches, numbered(batches))
        await shadows_published([shadow], len(expected))
    assert final_bars(await kafka_bars(settings, symbols)) == expected


async def test_two_kafka_shards_split_the_symbols_and_pick_up_topics_that_appear_later(
    redis_url: str, kafka_bootstrap: str, unique_name: object
) -> None:
    """Six tick topics, two shadow shards. Three topics exist when the shards start; the
    other three appear while they run (new symbols): each shard reads its own symbols, new
    topics from their first record, and together they publish every bar once, equal to the
    offline bars."""
    prefix = f"{unique_name('shards')}:"  # type: ignore[operator]
    pattern, symbols = symbols_for(6)
    trades = make_trades(symbols, (10, 0), 4, seed=34, per_minute=30)
    batches = frames(trades)
    seqs = numbered(batches)
    expected = expected_bars(trades)
    group = unique_name("shadow")  # type: ignore[operator]

    def shard(index: int) -> BarsSettings:
        return settings_for(
            redis_url,
            prefix,
            pattern,
            source="kafka",
            kafka_bootstrap=kafka_bootstrap,
            kafka_group=group,
            shard_index=index,
            shard_count=2,
            discover_interval_ms=200,
        )

    early, late = symbols[:3], symbols[3:]
    await create_tick_topics(shard(0), early)
    async with service(shard(0)) as one, service(shard(1)) as two:
        sources = [builder_of(member).source for member in (one, two)]
        assert all(isinstance(source, KafkaTickSource) for source in sources)
        await eventually(
            lambda: sum(len(s.assigned) for s in sources) == len(early),  # type: ignore[attr-defined]
            timeout=20,
        )
        await create_tick_topics(shard(0), late)  # new listings, after the shards started
        await produce_like_the_mirror(kafka_bootstrap, batches, seqs)
        await shadows_published((one, two), len(expected))
        assigned = [s.assigned for s in sources]  # type: ignore[attr-defined]
        assert all(assigned) and not assigned[0] & assigned[1]
        assert sum(len(a) for a in assigned) == len(symbols)
    shadow_bars = await kafka_bars(shard(0), symbols)
    assert_published_once(shadow_bars)
    assert final_bars(shadow_bars) == expected


async def test_ticks_in_one_topic_keyed_by_symbol_become_the_same_bars_in_two_shards(
    redis_url: str, kafka_bootstrap: str, unique_name: object
) -> None:
    """``TOPIC_MODE=single``: every symbol's ticks in one two-partition topic keyed by symbol,
    as the mirror writes them for thousands of symbols, some records sent twice, one under
    another symbol's key. Two shadow shards read every partition; each aggregates its own
    symbols only (another shard's records are passed over by their key), the record whose
    symbol is not its key goes to the dead letters, and together they publish every bar once,
    equal to the offline bars, and drop every duplicate."""
    prefix = f"{unique_name('single')}:"  # type: ignore[operator]
    pattern, symbols = symbols_for(6, shards=2)
    trades = make_trades(symbols, (10, 0), 4, seed=55, per_minute=30)
    batches = frames(trades)
    seqs = numbered(batches)
    expected = expected_bars(trades)
    resend = set(range(2, len(batches), 13))
    group = unique_name("shadow")  # type: ignore[operator]

    def shard(index: int) -> BarsSettings:
        return settings_for(
            redis_url,
            prefix,
            pattern,
            source="kafka",
            topic_mode="single",
            kafka_bootstrap=kafka_bootstrap,
            kafka_group=group,
            shard_index=index,
            shard_count=2,
        )

    admin = TopicAdmin(shard(0))
    try:
        await admin.ensure([TopicSpec(names.TICKS_SINGLE_TOPIC, 2, 1, TICK_TOPIC_CONFIGS)])
    finally:
        await admin.close()
    async with service(shard(0)) as one, service(shard(1)) as two:
        sources = [builder_of(member).source for member in (one, two)]
        assert all(isinstance(source, KafkaTickSource) for source in sources)
        single = [TopicPartition(names.TICKS_SINGLE_TOPIC, p) for p in (0, 1)]
        await eventually(
            lambda: all(set(single) <= s.assigned for s in sources),  # type: ignore[attr-defined]
            timeout=20,
            message="the single topic's partitions not assigned to both shards",
        )
        await produce_like_the_mirror(
            kafka_bootstrap, batches, seqs, resend, topic=names.TICKS_SINGLE_TOPIC
        )
        stray_trade = Trade(symbols[1], 1.0, 100, ny_epoch_ms(DAY, 10, 1), 4, (), "stray")
        stray = TickBatch(999, symbols[1], [stray_trade])
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:  # under symbols[0]'s key: its shard checks it and dead-letters it
            await producer.send_and_wait(
                names.TICKS_SINGLE_TOPIC, ENCODER.encode(stray), key=symbols[0].encode()
            )
        finally:
            await producer.stop()
        await shadows_published((one, two), len(expected))
        for index, member in enumerate((one, two)):
            aggregated = set(builder_of(member).aggregators)
            assert aggregated and all(shard_of(s, 2) == index for s in aggregated)
        duplicates = [s.duplicates for s in sources]  # type: ignore[attr-defined]
        assert sum(duplicates) == len(resend)
        letters = "tickmesh_dead_letters_total"
        labels = {"service": "bars", "source_kind": names.TICKS_SINGLE_TOPIC}
        await eventually(
            lambda: sum(metric(m, letters, **labels) for m in (one, two)) == 1,
            timeout=10,
            message="the record under another symbol's key was not dead-lettered",
        )
    shadow_bars = await kafka_bars(shard(0), symbols)
    assert_published_once(shadow_bars)
    assert final_bars(shadow_bars) == expected
    # every bar in the one topic, keyed by its symbol: no bars.<SYM>.1m topic was made
    assert not set(map(bar_channel, symbols)) & set(await list_topics(shard(0)))


# -- real data ---------------------------------------------------------------------------------


async def test_a_real_spy_day_through_redis_equals_the_backfill(
    redis_url: str, redis_client: object, unique_name: object, shared_data: Path, tmp_path: Path
) -> None:
    """SPY 2013-10-07 (250,601 trades) published in batches of 100 trades: the bar store ends
    with exactly the bars ``backfill`` writes for the same file."""
    from libs.common.market.tickfiles import read_lean_trades
    from services.bars.backfill import run_backfill

    zip_path = shared_data / "tick" / "spy" / "20131007_trade.zip"
    out = tmp_path / "spy.jsonl"
    run_backfill([zip_path], "algoseek", out)
    backfilled = [
        msgspec.convert({"seq": 0, **msgspec.json.decode(line)}, Bar)
        for line in out.read_bytes().splitlines()
        if line
    ]
    trades = read_lean_trades(zip_path)
    batches = [TickBatch(0, "SPY", trades[i : i + 100]) for i in range(0, len(trades), 100)]
    prefix = f"{unique_name('spy')}:"  # type: ignore[operator]
    publisher = Publisher(redis_client, keys=Keys(prefix))  # type: ignore[arg-type]
    async with service(settings_for(redis_url, prefix, "ticks.SPY")) as runtime:
        await publish(publisher, batches, chunk=100)
        expected = final_bars(backfilled)

        async def stored() -> dict[BarKey, BarValue] | None:
            got = await store_bars(redis_client, prefix, ["SPY"], SPY_DAY)
            return got if set(got) >= set(expected) else None

        await eventually(stored, timeout=60, interval=0.2)
        await eventually(
            lambda: metric(runtime, "tickmesh_bars_ticks_total", source="redis") == len(trades),
            timeout=10,
        )
        await asyncio.sleep(0.5)  # a late revision would come now
    assert await store_bars(redis_client, prefix, ["SPY"], SPY_DAY) == expected
    assert len(expected) == 828
    assert_published_once(await published_bars(redis_client, prefix, ["SPY"]))
