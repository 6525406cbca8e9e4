"""Bars: ticks in (Redis, or Kafka in shadow mode); vendor-faithful 1-minute bars out.

Actors (one hop from here): the ``builder.BarBuilder``, which owns the aggregation core and
its tick source (``sources.RedisTickSource`` or ``sources.KafkaTickSource``, read by a task of
the builder), and the heartbeat. ``backfill`` builds bars offline from tick files with the
same core.
"""

from __future__ import annotations

import argparse
import gc
import sys

from aiokafka import AIOKafkaProducer
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

from libs.common.io.barstore import BarStore
from libs.common.io.deadletter import DeadLetters
from libs.common.io.kafka_io import (
    TopicAdmin,
    TopicSpec,
    make_consumer,
    start_consumer,
    start_producer,
)
from libs.common.io.redis_io import Publisher
from libs.common.io.reliable import SequencedConsumer
from libs.common.io.wiring import add_heartbeat, connect_runtime_redis, make_publisher
from libs.common.market import aggregator as bar_core
from libs.common.names import Keys
from libs.common.runtime.cli import ServiceCli
from libs.common.runtime.service import ServiceRuntime, run_main
from libs.common.schemas import ENCODER, Bar
from services.bars.backfill import add_arguments as add_backfill_arguments
from services.bars.builder import (
    BarBuilder,
    BarSink,
    ClosedMinutes,
    StreamClosedMinutes,
    bar_channel,
    shard_of,
)
from services.bars.config import BarsSettings
from services.bars.sources import (
    KafkaTickSource,
    RedisTickSource,
    symbol_of_tick_channel,
    topic_pattern,
)

CLI = ServiceCli("bars", __doc__.splitlines()[0], BarsSettings)

BAR_TOPIC_CONFIGS = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}


def redis_sink(publisher: Publisher, store: BarStore, closed: ClosedMinutes) -> BarSink:
    """Keep bars in the bar store, then publish them on ``bars.<SYM>.1m`` (pub/sub + stream).

    The store is written first: a crash in between leaves a bar stored but not published,
    which the restart publishes (and stores again); the other order could leave a published
    bar that the store never gets (a restart does not publish it again).
    """

    async def sink(bars: list[Bar]) -> None:
        await store.put_many(bars)
        seqs = await publisher.publish_many([(bar_channel(bar.symbol), bar) for bar in bars])
        for bar, seq in zip(bars, seqs, strict=True):
            closed.note_published(bar.symbol, seq)

    return sink


def kafka_sink(admin: TopicAdmin, producer: AIOKafkaProducer) -> BarSink:
    """Produce bars to Kafka ``bars.<SYM>.1m`` keyed by symbol, creating topics once."""

    async def sink(bars: list[Bar]) -> None:
        await admin.ensure(
            TopicSpec(topic, 1, 1, BAR_TOPIC_CONFIGS)
            for topic in sorted({bar_channel(bar.symbol) for bar in bars})
        )
        futures = [
            await producer.send(
                bar_channel(bar.symbol), ENCODER.encode(bar), key=bar.symbol.encode()
            )
            for bar in bars
        ]
        for future in futures:
            await future

    return sink


def builder_name(settings: BarsSettings) -> str:
    """The name of the builder's durable state: ``bars-redis-<i>of<n>`` (its stream positions
    and published marks), ``bars-kafka-<group>`` (its published marks, shared by the group's
    members since partitions move between them)."""
    if settings.source == "kafka":
        return f"bars-kafka-{settings.kafka_group}"
    return f"bars-redis-{settings.shard_index}of{settings.shard_count}"


async def build(runtime: ServiceRuntime) -> None:
    """Create the bar builder (with its tick source) and the heartbeat under the runtime's
    supervisor."""
    settings: BarsSettings = runtime.settings  # type: ignore[assignment]
    if settings.shard_index >= settings.shard_count:
        raise ValueError(
            f"BARS_SHARD_INDEX={settings.shard_index} must be below "
            f"BARS_SHARD_COUNT={settings.shard_count}"
        )
    if settings.source not in ("redis", "kafka"):
        raise ValueError(f"BARS_SOURCE must be redis or kafka, not {settings.source!r}")
    policy = bar_core.get_policy(settings.policy)  # fails fast on a bad name
    if settings.late_policy not in ("revise", "drop"):
        raise ValueError(f"BARS_LATE_POLICY must be revise or drop, not {settings.late_policy!r}")
    client = await connect_runtime_redis(runtime)
    keys = Keys(settings.key_prefix)
    publisher = make_publisher(runtime, client)
    dead_letters = DeadLetters(publisher, "bars", registry=runtime.registry)

    def make_aggregator() -> bar_core.BarAggregator:
        return bar_core.BarAggregator(
            policy, grace_ms=settings.grace_ms, late_policy=settings.late_policy
        )

    name = builder_name(settings)
    builder: BarBuilder
    if settings.source == "redis":

        def owned(symbol: str) -> bool:
            return shard_of(symbol, settings.shard_count) == settings.shard_index

        closed: ClosedMinutes = StreamClosedMinutes(client, keys, name, accept=owned)
        sink = redis_sink(publisher, BarStore(client, keys), closed)

        def make_redis_consumer() -> SequencedConsumer:
            return SequencedConsumer(
                client,
                name,
                [settings.tick_pattern],
                keys=keys,
                registry=runtime.registry,
                accept=lambda channel: owned(symbol_of_tick_channel(channel)),
            )

        source = RedisTickSource(make_redis_consumer, dead_letters)
        builder = BarBuilder(
            f"{name}.builder",
            make_aggregator,
            source,
            sink,
            closed,
            tick_interval_ms=settings.tick_interval_ms,
            registry=runtime.registry,
            source_kind="redis",
        )
    else:
        producer = await start_producer(settings)
        runtime.on_cleanup(producer.stop)
        admin = TopicAdmin(settings)
        runtime.on_cleanup(admin.close)
        # round robin: with one topic per symbol (one partition each), the default range
        # assignor would give every topic's only partition to the same member
        kafka_consumer = make_consumer(
            settings,
            group_id=settings.kafka_group,
            partition_assignment_strategy=(RoundRobinPartitionAssignor,),
        )
        kafka_source = KafkaTickSource(kafka_consumer, dead_letters, registry=runtime.registry)
        kafka_consumer.subscribe(
            pattern=topic_pattern(settings.tick_pattern), listener=kafka_source.listener()
        )
        await start_consumer(kafka_consumer)
        runtime.on_cleanup(kafka_consumer.stop)

        async def kafka_ready() -> bool:
            await kafka_consumer.topics()  # a metadata round trip; raises when unreachable
            return True

        runtime.http.add_readiness("kafka", kafka_ready)
        closed = ClosedMinutes(client, keys, name)
        builder = BarBuilder(
            f"{name}.builder",
            make_aggregator,
            kafka_source,
            kafka_sink(admin, producer),
            closed,
            tick_interval_ms=settings.tick_interval_ms,
            registry=runtime.registry,
            source_kind="kafka",
        )
    runtime.supervisor.add(builder)
    add_heartbeat(runtime, publisher, lag_ms=lambda: builder.lag_ms)


async def build_and_freeze(runtime: ServiceRuntime) -> None:
    """``build``, then move everything allocated so far (modules, clients, settings) out of
    the garbage collector's way: its full rounds then scan only what the hot path keeps alive
    (decoded ticks waiting for the builder), which takes a third off the Kafka path's time."""
    await build(runtime)
    gc.collect()
    gc.freeze()


def run(_args: argparse.Namespace) -> int:
    """``run``: serve until stopped."""
    return run_main("bars", CLI.settings(), build_and_freeze)


def backfill(args: argparse.Namespace) -> int:
    """``backfill``: build bars from tick files with the same core."""
    from services.bars.backfill import run_backfill

    summary = run_backfill(args.files, args.policy, args.out, args.grace_ms, symbols=args.symbols)
    print(summary)
    return 0


CLI.command("run", "run the bar builder (the default)", run)
backfill_parser = CLI.command("backfill", "build bars offline from tick files", backfill)
add_backfill_arguments(backfill_parser)

if __name__ == "__main__":
    sys.exit(CLI.main())
