"""The bridge's durable state in Redis, written in one transaction with the minute's records.

The key is ``Keys(prefix).state("engine_bridge:<portfolio_id>")`` and holds the JSON of a
``BridgeState``. ``publish_and_save`` queues the sequenced publish of every record (the same
Lua script ``Publisher`` uses, so sequence numbers and streams behave identically) and the
``SET`` of the state in one ``MULTI``/``EXEC``: either the minute's records are out *and*
the state says the minute is done, or neither. That is what keeps a fill from being
published twice when the bridge dies between the two.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import msgspec
import redis.asyncio as aioredis

from libs.common.redis_io import Keys, Publisher, channel_kind, record_tail
from services.engine_bridge.model import STATE_DECODER, STATE_ENCODER, BridgeState


def state_key(keys: Keys, portfolio_id: str) -> str:
    """The Redis key of a portfolio's bridge state."""
    return keys.state(f"engine_bridge:{portfolio_id}")


class StateStore:
    """Load, save, and publish-with-save of one portfolio's ``BridgeState``."""

    def __init__(self, client: aioredis.Redis, publisher: Publisher, portfolio_id: str) -> None:
        self.client = client
        self.publisher = publisher
        self.key = state_key(publisher.keys, portfolio_id)

    async def load(self) -> BridgeState | None:
        """The saved state, or None for a new portfolio."""
        raw = await self.client.get(self.key)
        if raw is None:
            return None
        return STATE_DECODER.decode(raw)

    async def save(self, state: BridgeState) -> None:
        """Save the state alone (pending bars changed, nothing to publish)."""
        await self.client.set(self.key, STATE_ENCODER.encode(state))

    async def publish_and_save(
        self, records: Sequence[tuple[str, msgspec.Struct | bytes]], state: BridgeState
    ) -> list[int]:
        """Publish ``records`` and save ``state`` atomically; returns the records' sequences."""
        publisher = self.publisher
        keys = publisher.keys
        # The publisher's own registered script: the same Lua, loaded once per connection.
        script = publisher._script
        started = time.perf_counter()
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                for channel, record in records:
                    await script(
                        keys=[keys.seq(channel), keys.stream(channel)],
                        args=[channel, record_tail(record), publisher.stream_maxlen],
                        client=pipe,
                    )
                pipe.set(self.key, STATE_ENCODER.encode(state))
                results = await pipe.execute()
        except Exception:
            publisher.metrics.errors.inc()
            raise
        publisher.metrics.latency.observe(time.perf_counter() - started)
        publisher.metrics.batches.inc()
        kinds: dict[str, int] = {}
        for channel, _ in records:
            kind = channel_kind(channel)
            kinds[kind] = kinds.get(kind, 0) + 1
        for kind, count in kinds.items():
            publisher.metrics.records.labels(kind).inc(count)
        return [int(result) for result in results[:-1]]
