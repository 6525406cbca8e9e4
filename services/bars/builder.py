"""The bar builder actor: ticks in, closed bars out, positions committed only when safe.

One ``BarBuilder`` owns one aggregation core (``libs.common.bars.BarAggregator``) and handles
two kinds of message from its mailbox, so all aggregation is sequential:

- ``TickWork``: decoded tick batches from a source (Redis or Kafka), with their positions;
- ``WatermarkTick``: sent by its own timer, so quiet symbols' bars close with wall time.

A source position is committed only once every tick of the batch at that position is inside
a published bar, so a crash re-reads exactly the ticks of the minutes still open. Bars that
were published before a crash are not published again: the last closed minute per symbol is
kept durably next to the positions.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

import redis.asyncio as aioredis
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from libs.common.actors import Actor, Overflow
from libs.common.bars import BarAggregator
from libs.common.clock import SYSTEM_CLOCK, Clock
from libs.common.redis_io import Keys
from libs.common.schemas import Bar, TickBatch

log = structlog.get_logger("tickmesh.bars")


def shard_of(symbol: str, shard_count: int) -> int:
    """The shard that owns ``symbol`` (stable across processes and restarts)."""
    return zlib.crc32(symbol.encode()) % shard_count


class TickWork(NamedTuple):
    """Tick batches from a source, each with the source position it came from."""

    items: Sequence[tuple[str, int, TickBatch]]
    """(channel, position, batch) in per-channel order."""


class WatermarkTick(NamedTuple):
    """Time passed: close what the wall-clock watermark allows."""


BarSink = Callable[[list[Bar]], Awaitable[None]]
Committer = Callable[[dict[str, int]], Awaitable[None]]


class ClosedMinutes:
    """The end of the last published minute per symbol, kept durably in a Redis hash."""

    def __init__(self, client: aioredis.Redis | None, keys: Keys, name: str) -> None:
        self.client = client
        self.key = keys.state(f"bars:{name}:closed")
        self.by_symbol: dict[str, int] = {}

    async def load(self) -> None:
        """Read the stored ends."""
        if self.client is not None:
            raw = await self.client.hgetall(self.key)
            self.by_symbol = {symbol.decode(): int(end) for symbol, end in raw.items()}

    async def save(self, changed: dict[str, int]) -> None:
        """Store new ends."""
        self.by_symbol.update(changed)
        if self.client is not None and changed:
            await self.client.hset(self.key, mapping=changed)  # type: ignore[arg-type]


class BuilderMetrics:
    """Metrics of the bar builder."""

    def __init__(self, registry: CollectorRegistry | None, source: str) -> None:
        kwargs = {"registry": registry} if registry is not None else {}
        self.ticks = Counter("tickmesh_bars_ticks", "Ticks aggregated", ["source"], **kwargs)
        self.bars = Counter("tickmesh_bars_published", "Bars published (revision 0)",
                            ["source"], **kwargs)
        self.revisions = Counter("tickmesh_bars_revisions", "Corrections published",
                                 ["source"], **kwargs)
        self.republish_skipped = Counter(
            "tickmesh_bars_republish_skipped", "Bars rebuilt after a restart and not sent again",
            ["source"], **kwargs)
        self.lag = Gauge("tickmesh_bars_watermark_lag_ms",
                         "Wall time minus the event-time watermark", ["source"], **kwargs)
        self.source = source


class BarBuilder(Actor[TickWork | WatermarkTick]):
    """Aggregates ticks into bars, publishes them through a sink, commits safe positions."""

    def __init__(
        self,
        name: str,
        aggregator: BarAggregator,
        sink: BarSink,
        committer: Committer,
        closed: ClosedMinutes,
        *,
        tick_interval_ms: int = 250,
        clock: Clock = SYSTEM_CLOCK,
        registry: CollectorRegistry | None = None,
        mailbox_size: int = 256,
        source: str = "redis",
    ) -> None:
        super().__init__(name, mailbox_size=mailbox_size, overflow=Overflow.BLOCK,
                         registry=registry)
        self.aggregator = aggregator
        self.sink = sink
        self.committer = committer
        self.closed = closed
        self.clock = clock
        self.metrics = BuilderMetrics(registry, source)
        self._source = source
        # per channel: (position, newest tick time of the batch, its symbol), oldest first
        self._pending: dict[str, deque[tuple[int, int, str]]] = {}
        self.lag_ms = 0
        """Wall time minus the event-time watermark at the last message (for heartbeats)."""
        self.every(tick_interval_ms / 1000.0, self._tick, name=f"{name}.watermark")

    async def on_start(self) -> None:
        await self.closed.load()

    async def _tick(self) -> None:
        self.tell_nowait(WatermarkTick())

    async def handle(self, message: TickWork | WatermarkTick) -> None:
        now = self.clock.now_ms()
        if isinstance(message, WatermarkTick):
            bars = self.aggregator.advance(now)
        else:
            bars = []
            ticks = 0
            for channel, position, batch in message.items:
                if batch.ticks:
                    bars.extend(self.aggregator.add(batch.ticks, now, symbol=batch.sym))
                    ticks += len(batch.ticks)
                    newest = max(tick.t for tick in batch.ticks)
                else:
                    newest = 0
                self._pending.setdefault(channel, deque()).append((position, newest, batch.sym))
            self.metrics.ticks.labels(self._source).inc(ticks)
        await self._publish(bars)
        await self._commit_safe()
        watermark = self.aggregator.watermark_ms
        if watermark:
            self.lag_ms = max(0, now - watermark)
            self.metrics.lag.labels(self._source).set(self.lag_ms)

    async def _publish(self, bars: list[Bar]) -> None:
        if not bars:
            return
        fresh: list[Bar] = []
        ends: dict[str, int] = {}
        for bar in bars:
            if bar.revision == 0 and bar.endMs <= self.closed.by_symbol.get(bar.symbol, 0):
                self.metrics.republish_skipped.labels(self._source).inc()
                continue
            fresh.append(bar)
            if bar.endMs > ends.get(bar.symbol, self.closed.by_symbol.get(bar.symbol, 0)):
                ends[bar.symbol] = bar.endMs
        if fresh:
            await self.sink(fresh)
            revised = sum(1 for bar in fresh if bar.revision)
            self.metrics.bars.labels(self._source).inc(len(fresh) - revised)
            self.metrics.revisions.labels(self._source).inc(revised)
        await self.closed.save(ends)

    async def _commit_safe(self) -> None:
        """Commit each channel up to the last batch whose ticks all sit in closed minutes."""
        safe: dict[str, int] = {}
        open_since = self.aggregator.open_since
        for channel, pending in self._pending.items():
            while pending:
                _position, newest, symbol = pending[0]
                earliest_open = open_since(symbol)
                if earliest_open is not None and newest >= earliest_open:
                    break
                safe[channel] = pending.popleft()[0]
        if safe:
            await self.committer(safe)

    async def on_stop(self) -> None:
        log.info("bars.builder_stopped", open_symbols=len(self._pending))
