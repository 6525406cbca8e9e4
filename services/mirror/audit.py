"""Delivery audit: does Kafka hold every record Redis published? Counts, gaps, duplicates.

For each channel, Redis's sequence counter says how many records were ever published
(1..N, no gaps by construction); the mirrored topics' ``tm-channel``/``tm-seq`` headers say
which of them Kafka holds and how often. The dead-letter topic counts too: a record that
went there was delivered (to where undecodable records belong). ``python -m services.mirror
audit`` prints the result; the no-loss tests and the benchmark use ``audit``.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
import redis.asyncio as aioredis

from libs.common.io.kafka_io import read_from_beginning, record_identity
from libs.common.io.redis_io import StreamReader
from libs.common.names import Keys
from services.mirror.config import MirrorSettings
from services.mirror.routing import RoutingTable


class ChannelAudit(msgspec.Struct):
    """One channel: published on Redis vs held by Kafka."""

    channel: str
    published: int
    inKafka: int = 0
    """Records delivered to their own topic."""
    duplicates: int = 0
    missing: int = 0
    """Neither delivered nor dead-lettered."""
    firstMissing: list[int] = []
    deadLettered: int = 0
    """Records sent to the dead-letter topic instead (counted apart from delivered)."""


class Audit(msgspec.Struct):
    """Every audited channel, with totals."""

    channels: list[ChannelAudit]
    published: int = 0
    inKafka: int = 0
    duplicates: int = 0
    missing: int = 0
    kafkaRecords: int = 0
    deadLettered: int = 0

    @property
    def lost(self) -> int:
        """Records published on Redis that Kafka does not hold."""
        return self.missing


async def published_counts(
    client: aioredis.Redis, keys: Keys, channels: Iterable[str]
) -> dict[str, int]:
    """How many records each channel ever got (its sequence counter, else its stream top)."""
    names = sorted(set(channels))
    if not names:
        return {}
    async with client.pipeline(transaction=False) as pipe:
        for channel in names:
            pipe.get(keys.seq(channel))
        values = await pipe.execute()
    reader = StreamReader(client, keys)
    counts = {}
    for channel, value in zip(names, values, strict=True):
        counts[channel] = int(value) if value is not None else await reader.last_seq(channel)
    return counts


async def audit(
    settings: MirrorSettings,
    client: aioredis.Redis,
    *,
    channels: Iterable[str] | None = None,
    extra_topics: Iterable[str] = (),
) -> Audit:
    """Compare what Redis published on ``channels`` (default: every routed channel with a
    stream) with the (channel, seq) headers found in the routed topics from the beginning."""
    keys = Keys(settings.key_prefix)
    table = RoutingTable(settings)
    if channels is None:
        channels = await StreamReader(client, keys).channels(table.patterns)
    published = await published_counts(client, keys, channels)
    topics = {settings.deadletter_topic, *extra_topics}
    for channel in published:
        target = table.target(channel)
        if target is not None:
            topics.add(target.topic)
    seen: dict[str, dict[int, int]] = {channel: {} for channel in published}
    dead_seqs: dict[str, set[int]] = {channel: set() for channel in published}
    kafka_records = dead = 0
    async for records in read_from_beginning(
        settings, sorted(topics), idle_ms=settings.kafka_idle_ms
    ):
        for record in records:
            kafka_records += 1
            identity = record_identity(record.headers)
            if identity is None:
                continue
            channel, seq = identity
            if record.topic == settings.deadletter_topic:
                # dead-lettered, not delivered: counted apart
                dead += 1
                if channel in dead_seqs:
                    dead_seqs[channel].add(seq)
                continue
            counts = seen.get(channel)
            if counts is not None:
                counts[seq] = counts.get(seq, 0) + 1
    result = Audit(channels=[], kafkaRecords=kafka_records, deadLettered=dead)
    for channel, count in sorted(published.items()):
        counts = seen[channel]
        dead_here = dead_seqs[channel]
        held = sum(1 for seq in counts if 1 <= seq <= count)
        missing = [seq for seq in range(1, count + 1) if seq not in counts and seq not in dead_here]
        entry = ChannelAudit(
            channel=channel,
            published=count,
            inKafka=held,
            deadLettered=len(dead_here),
            duplicates=sum(copies - 1 for copies in counts.values()),
            missing=len(missing),
            firstMissing=missing[:20],
        )
        result.channels.append(entry)
        result.published += entry.published
        result.inKafka += entry.inKafka
        result.duplicates += entry.duplicates
        result.missing += entry.missing
    return result
