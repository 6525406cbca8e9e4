"""Kafka I/O: producer and consumer factories, topic creation, connect with retry.

Defaults are right for real Kafka and configurable for the embedded broker (see
ARCHITECTURE.md, "Known limits"): the idempotent producer is a setting, group timeouts are
settings (joins take about half the session timeout on the embedded broker), and nothing here
relies on ``end_offsets``/``seek_to_end``/compaction being honoured.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from msgspec import Struct

from libs.common.settings import CommonSettings

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


async def _retry_start(
    what: str, start: object, max_wait_s: float, initial_delay_s: float = 0.2
) -> None:
    deadline = time.monotonic() + max_wait_s
    delay = initial_delay_s
    attempt = 0
    while True:
        attempt += 1
        try:
            await start()  # type: ignore[operator]
            return
        except Exception as exc:
            if not is_retriable(exc) or time.monotonic() + delay > deadline:
                raise ConnectionError(f"Kafka {what} could not start after {attempt} attempts: "
                                      f"{exc!r}") from exc
            log.warning("kafka.connect_retry", what=what, attempt=attempt,
                        delay_s=round(delay, 2), error=repr(exc))
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(5.0, delay * 2)


async def start_producer(
    settings: CommonSettings,
    *,
    linger_ms: int = 5,
    max_batch_size: int = 1_048_576,
    compression_type: str | None = None,
    max_wait_s: float = 60.0,
    client_id: str | None = None,
) -> AIOKafkaProducer:
    """A started producer (acks=all), retrying the connection with backoff."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=settings.kafka_enable_idempotence,
        linger_ms=linger_ms,
        max_batch_size=max_batch_size,
        max_request_size=max(max_batch_size, 1_048_576),
        compression_type=compression_type,
        client_id=client_id or f"tickmesh-{settings.effective_run_id()}",
        request_timeout_ms=30_000,
    )
    try:
        await _retry_start("producer", producer.start, max_wait_s)
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
) -> AIOKafkaConsumer:
    """An unstarted consumer with the group timeouts from settings; subscribe by pattern or
    topics (``pattern`` subscribes with ``consumer.subscribe(pattern=...)`` at start)."""
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=settings.kafka_bootstrap,
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
    )
    if pattern is not None:
        consumer.subscribe(pattern=pattern)
    return consumer


async def start_consumer(consumer: AIOKafkaConsumer, *, max_wait_s: float = 60.0) -> None:
    """Start ``consumer``, retrying the connection with backoff."""
    await _retry_start("consumer", consumer.start, max_wait_s)


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
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                                request_timeout_ms=30_000)
    await _retry_start("admin", admin.start, max_wait_s)
    try:
        existing = set(await admin.list_topics())
        missing = [spec for name, spec in wanted.items() if name not in existing]
        if not missing:
            return []
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
                raise RuntimeError(f"creating Kafka topic {topic} failed: error code {code} "
                                   f"{error[2] if len(error) > 2 else ''}")
        log.info("kafka.topics_created", topics=[spec.name for spec in missing])
        return [spec.name for spec in missing]
    finally:
        await admin.close()
