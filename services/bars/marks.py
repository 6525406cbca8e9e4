"""What the bar builder published, per symbol: the marks a restart resumes from.

``ClosedMinutes`` keeps, in a Redis hash (``<prefix>state:bars:<name>:closed``), the end of
the newest minute published for each symbol and the sequence of its last bar on the Redis
channel; ``StreamClosedMinutes`` (the Redis path) also reads the bars streams after the
saved sequences, so bars published just before a crash are known as published.

With the marks, in the same transaction, it keeps the closed minutes of each symbol's day as
the core holds them (``MinuteSnapshot``: one hash per symbol and New York day, a field per
minute, the source position read per channel when saved), so that after a restart a late
trade revises a minute published before it instead of being lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import date

import msgspec
import redis.asyncio as aioredis
import structlog

from libs.common import names
from libs.common.io.redis_io import RETRIABLE, CachedScript, StreamReader
from libs.common.market.sessions import MINUTE_MS, ny_date
from libs.common.names import Keys
from libs.common.runtime.retry import retry_async
from libs.common.schemas import BAR_DECODER, Bar, Trade

log = structlog.get_logger("tickmesh.bars")

SAVE_RETRY_S = 30.0
"""How long a save waits for Redis (a restart, a failover) before it fails the builder. The
bars it records are out already, and a Kafka produce cannot be taken back: a builder restarted
without the save would publish them again (copies in the shadow's topic)."""
SNAPSHOT_TTL_S = 3 * 86_400
"""How long a day's saved minutes are kept (a restart the next days still finds them)."""
_POSITION = "@pos:"
_FLAGS = "@flags"
_STATE_ENCODER = msgspec.msgpack.Encoder()
_HSET_CHUNK = 500
"""Field pairs per HSET inside the save script (Lua's ``unpack`` has a bounded stack)."""

# KEYS[1] the marks hash, KEYS[2..] the minutes hashes. ARGV[1] the minutes' TTL, then per key
# in order: its number of fields and as many field/value pairs. One script call: nothing else
# runs between its writes, as in the transaction it replaced, at the cost of one command where
# the transaction sent two per minutes hash (160 ms for a thousand symbols' close, busy box).
_SAVE_LUA = f"""
local ttl = ARGV[1]
local a = 2
local function hset(key)
  local count = tonumber(ARGV[a])
  a = a + 1
  while count > 0 do
    local chunk = math.min(count, {_HSET_CHUNK})
    local args = {{}}
    for j = 1, 2 * chunk do args[j] = ARGV[a + j - 1] end
    redis.call('HSET', key, unpack(args))
    a = a + 2 * chunk
    count = count - chunk
  end
end
hset(KEYS[1])
for k = 2, #KEYS do
  hset(KEYS[k])
  redis.call('EXPIRE', KEYS[k], ttl)
end
return #KEYS
"""
_STATE_DECODER = msgspec.msgpack.Decoder(list[float])


class MinuteSnapshot(msgspec.Struct):
    """One symbol's closed minutes of one New York day, as saved: the states of
    ``accumulator.Day.take_changed`` (all of them when loaded, the changed ones when saved),
    whether the day's auction prints were seen, and the source position read per channel
    when they were saved (a tick at or before it is in the states)."""

    symbol: str
    day: date
    states: list[list[float]]
    positions: dict[str, int]
    opening_seen: bool = False
    closing_seen: bool = False

    def minutes(self) -> set[int]:
        """The starts of the saved minutes."""
        return {int(state[0]) for state in self.states}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RestartGuard:
    """What of a restored symbol's ticks and bars is new to its core after a (re)start.

    ``mark``: the end of the newest minute published before the start; ``snapshot``: the
    closed minutes the core took back, with the source positions read when they were saved;
    ``saved_mark``: the mark saved with them (on the Redis path ``mark`` may be later: bars
    published just before a crash, found in the bars streams, whose minutes were not saved).
    """

    __slots__ = ("mark", "minutes", "positions", "saved_mark", "snapshot")

    def __init__(
        self, mark: int, snapshot: MinuteSnapshot | None, saved_mark: int | None = None
    ) -> None:
        self.mark = mark
        self.snapshot = snapshot is not None
        self.saved_mark = mark if saved_mark is None else min(mark, saved_mark)
        self.minutes = snapshot.minutes() if snapshot is not None else set()
        self.positions = snapshot.positions if snapshot is not None else {}

    def new_trades(self, channel: str, position: int, trades: Sequence[Trade]) -> Sequence[Trade]:
        """The trades of a batch read at ``position`` of ``channel`` that the core lacks:

        - of a restored minute, only when read after the position saved with it (a late
          trade: it revises the bar);
        - of a minute that had no trade when the minutes were saved (not restored, before the
          saved mark), only when read after that position (a late trade, a backfill into a
          gap: it makes the minute's first bar);
        - of any other minute before the mark, none: re-read ticks of minutes published
          before the start whose state was not saved (aggregated again they would make
          partial minutes that the policy may fold into a neighbour's bar);
        - after the mark, all.
        """
        minutes, mark = self.minutes, self.mark
        if not minutes and min(trade.t for trade in trades) >= mark:
            return trades
        fresh = self.snapshot and position > self.positions.get(channel, -1)
        saved_mark = self.saved_mark
        kept = []
        for trade in trades:
            t = trade.t
            if t >= mark and t - t % MINUTE_MS not in minutes:
                kept.append(trade)
            elif fresh and (t < saved_mark or t - t % MINUTE_MS in minutes):
                kept.append(trade)
        return kept

    def published_before(self, bar: Bar) -> bool:
        """``bar`` rebuilds a minute published before the start that the core did not take
        back (not to be sent again)."""
        if bar.endMs > self.mark or bar.startMs in self.minutes:
            return False
        return not (self.snapshot and bar.endMs <= self.saved_mark)


class ClosedMinutes:
    """What was published, per symbol: the end of the newest published minute.

    Kept in a Redis hash (``<prefix>state:bars:<name>:closed``, field = symbol, value =
    ``end`` or ``end:seq`` with the sequence of the symbol's last bar on its Redis channel).
    ``restored`` is the mark loaded at start (or at a Kafka assignment) that the builder
    compares rebuilt bars with; ``by_symbol`` follows every publication.
    """

    def __init__(
        self,
        client: aioredis.Redis | None,
        keys: Keys,
        name: str,
        *,
        retry_s: float = SAVE_RETRY_S,
    ) -> None:
        self.client = client
        self.retry_s = retry_s
        self.keys = keys
        self.key = keys.state(f"bars:{name}:closed")
        self.name = name
        self.by_symbol: dict[str, int] = {}
        self.seqs: dict[str, int] = {}
        self.restored: dict[str, int] = {}
        self.saved: dict[str, int] = {}
        """The marks as the hash held them at the last load (before the streams' recovery):
        saved in the same transaction as the minutes."""
        self._memory: dict[str, dict[str, bytes]] = {}
        """Saved minutes when there is no Redis client (tests, benchmarks)."""
        self._save = None if client is None else CachedScript(client, _SAVE_LUA)

    def _snapshot_key(self, symbol: str, day: date) -> str:
        return self.keys.state(f"bars:{self.name}:minutes:{symbol}:{day.isoformat()}")

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
        self.saved = {symbol: end for symbol, (end, _) in stored.items() if symbol not in kept}
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

    def note_published(self, symbol: str, seq: int) -> None:
        """The sink published a bar of ``symbol`` with channel sequence ``seq``."""
        if seq > self.seqs.get(symbol, 0):
            self.seqs[symbol] = seq

    async def save(self, bars: Sequence[Bar], snapshots: Sequence[MinuteSnapshot] = ()) -> None:
        """Store the marks of the symbols of ``bars``, just published, and the changed minutes
        of ``snapshots``, in one script call (all or nothing), retried while Redis is unreachable
        for up to ``retry_s`` (the call writes the same values again: it can run twice)."""
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
        fields = {
            self._snapshot_key(snapshot.symbol, snapshot.day): self._fields(snapshot)
            for snapshot in snapshots
        }
        save = self._save
        if save is None:  # no Redis client
            for key, mapping in fields.items():
                self._memory.setdefault(key, {}).update(mapping)
            return
        if not changed and not fields:
            return
        args: list[str | int | bytes] = [SNAPSHOT_TTL_S, len(changed)]
        for symbol, mark in changed.items():
            args += (symbol, mark)
        for mapping in fields.values():
            args.append(len(mapping))
            for field, value in mapping.items():
                args += (field, value)
        keys = [self.key, *fields]
        client, sha = save.client, save.sha
        await retry_async(
            lambda: save.run(lambda: client.evalsha(sha, len(keys), *keys, *args)),
            retriable=lambda exc: isinstance(exc, RETRIABLE),
            max_wait_s=self.retry_s,
            what="bars save",
            marks=len(changed),
            minutes=len(fields),
        )

    @staticmethod
    def _fields(snapshot: MinuteSnapshot) -> dict[str, bytes]:
        fields = {str(int(state[0])): _STATE_ENCODER.encode(state) for state in snapshot.states}
        for channel, position in snapshot.positions.items():
            fields[_POSITION + channel] = str(position).encode()
        flags = f"{int(snapshot.opening_seen)}{int(snapshot.closing_seen)}"
        fields[_FLAGS] = flags.encode()
        return fields

    async def load_snapshots(self, symbols: Iterable[str]) -> dict[str, MinuteSnapshot]:
        """The saved minutes of each of ``symbols`` for the day of its restored mark."""
        wanted = [
            (symbol, ny_date(self.restored[symbol] - 1))
            for symbol in symbols
            if self.restored.get(symbol)
        ]
        if not wanted:
            return {}
        keys = [self._snapshot_key(symbol, day) for symbol, day in wanted]
        if self.client is None:
            raws: list[dict[str, bytes]] = [dict(self._memory.get(key, {})) for key in keys]
        else:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                raws = await pipe.execute()
        out: dict[str, MinuteSnapshot] = {}
        for (symbol, day), raw in zip(wanted, raws, strict=True):
            if raw:
                out[symbol] = self._parse(symbol, day, raw)
        return out

    @staticmethod
    def _parse(
        symbol: str, day: date, raw: dict[str, bytes] | dict[bytes, bytes]
    ) -> MinuteSnapshot:
        snapshot = MinuteSnapshot(symbol, day, [], {})
        for field, value in raw.items():
            name = _text(field)
            if name.startswith(_POSITION):
                snapshot.positions[name[len(_POSITION) :]] = int(_text(value))
            elif name == _FLAGS:
                flags = _text(value)
                snapshot.opening_seen = flags[:1] == "1"
                snapshot.closing_seen = flags[1:2] == "1"
            else:
                snapshot.states.append(_STATE_DECODER.decode(value))
        snapshot.states.sort(key=lambda state: state[0])
        return snapshot


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
