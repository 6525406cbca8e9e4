"""Bars: ticks in (Redis, or Kafka in shadow mode); vendor-faithful 1-minute bars out.

Actors (one hop from here): the tick source (``sources.RedisTickSource`` or
``sources.KafkaTickSource``), the ``builder.BarBuilder`` that owns the aggregation core, and
the heartbeat. ``backfill`` builds bars offline from tick files with the same core.
"""

from __future__ import annotations

import argparse
import sys

from aiokafka import AIOKafkaProducer

from libs.common import bars as bar_core
from libs.common.barstore import BarStore
from libs.common.cli import ServiceCli
from libs.common.deadletter import DeadLetters
from libs.common.kafka_io import TopicSpec, ensure_topics, make_consumer, start_consumer, \
    start_producer
from libs.common.redis_io import Keys, Publisher
from libs.common.reliable import SequencedConsumer
from libs.common.schemas import ENCODER, Bar
from libs.common.service import ServiceRuntime, run_main
from libs.common.wiring import add_heartbeat, connect_runtime_redis, make_publisher
from services.bars.builder import BarBuilder, ClosedMinutes, shard_of
from services.bars.config import BarsSettings
from services.bars.sources import KafkaTickSource, RedisTickSource

CLI = ServiceCli("bars", __doc__.splitlines()[0], BarsSettings)


def bar_channel(symbol: str) -> str:
    """The Redis channel and Kafka topic of a symbol's bars."""
    return f"bars.{symbol}.1m"


def redis_sink(publisher: Publisher, store: BarStore):  # type: ignore[no-untyped-def]
    """Publish bars on ``bars.<SYM>.1m`` (pub/sub + stream) and keep them in the bar store."""

    async def sink(bars: list[Bar]) -> None:
        await publisher.publish_many([(bar_channel(bar.symbol), bar) for bar in bars])
        await store.put_many(bars)

    return sink


def kafka_sink(settings: BarsSettings, producer: AIOKafkaProducer):  # type: ignore[no-untyped-def]
    """Produce bars to Kafka ``bars.<SYM>.1m`` keyed by symbol, creating topics once."""
    created: set[str] = set()

    async def sink(bars: list[Bar]) -> None:
        topics = {bar_channel(bar.symbol) for bar in bars} - created
        if topics:
            await ensure_topics(settings, [
                TopicSpec(topic, 1, 1, {"cleanup.policy": "delete", "retention.ms": "-1",
                                        "retention.bytes": "-1"})
                for topic in sorted(topics)])
            created.update(topics)
        futures = [
            await producer.send(bar_channel(bar.symbol), ENCODER.encode(bar),
                                key=bar.symbol.encode())
            for bar in bars
        ]
        for future in futures:
            await future

    return sink


async def build(runtime: ServiceRuntime) -> None:
    """Create the bar builder's actors under the runtime's supervisor."""
    settings: BarsSettings = runtime.settings  # type: ignore[assignment]
    if settings.shard_index >= settings.shard_count:
        raise ValueError(f"BARS_SHARD_INDEX={settings.shard_index} must be below "
                         f"BARS_SHARD_COUNT={settings.shard_count}")
    client = await connect_runtime_redis(runtime)
    keys = Keys(settings.key_prefix)
    publisher = make_publisher(runtime, client)
    dead_letters = DeadLetters(publisher, "bars", registry=runtime.registry)
    aggregator = bar_core.BarAggregator(
        bar_core.get_policy(settings.policy), grace_ms=settings.grace_ms,
        late_policy=settings.late_policy,
    )
    name = f"bars-{settings.source}-{settings.shard_index}of{settings.shard_count}"
    closed = ClosedMinutes(client, keys, name)
    if settings.source == "redis":
        sink = redis_sink(publisher, BarStore(client, keys))
        consumer = SequencedConsumer(
            client, name, [settings.tick_pattern], keys=keys, registry=runtime.registry,
            accept=lambda channel: shard_of(channel.split(".")[1], settings.shard_count)
            == settings.shard_index,
        )
        holder: dict[str, RedisTickSource] = {}

        async def commit_redis(safe: dict[str, int]) -> None:
            await holder["source"].commit(safe)

        builder = BarBuilder(f"{name}.builder", aggregator, sink, commit_redis, closed,
                             tick_interval_ms=settings.tick_interval_ms,
                             registry=runtime.registry, source="redis")
        holder["source"] = RedisTickSource(f"{name}.source", consumer, builder, dead_letters,
                                           registry=runtime.registry)
        runtime.supervisor.add(builder)
        runtime.supervisor.add(holder["source"])
    elif settings.source == "kafka":
        producer = await start_producer(settings)
        runtime.on_cleanup(producer.stop)
        pattern = "^" + settings.tick_pattern.replace(".", r"\.").replace("*", "[^.]+") + "$"
        kafka_consumer = make_consumer(settings, group_id=settings.kafka_group, pattern=pattern)
        await start_consumer(kafka_consumer)
        runtime.on_cleanup(kafka_consumer.stop)

        async def kafka_ready() -> bool:
            await kafka_consumer.topics()  # a metadata round trip; raises when unreachable
            return True

        runtime.http.add_readiness("kafka", kafka_ready)
        kafka_holder: dict[str, KafkaTickSource] = {}

        async def commit_kafka(safe: dict[str, int]) -> None:
            await kafka_holder["source"].commit(safe)

        builder = BarBuilder(f"{name}.builder", aggregator, kafka_sink(settings, producer),
                             commit_kafka, closed, tick_interval_ms=settings.tick_interval_ms,
                             registry=runtime.registry, source="kafka")
        kafka_holder["source"] = KafkaTickSource(f"{name}.source", kafka_consumer, builder,
                                                 dead_letters, registry=runtime.registry)
        runtime.supervisor.add(builder)
        runtime.supervisor.add(kafka_holder["source"])
    else:
        raise ValueError(f"BARS_SOURCE must be redis or kafka, not {settings.source!r}")
    add_heartbeat(runtime, publisher, lag_ms=lambda: builder.lag_ms)


def run(_args: argparse.Namespace) -> int:
    """``run``: serve until stopped."""
    return run_main("bars", CLI.settings(), build)


def backfill(args: argparse.Namespace) -> int:
    """``backfill``: build bars from tick files with the same core."""
    from services.bars.backfill import run_backfill

    summary = run_backfill(args.files, args.policy, args.out, args.grace_ms)
    print(summary)
    return 0


CLI.command("run", "run the bar builder (the default)", run)
backfill_parser = CLI.command("backfill", "build bars offline from tick files", backfill)
backfill_parser.add_argument("--policy", default="algoseek", choices=["algoseek", "polygon", "none"])
backfill_parser.add_argument("--out", required=True, help="output file, one JSON bar per line")
backfill_parser.add_argument("--grace-ms", type=int, default=0)
backfill_parser.add_argument("files", nargs="+", metavar="TICKFILE",
                             help="Lean trade zips (tick/spy/20131007_trade.zip) or Polygon "
                                  "flat-file trade CSVs")

if __name__ == "__main__":
    sys.exit(CLI.main())
