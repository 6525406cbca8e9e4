"""The forwarder: Redis channels to Kafka topics, at least once, in per-channel order.

Input is a ``SequencedConsumer`` (pub/sub for latency, gaps and restarts filled from the
streams, durable positions). A batch it yields that is not full waits up to ``linger_ms`` for
more records (each batch costs a produce request and a position save), unless it holds a
progress mark (``carries_mark``); then it is routed,
checked and handed to the producer as prebuilt record batches, one or more per partition
(``libs/common/io/kafka_batches.py``), and waits in the in-flight window without awaiting its
acknowledgements. The committer awaits the oldest batch's acknowledgements and only then
commits its positions, so a position never moves past a record Kafka has not acknowledged
and a crash re-sends (duplicates, dropped downstream by (channel, seq)) but never skips.

Backpressure: at most ``max_in_flight_batches`` batches are unacknowledged; when the window
is full the pump stops taking batches, the consumer's bounded queue fills, and the consumer
pauses pub/sub and reads the streams once Kafka is back (the stream is the buffer, up to
its ``MAXLEN``). When a send fails (the broker is unreachable past ``produce_timeout_ms``),
nothing after the last acknowledged batch is committed: the forwarder waits for what is
still in the air to settle, rewinds the consumer to the committed positions, and retries
with backoff until the broker answers; the records are then read again from the streams.
"""

from __future__ import annotations

import asyncio
import random
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from libs.common.io.deadletter import DeadLetters
from libs.common.io.kafka_batches import Outgoing, PartitionedSender
from libs.common.io.kafka_io import TopicAdmin, TopicSpec, sequence_headers, start_producer
from libs.common.io.reliable import Record, SequencedConsumer
from libs.common.names import PROGRESS, Keys
from libs.common.runtime.backoff import Backoff
from libs.common.runtime.clock import SYSTEM_CLOCK, Clock
from libs.common.runtime.lifecycle import Component, raise_if_cancelled
from services.mirror.config import MirrorSettings
from services.mirror.landed import OffsetStore, read_landed, starts_for
from services.mirror.metrics import MirrorMetrics
from services.mirror.routing import BadRecord, RoutingTable

log = structlog.get_logger("tickmesh.mirror")


@dataclass(slots=True)
class InFlight:
    """One sent batch waiting for Kafka's acknowledgements."""

    records: list[Record]
    acks: asyncio.Future[list[object]]
    """One acknowledgement per Kafka batch sent, carrying the batch's first offset."""
    counts: list[int]
    """Records in each of those batches."""
    sent_at: float
    kinds: dict[str, int]
    ticks: int
    size: int
    warned: bool = field(default=False)


def carries_mark(records: list[Record]) -> bool:
    """``records`` hold a progress mark. The shadow builder closes minutes on the marks it reads
    from Kafka, so a mark is sent at once: it never waits for the linger, and neither does what
    was read with it and before it."""
    return any(record.channel == PROGRESS for record in records)


def shard_filter(index: int, count: int) -> Callable[[str], bool] | None:
    """A channel filter for shard ``index`` of ``count`` (by CRC-32 of the channel name)."""
    if count <= 1:
        return None
    return lambda channel: zlib.crc32(channel.encode()) % count == index


class Forwarder(Component):
    """Mirrors the routed Redis channels to Kafka; see the module docstring."""

    def __init__(
        self,
        settings: MirrorSettings,
        client: aioredis.Redis,
        *,
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
        metrics: MirrorMetrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__("mirror.forwarder", registry=registry)
        self.settings = settings
        self.client = client
        self.registry = registry
        self.clock = clock
        self.table = RoutingTable(settings)
        self.keys = Keys(settings.key_prefix)
        self.mirror_metrics = metrics or MirrorMetrics.for_registry(registry)
        self.consumer: SequencedConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.admin = TopicAdmin(settings)
        self._in_flight: deque[InFlight] = deque()
        self._room = asyncio.Event()
        self._work = asyncio.Event()
        self._broken: BaseException | None = None
        self._broken_event = asyncio.Event()
        self._send_failures = 0
        self.backoff = Backoff(
            settings.retry_initial_ms / 1000, settings.retry_max_ms / 1000, jitter=0.2, rng=rng
        )
        self.dead_letters = DeadLetters(None, "mirror", registry=registry, clock=clock)
        self.offsets = OffsetStore(client, self.keys, settings.consumer_name)
        self.acked_offsets: dict[TopicPartition, int] = {}
        """The newest offset Kafka acknowledged per partition (saved with each commit)."""
        self.sender = PartitionedSender()
        self._written: set[str] = set()
        """Topics sent to since the last read-back."""
        self.landed: set[tuple[str, int]] = set()
        """Records Kafka already holds past the committed positions: not sent again."""
        self._abandoned: list[asyncio.Future[list[object]]] = []
        self._stalled = False
        self._down_since = 0.0
        self._episode_since = 0.0
        self._episode_max_lag = 0
        self._episode_start_acked = 0
        self.acknowledged = 0
        """Records acknowledged by Kafka since start (this process)."""
        self.acknowledged_ticks = 0
        self.mirror_metrics.kafka_up.set(1)
        self.spawn(self._pump, name="mirror.pump")
        self.spawn(self._commit_loop, name="mirror.committer")
        self.every(1.0, self._report, name="mirror.report")

    # -- lifecycle ---------------------------------------------------------------------------

    async def on_start(self) -> None:
        settings = self.settings
        self._in_flight.clear()
        self._abandoned.clear()
        self.sender.clear()
        self._broken = None
        self._broken_event.clear()
        self._room.set()
        self.producer = await start_producer(
            settings,
            linger_ms=settings.linger_ms,
            max_batch_size=settings.max_batch_bytes,
            compression_type=None if settings.compression == "none" else settings.compression,
            client_id=f"tickmesh-mirror-{settings.effective_run_id()}",
            request_timeout_ms=settings.produce_timeout_ms,
        )
        await self._ensure(self.table.static_specs())
        await self._ensure([self.table.spec_for_deadletters()])
        self.consumer = SequencedConsumer(
            self.client,
            settings.consumer_name,
            self.table.patterns,
            keys=self.keys,
            start=settings.start,
            accept=shard_filter(settings.shard_index, settings.shard_count),
            subscribe_own=settings.shard_count > 1,
            batch_max=settings.batch_max_records,
            queue_max=settings.queue_max_records,
            sweep_interval_s=settings.sweep_interval_ms / 1000,
            read_count=settings.read_count,
            registry=self.registry,
        )
        await self.consumer.open()
        # topics of the channels that already have streams, before their first record
        specs = []
        for channel in sorted(self.consumer.positions):
            target = self.table.target(channel)
            if target is not None:
                specs.append(target.spec)
        await self._ensure(specs)
        self.acked_offsets = await self.offsets.load()
        self._written = {tp.topic for tp in self.acked_offsets}
        for channel, committed in self.consumer.committed.items():
            target = self.table.target(channel)
            if target is not None and committed == 0:
                self._written.add(target.topic)
        await self._read_back()
        self.log.info(
            "mirror.started",
            channels=len(self.consumer.positions),
            committed=sum(self.consumer.committed.values()),
            routes=len(self.table.routes),
            topic_mode=settings.topic_mode,
        )

    async def on_stop(self) -> None:
        """Flush what was sent, commit what Kafka acknowledged, release the clients."""
        producer, consumer = self.producer, self.consumer
        try:
            if producer is not None and consumer is not None and self._broken is None:
                try:
                    await asyncio.wait_for(producer.flush(), self.settings.stop_deadline_s)
                except (TimeoutError, KafkaError) as exc:
                    self.log.warning("mirror.flush_failed", error=repr(exc))
                done, _failure = self._take_acknowledged()
                if done:
                    await self._acknowledged(done)
        finally:
            for entry in self._in_flight:
                entry.acks.cancel()
            self._in_flight.clear()
            if consumer is not None:
                await consumer.close()
            if producer is not None:
                await producer.stop()
            await self.admin.close()
            self.log.info("mirror.stopped", acknowledged=self.acknowledged)

    # -- topics ------------------------------------------------------------------------------

    async def _ensure(self, specs: list[TopicSpec]) -> None:
        created = await self.admin.ensure(specs)
        if created:
            self.mirror_metrics.topics_created.inc(len(created))

    # -- the pump: batches in, sends out -----------------------------------------------------

    async def _pump(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        batches = consumer.batches()
        next_batch: asyncio.Future[list[Record]] | None = None
        broken = asyncio.ensure_future(self._broken_event.wait())
        linger_s = self.settings.linger_ms / 1000
        batch_max = self.settings.batch_max_records
        try:
            while True:
                raise_if_cancelled()
                if next_batch is None:
                    next_batch = asyncio.ensure_future(anext(batches))
                waiting: set[asyncio.Future[Any]] = {next_batch, broken}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if self._broken is not None:
                    await self._recover()
                    if next_batch.done():
                        next_batch.result()  # read before the rewind: dropped
                        next_batch = None
                    broken = asyncio.ensure_future(self._broken_event.wait())
                    continue
                batch = next_batch.result()
                next_batch = None
                if linger_s and len(batch) < batch_max and not carries_mark(batch):
                    batch, next_batch = await self._linger(batches, batch, broken, linger_s)
                while len(self._in_flight) >= self.settings.max_in_flight_batches:
                    self._room.clear()
                    await self._room.wait()
                if self._broken is not None:
                    continue  # the rewind will deliver this batch again
                failures = self._send_failures
                try:
                    entry = await self._send(batch)
                except (KafkaError, OSError, TimeoutError) as exc:
                    self._fail(exc)
                    continue
                if self._send_failures != failures:
                    self._abandoned.append(entry.acks)  # built before the rewind
                    continue
                self._in_flight.append(entry)
                self.mirror_metrics.in_flight.inc(len(entry.records))
                self._work.set()
        finally:
            pending = [future for future in (next_batch, broken) if future is not None]
            for future in pending:
                future.cancel()
            # the generator can only be closed once the step running in next_batch has ended
            await asyncio.gather(*pending, return_exceptions=True)
            await batches.aclose()

    async def _linger(
        self,
        batches: AsyncIterator[list[Record]],
        batch: list[Record],
        broken: asyncio.Future[Any],
        linger_s: float,
    ) -> tuple[list[Record], asyncio.Future[list[Record]] | None]:
        """More records for a batch that is not full, for up to ``linger_s`` or until a
        progress mark comes: fewer, larger produce requests and position saves. Returns the
        batch (at most ``batch_max_records``) and what comes next: the read still waiting, the
        records that did not fit (as a done future), or None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + linger_s
        batch_max = self.settings.batch_max_records
        batch = list(batch)
        while len(batch) < batch_max and self._broken is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            more = asyncio.ensure_future(anext(batches))
            try:
                await asyncio.wait(
                    {more, broken}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
            except BaseException:  # cancelled: the generator's step must end before it closes
                more.cancel()
                await asyncio.gather(more, return_exceptions=True)
                raise
            if not more.done():
                return batch, more
            records = more.result()
            room = batch_max - len(batch)
            batch += records[:room]
            if len(records) > room:
                rest: asyncio.Future[list[Record]] = loop.create_future()
                rest.set_result(records[room:])
                return batch, rest
            if carries_mark(records):
                break
        return batch, None

    async def _send(self, batch: list[Record]) -> InFlight:
        assert self.producer is not None
        producer = self.producer
        table = self.table
        outgoing: list[Outgoing] = []
        new_specs: dict[str, TopicSpec] = {}
        known = self.admin.known
        kinds: dict[str, int] = {}
        ticks = 0
        size = 0
        landed = self.landed
        for record in batch:
            target = table.target(record.channel)
            if target is None:
                continue  # a channel no route wants (the consumer's patterns are the routes')
            if record.seq < 0:
                outgoing.append(self._dead_letter(record, "the record has no seq field"))
                continue
            try:
                key, count = target.prepare(record.payload)
            except BadRecord as exc:
                outgoing.append(self._dead_letter(record, str(exc)))
                continue
            if landed and (record.channel, record.seq) in landed:
                # Kafka holds it from before the restart or failure: count it as acknowledged
                self.mirror_metrics.already_landed.inc()
                kinds[target.kind] = kinds.get(target.kind, 0) + 1
                continue
            if target.topic not in known:
                new_specs[target.topic] = target.spec
            self._written.add(target.topic)
            outgoing.append(
                (target.topic, key, record.payload, sequence_headers(record.channel, record.seq))
            )
            ticks += count
            size += len(record.payload)
            kinds[target.kind] = kinds.get(target.kind, 0) + 1
        if new_specs:
            await self._ensure(list(new_specs.values()))
        futures, counts = await self.sender.send(producer, outgoing)
        acks: asyncio.Future[list[object]] = asyncio.gather(*futures, return_exceptions=True)
        return InFlight(batch, acks, counts, self.clock.monotonic(), kinds, ticks, size)

    def _dead_letter(self, record: Record, error: str) -> Outgoing:
        seq = max(record.seq, 0)
        letter = self.dead_letters.letter(record.channel, error, record.payload, seq=seq)
        return (
            self.settings.deadletter_topic,
            record.channel.encode(),
            letter,
            sequence_headers(record.channel, seq),
        )

    # -- the committer: acknowledgements in order, then positions ----------------------------

    async def _commit_loop(self) -> None:
        stall_s = self.settings.stall_warn_ms / 1000
        while True:
            raise_if_cancelled()
            if not self._in_flight:
                self._work.clear()
                await self._work.wait()
                continue
            entry = self._in_flight[0]
            if not entry.acks.done():
                await asyncio.wait({entry.acks}, timeout=stall_s)
                if not entry.acks.done():
                    self._note_stall(entry)
                    continue
            if not self._in_flight or self._in_flight[0] is not entry:
                continue  # abandoned by a failure meanwhile
            done, failure = self._take_acknowledged()
            if done:
                await self._acknowledged(done)
                self._room.set()
            if failure is not None:
                self._fail(failure)

    def _take_acknowledged(self) -> tuple[list[InFlight], BaseException | None]:
        """Every batch acknowledged at the head of the queue, taken off it, and the error of
        the first that failed (it stays there). They are committed together: while the loop
        waits on Redis more are acknowledged, and a backlog costs two round trips, not two a
        batch."""
        done: list[InFlight] = []
        while self._in_flight and self._in_flight[0].acks.done():
            head = self._in_flight[0]
            errors = [r for r in head.acks.result() if isinstance(r, BaseException)]
            if errors:
                return done, errors[0]
            done.append(self._in_flight.popleft())
        return done, None

    async def _acknowledged(self, entries: list[InFlight]) -> None:
        assert self.consumer is not None
        await self.consumer.commit(record for entry in entries for record in entry.records)
        changed: dict[TopicPartition, int] = {}
        acked = self.acked_offsets
        for entry in entries:
            for metadata, count in zip(entry.acks.result(), entry.counts, strict=True):
                tp = TopicPartition(metadata.topic, metadata.partition)  # type: ignore[attr-defined]
                offset = metadata.offset + count - 1  # type: ignore[attr-defined]
                if offset > acked.get(tp, -1):
                    acked[tp] = changed[tp] = offset
        now = self.clock.monotonic()
        await self.offsets.save(changed)
        # counted once both commits are stored: ``acknowledged`` is what a restart will not
        # send again
        metrics = self.mirror_metrics
        for entry in entries:
            metrics.in_flight.dec(len(entry.records))
            metrics.ack_seconds.observe(now - entry.sent_at)
            metrics.batches.inc()
            for kind, count in entry.kinds.items():
                metrics.records.labels(kind).inc(count)
            metrics.ticks.inc(entry.ticks)
            metrics.bytes.inc(entry.size)
            self.acknowledged += sum(entry.kinds.values())
            self.acknowledged_ticks += entry.ticks
        self.backoff.reset()
        if self._stalled and self._broken is None:
            self._stalled = False
            self.mirror_metrics.kafka_up.set(1)
            self.log.info(
                "mirror.kafka_recovered",
                down_s=round(self.clock.monotonic() - self._down_since, 3),
                action="catching up from the streams",
            )

    def _note_stall(self, entry: InFlight) -> None:
        if entry.warned:
            return
        entry.warned = True
        self.mirror_metrics.stalls.inc()
        if not self._stalled:
            self._stalled = True
            self._down_since = entry.sent_at
            self.mirror_metrics.kafka_up.set(0)
        self.log.warning(
            "mirror.kafka_stalled",
            waiting_s=round(self.clock.monotonic() - entry.sent_at, 3),
            in_flight_batches=len(self._in_flight),
            in_flight_records=sum(len(e.records) for e in self._in_flight),
            action="holding positions; new records wait in the Redis streams",
        )

    def _fail(self, exc: BaseException) -> None:
        """A send failed: commit nothing more; the pump rewinds and retries."""
        self._send_failures += 1
        if self._broken is None:
            self._broken = exc
            self._broken_event.set()
            self.mirror_metrics.kafka_failures.inc()
            self.mirror_metrics.kafka_up.set(0)
            if not self._stalled:
                self._stalled = True
                self._down_since = self.clock.monotonic()
            self.log.error(
                "mirror.kafka_send_failed",
                error=repr(exc),
                in_flight_batches=len(self._in_flight),
                action="rewinding to the committed positions and retrying",
            )
        self._abandoned.extend(entry.acks for entry in self._in_flight)
        for entry in self._in_flight:
            self.mirror_metrics.in_flight.dec(len(entry.records))
        self._in_flight.clear()
        self._room.set()

    async def _recover(self) -> None:
        """Wait out what is still in the air, back off, rewind; the next batch is the probe."""
        assert self.consumer is not None
        if self._abandoned:
            await asyncio.gather(*self._abandoned, return_exceptions=True)
            self._abandoned.clear()
        delay_s = self.backoff.next_s()
        self.log.info("mirror.retrying", attempt=self.backoff.attempts, delay_s=round(delay_s, 3))
        await asyncio.sleep(delay_s)
        try:
            await self._read_back()
        except (KafkaError, OSError, TimeoutError) as exc:
            self.log.warning("mirror.read_back_failed", error=repr(exc), action="retrying")
            self._broken_event.set()  # still broken: recover again after the backoff
            return
        self.consumer.rewind()
        self._broken = None
        self._broken_event.clear()

    async def _read_back(self) -> None:
        """Collect what Kafka holds past the committed positions (``landed``)."""
        partitions: list[TopicPartition] = []
        for topic in sorted(self._written):
            count = next((t.spec.partitions for t in self.table.targets() if t.topic == topic), 1)
            partitions.extend(TopicPartition(topic, index) for index in range(count))
        self.landed = await read_landed(self.settings, starts_for(partitions, self.acked_offsets))
        self._written = set()

    # -- reporting ---------------------------------------------------------------------------

    def lag_records(self) -> int:
        """Records published on Redis and not yet acknowledged by Kafka (approximately)."""
        consumer = self.consumer
        if consumer is None:
            return 0
        in_flight = sum(len(entry.records) for entry in self._in_flight)
        return consumer.behind_records + len(consumer._queue) + in_flight

    def oldest_unacked_s(self) -> float:
        """Age of the oldest unacknowledged batch (0 when none)."""
        return self.clock.monotonic() - self._in_flight[0].sent_at if self._in_flight else 0.0

    @property
    def falling_behind(self) -> bool:
        """True while the input overflows or Kafka is stalled or failing."""
        consumer = self.consumer
        return bool(
            self._stalled
            or self._broken is not None
            or (consumer is not None and consumer.falling_behind)
        )

    def _behind_reason(self) -> str:
        if self._broken is not None:
            return "Kafka sends are failing"
        if self._stalled:
            return "Kafka is not acknowledging"
        return "records arrive faster than they are forwarded (reading the streams)"

    async def _report(self) -> None:
        """Every second: gauges, and one log line when the mirror falls behind or catches up."""
        lag = self.lag_records()
        behind = self.falling_behind or lag > self.settings.queue_max_records
        self.mirror_metrics.lag_records.set(lag)
        self.mirror_metrics.oldest_unacked.set(self.oldest_unacked_s())
        self.mirror_metrics.falling_behind.set(1 if behind else 0)
        now = self.clock.monotonic()
        if behind and not self._episode_since:
            self._episode_since = now
            self._episode_max_lag = lag
            self._episode_start_acked = self.acknowledged
            self.log.warning(
                "mirror.falling_behind",
                reason=self._behind_reason(),
                lag_records=lag,
                in_flight_batches=len(self._in_flight),
            )
        elif behind:
            self._episode_max_lag = max(self._episode_max_lag, lag)
        elif self._episode_since and lag <= self.settings.batch_max_records:
            self.log.info(
                "mirror.caught_up",
                behind_s=round(now - self._episode_since, 3),
                max_lag_records=self._episode_max_lag,
                forwarded_meanwhile=self.acknowledged - self._episode_start_acked,
                kafka_failures=self._send_failures,
                resubscribes=self.consumer.resubscribes if self.consumer else 0,
            )
            self._episode_since = 0.0
