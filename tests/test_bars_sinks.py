"""The bar builder's sinks against the real servers: on Redis, the bar store's writes and the
publication in one round trip, the store's first; on Kafka, the topics it creates."""

from __future__ import annotations

import asyncio
from datetime import date
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import CollectorRegistry
from redis.exceptions import ResponseError

from libs.common import names
from libs.common.io.barstore import BarStore
from libs.common.io.kafka_io import TopicAdmin, read_from_beginning, start_producer
from libs.common.io.redis_io import Publisher
from libs.common.names import Keys
from libs.common.runtime.settings import CommonSettings
from libs.common.schemas import BAR_DECODER, Bar
from services.bars.marks import ClosedMinutes
from services.bars.sinks import kafka_sink, redis_sink

pytestmark = pytest.mark.integration

START = 1_381_154_400_000  # 2013-10-07 10:00 New York
DAY = date(2013, 10, 7)


def bar(symbol: str, minute: int, volume: int = 100) -> Bar:
    start = START + minute * 60_000
    return Bar(0, symbol, "", minute, 1, 2, 0.5, 1.5, volume, 1.2, 3, start, start + 60_000)


class Counted:
    """Counts the pipelines a client makes (a pipeline is one round trip)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.pipelines = 0
        self._pipeline = client.pipeline

    def __enter__(self) -> Counted:
        def pipeline(*args: Any, **kwargs: Any) -> Any:
            self.pipelines += 1
            return self._pipeline(*args, **kwargs)

        self.client.pipeline = pipeline
        return self

    def __exit__(self, *_: object) -> None:
        del self.client.pipeline


@pytest.fixture
def parts(redis_client, unique_name):  # type: ignore[no-untyped-def]
    keys = Keys(unique_name("k") + ":")
    publisher = Publisher(redis_client, keys=keys, registry=CollectorRegistry())
    store = BarStore(redis_client, keys, ttl_s=3_600, bars_per_call=2)
    closed = ClosedMinutes(redis_client, keys, "test")
    return keys, publisher, store, closed


async def test_redis_sink_stores_before_it_publishes_in_one_round_trip(  # type: ignore[no-untyped-def]
    redis_client, parts
) -> None:
    """A close of several symbols is one round trip in which the server runs every write of
    the store before any publication (its slow log, set to log every command, lists them in
    the order run); subscribers get every bar; the channel sequences are noted for the
    marks."""
    _keys, publisher, store, closed = parts
    sink = redis_sink(publisher, store, closed)
    pubsub = redis_client.pubsub()
    await pubsub.psubscribe(names.pattern_of(names.BARS))
    await pubsub.get_message(timeout=1.0)
    bars = [bar(symbol, minute) for minute in (0, 1) for symbol in ("A", "B", "C")]
    threshold = (await redis_client.config_get("slowlog-log-slower-than"))[
        "slowlog-log-slower-than"
    ]
    await redis_client.config_set("slowlog-log-slower-than", 0)
    try:
        await redis_client.slowlog_reset()
        with Counted(redis_client) as counted:
            await sink(bars)
        log = await redis_client.slowlog_get(100)
    finally:
        await redis_client.config_set("slowlog-log-slower-than", threshold)
    assert counted.pipelines == 1
    run = [entry["command"].split()[0].upper() for entry in sorted(log, key=lambda e: e["id"])]
    scripts = [command for command in run if command in (b"EVAL", b"EVALSHA")]
    assert scripts == [b"EVAL"] * 3 + [b"EVALSHA"]  # 6 bars, 2 a store call; 3 channels, 1 call
    received: list[Bar] = []
    async with asyncio.timeout(5):
        while len(received) < len(bars):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                received.append(BAR_DECODER.decode(message["data"]))
    await pubsub.aclose()
    assert sorted((b.symbol, b.startMs) for b in received) == sorted(
        (b.symbol, b.startMs) for b in bars
    )
    assert [b.seq for b in received if b.symbol == "A"] == [1, 2]
    assert closed.seqs == {"A": 2, "B": 2, "C": 2}
    assert sorted(await store.day("B", DAY)) == [START, START + 60_000]


async def test_redis_sink_rides_out_a_lost_script_cache(  # type: ignore[no-untyped-def]
    redis_client, parts
) -> None:
    """A server that lost its scripts (a restart) runs the store's writes all the same (they
    carry the script's text) and gets the publish script again: each bar once in the store,
    once on its channel."""
    keys, publisher, store, closed = parts
    sink = redis_sink(publisher, store, closed)
    await sink([bar("A", 0)])
    await redis_client.script_flush()
    await sink([bar("A", 1, volume=7), bar("B", 1)])
    assert {b.volume for b in (await store.day("A", DAY)).values()} == {100, 7}
    assert await redis_client.get(keys.seq(names.channel(names.BARS, "A"))) == b"2"
    assert await redis_client.xlen(keys.stream(names.channel(names.BARS, "A"))) == 2
    assert closed.seqs == {"A": 2, "B": 1}


async def test_redis_sink_raises_when_the_store_refuses_a_write(  # type: ignore[no-untyped-def]
    redis_client, parts
) -> None:
    """A store write the server refuses (a key of another type where a bar hash belongs) is
    an error of the close: the builder restarts and says so; nothing is noted as
    published."""
    _keys, publisher, store, closed = parts
    sink = redis_sink(publisher, store, closed)
    await redis_client.set(store.key("A", DAY), "not a hash")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await sink([bar("B", 0), bar("A", 0)])
    assert closed.seqs == {}
    assert sorted(await store.day("B", DAY)) == [START]  # written before A's in the call


async def test_kafka_sink_creates_bar_topics_with_the_replication_it_is_given(
    kafka_bootstrap: str, unique_name: Any
) -> None:
    """``BARS_TOPIC_REPLICATION`` reaches the topics the shadow creates (the one-node test
    broker keeps every replica on its one node, and says so)."""
    settings = CommonSettings(kafka_bootstrap=kafka_bootstrap)
    template = unique_name("bars") + ".{symbol}.1m"
    admin = TopicAdmin(settings)
    producer = await start_producer(settings, max_wait_s=30)
    described = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await described.start()
    try:
        sink = kafka_sink(admin, producer, template, replication=2)
        await sink([bar("AAA", 0), bar("BBB", 0), bar("AAA", 1)])
        topics = [names.channel(template, symbol) for symbol in ("AAA", "BBB")]
        for description in await described.describe_topics(topics):
            assert description["error_code"] == 0, description
            assert [len(p["replicas"]) for p in description["partitions"]] == [2]
        got = []
        async for records in read_from_beginning(settings, topics, idle_ms=500):
            got += [(r.key, BAR_DECODER.decode(r.value).startMs) for r in records]
        assert sorted(got) == [
            (b"AAA", START),
            (b"AAA", START + 60_000),
            (b"BBB", START),
        ]
    finally:
        await described.close()
        await producer.stop()
        await admin.close()
