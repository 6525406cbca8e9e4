"""A consumer's committed positions: the last sequence (or offset) it is done with, per
channel, kept in a Redis hash so that a restart resumes there."""

from __future__ import annotations

import redis.asyncio as aioredis

from libs.common.names import Keys


class PositionStore:
    """The last committed sequence per channel of one consumer, in a Redis hash
    (``<prefix>state:<kind>:<consumer>``; ``kind`` names what the positions count)."""

    def __init__(
        self, client: aioredis.Redis, keys: Keys, consumer: str, *, kind: str = "positions"
    ) -> None:
        self.client = client
        self.key = keys.state(f"{kind}:{consumer}")

    async def load(self) -> dict[str, int]:
        """All committed positions."""
        raw = await self.client.hgetall(self.key)
        return {
            (channel.decode() if isinstance(channel, bytes) else channel): int(seq)
            for channel, seq in raw.items()
        }

    async def save(self, positions: dict[str, int]) -> None:
        """Store positions (only ever forward, guarded in the caller)."""
        if positions:
            await self.client.hset(self.key, mapping=positions)  # type: ignore[arg-type]
