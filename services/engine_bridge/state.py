"""The bridge's durable state in Redis, written in one transaction with the minute's records.

The key is ``Keys(prefix).state("engine_bridge:<portfolio_id>")`` and holds the JSON of a
``BridgeState``. ``publish_and_save`` publishes every record (``Publisher.publish_many`` with
``transaction=True``, so sequence numbers and streams behave identically) and ``SET``s the
state in the same ``MULTI``/``EXEC``: either the minute's records are out *and*
the state says the minute is done, or neither. That is what keeps a fill from being
published twice when the bridge dies between the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import redis.asyncio as aioredis

from libs.common.io.redis_io import Publisher
from libs.common.names import Keys
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
        encoded = STATE_ENCODER.encode(state)
        return await self.publisher.publish_many(
            records, transaction=True, also=lambda pipe: pipe.set(self.key, encoded)
        )
