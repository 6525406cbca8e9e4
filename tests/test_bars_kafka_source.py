"""The shadow's Kafka source with a scripted consumer (the broker's side is pinned by
``test_bars_service.py``); positions in a real redis-server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from libs.common import names
from libs.common.io.deadletter import DeadLetters
from libs.common.io.kafka_io import sequence_headers
from libs.common.names import Keys
from libs.common.schemas import ENCODER, Progress, TickBatch, Trade
from services.bars.kafka_source import KafkaTickSource
from services.bars.source import Item

pytestmark = pytest.mark.timeout(30)

T0 = 1_709_564_400_000  # 2024-03-04 10:00 New York


@dataclass
class Message:
    value: bytes
    offset: int
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class ScriptedConsumer:
    """Answers ``getmany`` with the fetches it was given, in the partitions' order given."""

    def __init__(self, fetches: list[dict[TopicPartition, list[Message]]]) -> None:
        self.fetches = fetches
        self.assigned: list[TopicPartition] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def topics(self) -> set[str]:
        return {tp.topic for fetch in self.fetches for tp in fetch}

    def partitions_for_topic(self, _topic: str) -> set[int]:
        return {0}

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = partitions

    def seek(self, _tp: TopicPartition, _offset: int) -> None:
        pass

    async def getmany(self, **_kwargs: Any) -> dict[TopicPartition, list[Message]]:
        if self.fetches:
            return self.fetches.pop(0)
        await asyncio.sleep(3600)
        return {}


async def test_a_fetchs_progress_marks_are_delivered_before_its_ticks(
    redis_client: object, unique_name: object
) -> None:
    """One fetch holds a tick partition's records and, listed after them, a mark: the mark
    is delivered first (so the minutes it closes can close as their ticks are read, and go out
    before the ticks fetched after them), the ticks after it in their order."""
    name = unique_name("source")  # type: ignore[operator]
    ticks = TopicPartition(names.channel(names.TICKS, "A"), 0)
    progress = TopicPartition(names.PROGRESS, 0)
    records = [
        Message(
            ENCODER.encode(TickBatch(seq, "A", [Trade(sym="A", p=1.0, s=1, t=T0 + seq, x=4)])),
            seq - 1,
            headers=sequence_headers("ticks.A", seq),
        )
        for seq in (1, 2, 3)
    ]
    mark = Progress(0, "ingest", T0 + 61_000, {"ticks.A": 2}, False)
    consumer = ScriptedConsumer([{ticks: records, progress: [Message(ENCODER.encode(mark), 0)]}])
    registry = CollectorRegistry()
    source = KafkaTickSource(
        lambda: consumer,  # type: ignore[arg-type, return-value]
        redis_client,  # type: ignore[arg-type]
        Keys(f"{name}:"),
        name,
        DeadLetters(None, "bars", registry=registry),
        registry=registry,
    )
    await source.open(restart=False)
    delivered: list[Item] = []
    got = asyncio.Event()

    async def deliver(items: list[Item]) -> None:
        delivered.extend(items)
        if len(delivered) >= 4:
            got.set()

    reader = asyncio.create_task(source.run(deliver))
    try:
        await asyncio.wait_for(got.wait(), 10)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await source.close()
    assert [(channel, position) for channel, position, _ in delivered] == [
        (f"{names.PROGRESS}#0", 0),
        ("ticks.A#0", 0),
        ("ticks.A#0", 1),
        ("ticks.A#0", 2),
    ]
    assert delivered[0][2] == mark
