"""The dashboard's reader of the mesh: Redis channels in, the ``View`` kept current, events out
to the ``Hub``.

At each start it opens a ``SequencedConsumer`` positioned at the newest record of every
channel (it never commits: the dashboard is a viewer and leaves no positions behind), then
reads the history up to those positions — the day's symbols from the bar store, the newest
trades, positions, portfolio points, heartbeats and progress mark from the channels' streams —
and only then follows the channels live, gap-free. Each start builds a fresh view and asks
every browser to take a fresh snapshot.

The consumer pauses its pub/sub reading and catches up from the streams when it falls
behind, and the hub never waits for a browser: a slow dashboard costs the mesh nothing but
the reads it makes.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from datetime import date
from typing import Any

import msgspec
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter

from libs.common import names
from libs.common.io.barstore import BarStore
from libs.common.io.redis_io import StreamReader
from libs.common.io.reliable import Record, SequencedConsumer
from libs.common.market.sessions import ny_date
from libs.common.names import PARITY_DAYS, Keys
from libs.common.runtime.clock import SYSTEM_CLOCK, Clock
from libs.common.runtime.lifecycle import Component
from libs.common.schemas import (
    BAR_DECODER,
    Bar,
    DaySummary,
    ExecutedTrade,
    Heartbeat,
    Portfolio,
    Position,
    Progress,
)
from services.dashboard.config import DashboardSettings
from services.dashboard.hub import Hub
from services.dashboard.view import Event, View

_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {
    kind: msgspec.json.Decoder(kind)
    for kind in (ExecutedTrade, Position, Portfolio, Heartbeat, Progress)
}
PROGRESS_DECODER = msgspec.json.Decoder(Progress)
PORTFOLIO_DECODER = msgspec.json.Decoder(Portfolio)
SUMMARY_DECODER = msgspec.json.Decoder(DaySummary)
SUMMARY_EVERY = 5
"""The day's parity summary is read every this many health refreshes."""


class DashboardFeed(Component):
    """Follows the mesh on Redis and keeps the view and the browsers current."""

    def __init__(
        self,
        settings: DashboardSettings,
        client: aioredis.Redis,
        hub: Hub,
        *,
        consumer_name: str,
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__("dashboard.feed", registry=registry)
        self.settings = settings
        self.client = client
        self.hub = hub
        self.consumer_name = consumer_name
        self.registry = registry
        self.clock = clock
        self.keys = Keys(settings.key_prefix)
        self.store = BarStore(client, self.keys)
        self.reader = StreamReader(client, self.keys)
        self.view = self._new_view()
        self.consumer: SequencedConsumer | None = None
        self.ready = False
        self._refreshes = 0
        self.undecodable = Counter(
            "tickmesh_dashboard_undecodable_records",
            "Records the dashboard could not decode (skipped; their producer's consumers "
            "dead-letter them)",
            ["kind"],
            registry=registry,
        )
        self._handlers: list[tuple[str, Callable[[bytes], list[Event]]]] = [
            (settings.bars_pattern, self._on_bar),
            (settings.trades_channel, self._decoded(ExecutedTrade, self.view_call("on_trade"))),
            (settings.positions_channel, self._decoded(Position, self.view_call("on_position"))),
            (settings.portfolio_channel, self._decoded(Portfolio, self.view_call("on_portfolio"))),
            (names.HEARTBEAT, self._decoded(Heartbeat, self.view_call("on_heartbeat"))),
            (names.PROGRESS, self._decoded(Progress, self.view_call("on_progress"))),
        ]
        self._by_channel: dict[str, Callable[[bytes], list[Event]] | None] = {}
        self.spawn(self._follow, name="dashboard.feed.follow")
        self.every(settings.health_interval_ms / 1000, self.refresh, name="dashboard.feed.health")

    def _new_view(self) -> View:
        return View(recent_bars=self.settings.recent_bars, trades_kept=self.settings.trades_kept)

    def view_call(self, method: str) -> Callable[[Any], list[Event]]:
        """``self.view.<method>`` of the current view (a restart replaces the view)."""

        def call(record: Any) -> list[Event]:
            return getattr(self.view, method)(record) or []

        return call

    def _decoded(
        self, kind: type[Any], apply: Callable[[Any], list[Event]]
    ) -> Callable[[bytes], list[Event]]:
        decoder = _DECODERS[kind]

        def handle(payload: bytes) -> list[Event]:
            try:
                record = decoder.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._undecodable(kind.__name__, exc)
                return []
            return apply(record)

        return handle

    def _on_bar(self, payload: bytes) -> list[Event]:
        try:
            bar = BAR_DECODER.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._undecodable("Bar", exc)
            return []
        return self.view.on_bar(bar)

    def _undecodable(self, kind: str, exc: Exception) -> None:
        self.undecodable.labels(kind).inc()
        self.log.warning("dashboard.undecodable", kind=kind, error=str(exc))

    def _handler(self, channel: str) -> Callable[[bytes], list[Event]] | None:
        handler = self._by_channel.get(channel, ...)
        if handler is ...:
            handler = next(
                (
                    apply
                    for pattern, apply in self._handlers
                    if fnmatch.fnmatchcase(channel, pattern)
                ),
                None,
            )
            self._by_channel[channel] = handler
        return handler

    # -- lifecycle ---------------------------------------------------------------------------

    async def on_start(self) -> None:
        self.ready = False
        self.view = self._new_view()
        consumer = SequencedConsumer(
            self.client,
            self.consumer_name,
            [pattern for pattern, _ in self._handlers],
            keys=self.keys,
            start="latest",
            registry=self.registry,
        )
        self.consumer = consumer
        await consumer.open()
        await self.load_history(consumer.positions)
        self.hub.resync_all()
        self.ready = True
        self.log.info(
            "dashboard.history_loaded",
            day=self.view.day.isoformat() if self.view.day else None,
            symbols=len(self.view.last),
            trades=len(self.view.trades),
            positions=len(self.view.positions),
        )

    async def on_stop(self) -> None:
        self.ready = False
        if self.consumer is not None:
            await self.consumer.close()
            self.consumer = None

    async def _follow(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        async for batch in consumer.batches():
            self.apply(batch)

    def apply(self, batch: list[Record]) -> None:
        """Apply records to the view and publish what they mean to the browsers."""
        day = self.view.day
        events: list[Event] = []
        for record in batch:
            handler = self._handler(record.channel)
            if handler is not None:
                events.extend(handler(record.payload))
        if self.view.day != day:
            self.view.on_summary(None)
            self.hub.resync_all()
        self.hub.publish(events)

    # -- history -----------------------------------------------------------------------------

    async def newest_store_day(self) -> date | None:
        """The newest day the bar store holds bars of."""
        pattern = f"{self.keys.prefix}barstore:{{*}}:*"
        newest: date | None = None
        async for key in self.client.scan_iter(match=pattern, count=1000):
            text = key.decode() if isinstance(key, bytes) else key
            try:
                day = date.fromisoformat(text.rsplit(":", 1)[1])
            except ValueError:
                continue
            if newest is None or day > newest:
                newest = day
        return newest

    async def _tail(self, channel: str, count: int, positions: dict[str, int]) -> list[bytes]:
        upto = positions.get(channel)
        if upto is None:
            return []
        return [payload for _, payload in await self.reader.tail(channel, count, upto)]

    async def load_history(self, positions: dict[str, int]) -> None:
        """Fill the view from the bar store and the channels' streams, up to ``positions``
        (where the live consumer starts)."""
        settings = self.settings
        view = self.view
        count = settings.history_records
        progress = await self._tail(names.PROGRESS, 1, positions)
        portfolio = await self._tail(settings.portfolio_channel, count, positions)
        candidates = [await self.newest_store_day()]
        for payload in progress:
            mark = PROGRESS_DECODER.decode(payload)
            if mark.feedTimeMs and not mark.live:
                candidates.append(ny_date(mark.feedTimeMs))
        if portfolio:
            newest = PORTFOLIO_DECODER.decode(portfolio[-1])
            candidates.append(date.fromisoformat(newest.tsET[:10]))
        days = [day for day in candidates if day is not None]
        if days:
            view.roll(max(days))
        if view.day is not None:
            await self.load_lines(view.day)
        apply = {
            settings.trades_channel: self._handler(settings.trades_channel),
            settings.positions_channel: self._handler(settings.positions_channel),
            names.HEARTBEAT: self._handler(names.HEARTBEAT),
        }
        for channel, handler in apply.items():
            assert handler is not None
            for payload in await self._tail(channel, count, positions):
                handler(payload)
        portfolio_handler = self._handler(settings.portfolio_channel)
        assert portfolio_handler is not None
        for payload in portfolio:
            portfolio_handler(payload)
        for payload in progress:
            view.on_progress(PROGRESS_DECODER.decode(payload))
        await self.read_summary()

    async def load_lines(self, day: date) -> None:
        """The symbol list of ``day`` from the bar store: each symbol's first and newest bar."""
        symbols = await self.store.symbols(day)
        async with self.client.pipeline(transaction=False) as pipe:
            for symbol in symbols:
                pipe.hkeys(self.store.key(symbol, day))
            minutes = await pipe.execute()
        async with self.client.pipeline(transaction=False) as pipe:
            for symbol, fields in zip(symbols, minutes, strict=True):
                starts = sorted(int(field) for field in fields)
                pipe.hmget(self.store.key(symbol, day), [starts[0], starts[-1]] if starts else [0])
            ends = await pipe.execute()
        for values in ends:
            found = [BAR_DECODER.decode(value) for value in values if value is not None]
            if found:
                self.view.seed_line(found[0], found[-1])

    async def read_summary(self) -> None:
        """The current day's parity summary and gate, when the reconciler has written one."""
        day = self.view.day
        raw = (
            await self.client.hget(self.keys.state(PARITY_DAYS), day.isoformat())
            if day is not None
            else None
        )
        summary = None
        if raw is not None:
            try:
                summary = SUMMARY_DECODER.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._undecodable("DaySummary", exc)
        self.view.on_summary(summary)

    async def chart_bars(self, symbol: str) -> list[Bar]:
        """The current day's bars of ``symbol``: the bar store's and the newest kept here."""
        day = self.view.day
        stored = await self.store.day(symbol, day) if day is not None else {}
        return self.view.chart_bars(symbol, stored)

    # -- the health strip --------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The health strip now, with the dashboard's own figures."""
        health = self.view.health(self.clock.now_ms(), self.settings.stale_after_ms)
        consumer = self.consumer
        health["dashboard"] = {
            "clients": len(self.hub.outboxes),
            "behindRecords": consumer.behind_records if consumer is not None else None,
            "backlogMax": self.hub.backlog(),
        }
        return health

    async def refresh(self) -> None:
        """Publish the health strip; read the parity summary every few refreshes."""
        if self._refreshes % SUMMARY_EVERY == 0:
            await self.read_summary()
        self._refreshes += 1
        self.hub.publish([Event("health", self.health(), ("health",))])
