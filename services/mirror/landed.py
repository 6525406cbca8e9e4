"""What Kafka already holds beyond the mirror's committed positions, read back before re-sending.

The mirror commits a channel's position only after Kafka acknowledged the records, so after a
crash (or a failed send, whose records the broker may still have written) it reads the
records after its committed positions from the Redis streams again. Sent as they are, the ones
Kafka already holds would be there twice. So before re-sending, the mirror reads back the
partitions it may have written since its last commit, from the newest offset it knew to be
committed (``OffsetStore``, saved with every commit) to the end, and collects their
``(channel, seq)`` identities (the ``tm-channel``/``tm-seq`` headers): those it does not send
again. Without ``end_offsets`` (wrong on the embedded broker), the read ends when a partition
has been quiet for ``idle_ms``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis.asyncio as aioredis
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from libs.common.io.kafka_io import record_identity, start_consumer
from libs.common.io.positions import PositionStore
from libs.common.io.security import kafka_options
from libs.common.names import Keys
from libs.common.runtime.settings import CommonSettings

log = structlog.get_logger("tickmesh.mirror")


def partition_key(partition: TopicPartition) -> str:
    """``<topic>#<partition>``."""
    return f"{partition.topic}#{partition.partition}"


def parse_partition(key: str) -> TopicPartition:
    """The partition of ``partition_key``."""
    topic, _, number = key.rpartition("#")
    return TopicPartition(topic, int(number))


class OffsetStore:
    """The newest acknowledged offset per partition at the mirror's last commit: a
    ``PositionStore`` (``state:offsets:<consumer>``) keyed by ``partition_key``."""

    def __init__(self, client: aioredis.Redis, keys: Keys, consumer: str) -> None:
        self.positions = PositionStore(client, keys, consumer, kind="offsets")

    async def load(self) -> dict[TopicPartition, int]:
        """Every stored offset."""
        stored = await self.positions.load()
        return {parse_partition(key): offset for key, offset in stored.items()}

    async def save(self, offsets: dict[TopicPartition, int]) -> None:
        """Store offsets (only ever forward, guarded by the caller)."""
        await self.positions.save({partition_key(tp): offset for tp, offset in offsets.items()})


async def read_landed(
    settings: CommonSettings,
    starts: dict[TopicPartition, int],
    *,
    idle_ms: int = 500,
    max_wait_s: float = 30.0,
) -> set[tuple[str, int]]:
    """The ``(channel, seq)`` of every record at or after ``starts[partition]``."""
    if not starts:
        return set()
    consumer = AIOKafkaConsumer(
        **kafka_options(settings),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        max_partition_fetch_bytes=8 * 1_048_576,
    )
    await start_consumer(consumer, max_wait_s=max_wait_s, settings=settings)
    landed: set[tuple[str, int]] = set()
    started = time.monotonic()
    try:
        existing = await consumer.topics()
        partitions = [tp for tp in starts if tp.topic in existing]
        if not partitions:
            return landed
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, starts[tp])
        deadline = started + max_wait_s
        while time.monotonic() < deadline:
            fetched = await consumer.getmany(timeout_ms=idle_ms, max_records=10_000)
            if not fetched:
                break
            for messages in fetched.values():
                for message in messages:
                    identity = record_identity(message.headers)
                    if identity is not None:
                        landed.add(identity)
    finally:
        await consumer.stop()
    log.info(
        "mirror.read_back",
        partitions=len(starts),
        landed=len(landed),
        seconds=round(time.monotonic() - started, 3),
    )
    return landed


def starts_for(
    targets: Iterable[TopicPartition], stored: dict[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """Where to read back each partition: after its stored offset, or from its start."""
    return {tp: stored[tp] + 1 if tp in stored else 0 for tp in targets}
