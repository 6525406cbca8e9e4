"""The primary tick source: ``ticks.*`` (and the progress marks) from Redis without loss, for
one shard."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
import structlog

from libs.common import names
from libs.common.io.deadletter import DeadLetters
from libs.common.io.reliable import Record, SequencedConsumer
from libs.common.schemas import DECODERS, Progress, TickBatch
from services.bars.source import Deliver, Item, decode_batch, tick_symbol

log = structlog.get_logger("tickmesh.bars.sources")

decode_progress = DECODERS[Progress].decode


class RedisTickSource:
    """Reads ``ticks.*`` from Redis without loss (``SequencedConsumer``) for one shard.

    Each ``open`` builds a new consumer, which starts from the committed positions. After a
    batch that was not full it waits ``pause_s`` before taking the next, so that what ingest
    published meanwhile comes as one batch instead of one a round trip (each batch costs the
    builder a message and a handling); a full batch is followed at once.
    """

    def __init__(
        self,
        make_consumer: Callable[[], SequencedConsumer],
        dead_letters: DeadLetters,
        *,
        pause_s: float = 0.0,
    ) -> None:
        self.make_consumer = make_consumer
        self.dead_letters = dead_letters
        self.pause_s = pause_s
        self.consumer: SequencedConsumer | None = None

    async def open(self, *, restart: bool) -> None:
        """A fresh consumer (positions from the committed ones)."""
        await self.close()
        self.consumer = self.make_consumer()
        await self.consumer.open()

    async def close(self) -> None:
        """Stop the consumer's pub/sub reader."""
        consumer, self.consumer = self.consumer, None
        if consumer is not None:
            await consumer.close()

    async def commit(self, safe: dict[str, int]) -> None:
        """Store positions durably (only ever forward)."""
        if self.consumer is not None:
            await self.consumer.commit(Record(channel, seq, b"") for channel, seq in safe.items())

    async def run(self, deliver: Deliver) -> None:
        """Deliver each batch of records, decoded; bad ones to the dead letters."""
        consumer = self.consumer
        assert consumer is not None, "open() first"
        progress = names.PROGRESS
        pause_s = self.pause_s
        async for records in consumer.batches():
            items: list[Item] = []
            for record in records:
                if record.channel == progress:
                    try:
                        items.append((record.channel, record.seq, decode_progress(record.payload)))
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        await self.dead_letters.send(record.channel, str(exc), record.payload)
                        items.append((record.channel, record.seq, TickBatch(0, "", [])))
                    continue
                try:
                    batch = decode_batch(record.payload)
                    symbol = tick_symbol(record.channel)
                    if batch.sym != symbol:
                        raise ValueError(f"symbol {batch.sym!r} on the channel of {symbol!r}")
                except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                    await self.dead_letters.send(record.channel, str(exc), record.payload)
                    if record.seq > 0:  # its position is done with, like any other
                        items.append(
                            (
                                record.channel,
                                record.seq,
                                TickBatch(record.seq, tick_symbol(record.channel), []),
                            )
                        )
                    continue
                items.append((record.channel, record.seq, batch))
            if items:
                await deliver(items)
            if pause_s and len(records) < consumer.batch_max:
                await asyncio.sleep(pause_s)
