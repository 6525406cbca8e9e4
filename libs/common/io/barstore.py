"""The bar store: the latest revision of every closed bar, per symbol and New York day.

A Redis hash per (symbol, day), keyed by the bar's ``startMs``, valued by the Bar's JSON.
The bars service writes it with every publication (a correction replaces the bar); the
reconciler and the app read it. Writes keep only the highest revision.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date

import redis.asyncio as aioredis

from libs.common.market.sessions import ny_date
from libs.common.names import Keys
from libs.common.schemas import BAR_DECODER, ENCODER, Bar

# KEYS[1] the hash; ARGV[1] field, ARGV[2] revision, ARGV[3] bar JSON. Keeps the newest revision.
_PUT_LUA = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local rev = tonumber(string.match(old, '"revision":(%d+)'))
  if rev and rev > tonumber(ARGV[2]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""


class BarStore:
    """Read and write the bar store."""

    def __init__(
        self, client: aioredis.Redis, keys: Keys | None = None, ttl_s: int = 14 * 86_400
    ) -> None:
        self.client = client
        self.keys = keys or Keys()
        self.ttl_s = ttl_s
        self._put = client.register_script(_PUT_LUA)

    def key(self, symbol: str, day: date) -> str:
        """The hash of ``symbol`` on ``day``."""
        return f"{self.keys.prefix}barstore:{{{symbol}}}:{day.isoformat()}"

    async def put_many(self, bars: Iterable[Bar]) -> None:
        """Store bars (pipelined), keeping the highest revision of each minute."""
        async with self.client.pipeline(transaction=False) as pipe:
            count = 0
            for bar in bars:
                key = self.key(bar.symbol, ny_date(bar.startMs))
                await self._put(
                    keys=[key], args=[bar.startMs, bar.revision, ENCODER.encode(bar)], client=pipe
                )
                pipe.expire(key, self.ttl_s)
                count += 1
            if count:
                await pipe.execute()

    async def day(self, symbol: str, day: date) -> dict[int, Bar]:
        """Every bar of ``symbol`` on ``day``, by startMs."""
        raw = await self.client.hgetall(self.key(symbol, day))
        return {int(field): BAR_DECODER.decode(value) for field, value in raw.items()}

    async def symbols(self, day: date) -> list[str]:
        """Symbols with bars on ``day``."""
        pattern = f"{self.keys.prefix}barstore:{{*}}:{day.isoformat()}"
        found = set()
        prefix_len = len(self.keys.prefix) + len("barstore:{")
        async for key in self.client.scan_iter(match=pattern, count=1000):
            text = key.decode()
            found.add(text[prefix_len : text.index("}", prefix_len)])
        return sorted(found)
