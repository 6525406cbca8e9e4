"""What the bar builder published, per symbol: the marks a restart resumes from.

``ClosedMinutes`` keeps, in a Redis hash (``<prefix>state:bars:<name>:closed``), the end of
the newest minute published for each symbol and the sequence of its last bar on the Redis
channel; ``StreamClosedMinutes`` (the Redis path) also reads the bars streams after the
saved sequences, so bars published just before a crash are known as published.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import redis.asyncio as aioredis
import structlog

from libs.common import names
from libs.common.io.redis_io import StreamReader
from libs.common.names import Keys
from libs.common.schemas import BAR_DECODER, Bar

log = structlog.get_logger("tickmesh.bars")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ClosedMinutes:
    """What was published, per symbol: the end of the newest published minute.

    Kept in a Redis hash (``<prefix>state:bars:<name>:closed``, field = symbol, value =
    ``end`` or ``end:seq`` with the sequence of the symbol's last bar on its Redis channel).
    ``restored`` is the mark loaded at start (or at a Kafka assignment) that the builder
    compares rebuilt bars with; ``by_symbol`` follows every publication.
    """

    def __init__(self, client: aioredis.Redis | None, keys: Keys, name: str) -> None:
        self.client = client
        self.keys = keys
        self.key = keys.state(f"bars:{name}:closed")
        self.by_symbol: dict[str, int] = {}
        self.seqs: dict[str, int] = {}
        self.restored: dict[str, int] = {}

    async def _read(self) -> dict[str, tuple[int, int]]:
        if self.client is None:  # kept in memory only (tests, benchmarks)
            return {
                symbol: (end, self.seqs.get(symbol, 0)) for symbol, end in self.by_symbol.items()
            }
        raw = await self.client.hgetall(self.key)
        out: dict[str, tuple[int, int]] = {}
        for symbol, value in raw.items():
            end, _, seq = _text(value).partition(":")
            out[_text(symbol)] = (int(end), int(seq or 0))
        return out

    async def load(self, keep: Iterable[str] = ()) -> None:
        """Read the stored marks; the symbols in ``keep`` (still owned, their state in
        memory is newer) keep theirs."""
        kept = set(keep)
        stored = await self._read()
        stored = await self.recover(stored)
        for symbol in [s for s in self.by_symbol if s not in kept]:
            self.by_symbol.pop(symbol, None)
            self.seqs.pop(symbol, None)
            self.restored.pop(symbol, None)
        for symbol, (end, seq) in stored.items():
            if symbol in kept:
                continue
            self.by_symbol[symbol] = end
            self.seqs[symbol] = seq
            self.restored[symbol] = end

    async def recover(self, stored: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        """Hook: complete the stored marks from what was published after them."""
        return stored

    def forget(self, symbols: Iterable[str]) -> None:
        """Drop the marks of symbols that moved to another instance."""
        for symbol in symbols:
            self.by_symbol.pop(symbol, None)
            self.seqs.pop(symbol, None)
            self.restored.pop(symbol, None)

    def skip(self, bar: Bar) -> bool:
        """True when ``bar`` rebuilds a minute published before the last (re)start."""
        return bar.endMs <= self.restored.get(bar.symbol, 0)

    def note_published(self, symbol: str, seq: int) -> None:
        """The sink published a bar of ``symbol`` with channel sequence ``seq``."""
        if seq > self.seqs.get(symbol, 0):
            self.seqs[symbol] = seq

    async def save(self, bars: Sequence[Bar]) -> None:
        """Store the marks of the symbols of ``bars``, just published."""
        changed: dict[str, str] = {}
        for bar in bars:
            symbol = bar.symbol
            if bar.endMs > self.by_symbol.get(symbol, 0):
                self.by_symbol[symbol] = bar.endMs
            changed[symbol] = ""
        for symbol in changed:
            seq = self.seqs.get(symbol, 0)
            end = self.by_symbol.get(symbol, 0)
            changed[symbol] = f"{end}:{seq}" if seq else str(end)
        if self.client is not None and changed:
            await self.client.hset(self.key, mapping=changed)  # type: ignore[arg-type]


class StreamClosedMinutes(ClosedMinutes):
    """``ClosedMinutes`` of the Redis path: also reads the bars streams after the saved
    sequences, so that bars published just before a crash (and not yet noted in the hash)
    are known as published, and never sent twice."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        name: str,
        accept: Callable[[str], bool] = lambda _symbol: True,
    ) -> None:
        super().__init__(client, keys, name)
        self.reader = StreamReader(client, keys)
        self.accept = accept
        self.recovered = 0
        """Bars found in the streams that the hash did not know of (at the last load)."""

    async def recover(self, stored: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        out = dict(stored)
        self.recovered = 0
        for channel in await self.reader.channels(names.pattern_of(names.BARS)):
            symbol = names.symbol_of(names.BARS, channel)
            if symbol is None:
                continue
            if not self.accept(symbol):
                continue
            end, seq = out.get(symbol, (0, 0))
            if not seq:  # nothing saved (a new shard layout): the newest bars tell
                seq = max(0, await self.reader.last_seq(channel) - 1_000)
            while True:
                entries = await self.reader.read(channel, seq, 1_000)
                if not entries:
                    break
                for entry_seq, payload in entries:
                    try:
                        bar = BAR_DECODER.decode(payload)
                    except Exception:  # not ours to judge; the sequence counts
                        bar = None
                    if bar is not None:
                        end = max(end, bar.endMs)
                        self.recovered += 1
                    seq = entry_seq
            if (end, seq) != out.get(symbol, (0, 0)):
                out[symbol] = (end, seq)
        if self.recovered:
            log.warning(
                "bars.recovered_from_streams",
                bars=self.recovered,
                reason="published before a crash, after the last saved mark",
            )
        return out
