"""The shadow tick source: the mirrored tick topics from Kafka, as a consumer-group member."""

from __future__ import annotations

import asyncio

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge

from libs.common import names
from libs.common.io.deadletter import DeadLetters
from libs.common.io.kafka_io import SequenceDeduper, record_identity
from libs.common.runtime.metrics import metrics_for
from libs.common.schemas import TickBatch
from services.bars.source import BuilderControl, Deliver, Item, decode_batch, tick_symbol

log = structlog.get_logger("tickmesh.bars.sources")


class SourceMetrics:
    """Metrics of the tick sources; built once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duplicates = Counter(
            "tickmesh_bars_duplicate_batches",
            "Tick batches dropped as duplicates (same channel and sequence, Kafka source)",
            registry=registry,
        )
        self.commit_failures = Counter(
            "tickmesh_bars_commit_failures",
            "Kafka offset commits that failed (e.g. during a rebalance); read again later",
            registry=registry,
        )
        self.rebalances = Counter(
            "tickmesh_bars_rebalances",
            "Kafka consumer-group assignments received",
            registry=registry,
        )
        self.partitions = Gauge(
            "tickmesh_bars_assigned_partitions",
            "Kafka partitions assigned to this member",
            registry=registry,
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None) -> SourceMetrics:
        """The metrics of ``registry``, created once."""
        return metrics_for(cls, registry)


class KafkaTickSource:
    """Reads the mirrored tick topics as a member of a consumer group.

    Duplicates (the mirror delivers at least once) are dropped by their identity, the
    mirror's ``tm-channel``/``tm-seq`` headers (the payload's ``seq`` and symbol when a record
    has none), with one ``SequenceDeduper`` per partition. Around a rebalance the reader
    stops (``gate``), the builder finishes what it was given (``barrier``: bars published,
    offsets committed while the partitions are still ours), and after the assignment it
    forgets the symbols of the partitions that went to another member (``reassign``); the
    partitions it keeps restart from their committed offsets, and the dedupers drop what was
    already aggregated.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        dead_letters: DeadLetters,
        *,
        registry: CollectorRegistry | None = None,
        max_records: int = 5_000,
        deliver_every: int = 100,
        control_timeout_s: float = 10.0,
    ) -> None:
        self.consumer = consumer
        self.dead_letters = dead_letters
        self.max_records = max_records
        self.deliver_every = deliver_every
        self.control_timeout_s = control_timeout_s
        self.metrics = SourceMetrics.for_registry(registry)
        self.dedupers: dict[str, SequenceDeduper] = {}
        self.assigned: set[str] = set()
        self.builder: BuilderControl | None = None
        self.gate = asyncio.Lock()
        self._gate_held_for_rebalance = False
        self.duplicates = 0
        self.assignments = 0

    def listener(self) -> ConsumerRebalanceListener:
        """The rebalance listener to subscribe with."""
        return _Listener(self)

    @staticmethod
    def channel_of(partition: TopicPartition) -> str:
        """The position key of a partition: ``<topic>#<partition>``."""
        return f"{partition.topic}#{partition.partition}"

    async def open(self, builder: BuilderControl, *, restart: bool) -> None:
        """Bind to the builder; on a restart, rewind the assigned partitions to their
        committed offsets and forget what the dedupers saw."""
        self.builder = builder
        if not restart:
            return
        async with self.gate:
            # what other members published while this one was down or restarting
            await builder.closed.load()
            self.dedupers.clear()
            for partition in sorted(self.consumer.assignment()):
                committed = await self.consumer.committed(partition)
                if committed is None:
                    await self.consumer.seek_to_beginning(partition)
                else:
                    self.consumer.seek(partition, committed)
            log.info("bars.kafka_rewound", partitions=len(self.consumer.assignment()))

    async def close(self) -> None:
        """Nothing: the consumer lives as long as the process (its group membership too)."""

    async def commit(self, safe: dict[str, int]) -> None:
        """Commit the next offset of each partition that is still ours."""
        offsets: dict[TopicPartition, int] = {}
        assignment = self.consumer.assignment()
        for channel, offset in safe.items():
            topic, _, partition = channel.rpartition("#")
            tp = TopicPartition(topic, int(partition))
            if tp in assignment:
                offsets[tp] = offset + 1
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            # A rebalance took the partition or the generation moved on: the next owner reads
            # from the last committed offset, and what it rebuilds is not published again.
            self.metrics.commit_failures.inc()
            log.warning("bars.kafka_commit_failed", error=repr(exc), partitions=len(offsets))

    async def run(self, deliver: Deliver) -> None:
        """Fetch, dedupe, decode and deliver, holding the gate for each round."""
        consumer = self.consumer
        while True:
            async with self.gate:
                fetched = await consumer.getmany(timeout_ms=200, max_records=self.max_records)
                items: list[Item] = []
                for partition, messages in fetched.items():
                    channel = self.channel_of(partition)
                    deduper = self.dedupers.get(channel)
                    if deduper is None:
                        deduper = self.dedupers[channel] = SequenceDeduper()
                    for message in messages:
                        items.append(await self._item(channel, deduper, message))
                        if len(items) >= self.deliver_every:
                            await deliver(items)
                            items = []
                            # let the builder aggregate them now: decoded ticks waiting in
                            # bulk only make the garbage collector's rounds longer
                            await asyncio.sleep(0)
                if items:
                    await deliver(items)

    async def _item(self, channel: str, deduper: SequenceDeduper, message: object) -> Item:
        value: bytes = message.value  # type: ignore[attr-defined]
        offset: int = message.offset  # type: ignore[attr-defined]
        topic = channel.rpartition("#")[0]
        try:
            batch = decode_batch(value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self.dead_letters.send(topic, str(exc), value)
            return channel, offset, TickBatch(0, tick_symbol(topic), [])
        identity = record_identity(message.headers)  # type: ignore[attr-defined]
        if identity is None and batch.seq > 0:
            identity = (names.channel(names.TICKS, batch.sym), batch.seq)
        if identity is not None and not deduper.accept(*identity):
            self.duplicates += 1
            self.metrics.duplicates.inc()
            # its offset is still handed on, so that it can be committed
            return channel, offset, TickBatch(batch.seq, batch.sym, [])
        return channel, offset, batch

    async def on_revoked(self) -> None:
        """Stop reading and let the builder finish (and commit) what it was given."""
        if not self._gate_held_for_rebalance:
            await self.gate.acquire()
            self._gate_held_for_rebalance = True
        if self.builder is not None:
            await self.builder.barrier(self.control_timeout_s)

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Forget the partitions that went elsewhere, then read again."""
        try:
            channels = {self.channel_of(tp) for tp in assigned}
            lost = self.assigned - channels
            for channel in lost:
                self.dedupers.pop(channel, None)
            self.assigned = channels
            self.assignments += 1
            self.metrics.rebalances.inc()
            self.metrics.partitions.set(len(channels))
            log.info("bars.kafka_assigned", partitions=len(channels), lost=len(lost))
            if self.builder is not None:
                await self.builder.reassign(lost, self.control_timeout_s)
        finally:
            if self._gate_held_for_rebalance:
                self._gate_held_for_rebalance = False
                self.gate.release()


class _Listener(ConsumerRebalanceListener):
    def __init__(self, source: KafkaTickSource) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.source.on_revoked()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.source.on_assigned(set(assigned))
