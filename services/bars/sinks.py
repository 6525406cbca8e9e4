"""Where the bar builder's bars go: Redis (primary) or Kafka (shadow)."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer

from libs.common import names
from libs.common.io.barstore import BarStore
from libs.common.io.kafka_batches import PartitionedSender
from libs.common.io.kafka_io import TopicAdmin, TopicSpec
from libs.common.io.redis_io import Publisher
from libs.common.schemas import ENCODER, Bar
from services.bars.marks import ClosedMinutes
from services.bars.source import BarSink

BAR_TOPIC_CONFIGS = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}


def bar_topic_spec(name: str, replication: int = 1) -> TopicSpec:
    """A shadow bar topic as the Kafka sink creates it (one partition, kept for ever)."""
    return TopicSpec(name, 1, replication, BAR_TOPIC_CONFIGS)


def redis_sink(publisher: Publisher, store: BarStore, closed: ClosedMinutes) -> BarSink:
    """Keep bars in the bar store, then publish them on ``bars.<SYM>.1m`` (pub/sub + stream),
    in one round trip: the store's writes go first on the pipeline, so the server runs them
    first.

    The store comes first: a crash in between leaves a bar stored but not published, which
    the restart publishes (and stores again); the other order could leave a published bar
    that the store never gets (a restart does not publish it again). A server out of memory
    refuses the publication's writes as it refused the store's. What one round trip gives up:
    a store write refused for its key alone (another type of key where a bar hash belongs)
    no longer stops the publication after it; the close fails all the same (the error goes
    on, the builder restarts and logs it).
    """

    async def sink(bars: list[Bar]) -> None:
        payloads = [ENCODER.encode(bar) for bar in bars]  # one encoding for both writes
        seqs = await publisher.publish_many(
            [
                (names.channel(names.BARS, bar.symbol), payload)
                for bar, payload in zip(bars, payloads, strict=True)
            ],
            before=lambda pipe: store.queue_put(pipe, bars, payloads),
        )
        for bar, seq in zip(bars, seqs, strict=True):
            closed.note_published(bar.symbol, seq)

    return sink


def kafka_sink(
    admin: TopicAdmin,
    producer: AIOKafkaProducer,
    topic: str = names.BARS,
    *,
    replication: int = 1,
) -> BarSink:
    """Produce bars to Kafka keyed by symbol, creating topics once (with ``replication``
    copies): to ``bars.<SYM>.1m`` (``topic`` a template), or all to one topic
    (``names.shadow_bars_topic``). A call's bars go as prebuilt record batches, one or more
    per partition (a minute's close is a bar per symbol at once), and the call returns once
    Kafka acknowledged them all."""
    sender = PartitionedSender()

    async def sink(bars: list[Bar]) -> None:
        topics = [names.channel(topic, bar.symbol) for bar in bars]
        known = admin.known  # a close asks for the topics it has not seen before only
        new = sorted({name for name in topics if name not in known})
        if new:
            await admin.ensure(bar_topic_spec(name, replication) for name in new)
        futures, _ = await sender.send(
            producer,
            [
                (name, bar.symbol.encode(), ENCODER.encode(bar), None)
                for name, bar in zip(topics, bars, strict=True)
            ],
        )
        for future in futures:
            await future

    return sink
