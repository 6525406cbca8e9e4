"""Kafka I/O: producer and consumer factories, topic creation, connect with retry.

Defaults are right for real Kafka and configurable for the embedded broker (see
ARCHITECTURE.md, "Known limits"): the idempotent producer is a setting, group timeouts are
settings (joins take about half the session timeout on the embedded broker), and nothing here
relies on ``end_offsets``/``seek_to_end``/compaction being honoured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from msgspec import Struct

from libs.common.io.security import ConnectionSettingError, diagnose_kafka, kafka_options
from libs.common.names import HEADER_CHANNEL, HEADER_SEQ
from libs.common.runtime.retry import retry_async
from libs.common.runtime.settings import CommonSettings

log = structlog.get_logger("tickmesh.kafka")


class TopicSpec(Struct, frozen=True):
    """A topic to create: name, partitions, replication and configs."""

    name: str
    partitions: int = 1
    replication_factor: int = 1
    configs: dict[str, str] = {}


def is_retriable(exc: BaseException) -> bool:
    """aiokafka marks each error class retriable or not; connection errors always are."""
    if isinstance(exc, (KafkaConnectionError, ConnectionError, OSError, asyncio.TimeoutError)):
        return True
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


_CHECKED: set[tuple[object, ...]] = set()
"""The Kafka security settings this process has already checked (``diagnose_kafka``)."""


def _security_key(settings: CommonSettings) -> tuple[object, ...]:
    return (
        settings.kafka_bootstrap,
        settings.kafka_security_protocol,
        settings.kafka_sasl_mechanism,
        settings.kafka_sasl_username,
        settings.kafka_sasl_password,
        settings.kafka_ssl_cafile,
        settings.kafka_ssl_certfile,
        settings.kafka_ssl_check_hostname,
    )


async def _retry_start(
    what: str,
    start: Callable[[], Awaitable[None]],
    max_wait_s: float,
    initial_delay_s: float = 0.2,
    settings: CommonSettings | None = None,
) -> None:
    """``start()`` retried while the broker is unreachable. The first failure is diagnosed
    (``security.diagnose_kafka``): a wrong setting raises ``ConnectionSettingError`` at
    once instead of being retried as if it were an outage."""
    diagnosed = settings is None
    if settings is not None and _security_key(settings) not in _CHECKED:
        # once per process and security settings, before the client's own start: a TLS
        # client facing a plaintext listener would otherwise wait a whole request timeout
        await diagnose_kafka(settings)
        _CHECKED.add(_security_key(settings))

    async def attempt() -> None:
        nonlocal diagnosed
        try:
            await start()
        except Exception as exc:
            if not diagnosed and is_retriable(exc):
                diagnosed = True
                assert settings is not None
                await diagnose_kafka(settings)
            raise

    try:
        await retry_async(
            attempt,
            retriable=is_retriable,
            max_wait_s=max_wait_s,
            what=f"kafka {what}",
            initial_s=initial_delay_s,
        )
    except ConnectionSettingError:
        raise
    except Exception as exc:
        raise ConnectionError(f"Kafka {what} could not start: {exc!r}") from exc


async def start_producer(
    settings: CommonSettings,
    *,
    linger_ms: int = 5,
    max_batch_size: int = 1_048_576,
    compression_type: str | None = None,
    max_wait_s: float = 60.0,
    client_id: str | None = None,
    request_timeout_ms: int | None = None,
) -> AIOKafkaProducer:
    """A started producer (acks=all), retrying the connection with backoff.

    ``request_timeout_ms`` (default: the shared ``kafka_request_timeout_ms``) also bounds
    how long a record may wait in the producer: past it, its send fails (unless the producer
    is idempotent, which retries until delivered)."""
    options = kafka_options(settings)
    if request_timeout_ms is not None:
        options["request_timeout_ms"] = request_timeout_ms
    producer = AIOKafkaProducer(
        **options,
        acks="all",
        enable_idempotence=settings.kafka_enable_idempotence,
        linger_ms=linger_ms,
        max_batch_size=max_batch_size,
        max_request_size=max(max_batch_size, 1_048_576),
        compression_type=compression_type,
        client_id=client_id or f"tickmesh-{settings.effective_run_id()}",
    )
    try:
        await _retry_start("producer", producer.start, max_wait_s, settings=settings)
    except BaseException:
        await producer.stop()
        raise
    return producer


def make_consumer(
    settings: CommonSettings,
    *topics: str,
    group_id: str | None,
    pattern: str | None = None,
    auto_offset_reset: str = "earliest",
    enable_auto_commit: bool = False,
    max_poll_records: int = 2_000,
    client_id: str | None = None,
    partition_assignment_strategy: tuple[type, ...] | None = None,
) -> AIOKafkaConsumer:
    """An unstarted consumer with the group timeouts from settings; subscribe by pattern or
    topics (``pattern`` subscribes with ``consumer.subscribe(pattern=...)`` at start).
    ``partition_assignment_strategy`` replaces aiokafka's default (range) assignors."""
    extra = (
        {}
        if partition_assignment_strategy is None
        else {"partition_assignment_strategy": partition_assignment_strategy}
    )
    consumer = AIOKafkaConsumer(
        *topics,
        **kafka_options(settings),
        group_id=group_id,
        auto_offset_reset=auto_offset_reset,
        enable_auto_commit=enable_auto_commit,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        rebalance_timeout_ms=settings.kafka_rebalance_timeout_ms,
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        max_poll_records=max_poll_records,
        metadata_max_age_ms=5_000,
        client_id=client_id or f"tickmesh-{settings.effective_run_id()}",
        **extra,
    )
    if pattern is not None:
        consumer.subscribe(pattern=pattern)
    return consumer


def topic_regex(glob: str) -> str:
    """The subscription regex of a channel glob: ``ticks.*`` -> ``^ticks\\..+$``."""
    return "^" + glob.replace(".", r"\.").replace("*", ".+").replace("?", ".") + "$"


async def start_consumer(
    consumer: AIOKafkaConsumer,
    *,
    max_wait_s: float = 60.0,
    settings: CommonSettings | None = None,
) -> None:
    """Start ``consumer``, retrying the connection with backoff (a wrong setting among
    ``settings`` raises ``ConnectionSettingError`` at once)."""
    await _retry_start("consumer", consumer.start, max_wait_s, settings=settings)


async def ensure_topics(
    settings: CommonSettings, specs: Iterable[TopicSpec], *, max_wait_s: float = 60.0
) -> list[str]:
    """Create the topics that do not exist yet, with their partitions and configs.

    Returns the names created. Existing topics are left as they are (a config drift is
    logged, not changed).
    """
    wanted = {spec.name: spec for spec in specs}
    if not wanted:
        return []
    admin = AIOKafkaAdminClient(**kafka_options(settings))
    await _retry_start("admin", admin.start, max_wait_s, settings=settings)
    try:
        existing = set(await admin.list_topics())
        missing = [spec for name, spec in wanted.items() if name not in existing]
        if not missing:
            return []
        return await _create(admin, missing)
    finally:
        await admin.close()


# -- the mirror's record identity, and deduplication for consumers ---------------------------


def sequence_headers(channel: str, seq: int) -> list[tuple[str, bytes]]:
    """The headers the mirror puts on every record: its channel and sequence number."""
    return [(HEADER_CHANNEL, channel.encode()), (HEADER_SEQ, str(seq).encode())]


def record_identity(headers: Iterable[tuple[str, bytes]] | None) -> tuple[str, int] | None:
    """``(channel, seq)`` from a record's headers, or None when the mirror did not set them
    (or set them wrong: a channel that is not UTF-8, a sequence that is not a number)."""
    channel: str | None = None
    seq: int | None = None
    for name, value in headers or ():
        if name == HEADER_CHANNEL:
            try:
                channel = value.decode()
            except UnicodeDecodeError:
                return None
        elif name == HEADER_SEQ:
            try:
                seq = int(value)
            except ValueError:
                return None
    if channel is None or seq is None:
        return None
    return channel, seq


class SequenceDeduper:
    """Drops Kafka records already seen, by their (channel, seq) identity.

    The mirror delivers at least once, so a record can arrive twice; and when a produce
    request fails after later ones to the same partition succeeded, the re-sent records
    arrive *after* newer ones. A plain "drop seq <= last seen" would then drop the re-sent
    records, which are the only copy. So this keeps, per channel, the highest sequence below
    which everything was seen (``floor``) plus the sequences seen above it; the set shrinks
    as holes fill. A channel's first record sets its floor to ``seq - 1`` (a consumer may
    start mid-stream); ``seed`` sets floors from a consumer's own durable state. When the
    set above a floor grows past ``max_pending`` the floor jumps to the oldest pending
    sequence and the abandoned hole is counted (``abandoned``).
    """

    def __init__(self, max_pending: int = 100_000) -> None:
        self.max_pending = max_pending
        self.floors: dict[str, int] = {}
        self._above: dict[str, set[int]] = {}
        self.accepted = 0
        self.duplicates = 0
        self.abandoned = 0

    def seed(self, floors: dict[str, int]) -> None:
        """Treat everything at or below ``floors[channel]`` as already seen."""
        for channel, floor in floors.items():
            if floor > self.floors.get(channel, -1):
                self.floors[channel] = floor
                above = self._above.get(channel, set())
                self._above[channel] = {seq for seq in above if seq > floor}
                self._advance(channel)

    def _advance(self, channel: str) -> None:
        above = self._above[channel]
        floor = self.floors[channel]
        while floor + 1 in above:
            floor += 1
            above.discard(floor)
        self.floors[channel] = floor

    def accept(self, channel: str, seq: int) -> bool:
        """True the first time ``(channel, seq)`` is seen, False for a duplicate."""
        floor = self.floors.get(channel)
        if floor is None:
            self.floors[channel] = seq
            self._above[channel] = set()
            self.accepted += 1
            return True
        if seq <= floor:
            self.duplicates += 1
            return False
        if seq == floor + 1:
            self.floors[channel] = seq
            if self._above[channel]:
                self._advance(channel)
            self.accepted += 1
            return True
        above = self._above[channel]
        if seq in above:
            self.duplicates += 1
            return False
        above.add(seq)
        if len(above) > self.max_pending:
            oldest = min(above)
            self.abandoned += oldest - floor - 1
            self.floors[channel] = oldest
            above.discard(oldest)
            self._advance(channel)
        self.accepted += 1
        return True

    def accept_headers(self, headers: Iterable[tuple[str, bytes]] | None) -> bool:
        """``accept`` by a record's headers; records without the mirror's headers pass."""
        identity = record_identity(headers)
        return True if identity is None else self.accept(*identity)

    def holes(self) -> dict[str, int]:
        """Per channel with a hole: how many sequences above the floor are still pending."""
        return {channel: len(above) for channel, above in self._above.items() if above}


class TopicAdmin:
    """Creates topics on demand, once each, over one long-lived admin connection."""

    def __init__(self, settings: CommonSettings, *, max_wait_s: float = 60.0) -> None:
        self.settings = settings
        self.max_wait_s = max_wait_s
        self.known: set[str] = set()
        self._admin: AIOKafkaAdminClient | None = None
        self._lock = asyncio.Lock()

    async def _client(self) -> AIOKafkaAdminClient:
        if self._admin is None:
            admin = AIOKafkaAdminClient(**kafka_options(self.settings))
            try:
                await _retry_start("admin", admin.start, self.max_wait_s, settings=self.settings)
            except BaseException:
                await admin.close()
                raise
            self._admin = admin
        return self._admin

    async def ensure(self, specs: Iterable[TopicSpec]) -> list[str]:
        """Create those of ``specs`` that do not exist yet; returns the names created."""
        wanted = {spec.name: spec for spec in specs if spec.name not in self.known}
        if not wanted:
            return []
        async with self._lock:
            admin = await self._client()
            try:
                existing = set(await admin.list_topics())
                missing = [spec for name, spec in wanted.items() if name not in existing]
                created = await _create(admin, missing) if missing else []
            except Exception:
                await self.close()  # a broken connection is rebuilt on the next call
                raise
            # every topic the broker listed is known now: a later new channel whose topic
            # exists (created by another process, or before this one started) costs no
            # listing of the whole cluster's topics
            self.known.update(existing)
            self.known.update(wanted)
            return created

    async def close(self) -> None:
        """Close the admin connection (a later ``ensure`` reopens it)."""
        admin, self._admin = self._admin, None
        if admin is not None:
            await admin.close()


async def _create(admin: AIOKafkaAdminClient, missing: list[TopicSpec]) -> list[str]:
    new_topics = [
        NewTopic(
            name=spec.name,
            num_partitions=spec.partitions,
            replication_factor=spec.replication_factor,
            topic_configs=dict(spec.configs),
        )
        for spec in missing
    ]
    try:
        response = await admin.create_topics(new_topics)
    except TopicAlreadyExistsError:
        response = None
    for error in getattr(response, "topic_errors", ()):
        topic, code = error[0], error[1]
        if code not in (0, TopicAlreadyExistsError.errno):
            raise RuntimeError(
                f"creating Kafka topic {topic} failed: error code {code} "
                f"{error[2] if len(error) > 2 else ''}"
            )
    log.info("kafka.topics_created", topics=[spec.name for spec in missing])
    return [spec.name for spec in missing]


class ReadIncomplete(RuntimeError):
    """A read from the beginning did not reach the end of every partition in time."""


async def read_from_beginning(
    settings: CommonSettings,
    topics: Iterable[str],
    *,
    idle_ms: int = 1_500,
    max_records: int = 10_000,
    until_ms: int | None = None,
    clock_slack_ms: int = 2_000,
    max_wait_s: float = 300.0,
    starts: Mapping[TopicPartition, int] | None = None,
) -> AsyncIterator[list[ConsumerRecord[bytes, bytes]]]:
    """Every record of ``topics`` from the beginning, in chunks (each of one partition), up to
    the end of each partition as of the read (or the first record stamped after ``until_ms``).
    ``starts``: partitions to read from that offset instead (where an earlier read stopped).

    A partition is done when the consumer's position reaches the high watermark the broker
    reported in a fetch response for it (``highwater``: set by every response, with records
    or without), or at its first record stamped after ``until_ms`` (default: when the read
    started, plus ``clock_slack_ms`` for clocks that differ between hosts), so a topic still
    being written to (heartbeats every second) is read up to "now" and not followed forever.
    A slow broker is waited for: nothing ends the read before every partition has been
    answered at least once. As a safety net for a broker whose watermarks are off, the read
    also ends when every partition has been answered and no record came for ``idle_ms``.
    Past ``max_wait_s`` it raises ``ReadIncomplete`` rather than return part of the data. No
    consumer group (assign + seek_to_beginning): nothing is committed. Missing topics are
    skipped.
    """
    cutoff = (until_ms if until_ms is not None else int(time.time() * 1000)) + clock_slack_ms
    consumer = AIOKafkaConsumer(
        **kafka_options(settings),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        max_partition_fetch_bytes=8 * 1_048_576,
    )
    await start_consumer(consumer, settings=settings)
    try:
        existing = await consumer.topics()
        partitions = [
            TopicPartition(topic, partition)
            for topic in sorted(set(topics) & existing)
            for partition in sorted(consumer.partitions_for_topic(topic) or {0})
        ]
        if not partitions:
            return
        consumer.assign(partitions)
        starts = starts or {}
        first = [tp for tp in partitions if tp not in starts]
        if first:  # (none given would mean every assigned partition)
            await consumer.seek_to_beginning(*first)
        for tp in partitions:
            if tp in starts:
                consumer.seek(tp, starts[tp])
        reading = set(partitions)
        started = time.monotonic()
        last_record = started
        positions: dict[TopicPartition, int] = {}
        while reading:
            fetched = await consumer.getmany(
                *reading, timeout_ms=min(idle_ms, 500), max_records=max_records
            )
            now = time.monotonic()
            for partition, messages in fetched.items():
                if partition not in reading or not messages:
                    continue
                last_record = now
                late = next((i for i, m in enumerate(messages) if m.timestamp > cutoff), None)
                if late is not None:
                    # a record stamped after the cutoff: this partition is read up to "now"
                    messages = messages[:late]
                    reading.discard(partition)
                    consumer.pause(partition)
                else:
                    positions[partition] = messages[-1].offset + 1
                if messages:
                    yield messages
            answered = True
            for partition in list(reading):
                highwater = consumer.highwater(partition)
                if highwater is None:
                    answered = False
                    continue
                position = positions.get(partition)
                if position is None:
                    position = await consumer.position(partition)
                if position >= highwater:
                    reading.discard(partition)
                    consumer.pause(partition)
            if reading and answered and now - last_record >= idle_ms / 1000:
                return  # answered, and quiet: the watermarks disagree with the data
            if reading and now - started > max_wait_s:
                raise ReadIncomplete(
                    f"reading {len(partitions)} Kafka partitions from the beginning: "
                    f"{len(reading)} not at their end after {max_wait_s:g} s "
                    f"(e.g. {sorted(str(p) for p in reading)[:3]})"
                )
    finally:
        await consumer.stop()


async def list_topics(settings: CommonSettings) -> set[str]:
    """The names of the topics the cluster has."""
    consumer = AIOKafkaConsumer(**kafka_options(settings), group_id=None)
    await start_consumer(consumer, settings=settings)
    try:
        return set(await consumer.topics())
    finally:
        await consumer.stop()
