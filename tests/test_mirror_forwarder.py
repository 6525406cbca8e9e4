"""The forwarder in-process against real Redis and the Kafka-protocol broker."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable

import msgspec
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2
from prometheus_client import CollectorRegistry

from devstack.localstack import TansuBroker
from libs.common import names
from libs.common.io.kafka_io import read_from_beginning, record_identity
from libs.common.io.redis_io import Publisher
from libs.common.io.reliable import Record
from libs.common.names import Keys
from libs.common.runtime.settings import load_settings
from libs.common.schemas import DeadLetter, Progress, TickBatch, Trade
from services.mirror.audit import audit
from services.mirror.config import MirrorSettings
from services.mirror.forwarder import Forwarder, InFlight
from services.mirror.landed import OffsetStore
from tests.helpers import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def ticks(symbol: str, count: int = 3) -> TickBatch:
    return TickBatch(
        seq=0,
        sym=symbol,
        ticks=[Trade(sym=symbol, p=10.0 + i, s=100, t=1_381_152_600_000 + i) for i in range(count)],
    )


def mirror_settings(
    redis_url: str,
    kafka_bootstrap: str,
    name: str,
    routes: list[dict[str, object]] | None = None,
    **extra: str,
) -> MirrorSettings:
    """Settings isolated to one test: its own key prefix, channels, topics and consumer;
    ``routes`` replace the one route of its tick channels."""
    env = {
        "MIRROR_REDIS_URL": redis_url,
        "MIRROR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "MIRROR_KEY_PREFIX": f"{name}:",
        "MIRROR_ROUTES": msgspec.json.encode(
            routes
            or [
                {
                    "pattern": f"ticks.{name}*",
                    "schema": "TickBatch",
                    "single_topic": f"single.{name}",
                }
            ]
        ).decode(),
        "MIRROR_DEADLETTER_TOPIC": f"dlq.{name}",
        "MIRROR_SWEEP_INTERVAL_MS": "200",
        "MIRROR_KAFKA_IDLE_MS": "1000",
        "MIRROR_RECONCILE_INTERVAL_S": "0",
    }
    env.update({f"MIRROR_{key.upper()}": value for key, value in extra.items()})
    return load_settings(MirrorSettings, env)


def batch_sizes(mirror: Forwarder) -> list[int]:
    """The size of each batch ``mirror`` sends from now on, in order (a list that fills)."""
    sizes: list[int] = []
    send = mirror._send

    async def counted_send(batch: list[Record]) -> InFlight:
        sizes.append(len(batch))
        return await send(batch)

    mirror._send = counted_send  # type: ignore[method-assign]
    return sizes


class Running:
    """A Forwarder started in this event loop."""

    def __init__(self, settings: MirrorSettings, client: aioredis.Redis) -> None:
        self.registry = CollectorRegistry()
        self.actor = Forwarder(settings, client, registry=self.registry)

    async def __aenter__(self) -> Forwarder:
        await self.actor.start()
        return self.actor

    async def __aexit__(self, *exc: object) -> None:
        await self.actor.stop(10)


@pytest.fixture
def name(unique_name: Callable[[str], str]) -> str:
    return unique_name("M").replace("-", "")[-40:]


async def test_every_record_reaches_kafka_in_order_with_key_and_sequence_headers(
    redis_client: aioredis.Redis, redis_url: str, kafka_bootstrap: str, name: str
) -> None:
    settings = mirror_settings(redis_url, kafka_bootstrap, name)
    publisher = Publisher(redis_client, keys=Keys(settings.key_prefix))
    channels = [f"ticks.{name}A", f"ticks.{name}B"]
    for channel in channels:  # published before the mirror starts: read from the streams
        await publisher.publish_many([(channel, ticks("X"))] * 30)
    async with Running(settings, redis_client) as mirror:
        for channel in channels:  # and while it runs: pub/sub
            await publisher.publish_many([(channel, ticks("X"))] * 30)
        await eventually(lambda: mirror.acknowledged == 120, timeout=30)
    for channel in channels:
        records = []
        async for chunk in read_from_beginning(settings, [channel]):
            records.extend(chunk)
        assert [record_identity(r.headers) for r in records] == [
            (channel, seq) for seq in range(1, 61)
        ]
        assert {r.key for r in records} == {channel.split(".")[1].encode()}
        assert msgspec.json.decode(records[0].value, type=TickBatch).seq == 1
    result = await audit(settings, redis_client)
    assert (result.published, result.missing, result.duplicates) == (120, 0, 0)


async def test_undecodable_records_go_to_the_dead_letter_topic_and_delivery_goes_on(
    redis_client: aioredis.Redis, redis_url: str, kafka_bootstrap: str, name: str
) -> None:
    settings = mirror_settings(redis_url, kafka_bootstrap, name)
    publisher = Publisher(redis_client, keys=Keys(settings.key_prefix))
    channel = f"ticks.{name}"
    async with Running(settings, redis_client) as mirror:
        await publisher.publish(channel, ticks("X"))
        await publisher.publish(channel, b'{"seq":0,"sym":"X","ticks":"not a list"}')
        await publisher.publish(channel, ticks("X"))
        await eventually(lambda: mirror.acknowledged == 2, timeout=30)
        await eventually(
            lambda: (
                mirror.registry.get_sample_value(
                    "tickmesh_dead_letters_total", {"service": "mirror", "source_kind": "ticks"}
                )
                == 1
            )
        )
    letters = []
    async for chunk in read_from_beginning(settings, [settings.deadletter_topic]):
        letters.extend(chunk)
    assert len(letters) == 1
    letter = msgspec.json.decode(letters[0].value, type=DeadLetter)
    assert (letter.source, letter.seq, letter.service) == (channel, 2, "mirror")
    assert "TickBatch" in letter.error
    assert b"not a list" in letter.raw
    assert letters[0].key == channel.encode()
    assert base64.b64encode(letter.raw) in letters[0].value  # raw travels as base64
    result = await audit(settings, redis_client)
    assert (result.published, result.missing, result.deadLettered) == (3, 0, 1)


async def test_a_restart_resumes_after_what_kafka_acknowledged(
    redis_client: aioredis.Redis, redis_url: str, kafka_bootstrap: str, name: str
) -> None:
    settings = mirror_settings(redis_url, kafka_bootstrap, name)
    publisher = Publisher(redis_client, keys=Keys(settings.key_prefix))
    channel = f"ticks.{name}"
    async with Running(settings, redis_client) as mirror:
        await publisher.publish_many([(channel, ticks("X"))] * 50)
        await eventually(lambda: mirror.acknowledged == 50, timeout=30)
    await publisher.publish_many([(channel, ticks("X"))] * 50)  # while it is stopped
    async with Running(settings, redis_client) as mirror:
        await eventually(lambda: mirror.acknowledged == 50, timeout=30)
    result = await audit(settings, redis_client)
    assert (result.published, result.inKafka, result.missing, result.duplicates) == (100, 100, 0, 0)
    # what a restart reads back from: the offset of the last record acknowledged, not of the
    # first record of the last batch
    stored = await OffsetStore(
        redis_client, Keys(settings.key_prefix), settings.consumer_name
    ).load()
    assert stored == {TopicPartition(channel, 0): 99}


async def test_batches_acknowledged_while_a_commit_waits_are_committed_together(
    redis_client: aioredis.Redis, redis_url: str, kafka_bootstrap: str, name: str
) -> None:
    """Kafka acknowledges batches faster than Redis takes their commits (a slow Redis here):
    the batches acknowledged meanwhile share the next commit, in order, and nothing is lost."""
    settings = mirror_settings(redis_url, kafka_bootstrap, name, batch_max_records="10")
    publisher = Publisher(redis_client, keys=Keys(settings.key_prefix))
    channel = f"ticks.{name}"
    async with Running(settings, redis_client) as mirror:
        saves: list[dict[TopicPartition, int]] = []
        save = mirror.offsets.save

        async def slow_save(changed: dict[TopicPartition, int]) -> None:
            saves.append(dict(changed))
            await asyncio.sleep(0.2)
            await save(changed)

        mirror.offsets.save = slow_save  # type: ignore[method-assign]
        await publisher.publish_many([(channel, ticks("X"))] * 200)
        await eventually(lambda: mirror.acknowledged == 200, timeout=30)
        batches = mirror.mirror_metrics.batches._value.get()
    assert batches >= 4  # small batches (ten records read at a time)
    assert len(saves) < batches / 2, (len(saves), batches)  # not one commit a batch
    offsets = [next(iter(changed.values())) for changed in saves if changed]
    assert offsets == sorted(offsets) and offsets[-1] == 199
    result = await audit(settings, redis_client)
    assert (result.published, result.inKafka, result.missing, result.duplicates) == (200, 200, 0, 0)


@pytest.mark.parametrize("linger_ms", [0, 400])
async def test_records_arriving_within_the_linger_share_one_produce_batch(
    redis_client: aioredis.Redis, redis_url: str, kafka_bootstrap: str, name: str, linger_ms: int
) -> None:
    """Eight one-record round trips 20 ms apart: with a linger they travel in one or two
    produce batches (one position save each), without it in about one batch a record."""
    settings = mirror_settings(redis_url, kafka_bootstrap, name, linger_ms=str(linger_ms))
    publisher = Publisher(redis_client, keys=Keys(settings.key_prefix))
    channel = f"ticks.{name}"
    async with Running(settings, redis_client) as mirror:
        await publisher.publish_many([(channel, ticks("X"))])  # the stream exists: pub/sub
        await eventually(lambda: mirror.acknowledged == 1, timeout=30)
        before = mirror.mirror_metrics.batches._value.get()
        for _ in range(8):
            await publisher.publish_many([(channel, ticks("X"))])
            await asyncio.sleep(0.02)
        await eventually(lambda: mirror.acknowledged == 9, timeout=30)
        batches = mirror.mirror_metrics.batches._value.get() - before
    if linger_ms:
        assert batches <= 2, batches
    else:
        assert batches >= 6, batches
    records = []
    async for chunk in read_from_beginning(settings, [channel]):
        records.extend(chunk)
    assert [record_identity(r.headers) for r in records] == [(channel, s) for s in range(1, 10)]


async def test_a_full_batch_is_sent_without_waiting_for_the_linger(
    redis_client: aioredis.Redis, redis_url: str, kafka_bootstrap: str, name: str
) -> None:
    """A linger of a minute holds no batch that is full: 30 records published in one round
    trip go in three batches of ten, at once, and no batch is larger than the setting."""
    settings = mirror_settings(
        redis_url, kafka_bootstrap, name, linger_ms="60000", batch_max_records="10"
    )
    publisher = Publisher(redis_client, keys=Keys(settings.key_prefix))
    channel = f"ticks.{name}"
    async with Running(settings, redis_client) as mirror:
        sizes = batch_sizes(mirror)
        await publisher.publish_many([(channel, ticks("X"))] * 30)
        await eventually(lambda: mirror.acknowledged == 30, timeout=20)
    assert sizes == [10, 10, 10]


async def test_a_progress_mark_is_sent_without_waiting_for_the_linger(
    redis_client: aioredis.Redis, redis_url: str, kafka_bootstrap: str, name: str
) -> None:
    """The shadow builder closes minutes on the progress marks it reads from Kafka, so a
    linger of a minute holds no mark: three tick records wait in it until a mark comes, then
    the four go in one batch at once."""
    channel = f"ticks.{name}"
    routes = [
        {"pattern": f"ticks.{name}*", "schema": "TickBatch"},
        {"pattern": names.PROGRESS, "topic": f"progress.{name}", "key": "field:source"},
    ]
    settings = mirror_settings(redis_url, kafka_bootstrap, name, routes, linger_ms="60000")
    publisher = Publisher(redis_client, keys=Keys(settings.key_prefix))
    await publisher.publish_many([(channel, ticks("X"))])
    async with Running(settings, redis_client) as mirror:
        sizes = batch_sizes(mirror)
        await eventually(lambda: mirror.consumer is not None, timeout=30)
        for _ in range(2):
            await publisher.publish_many([(channel, ticks("X"))])
        await eventually(
            lambda: mirror.consumer is not None and mirror.consumer.positions.get(channel) == 3,
            timeout=30,
        )
        assert mirror.acknowledged == 0  # read, not sent: the batch is lingering
        mark = Progress(seq=0, source="ingest", feedTimeMs=1_381_152_660_000, ticks={channel: 3})
        await publisher.publish_many([(names.PROGRESS, mark)])
        await eventually(lambda: mirror.acknowledged == 4, timeout=20)
    assert sizes == [4]


async def test_a_stop_while_a_batch_lingers_sends_nothing_twice_and_loses_nothing(
    redis_client: aioredis.Redis, redis_url: str, kafka_bootstrap: str, name: str
) -> None:
    """Five records read and waiting in a minute's linger when the mirror stops: the stop
    does not wait for the linger, nothing of them was committed, and the next run sends
    each exactly once."""
    lingering = mirror_settings(redis_url, kafka_bootstrap, name, linger_ms="60000")
    publisher = Publisher(redis_client, keys=Keys(lingering.key_prefix))
    channel = f"ticks.{name}"
    await publisher.publish_many([(channel, ticks("X"))])  # the stream exists: pub/sub
    running = Running(lingering, redis_client)
    mirror = await running.__aenter__()
    try:
        await eventually(lambda: mirror.consumer is not None, timeout=30)
        await publisher.publish_many([(channel, ticks("X"))] * 4)
        await eventually(
            lambda: mirror.consumer is not None and mirror.consumer.positions.get(channel) == 5,
            timeout=30,
        )
        assert mirror.acknowledged == 0  # read, not sent: the batch is lingering
    finally:
        await asyncio.wait_for(running.__aexit__(), timeout=20)
    failures = running.registry.get_sample_value(
        "tickmesh_actor_failures_total", {"actor": "mirror.forwarder"}
    )
    assert not failures  # the pump's read ended before its generator was closed
    prompt = mirror_settings(redis_url, kafka_bootstrap, name, linger_ms="0")
    async with Running(prompt, redis_client) as again:
        await eventually(lambda: again.acknowledged == 5, timeout=30)
    result = await audit(prompt, redis_client)
    assert (result.published, result.inKafka, result.missing, result.duplicates) == (5, 5, 0, 0)


async def test_single_topic_mode_keys_every_symbol_in_one_topic(
    redis_client: aioredis.Redis, redis_url: str, kafka_bootstrap: str, name: str
) -> None:
    routes = [
        {
            "pattern": f"ticks.{name}*",
            "schema": "TickBatch",
            "single_topic": f"single.{name}",
            "partitions": 4,
        }
    ]
    settings = mirror_settings(redis_url, kafka_bootstrap, name, routes, topic_mode="single")
    publisher = Publisher(redis_client, keys=Keys(settings.key_prefix))
    symbols = [f"{name}{letter}" for letter in "ABCDEFGH"]
    async with Running(settings, redis_client) as mirror:
        await publisher.publish_many(
            [(f"ticks.{symbol}", ticks(symbol)) for _ in range(5) for symbol in symbols]
        )
        await eventually(lambda: mirror.acknowledged == 40, timeout=30)
    records = []
    async for chunk in read_from_beginning(settings, [f"single.{name}"]):
        records.extend(chunk)
    assert sorted({r.key for r in records}) == [symbol.encode() for symbol in symbols]
    assert len(records) == 40
    # each key on the partition Kafka's default partitioner gives it, in publish order
    for record in records:
        assert record.partition == (murmur2(record.key) & 0x7FFFFFFF) % 4
    for symbol in symbols:
        seqs = [record_identity(r.headers) for r in records if r.key == symbol.encode()]
        assert seqs == [(f"ticks.{symbol}", seq) for seq in range(1, 6)]


async def test_when_kafka_fails_positions_hold_and_everything_arrives_after_it_returns(
    redis_client: aioredis.Redis,
    redis_url: str,
    kafka_bootstrap: str,
    kafka_broker: TansuBroker,
    name: str,
) -> None:
    # a short produce timeout turns the pause into failed sends (not just a stall)
    settings = mirror_settings(
        redis_url,
        kafka_bootstrap,
        name,
        produce_timeout_ms="1500",
        retry_initial_ms="100",
        retry_max_ms="500",
        stall_warn_ms="500",
    )
    publisher = Publisher(redis_client, keys=Keys(settings.key_prefix))
    channel = f"ticks.{name}"
    positions_key = Keys(settings.key_prefix).state(f"positions:{settings.consumer_name}")
    async with Running(settings, redis_client) as mirror:
        await publisher.publish_many([(channel, ticks("X"))] * 20)
        await eventually(lambda: mirror.acknowledged == 20, timeout=30)
        kafka_broker.pause()
        try:
            for _ in range(10):
                await publisher.publish_many([(channel, ticks("X"))] * 20)
                await asyncio.sleep(0.3)
            await eventually(
                lambda: (
                    mirror.registry.get_sample_value("tickmesh_mirror_kafka_failures_total") >= 1
                ),
                timeout=20,
            )
            assert int(await redis_client.hget(positions_key, channel)) <= 20 + 20
            assert mirror.falling_behind
        finally:
            kafka_broker.resume()
        await eventually(
            lambda: mirror.acknowledged >= 220 and not mirror.falling_behind, timeout=60
        )
        assert int(await redis_client.hget(positions_key, channel)) == 220
    result = await audit(settings, redis_client)
    assert (result.published, result.inKafka, result.missing) == (220, 220, 0)


async def test_reading_a_topic_from_the_beginning_ends_while_it_is_still_written(
    kafka_bootstrap: str, redis_url: str, name: str
) -> None:
    # heartbeats are mirrored every second: an "until idle" read would never end
    settings = mirror_settings(redis_url, kafka_bootstrap, name)
    topic = f"live.{name}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()

    async def keep_writing() -> None:
        while True:
            await producer.send(topic, b"later")
            await asyncio.sleep(0.2)

    try:
        for _ in range(50):
            await producer.send(topic, b"before")
        await producer.flush()
        writer = asyncio.create_task(keep_writing())
        try:
            values = []
            async with asyncio.timeout(30):
                async for chunk in read_from_beginning(settings, [topic]):
                    values.extend(record.value for record in chunk)
        finally:
            writer.cancel()
    finally:
        await producer.stop()
    assert values.count(b"before") == 50  # (an auto-created topic may have several partitions)
