"""The bar store: the latest revision of every closed bar, per symbol and New York day.

A Redis hash per (symbol, day), keyed by the bar's ``startMs``, valued by the Bar's JSON.
The bars service writes it with every publication (a correction replaces the bar); the
reconciler and the app read it. Writes keep only the highest revision.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from libs.common.market.sessions import ny_date
from libs.common.names import Keys
from libs.common.schemas import BAR_DECODER, ENCODER, Bar

# KEYS: the hashes, one per bar; ARGV[1] the TTL, then per bar its field (startMs), revision
# and JSON. Keeps the newest revision of each minute; every key written gets the TTL.
_PUT_LUA = """
local ttl = ARGV[1]
for i, key in ipairs(KEYS) do
  local at = 2 + (i - 1) * 3
  local old = redis.call('HGET', key, ARGV[at])
  local rev = old and tonumber(string.match(old, '"revision":(%d+)'))
  if not (rev and rev > tonumber(ARGV[at + 1])) then
    redis.call('HSET', key, ARGV[at], ARGV[at + 2])
  end
  redis.call('EXPIRE', key, ttl)
end
return #KEYS
"""


class BarStore:
    """Read and write the bar store."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys | None = None,
        ttl_s: int = 14 * 86_400,
        *,
        bars_per_call: int = 64,
    ) -> None:
        self.client = client
        self.keys = keys or Keys()
        self.ttl_s = ttl_s
        if bars_per_call < 1:
            raise ValueError(f"bars_per_call must be at least 1, not {bars_per_call}")
        self.bars_per_call = bars_per_call
        """Bars in one call of the store script (a minute's close stores a bar per symbol: a
        call each was 60-90 ms for 1,000 bars); 1 on a Redis Cluster, where a call's keys must
        share a slot (a symbol's do)."""

    def key(self, symbol: str, day: date) -> str:
        """The hash of ``symbol`` on ``day``."""
        return f"{self.keys.prefix}barstore:{{{symbol}}}:{day.isoformat()}"

    def queue_put(
        self, pipe: Pipeline, bars: Sequence[Bar], encoded: Sequence[bytes] | None = None
    ) -> None:
        """Queue the store's writes of ``bars`` on ``pipe`` (a call of the store script per
        ``bars_per_call`` bars), keeping the highest revision of each minute; ``encoded``: the
        bars' JSON when the caller has it already (it publishes them too).

        The calls are ``EVAL`` with the script's text, never ``EVALSHA``: a server that lost its
        script cache (a restart) runs them all the same, so on a pipeline that goes on to
        publish the bars nothing is published that the store missed for want of a script."""
        payloads = [ENCODER.encode(bar) for bar in bars] if encoded is None else encoded
        per_call, ttl_s, text = self.bars_per_call, self.ttl_s, _PUT_LUA
        for first in range(0, len(bars), per_call):
            keys: list[str] = []
            args: list[str | int | bytes] = [ttl_s]
            for bar, payload in zip(
                bars[first : first + per_call], payloads[first : first + per_call], strict=True
            ):
                keys.append(self.key(bar.symbol, ny_date(bar.startMs)))
                args += (bar.startMs, bar.revision, payload)
            pipe.eval(text, len(keys), *keys, *args)

    async def put_many(self, bars: Sequence[Bar], encoded: Sequence[bytes] | None = None) -> None:
        """Store bars (one pipelined round trip), keeping the highest revision of each minute.
        ``encoded``: the bars' JSON when the caller has it already."""
        if not bars:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            self.queue_put(pipe, bars, encoded)
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
