"""The bars' Redis tick source: its pause after a batch that was not full."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from libs.common.io.deadletter import DeadLetters
from libs.common.io.redis_io import Publisher
from libs.common.io.reliable import SequencedConsumer
from libs.common.names import Keys
from libs.common.schemas import TickBatch, Trade
from services.bars.redis_source import RedisTickSource
from services.bars.source import Item
from tests.helpers import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def tick_record(symbol: str, index: int) -> TickBatch:
    """A one-trade tick record."""
    return TickBatch(
        seq=0,
        sym=symbol,
        ticks=[Trade(sym=symbol, p=100.0, s=100, t=1_381_152_600_000 + index, i=str(index + 1))],
    )


class Deliveries:
    """Runs a source and keeps what each delivery carried."""

    def __init__(self, source: RedisTickSource) -> None:
        self.source = source
        self.sizes: list[int] = []
        self.task: asyncio.Task[None] | None = None

    async def deliver(self, items: Sequence[Item]) -> None:
        self.sizes.append(len(items))

    async def __aenter__(self) -> Deliveries:
        await self.source.open(restart=False)
        self.task = asyncio.create_task(self.source.run(self.deliver))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.source.close()


def make_source(
    client: aioredis.Redis, keys: Keys, symbol: str, *, pause_s: float, batch_max: int = 2_000
) -> RedisTickSource:
    registry = CollectorRegistry()

    def make_consumer() -> SequencedConsumer:
        return SequencedConsumer(
            client,
            "bars-test",
            [f"ticks.{symbol}"],
            keys=keys,
            registry=registry,
            batch_max=batch_max,
        )

    return RedisTickSource(
        make_consumer, DeadLetters(None, "bars", registry=registry), pause_s=pause_s
    )


async def test_records_published_during_the_pause_come_as_one_batch(
    redis_client: aioredis.Redis, unique_name
) -> None:
    """Five round trips 20 ms apart, made while the source pauses after a batch of one, reach
    the builder as one batch (without the pause: five)."""
    keys = Keys(unique_name("tm") + ":")
    symbol = unique_name("S")
    channel = f"ticks.{symbol}"
    publisher = Publisher(redis_client, keys=keys)
    source = make_source(redis_client, keys, symbol, pause_s=0.5)
    async with Deliveries(source) as deliveries:
        await publisher.publish(channel, tick_record(symbol, 0))
        await eventually(lambda: deliveries.sizes == [1], timeout=10)
        for index in range(1, 6):
            await publisher.publish(channel, tick_record(symbol, index))
            await asyncio.sleep(0.02)
        await eventually(lambda: sum(deliveries.sizes) == 6, timeout=10)
    assert deliveries.sizes == [1, 5]


async def test_a_full_batch_is_followed_at_once(redis_client: aioredis.Redis, unique_name) -> None:
    """A pause of a minute holds nothing back behind a full batch: seven records published in
    one round trip arrive as 3, 3 and 1 within seconds."""
    keys = Keys(unique_name("tm") + ":")
    symbol = unique_name("S")
    channel = f"ticks.{symbol}"
    publisher = Publisher(redis_client, keys=keys)
    source = make_source(redis_client, keys, symbol, pause_s=60.0, batch_max=3)
    async with Deliveries(source) as deliveries:
        await publisher.publish_many([(channel, tick_record(symbol, i)) for i in range(7)])
        await eventually(lambda: sum(deliveries.sizes) == 7, timeout=10)
    assert deliveries.sizes == [3, 3, 1]
