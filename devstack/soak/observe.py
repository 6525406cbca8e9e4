"""What a soak reads besides the reconciler: the Redis side as it happens, and the source.

``RedisTally`` follows the Redis streams the soak counts (every symbol's ticks, the dead
letters, the feed gaps) from where it stopped each time it is polled, so a stream trimmed by
its ``MAXLEN`` later in the week is still counted whole (a record trimmed before the tally read
it is counted as such). ``source_trades`` loads a day's trades exactly as the simulator sends
them, and ``lost_trades`` says which of them Kafka lacks and whether each lies inside a feed
gap ingest reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import cast

import msgspec
import redis

from libs.common import names
from libs.common.market.identity import TradeIds
from libs.common.market.sessions import ny_date
from libs.common.names import Keys
from libs.common.schemas import DECODERS, TICK_BATCH_DECODER, DeadLetter, FeedGap, Trade
from services.ingest.simulator import FileFeed, ReplayDay, load_day_trades

DEAD_LETTER_DECODER = DECODERS[DeadLetter]
GAP_DECODER = DECODERS[FeedGap]
Identity = tuple[str, str]
"""A trade's identity within its day: its symbol and ``Trade.identity()``."""
_Entries = list[tuple[bytes, dict[bytes, bytes]]]


def identity(trade: Trade) -> Identity:
    """The trade's identity within its New York day (the contract's ``(x, trfi, i)``)."""
    return (trade.sym, trade.identity())


class StreamTail:
    """One channel's stream, read from where the last read stopped."""

    def __init__(self, client: redis.Redis, keys: Keys, channel: str) -> None:
        self.client = client
        self.key = keys.stream(channel)
        self.channel = channel
        self.cursor = 0
        self.trimmed = 0
        """Records trimmed from the stream before this tail read them."""

    def read(self, batch: int = 5_000) -> list[tuple[int, bytes]]:
        """Every record after the cursor, oldest first."""
        out: list[tuple[int, bytes]] = []
        while True:
            entries = cast(
                _Entries,
                self.client.xrange(self.key, min=f"(0-{self.cursor}", max="+", count=batch),
            )
            if not entries:
                return out
            for entry_id, fields in entries:
                seq = int(entry_id.split(b"-")[1])
                if seq > self.cursor + 1:
                    self.trimmed += seq - self.cursor - 1
                self.cursor = seq
                out.append((seq, fields[b"d"]))
            if len(entries) < batch:
                return out


@dataclass
class DayTally:
    """What Redis held of one New York day, as the tally read it."""

    trades: int = 0
    """Unique trades (by identity) in the tick streams."""
    per_symbol: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    """Dead letters written while the day was replayed (by the soak's clock)."""


class RedisTally:
    """Follows the tick streams of ``symbols``, the dead letters and the feed gaps."""

    def __init__(self, url: str, symbols: Sequence[str], keys: Keys | None = None) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=2)
        keys = keys or Keys()
        self.ticks = {
            symbol: StreamTail(self.client, keys, names.channel(names.TICKS, symbol))
            for symbol in symbols
        }
        self.dead_letter_tail = StreamTail(self.client, keys, names.DEAD_LETTERS)
        self.gap_tail = StreamTail(self.client, keys, names.FEED_GAPS)
        self.ids = TradeIds(keep_days=3)
        self.days: dict[date, DayTally] = {}
        self.dead_letters: list[DeadLetter] = []
        self.gaps: dict[str, FeedGap] = {}
        """The latest record of each gap, by id."""
        self.errors = 0

    def day(self, day: date) -> DayTally:
        """The tally of ``day`` (empty until trades of it were read)."""
        return self.days.setdefault(day, DayTally())

    def poll(self) -> bool:
        """Read what is new; False when Redis did not answer (a restart: try again later)."""
        try:
            for symbol, tail in self.ticks.items():
                for _, payload in tail.read():
                    self._count(symbol, payload)
            for _, payload in self.dead_letter_tail.read():
                try:
                    self.dead_letters.append(DEAD_LETTER_DECODER.decode(payload))
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
            for _, payload in self.gap_tail.read():
                try:
                    gap = GAP_DECODER.decode(payload)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                self.gaps[gap.gapId] = gap
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            self.errors += 1
            return False
        return True

    def _count(self, symbol: str, payload: bytes) -> None:
        try:
            batch = TICK_BATCH_DECODER.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        before = self.ids.duplicates
        fresh = self.ids.fresh(batch.sym, batch.ticks)
        duplicates = self.ids.duplicates - before
        for trade in fresh:
            tally = self.day(ny_date(trade.t))
            tally.trades += 1
            tally.per_symbol[symbol] = tally.per_symbol.get(symbol, 0) + 1
        if duplicates:
            self.day(ny_date(batch.ticks[0].t)).duplicates += duplicates

    @property
    def trimmed(self) -> int:
        """Tick records trimmed before the tally read them (0: every record was counted)."""
        return sum(tail.trimmed for tail in self.ticks.values())

    def letters_between(self, start_ms: int, end_ms: int) -> list[DeadLetter]:
        """Dead letters written in ``[start_ms, end_ms)`` (wall time)."""
        return [letter for letter in self.dead_letters if start_ms <= letter.tsMs < end_ms]

    def gaps_opened_between(self, start_ms: int, end_ms: int) -> list[FeedGap]:
        """Feed gaps opened in ``[start_ms, end_ms)`` (wall time), oldest first."""
        found = [gap for gap in self.gaps.values() if start_ms <= gap.openedAtMs < end_ms]
        return sorted(found, key=lambda gap: gap.openedAtMs)

    def close(self) -> None:
        """Close the connection."""
        self.client.close()


def source_trades(data_dir: Path, symbols: Sequence[str], day: ReplayDay) -> list[Trade]:
    """The trades the simulator sends for ``day``, read and shifted as it does."""
    feed = FileFeed(data_dir, day.source, tuple(symbols), 0.0, days=(day,))
    return list(load_day_trades(feed, day))


def in_gap(trade: Trade, gaps: Iterable[FeedGap]) -> FeedGap | None:
    """The reported gap of ``trade``'s symbol whose time span holds ``trade.t`` (ends
    included; a gap still open reaches to the end of time)."""
    for gap in gaps:
        if "*" not in gap.symbols and trade.sym not in gap.symbols:
            continue
        if gap.status == "backfilled":
            continue
        end = gap.endMs or 2**62
        if gap.startMs <= trade.t <= end:
            return gap
    return None


@dataclass
class Losses:
    """The source's trades of a day that Kafka lacks, and what the Kafka path has extra."""

    missing: int = 0
    in_gap: int = 0
    outside_gap: list[Trade] = field(default_factory=list)
    extra: int = 0
    """Unique trades in Kafka the source files lack (the good trades of malformed rounds)."""
    by_gap: dict[str, int] = field(default_factory=dict)


def lost_trades(source: Sequence[Trade], kafka: Iterable[Trade], gaps: Sequence[FeedGap]) -> Losses:
    """Which source trades Kafka lacks, each placed inside a reported gap or not."""
    held = {identity(trade) for trade in kafka}
    losses = Losses()
    expected = set()
    for trade in source:
        key = identity(trade)
        expected.add(key)
        if key in held:
            continue
        losses.missing += 1
        gap = in_gap(trade, gaps)
        if gap is None:
            losses.outside_gap.append(trade)
        else:
            losses.in_gap += 1
            losses.by_gap[gap.gapId] = losses.by_gap.get(gap.gapId, 0) + 1
    losses.extra = len(held - expected)
    return losses
