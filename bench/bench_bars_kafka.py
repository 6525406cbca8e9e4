"""The shadow bar builder (Kafka source) against quixstreams' tumbling-window OHLCV, same run.

One day of SPY trades (real ``tick/spy/20131007_trade.zip``, 250,601 trades, when the shared
data is there; otherwise a synthetic day of the same size) is produced once to a ticks topic
on a Tansu broker started for the run (``localstack.TansuBroker``), as the mirror writes it:
JSON ``TickBatch`` records of 100 trades, key ``SPY``, headers ``tm-channel``/``tm-seq``,
followed by one sentinel trade an hour after the last, so that every real minute can close
on event time in all three. Then, each from the earliest offset:

- ``tickmesh``: the service's own path, ``KafkaTickSource`` + ``BarBuilder`` (the source
  assigns itself the topic's partition, as the service does, with no consumer group; positions
  in a redis-server started for the run; mirror-header dedupe, msgspec decode, the
  ``algoseek`` core, safe commits), with a sink that only collects bars;
- ``quixstreams``: ``Application`` + ``StreamingDataFrame``: explode each batch into trades,
  event time from the trade, ``tumbling_window(1 min, grace)`` with Earliest/Max/Min/Latest
  price and Sum size, ``.final()``; no condition rules (plain OHLCV), no changelog topics;
- ``reference``: a plain aiokafka + msgspec loop with a dict of minutes (no rules, no
  watermark, no commits): the floor of any Python consumer here.

Measured for each: **first record to last bar** (from the first fetched record to the bar of
the last real minute) and **end to end** (from creating the client, so including the first
fetch and, for the two that use a consumer group, the join). Group timeouts are lowered
(session 1 s, heartbeat 200 ms, rebalance 1 s): a join takes about half the session timeout
on Tansu. Topics are
created with ``retention.ms=-1`` and ``retention.bytes=-1`` (quixstreams' topic-config lookup
fails on Tansu otherwise).

Run: ``.venv/bin/python bench/bench_bars_kafka.py [--repeat 1] [--skip-quix]``
(quixstreams is a bench-only dependency: ``pip install -e '.[bench]'``). Bounded: each run
gives up after ``--timeout-s`` (120 s).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry
from summary import LIKE_FOR_LIKE, add_rows, row

from devstack.localstack import RedisServer, TansuBroker
from libs.common.io.kafka_io import (
    TopicAdmin,
    TopicSpec,
    make_consumer,
    sequence_headers,
)
from libs.common.io.security import kafka_options
from libs.common.market import calendar
from libs.common.market.aggregator import BarAggregator
from libs.common.market.sessions import MINUTE_MS
from libs.common.names import Keys
from libs.common.schemas import ENCODER, TICK_BATCH_DECODER, Bar, TickBatch, Trade
from services.bars.builder import BarBuilder
from services.bars.config import BarsSettings
from services.bars.kafka_source import KafkaTickSource
from services.bars.marks import ClosedMinutes

TOPIC = "ticks.SPY"
BATCH = 100
GRACE_MS = 2_000
SESSION_MS, HEARTBEAT_MS, REBALANCE_MS = 1_000, 200, 1_000
STOP_S = 15
TOPIC_CONFIGS = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}


@dataclass
class Result:
    """One system's run."""

    name: str
    trades: int
    started: float
    first_record: float
    last_bar: float
    bars: int

    @property
    def processing_s(self) -> float:
        return self.last_bar - self.first_record

    @property
    def end_to_end_s(self) -> float:
        return self.last_bar - self.started


def load_trades() -> tuple[str, list[Trade]]:
    """(description, trades): the real SPY day, or a synthetic one of the same size."""
    from bench_bar_core import data_dir, synthetic_day

    path = data_dir() / "tick" / "spy" / "20131007_trade.zip"
    if path.is_file():
        from libs.common.market.tickfiles import read_lean_trades

        return f"real SPY 2013-10-07 ({path})", read_lean_trades(path)
    return "synthetic SPY-like day (shared data absent)", synthetic_day(count=250_601)


def settings_for(bootstrap: str, group: str) -> BarsSettings:
    return BarsSettings(
        kafka_bootstrap=bootstrap,
        kafka_group=group,
        source="kafka",
        tick_pattern=TOPIC,
        grace_ms=GRACE_MS,
        kafka_session_timeout_ms=SESSION_MS,
        kafka_heartbeat_interval_ms=HEARTBEAT_MS,
        kafka_rebalance_timeout_ms=REBALANCE_MS,
        run_id="bench",
    )


async def produce(bootstrap: str, trades: list[Trade]) -> tuple[int, int]:
    """Create the topic and produce the day as the mirror would; returns (records, last
    real minute start)."""
    settings = settings_for(bootstrap, "unused")
    admin = TopicAdmin(settings)
    try:
        await admin.ensure([TopicSpec(TOPIC, 1, 1, TOPIC_CONFIGS)])
    finally:
        await admin.close()
    newest = max(trade.t for trade in trades)
    sentinel = Trade("SPY", trades[-1].p, 1, newest + 3_600_000, 4, (), "sentinel", 2)
    batches = [trades[i : i + BATCH] for i in range(0, len(trades), BATCH)] + [[sentinel]]
    producer = AIOKafkaProducer(
        **kafka_options(settings),
        linger_ms=20,
        acks="all",
        max_batch_size=1_048_576,
        max_request_size=2_097_152,
    )
    await producer.start()
    try:
        futures = []
        for seq, ticks in enumerate(batches, 1):
            payload = ENCODER.encode(TickBatch(seq, "SPY", ticks))
            futures.append(
                await producer.send(
                    TOPIC, payload, key=b"SPY", headers=sequence_headers(TOPIC, seq)
                )
            )
        for future in futures:
            await future
    finally:
        await producer.stop()
    return len(batches), newest - newest % MINUTE_MS


class _NoDeadLetters:
    async def send(self, source: str, error: str, raw: bytes) -> None:
        raise RuntimeError(f"bad record in the benchmark topic: {error}")


async def run_tickmesh(
    bootstrap: str, redis_url: str, trades: int, last_minute: int, timeout_s: float
) -> Result:
    """The service's Kafka path (source + builder actor) with a collecting sink: the source
    assigns itself the topic's partition (no consumer group, as the service does) and keeps
    its positions in Redis."""
    name = f"bench-tickmesh-{uuid.uuid4().hex[:8]}"
    settings = settings_for(bootstrap, name)
    registry = CollectorRegistry()
    started = time.perf_counter()
    first: list[float] = []
    done = asyncio.get_running_loop().create_future()
    collected: list[Bar] = []
    client = aioredis.Redis.from_url(redis_url)
    keys = Keys("bench:")

    def make_timed_consumer() -> AIOKafkaConsumer:
        consumer = make_consumer(settings, group_id=None)
        getmany = consumer.getmany

        async def timed_getmany(*args: Any, **kwargs: Any) -> Any:
            fetched = await getmany(*args, **kwargs)
            if fetched and not first:
                first.append(time.perf_counter())
            return fetched

        consumer.getmany = timed_getmany  # type: ignore[method-assign]
        return consumer

    source = KafkaTickSource(
        make_timed_consumer,
        client,
        keys,
        name,
        _NoDeadLetters(),  # type: ignore[arg-type]
        tick_pattern=settings.tick_pattern,
        progress_topic=None,  # no ingest here: minutes close on the trades' own time
        registry=registry,
    )

    async def sink(bars: list[Bar]) -> None:
        collected.extend(bars)
        if not done.done() and any(bar.startMs == last_minute for bar in bars):
            done.set_result(time.perf_counter())

    builder = BarBuilder(
        "bench.builder",
        lambda symbol: BarAggregator(symbol, "algoseek", grace_ms=settings.grace_ms),
        source,
        sink,
        ClosedMinutes(None, keys, "bench"),
        tick_interval_ms=settings.tick_interval_ms,
        registry=registry,
        source_kind="kafka",
        identity_horizon_ms=settings.identity_horizon_ms,
    )
    await builder.start()
    try:
        async with asyncio.timeout(timeout_s):
            last_bar = await done
    finally:
        try:
            await asyncio.wait_for(builder.stop(), STOP_S)
        except TimeoutError:
            # Seen with redis-py 8: a task cancelled during a Redis command may go on running
            # (the cancellation is lost), so stop() waits for it; cancelling again ends it.
            print(
                f"bench_bars_kafka: the builder did not stop within {STOP_S} s; closing its source"
            )
            await source.close()
        await client.aclose()
    return Result(
        "tickmesh (KafkaTickSource + BarBuilder, algoseek)",
        trades,
        started,
        first[0],
        last_bar,
        len({(b.symbol, b.startMs) for b in collected}),
    )


async def run_reference(bootstrap: str, trades: int, last_minute: int, timeout_s: float) -> Result:
    """A plain aiokafka + msgspec loop: decode and a dict of minutes, nothing else."""
    started = time.perf_counter()
    consumer = AIOKafkaConsumer(
        TOPIC,
        **kafka_options(settings_for(bootstrap, "unused")),
        group_id=f"bench-plain-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=SESSION_MS,
        heartbeat_interval_ms=HEARTBEAT_MS,
        rebalance_timeout_ms=REBALANCE_MS,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    bars: dict[int, list[float]] = {}
    first = 0.0
    last_bar = 0.0
    try:
        async with asyncio.timeout(timeout_s):
            while not last_bar:
                fetched = await consumer.getmany(timeout_ms=200, max_records=5_000)
                if fetched and not first:
                    first = time.perf_counter()
                for messages in fetched.values():
                    for message in messages:
                        for trade in TICK_BATCH_DECODER.decode(message.value).ticks:
                            t = trade.t
                            minute = t - t % MINUTE_MS
                            p = trade.p
                            bar = bars.get(minute)
                            if bar is None:
                                if minute > last_minute and last_minute in bars:
                                    last_bar = time.perf_counter()
                                bars[minute] = [p, p, p, p, trade.s]
                                continue
                            bar[1] = max(bar[1], p)
                            bar[2] = min(bar[2], p)
                            bar[3] = p
                            bar[4] += trade.s
    finally:
        await consumer.stop()
    return Result(
        "reference (plain aiokafka + msgspec loop, no rules)",
        trades,
        started,
        first,
        last_bar,
        len(bars) - 1,
    )


def run_quix(bootstrap: str, trades: int, last_minute: int, timeout_s: float) -> Result:
    """quixstreams' tumbling-window OHLCV over the same topic."""
    import logging

    from quixstreams import Application
    from quixstreams.dataframe.windows import aggregations as agg

    started = time.perf_counter()
    first: list[float] = []
    last: list[float] = []
    windows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-quix-") as state_dir:
        app = Application(
            broker_address=bootstrap,
            consumer_group=f"bench-quix-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
            consumer_extra_config={
                "session.timeout.ms": SESSION_MS,
                "heartbeat.interval.ms": HEARTBEAT_MS,
            },
            state_dir=state_dir,
            use_changelog_topics=False,
            loglevel=logging.WARNING,
        )
        topic = app.topic(TOPIC, value_deserializer="json")
        sdf = app.dataframe(topic)

        def mark_first(_value: Any) -> None:
            if not first:
                first.append(time.perf_counter())

        def collect(window: dict[str, Any]) -> None:
            windows.append(window)
            if window["start"] == last_minute and not last:
                last.append(time.perf_counter())
                app.stop()

        sdf = sdf.update(mark_first)
        sdf = sdf.apply(lambda batch: batch["ticks"], expand=True)
        sdf = sdf.set_timestamp(lambda value, _key, _timestamp, _headers: value["t"])
        sdf = (
            sdf.tumbling_window(MINUTE_MS, grace_ms=GRACE_MS)
            .agg(
                open=agg.Earliest("p"),
                high=agg.Max("p"),
                low=agg.Min("p"),
                close=agg.Latest("p"),
                volume=agg.Sum("s"),
            )
            .final()
        )
        sdf = sdf.update(collect)
        watchdog = threading.Timer(timeout_s, app.stop)
        watchdog.start()
        try:
            app.run()
        finally:
            watchdog.cancel()
    if not last:
        raise TimeoutError(f"quixstreams did not emit the last bar within {timeout_s:g} s")
    return Result(
        "quixstreams (tumbling window OHLCV, no rules)",
        trades,
        started,
        first[0],
        last[0],
        len(windows),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print ticks/s of each system and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="rounds (best of)")
    parser.add_argument("--skip-quix", action="store_true", help="without quixstreams")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per run")
    parser.add_argument("--summary", help="append headline rows here (scripts/bench.sh)")
    args = parser.parse_args(argv)
    description, trades = load_trades()
    count = len(trades)
    broker = TansuBroker()
    broker.start()
    redis = RedisServer().start()  # the tickmesh source keeps its positions there
    try:
        records, last_minute = asyncio.run(produce(broker.bootstrap, trades))
        del trades  # a quarter of a million live objects would slow every GC round of all three
        # the exchange calendar is read at the service's start (services/bars/__main__.py),
        # not on its first trade: read here it would put a quarter of a second of startup
        # (importing pandas and exchange_calendars) inside the first round's timing
        calendar.load()
        gc.collect()
        gc.freeze()  # as the service's ``run`` does after its startup
        runs: dict[str, list[Result]] = {}
        for _ in range(args.repeat):
            for result in (
                asyncio.run(
                    run_tickmesh(broker.bootstrap, redis.url, count, last_minute, args.timeout_s)
                ),
                asyncio.run(run_reference(broker.bootstrap, count, last_minute, args.timeout_s)),
                *(
                    []
                    if args.skip_quix
                    else [run_quix(broker.bootstrap, count, last_minute, args.timeout_s)]
                ),
            ):
                runs.setdefault(result.name, []).append(result)
    finally:
        broker.stop()
        redis.stop()
    print(
        f"input: {description}: {count:,} trades in {records - 1:,} records of up to "
        f"{BATCH} trades (+1 sentinel) on one Tansu partition"
    )
    print(
        f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cpus, "
        f"load average {os.getloadavg()[0]:.1f}; best of {args.repeat}; group session "
        f"{SESSION_MS} ms, grace {GRACE_MS} ms"
    )
    print(
        f"{'system':54s} {'bars':>5s} {'first rec -> last bar':>22s} {'ticks/s':>10s} "
        f"{'end to end':>11s} {'ticks/s':>10s}"
    )
    best: dict[str, Result] = {}
    for name, results in runs.items():
        result = best[name] = min(results, key=lambda r: r.processing_s)
        e2e = min(r.end_to_end_s for r in results)
        print(
            f"{name:54s} {result.bars:5d} {result.processing_s:21.3f}s "
            f"{result.trades / result.processing_s:10,.0f} {e2e:10.3f}s "
            f"{result.trades / e2e:10,.0f}"
        )
    ours = next(r for n, r in best.items() if n.startswith("tickmesh"))
    quix = next((r for n, r in best.items() if n.startswith("quixstreams")), None)
    if quix is not None:
        quix_e2e = min(r.end_to_end_s for r in runs[quix.name])
        ours_e2e = min(r.end_to_end_s for r in runs[ours.name])
        ratio = quix.processing_s / ours.processing_s
        verdict = f"target >= 10x: {'met' if ratio >= 10 else 'not met'}"
        print(
            f"ratio tickmesh / quixstreams: {ratio:.1f}x first record to last bar, "
            f"{quix_e2e / ours_e2e:.1f}x end to end ({verdict})"
        )
        add_rows(
            args.summary,
            [
                row(
                    "bench_bars_kafka",
                    "shadow bar builder, first record to last bar, ticks/s",
                    f"{ours.trades / ours.processing_s:,.0f}",
                    f"quixstreams {quix.trades / quix.processing_s:,.0f}",
                    ratio,
                    f"{LIKE_FOR_LIKE} (same topic, {BATCH} trades/record); best of "
                    f"{args.repeat}; {verdict}",
                ),
                row(
                    "bench_bars_kafka",
                    "shadow bar builder, end to end (quixstreams incl. its group join), ticks/s",
                    f"{ours.trades / ours_e2e:,.0f}",
                    f"quixstreams {quix.trades / quix_e2e:,.0f}",
                    quix_e2e / ours_e2e,
                    f"same topic, {BATCH} trades/record; quixstreams joins a group, "
                    "ours assigns itself",
                ),
            ],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
