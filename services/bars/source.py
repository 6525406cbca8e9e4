"""What the bar builder and its tick sources say to each other, and nothing else.

A source reads, decodes (bad records become dead letters) and hands batches to the builder
through ``deliver`` (the builder's ``post``, which blocks while its mailbox is full:
backpressure, never loss). The builder owns the source: it ``open``s it at each start
(``restart=True``: rewind to the committed positions), runs its ``run`` loop as a task of its
own, ``commit``s positions that are safe and ``close``s it at stop. Besides tick batches, a
source delivers the progress marks of its path (``Progress``), which close minutes.

Positions are per channel: the Redis channel's sequence number, or ``<topic>#<partition>``'s
offset on Kafka. Implementations: ``redis_source.RedisTickSource`` (primary) and
``kafka_source.KafkaTickSource`` (shadow).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from libs.common import names
from libs.common.schemas import TICK_BATCH_DECODER, Bar, Progress, TickBatch

Item = tuple[str, int, TickBatch | Progress]
"""(channel, position, record): a tick batch or a progress mark, and where it came from."""

Deliver = Callable[[Sequence[Item]], Awaitable[None]]
BarSink = Callable[[list[Bar]], Awaitable[None]]
"""Where the builder's bars go (``sinks``): Redis channels and the bar store, or Kafka."""


@functools.lru_cache(maxsize=100_000)
def tick_symbol(channel: str) -> str:
    """The symbol of a tick channel or topic: ``ticks.BRK.B`` -> ``BRK.B`` (asked for every
    record, so remembered per channel)."""
    return names.symbol_of(names.TICKS, channel) or channel


decode_batch: Callable[[bytes], TickBatch] = TICK_BATCH_DECODER.decode
"""Decode one tick record, raising ``msgspec.DecodeError`` / ``ValidationError`` (the decoder's
own method: no Python call of ours a record)."""


class TickSource(Protocol):
    """What the builder needs from a source."""

    async def open(self, *, restart: bool) -> None:
        """Get ready to read; on a restart, from the committed positions."""

    async def run(self, deliver: Deliver) -> None:
        """Read, decode and deliver forever."""

    async def commit(self, safe: dict[str, int]) -> None:
        """Durably note positions as done."""

    async def close(self) -> None:
        """Stop reading."""
