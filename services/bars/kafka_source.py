"""The shadow tick source: the mirrored tick topics and the progress marks, from Kafka.

The source assigns itself the partitions of its shard's symbols (the same CRC-32 rule as the
Redis path), plus the progress topic, instead of waiting for a consumer group to hand them
out: a topic that appears later (a symbol's first trade, a new listing, the first day of a
mesh) is found by listing the topics every ``discover_interval_s`` and read from its first
record. With ticks in one topic keyed by symbol (``single_topic``, the mirror's
``TOPIC_MODE=single``, for thousands of symbols) the source reads every partition of that
topic and hands on the records of other shards' symbols as empty batches (their offsets still
count for commits). Positions (the next offset of each partition) are kept in Redis with the
builder's other state and committed only when safe (the builder's rule). Duplicates (the
mirror delivers at least once) are dropped by their identity, the mirror's ``tm-channel``/``tm-seq``
headers (the payload's ``seq`` and symbol when a record has none), one ``SequenceDeduper`` per
partition.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import msgspec
import redis.asyncio as aioredis
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge

from libs.common import names
from libs.common.io.deadletter import DeadLetters
from libs.common.io.kafka_io import SequenceDeduper, record_identity, topic_regex
from libs.common.io.positions import PositionStore
from libs.common.names import Keys
from libs.common.runtime.metrics import metrics_for
from libs.common.schemas import DECODERS, Progress, TickBatch
from services.bars.source import Deliver, Item, decode_batch, tick_symbol

log = structlog.get_logger("tickmesh.bars.sources")

_PROGRESS_DECODER = DECODERS[Progress]
_NOT_OURS = TickBatch(0, "", [])
"""What a record of another shard's symbol becomes: nothing to aggregate, an offset to commit."""


class SourceMetrics:
    """Metrics of the Kafka tick source; built once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duplicates = Counter(
            "tickmesh_bars_duplicate_batches",
            "Tick batches dropped as duplicates (same channel and sequence, Kafka source)",
            registry=registry,
        )
        self.partitions = Gauge(
            "tickmesh_bars_assigned_partitions",
            "Kafka partitions this instance reads",
            registry=registry,
        )
        self.discovered = Counter(
            "tickmesh_bars_topics_discovered",
            "Tick topics found after the source started reading (new symbols)",
            registry=registry,
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None) -> SourceMetrics:
        """The metrics of ``registry``, created once."""
        return metrics_for(cls, registry)


def partition_key(tp: TopicPartition) -> str:
    """The position key of a partition: ``<topic>#<partition>``."""
    return f"{tp.topic}#{tp.partition}"


class KafkaTickSource:
    """See the module docstring."""

    def __init__(
        self,
        make_consumer: Callable[[], AIOKafkaConsumer],
        client: aioredis.Redis,
        keys: Keys,
        name: str,
        dead_letters: DeadLetters,
        *,
        tick_pattern: str = names.TICKS_PATTERN,
        owns: Callable[[str], bool] = lambda _symbol: True,
        progress_topic: str | None = names.PROGRESS,
        single_topic: str | None = None,
        discover_interval_s: float = 1.0,
        registry: CollectorRegistry | None = None,
        max_records: int = 5_000,
        deliver_every: int = 100,
    ) -> None:
        self.make_consumer = make_consumer
        self.store = PositionStore(client, keys, f"kafka:{name}")
        self.dead_letters = dead_letters
        self.tick_regex = re.compile(topic_regex(tick_pattern))
        self.owns = owns
        self.progress_topic = progress_topic
        self.single_topic = single_topic
        self._owned: dict[str, bool] = {}
        """``owns`` of each symbol seen in the single topic."""
        self.discover_interval_s = discover_interval_s
        self.max_records = max_records
        self.deliver_every = deliver_every
        self.metrics = SourceMetrics.for_registry(registry)
        self.consumer: AIOKafkaConsumer | None = None
        self.dedupers: dict[str, SequenceDeduper] = {}
        self.assigned: set[TopicPartition] = set()
        self._next: dict[TopicPartition, int] = {}
        """The next offset to read of each assigned partition."""
        self._committed: dict[str, int] = {}
        self._last_discover = 0.0
        self._listing: asyncio.Task[set[str]] | None = None
        """The topic listing under way: delivery does not wait for it (a thousand bar topics'
        metadata takes the broker and the client tens of milliseconds)."""
        self.duplicates = 0

    def wants(self, topic: str) -> bool:
        """True for the progress topic and this shard's tick topics (the single topic when
        ticks share one)."""
        if topic == self.progress_topic:
            return True
        if self.single_topic is not None:
            return topic == self.single_topic
        return bool(self.tick_regex.match(topic)) and self.owns(tick_symbol(topic))

    async def open(self, *, restart: bool) -> None:
        """A fresh consumer, at the committed positions."""
        await self.close()
        self._committed = await self.store.load()
        self.dedupers.clear()
        self.assigned = set()
        self._next = {}
        consumer = self.make_consumer()
        await consumer.start()
        self.consumer = consumer
        await self._discover()
        log.info(
            "bars.kafka_assigned",
            partitions=len(self.assigned),
            restart=restart,
            committed=len(self._committed),
        )

    async def close(self) -> None:
        """Stop the consumer (and a topic listing under way)."""
        listing, self._listing = self._listing, None
        if listing is not None:
            listing.cancel()
            await asyncio.gather(listing, return_exceptions=True)
        consumer, self.consumer = self.consumer, None
        if consumer is not None:
            await consumer.stop()

    async def _discover(self) -> None:
        """List the topics now and assign what is new (at open)."""
        consumer = self.consumer
        assert consumer is not None
        self._last_discover = time.monotonic()
        self._assign_new(await consumer.topics())

    def _list_in_background(self) -> None:
        """Start listing the topics if it is time and no listing runs."""
        consumer = self.consumer
        if self._listing is not None or consumer is None:
            return
        if time.monotonic() - self._last_discover >= self.discover_interval_s:
            self._last_discover = time.monotonic()
            self._listing = asyncio.create_task(consumer.topics(), name="bars.kafka_topics")

    def _take_listing(self) -> None:
        """Assign what a finished listing found; its error is raised here, as an inline
        listing's was."""
        listing = self._listing
        if listing is not None and listing.done():
            self._listing = None
            self._assign_new(listing.result())

    def _assign_new(self, topics: set[str]) -> None:
        """Assign the wanted partitions of every topic, new ones from their start."""
        consumer = self.consumer
        assert consumer is not None
        new: list[TopicPartition] = []
        for topic in sorted(topics):
            if not self.wants(topic):
                continue
            for partition in sorted(consumer.partitions_for_topic(topic) or {0}):
                tp = TopicPartition(topic, partition)
                if tp not in self.assigned:
                    new.append(tp)
        if not new:
            return
        fresh = bool(self.assigned)
        for tp in new:
            self._next[tp] = self._committed.get(partition_key(tp), 0)
        self.assigned.update(new)
        consumer.assign(sorted(self.assigned))
        for tp in self.assigned:
            consumer.seek(tp, self._next[tp])
        self.metrics.partitions.set(len(self.assigned))
        if fresh:
            self.metrics.discovered.inc(len(new))
            log.info("bars.kafka_topics_found", topics=sorted({tp.topic for tp in new})[:20])

    async def commit(self, safe: dict[str, int]) -> None:
        """Store the next offset of each partition (only ever forward)."""
        changed = {
            channel: offset + 1
            for channel, offset in safe.items()
            if offset + 1 > self._committed.get(channel, 0)
        }
        if changed:
            await self.store.save(changed)
            self._committed.update(changed)

    async def run(self, deliver: Deliver) -> None:
        """Fetch, dedupe, decode and deliver; look for new topics every so often."""
        consumer = self.consumer
        assert consumer is not None, "open() first"
        while True:
            self._take_listing()
            self._list_in_background()
            if not self.assigned:
                # nothing to read yet (a fresh mesh): getmany would wait for an assignment
                listing = self._listing
                if listing is None:
                    await asyncio.sleep(self.discover_interval_s)
                else:
                    await asyncio.wait([listing], timeout=self.discover_interval_s)
                continue
            fetched = await consumer.getmany(timeout_ms=200, max_records=self.max_records)
            items: list[Item] = []
            # the progress marks first: a mark waits for each symbol's ticks up to its sequence,
            # so the minutes it closes close as those ticks are read, and their bars can go out
            # before the ticks fetched after them are aggregated (read last, a mark would wait
            # for the whole fetch)
            for tp, messages in sorted(fetched.items(), key=self._marks_first):
                channel = partition_key(tp)
                deduper = self.dedupers.get(channel)
                if deduper is None:
                    deduper = self.dedupers[channel] = SequenceDeduper()
                topic = tp.topic
                for message in messages:
                    item, letter = self._item(channel, topic, deduper, message)
                    if letter is not None:
                        await self.dead_letters.send(topic, letter, message.value)
                    items.append(item)
                    self._next[tp] = message.offset + 1
                    if len(items) >= self.deliver_every:
                        await deliver(items)
                        items = []
            if items:
                await deliver(items)

    def _marks_first(self, fetched: tuple[TopicPartition, object]) -> bool:
        """Sort key of a fetch's partitions: the progress topic's first."""
        return fetched[0].topic != self.progress_topic

    def _owns(self, symbol: str) -> bool:
        """``owns``, remembered per symbol (the single topic's records ask it each)."""
        owned = self._owned.get(symbol)
        if owned is None:
            owned = self._owned[symbol] = self.owns(symbol)
        return owned

    def _item(
        self, channel: str, topic: str, deduper: SequenceDeduper, message: object
    ) -> tuple[Item, str | None]:
        """The item of one record, and the reason it goes to the dead letters (None: it does
        not). Synchronous: it runs once a record."""
        value: bytes = message.value  # type: ignore[attr-defined]
        offset: int = message.offset  # type: ignore[attr-defined]
        if topic == self.progress_topic:
            try:
                return (channel, offset, _PROGRESS_DECODER.decode(value)), None
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                return (channel, offset, TickBatch(0, "", [])), str(exc)
        single = topic == self.single_topic
        raw_key: bytes | None = message.key if single else None  # type: ignore[attr-defined]
        key = raw_key.decode(errors="replace") if raw_key else ""
        if key and not self._owns(key):
            # another shard's symbol (the key is the symbol): not even decoded; the shard
            # that owns the key checks that the record's symbol is the key's
            return (channel, offset, _NOT_OURS), None
        try:
            batch = decode_batch(value)
            if key and batch.sym != key:
                raise ValueError(f"symbol {batch.sym!r} under the key {key!r}")
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            empty = TickBatch(0, "" if single else tick_symbol(topic), [])
            return (channel, offset, empty), str(exc)
        if single and not key and not self._owns(batch.sym):
            return (channel, offset, _NOT_OURS), None  # another shard's (a record without key)
        identity = record_identity(message.headers)  # type: ignore[attr-defined]
        if identity is None and batch.seq > 0:
            identity = (names.channel(names.TICKS, batch.sym), batch.seq)
        if identity is not None and not deduper.accept(*identity):
            self.duplicates += 1
            self.metrics.duplicates.inc()
            # its offset is still handed on, so that it can be committed
            return (channel, offset, TickBatch(batch.seq, batch.sym, [])), None
        return (channel, offset, batch), None
