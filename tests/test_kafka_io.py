"""Reading topics from the beginning against the real broker: every record of every partition,
up to its end, however slow the broker is to answer."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaProducer

from devstack.localstack import TansuBroker
from libs.common.io.kafka_io import TopicSpec, ensure_topics, read_from_beginning
from libs.common.runtime.settings import CommonSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def fill(settings: CommonSettings, topics: list[str]) -> dict[str, int]:
    """Topic i gets i records (the first none at all)."""
    await ensure_topics(settings, [TopicSpec(topic) for topic in topics])
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5)
    await producer.start()
    try:
        for number, topic in enumerate(topics):
            for record in range(number):
                await producer.send(topic, f"{topic}-{record}".encode())
        await producer.flush()
    finally:
        await producer.stop()
    return {topic: number for number, topic in enumerate(topics)}


async def count(settings: CommonSettings, topics: list[str], **options: float) -> Counter[str]:
    found: Counter[str] = Counter()
    async for chunk in read_from_beginning(settings, topics, **options):  # type: ignore[arg-type]
        for record in chunk:
            found[record.topic] += 1
    return found


async def test_every_record_of_many_topics_even_when_the_broker_is_slow_to_answer(
    kafka_broker: TansuBroker, kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> None:
    """Forty topics (one empty); the broker freezes for three seconds, twice the quiet time
    that ends a read, just as the read starts: the read waits for its answers and returns
    every record, and no more."""
    settings = CommonSettings(kafka_bootstrap=kafka_bootstrap)
    name = unique_name("rfb")
    topics = [f"{name}.{number:02d}" for number in range(40)]
    expected = await fill(settings, topics)
    kafka_broker.pause()
    try:
        reading = asyncio.ensure_future(count(settings, topics, idle_ms=1_500))
        await asyncio.sleep(3.0)
    finally:
        kafka_broker.resume()
    found = await asyncio.wait_for(reading, 60)
    assert dict(found) == {topic: n for topic, n in expected.items() if n}
