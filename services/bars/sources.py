"""Tick sources of the bar builder: Redis (primary) and Kafka (shadow), one shape each.

A source actor reads, decodes (bad records become dead letters) and hands ``TickWork`` to the
builder with ``tell``, which blocks while the builder's mailbox is full: backpressure, never
loss. Each source also gives the builder a committer for its positions.
"""

from __future__ import annotations

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry

from libs.common.actors import Actor
from libs.common.deadletter import DeadLetters
from libs.common.reliable import Record, SequencedConsumer
from libs.common.schemas import TICK_BATCH_DECODER, TickBatch
from services.bars.builder import BarBuilder, TickWork

log = structlog.get_logger("tickmesh.bars.sources")


def decode_batch(payload: bytes) -> TickBatch:
    """Decode one tick record, raising ``msgspec.DecodeError`` / ``ValidationError``."""
    return TICK_BATCH_DECODER.decode(payload)


class RedisTickSource(Actor[None]):
    """Reads ``ticks.*`` from Redis without loss (``SequencedConsumer``) for one shard."""

    def __init__(self, name: str, consumer: SequencedConsumer, builder: BarBuilder,
                 dead_letters: DeadLetters, *, registry: CollectorRegistry | None = None) -> None:
        super().__init__(name, mailbox_size=1, registry=registry)
        self.consumer = consumer
        self.builder = builder
        self.dead_letters = dead_letters
        self.spawn(self._read, name=f"{name}.read")

    async def commit(self, safe: dict[str, int]) -> None:
        """The builder's committer: store positions durably."""
        await self.consumer.commit(Record(channel, seq, b"") for channel, seq in safe.items())

    async def _read(self) -> None:
        async for records in self.consumer.batches():
            items: list[tuple[str, int, TickBatch]] = []
            for record in records:
                try:
                    items.append((record.channel, record.seq, decode_batch(record.payload)))
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    await self.dead_letters.send(record.channel, str(exc), record.payload)
            if items:
                await self.builder.tell(TickWork(items))

    async def on_stop(self) -> None:
        await self.consumer.close()


class KafkaTickSource(Actor[None]):
    """Reads the mirrored tick topics with a consumer group; drops duplicates by sequence."""

    def __init__(self, name: str, consumer: AIOKafkaConsumer, builder: BarBuilder,
                 dead_letters: DeadLetters, *, registry: CollectorRegistry | None = None) -> None:
        super().__init__(name, mailbox_size=1, registry=registry)
        self.consumer = consumer
        self.builder = builder
        self.dead_letters = dead_letters
        self.last_seq: dict[str, int] = {}
        self.duplicates = 0
        self.spawn(self._read, name=f"{name}.read")

    async def commit(self, safe: dict[str, int]) -> None:
        """The builder's committer: commit the next offset of each partition."""
        offsets = {}
        for channel, offset in safe.items():
            topic, _, partition = channel.rpartition("#")
            offsets[TopicPartition(topic, int(partition))] = offset + 1
        await self.consumer.commit(offsets)

    async def _read(self) -> None:
        while True:
            fetched = await self.consumer.getmany(timeout_ms=200, max_records=5_000)
            items: list[tuple[str, int, TickBatch]] = []
            for partition, messages in fetched.items():
                channel = f"{partition.topic}#{partition.partition}"
                for message in messages:
                    try:
                        batch = decode_batch(message.value)
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        await self.dead_letters.send(partition.topic, str(exc), message.value)
                        continue
                    origin = f"{partition.topic}:{batch.sym}"
                    if batch.seq <= self.last_seq.get(origin, 0):
                        self.duplicates += 1
                        # still hand the position on so the offset can be committed
                        items.append((channel, message.offset, TickBatch(batch.seq, batch.sym, [])))
                        continue
                    self.last_seq[origin] = batch.seq
                    items.append((channel, message.offset, batch))
            if items:
                await self.builder.tell(TickWork(items))
