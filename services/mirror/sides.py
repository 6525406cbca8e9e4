"""Reading what the reconciler compares: the Redis bars (bar store), the Kafka bars (the
shadow builder's topics) and the vendor's minute aggregates (Redis streams), for one day."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import TypeVar

import msgspec
import redis.asyncio as aioredis
from aiokafka import TopicPartition

from libs.common import names
from libs.common.io.barstore import BarStore
from libs.common.io.kafka_io import list_topics, read_from_beginning
from libs.common.io.redis_io import StreamReader
from libs.common.market.listings import Listings
from libs.common.market.policies import get_policy
from libs.common.market.sessions import ny_date
from libs.common.names import Keys
from libs.common.schemas import (
    BAR_DECODER,
    DECODERS,
    TICK_BATCH_DECODER,
    AggregateBatch,
    Bar,
    DeadLetter,
    FeedGap,
    Ledger,
    StructT,
    VendorAggregate,
)
from services.mirror.completeness import Counts, TickTally, add_ledger_counts
from services.mirror.config import MirrorSettings

AGGREGATE_DECODER = DECODERS[AggregateBatch]
LEDGER_DECODER = DECODERS[Ledger]


DayT = TypeVar("DayT")


def _keep_day(cache: dict[date, DayT], day: date, value: DayT) -> None:
    """``cache[day] = value``, keeping the two newest days (a report's and the rollover's)."""
    cache[day] = value
    for old in sorted(cache)[:-2]:
        del cache[old]


@dataclass
class DaySides:
    """Everything one day's report compares, read once."""

    day: date
    symbols: list[str]
    redis: dict[str, dict[int, Bar]] = field(default_factory=dict)
    """Per symbol: the bar store's bar of each minute (its newest revision)."""
    kafka: dict[str, list[Bar]] = field(default_factory=dict)
    vendor: dict[str, dict[int, VendorAggregate]] = field(default_factory=dict)
    """Per symbol whose feed has the vendor's aggregates."""
    vendor_checked: bool = False
    kafka_records: int = 0
    kafka_undecodable: int = 0
    ledger: dict[str, Counts] = field(default_factory=dict)
    """The source's trades and volume per symbol and minute (``sentio.ledger.v1``)."""
    ticks: TickTally | None = None
    """The unique trades the Kafka tick topics hold (None: not read)."""
    gaps: list[FeedGap] = field(default_factory=list)
    dead_letters: int = 0
    """Dead letters of the day (counted apart from what was delivered)."""

    @property
    def redis_count(self) -> int:
        """Redis bars of the day."""
        return sum(len(bars) for bars in self.redis.values())

    @property
    def kafka_count(self) -> int:
        """Kafka bars of the day (every copy)."""
        return sum(len(bars) for bars in self.kafka.values())


class SideReader:
    """Reads the sides of a day."""

    def __init__(
        self,
        settings: MirrorSettings,
        client: aioredis.Redis,
        *,
        listings: Listings | None = None,
        keep_trades: bool = False,
        read_share: float = 1.0,
    ) -> None:
        self.settings = settings
        self.client = client
        self.policy = get_policy(settings.bars_policy, listings=listings)
        """The bars' policy, to rebuild the source's bars from the Kafka ticks."""
        self.keep_trades = keep_trades
        """Keep the Kafka ticks themselves in ``DaySides.ticks`` (not only their tallies)."""
        self._pause = 1 / read_share - 1
        """After each chunk read, wait this many times as long as its work took (so that
        reading takes at most ``read_share`` of the event loop)."""
        self.busy_s = 0.0
        """Time spent on the chunks read (decoding, counting), since this reader was made."""
        self.rested_s = 0.0
        """Time waited after them (``read_share``)."""
        self._ledgers: dict[date, tuple[dict[str, Counts], int]] = {}
        """Per day (the last two): the ledger's counts so far and the stream's last record read."""
        self._tallies: dict[date, tuple[TickTally, dict[TopicPartition, int]]] = {}
        """Per day (the last two): the Kafka ticks tallied so far, and where each partition's
        read stopped, so that the next report of the day reads only what came since."""
        self.keys = Keys(settings.key_prefix)
        self.store = BarStore(client, self.keys)

    async def collect(
        self, day: date, symbols: list[str] | None, *, vendor: bool, source: bool = True
    ) -> DaySides:
        """Every side of ``day`` for ``symbols`` (None: every symbol the feed gave that day or
        with bars on a side). ``source``: also the ledger, the Kafka ticks, gaps and dead
        letters (completeness against the source)."""
        ledger = await self.ledger(day, resume=not symbols) if source else {}
        if symbols:
            wanted = sorted(set(symbols))
            kafka, read, bad = await self.kafka_bars(wanted, day)
        else:
            kafka, read, bad = await self.kafka_bars(None, day)
            wanted = sorted(set(await self.store.symbols(day)) | set(kafka) | set(ledger))
        sides = DaySides(day, wanted, kafka=kafka, kafka_records=read, kafka_undecodable=bad)
        sides.vendor_checked = vendor
        if source:
            sides.ledger = {symbol: ledger.get(symbol, {}) for symbol in wanted}
            sides.ticks = await self.kafka_ticks(wanted, day, resume=not symbols)
            sides.gaps = await self.records(names.FEED_GAPS, FeedGap)
            sides.dead_letters = await self.dead_letters(day)
        for symbol in wanted:
            sides.redis[symbol] = await self.store.day(symbol, day)
            if vendor:
                aggregates = await self.vendor_bars(symbol, day)
                if aggregates is not None:
                    sides.vendor[symbol] = aggregates
        return sides

    def _bars_topic(self, symbol: str) -> str:
        return names.channel(self.settings.bars_topic(), symbol)

    async def kafka_symbols(self) -> set[str]:
        """Symbols that have a Kafka bars topic (per-symbol topics only)."""
        template = self.settings.bars_topic()
        if "{symbol}" not in template:
            return set()
        prefix, _, suffix = template.partition("{symbol}")
        return {
            topic[len(prefix) : len(topic) - len(suffix)]
            for topic in await list_topics(self.settings)
            if topic.startswith(prefix)
            and topic.endswith(suffix)
            and len(topic) > len(prefix) + len(suffix)
        }

    async def kafka_bars(
        self, symbols: Iterable[str] | None, day: date
    ) -> tuple[dict[str, list[Bar]], int, int]:
        """Kafka bars of ``day`` by symbol (every copy), records read, undecodable records.

        ``symbols`` None: every symbol found (the single-topic layout reads all records).
        """
        wanted = None if symbols is None else set(symbols)
        template = self.settings.bars_topic()
        if "{symbol}" in template:
            names = wanted if wanted is not None else await self.kafka_symbols()
            topics = sorted(self._bars_topic(symbol) for symbol in names)
        else:
            topics = [template]
        found: dict[str, list[Bar]] = {}
        read = bad = 0
        async for records in read_from_beginning(
            self.settings, topics, idle_ms=self.settings.kafka_idle_ms
        ):
            for record in records:
                read += 1
                try:
                    bar = BAR_DECODER.decode(record.value)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    bad += 1
                    continue
                if (wanted is None or bar.symbol in wanted) and ny_date(bar.startMs) == day:
                    found.setdefault(bar.symbol, []).append(bar)
        return found, read, bad

    async def vendor_bars(self, symbol: str, day: date) -> dict[int, VendorAggregate] | None:
        """The vendor's minute aggregates of ``symbol`` on ``day`` by start (None: no stream)."""
        template = self.settings.vendor_channel
        if not template:
            return None
        channel = template.replace("{symbol}", symbol)
        reader = StreamReader(self.client, self.keys)
        if not await self.client.exists(self.keys.stream(channel)):
            return None
        found: dict[int, VendorAggregate] = {}
        cursor = 0
        while True:
            entries = await reader.read(channel, cursor, 1_000)
            if not entries:
                break
            cursor = entries[-1][0]
            for _, payload in entries:
                try:
                    batch = AGGREGATE_DECODER.decode(payload)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                for aggregate in batch.aggs:
                    if aggregate.s and ny_date(aggregate.s) == day:
                        found[aggregate.s] = aggregate
        return found

    async def records(self, channel: str, record_type: type[StructT]) -> list[StructT]:
        """Every decodable record of ``channel``'s Redis stream, oldest first."""
        reader = StreamReader(self.client, self.keys)
        decoder = DECODERS[record_type]
        out: list[StructT] = []
        cursor = 0
        while True:
            entries = await reader.read(channel, cursor, 5_000)
            if not entries:
                return out
            cursor = entries[-1][0]
            for _, payload in entries:
                try:
                    out.append(decoder.decode(payload))
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue

    async def _rest(self, since: float) -> None:
        """After a chunk's work (begun at ``since``): give the event loop back, for as long as
        ``read_share`` asks."""
        busy = time.perf_counter() - since
        self.busy_s += busy
        self.rested_s += busy * self._pause
        await asyncio.sleep(busy * self._pause)

    async def ledger(self, day: date, *, resume: bool = False) -> dict[str, Counts]:
        """The source ledger of ``day`` per symbol and minute, counted as the stream is read
        (its records are not kept). ``resume``: carry on from this day's previous read (its
        counts, and the stream's records that came since)."""
        counts, cursor = self._ledgers.get(day, ({}, 0)) if resume else ({}, 0)
        if resume:
            _keep_day(self._ledgers, day, (counts, cursor))
        reader = StreamReader(self.client, self.keys)
        while True:
            entries = await reader.read(names.LEDGER, cursor, 5_000)
            if not entries:
                break
            busy = time.perf_counter()
            cursor = entries[-1][0]
            ledgers = []
            for _, payload in entries:
                try:
                    ledgers.append(LEDGER_DECODER.decode(payload))
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
            add_ledger_counts(counts, ledgers, day.toordinal())
            if resume:  # with the counts, chunk by chunk: a read cut short counts nothing twice
                self._ledgers[day] = (counts, cursor)
            await self._rest(busy)
        return counts

    async def dead_letters(self, day: date) -> int:
        """Dead letters written on ``day`` (New York time)."""
        letters = await self.records(names.DEAD_LETTERS, DeadLetter)
        return sum(1 for letter in letters if ny_date(letter.tsMs) == day)

    async def kafka_ticks(
        self, symbols: Iterable[str], day: date, *, resume: bool = False
    ) -> TickTally:
        """The unique trades of ``day`` the Kafka tick topics of ``symbols`` hold (their
        ``ticks.<SYM>`` topics, or their records in the one tick topic of ``TOPIC_MODE=single``).

        ``resume`` (a report of every symbol): carry on from this day's previous read, reading
        only the records that came since, so that a report every minute does not read the day
        again each time; the one tick topic is then tallied for every symbol in it."""
        wanted = set(symbols)
        single = self.settings.topic_mode == "single"
        if single:
            topics = [names.TICKS_SINGLE_TOPIC]
        else:
            topics = sorted(names.channel(names.TICKS, symbol) for symbol in wanted)
        cached = self._tallies.get(day) if resume else None
        if cached is None:
            cached = (TickTally(day.toordinal(), self.policy, keep_trades=self.keep_trades), {})
            if resume:
                _keep_day(self._tallies, day, cached)
        tally, positions = cached
        # in chunks of 2,000 records (decoded, counted and aggregated between two reads), so
        # that whatever shares the event loop (the forwarder, with MIRROR_ROLE=all) is not
        # held up for long
        async for records in read_from_beginning(
            self.settings,
            topics,
            idle_ms=self.settings.kafka_idle_ms,
            max_records=2_000,
            starts=positions,
        ):
            busy = time.perf_counter()
            for record in records:
                try:
                    batch = TICK_BATCH_DECODER.decode(record.value)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                if resume or not single or batch.sym in wanted:
                    tally.add(batch)
            last = records[-1]  # one partition's
            positions[TopicPartition(last.topic, last.partition)] = last.offset + 1
            # records the consumer already holds come without a pause: give the rest of the
            # event loop its turn, and the report no more than its share
            await self._rest(busy)
        return tally

    async def latest_day(self) -> date | None:
        """The newest day that has bars in the bar store (for a default date)."""
        pattern = f"{self.keys.prefix}barstore:{{*}}:*"
        newest: date | None = None
        async for key in self.client.scan_iter(match=pattern, count=1000):
            try:
                found = date.fromisoformat(key.decode().rsplit(":", 1)[1])
            except ValueError:
                continue
            newest = found if newest is None or found > newest else newest
        return newest
