"""A file feed of several days over the same connections: one day after the other, each under
its own as-of date, with a quiet pause between them (and, on request, a hold until released).

A disconnect is a feed gap, so a week replayed as one feed serves every day on the same
socket: after a day's last frame the socket goes quiet for ``day_pause_s`` (ingest's idle mark
closes the day's last minutes, as the night does), then the next day starts. The replay says
which day it sends and which are done (``status``), and paces every day with one ``Pace`` (so
a burst asked for during a day applies to it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import structlog

from services.ingest.protocol import Event, MinuteAggEvent, TradeEvent
from services.ingest.simulator.feeds import (
    Pace,
    file_frames,
    find_tick_file,
    load_day_trades,
    load_vendor_minutes,
)
from services.ingest.simulator.settings import FileFeed, ReplayDay

log = structlog.get_logger("ingest.simulator")


class DayReplay:
    """The days of ``feed`` (``FileFeed.replay_days``), replayed in order as one feed.

    ``load`` reads the first day and checks that every day's files exist (a missing file fails
    at start, not days later); ``frames`` yields the frames of every day, reading each day
    while the previous pause runs. ``release`` lets the next day start when the feed holds
    between days.
    """

    def __init__(
        self,
        feed: FileFeed,
        *,
        frame_max_events: int,
        window_ms: int,
        minute_aggregates: bool = True,
        pace: Pace | None = None,
    ) -> None:
        self.feed = feed
        self.days = feed.replay_days
        self.frame_max_events = frame_max_events
        self.window_ms = window_ms
        self.minute_aggregates = minute_aggregates
        self.pace = pace or Pace(feed.speed)
        self.current: ReplayDay | None = None
        """The day being sent (None before the first and after the last)."""
        self.done: list[ReplayDay] = []
        self.trades_sent: dict[str, int] = {}
        """Trades loaded per as-of day (each day is sent whole)."""
        self.holding = False
        self._releases = 0
        self._released = asyncio.Event()
        self._loaded: tuple[list[TradeEvent], list[MinuteAggEvent] | None] | None = None

    def _load(self, day: ReplayDay) -> tuple[list[TradeEvent], list[MinuteAggEvent] | None]:
        trades = load_day_trades(self.feed, day)
        minutes = load_vendor_minutes(self.feed, day) if self.minute_aggregates else None
        log.info(
            "simulator.file_feed_loaded",
            trades=len(trades),
            day=day.as_of.isoformat(),
            source_day=day.source.isoformat(),
            symbols=",".join(self.feed.symbols),
        )
        return trades, minutes

    async def load(self) -> int:
        """Check every day's files and read the first day; returns its trades."""
        for day in self.days:
            for symbol in self.feed.symbols:
                find_tick_file(self.feed.data_dir, symbol, day.source)
        self._loaded = await asyncio.to_thread(self._load, self.days[0])
        return len(self._loaded[0])

    def release(self) -> int:
        """Let one more day start after its pause (when holding between days); returns the
        number of releases so far."""
        self._releases += 1
        self._released.set()
        return self._releases

    async def _hold(self, index: int) -> None:
        """Before day ``index`` (from 1): wait until ``index`` releases were given."""
        self.holding = True
        try:
            while self._releases < index:
                self._released.clear()
                await self._released.wait()
        finally:
            self.holding = False

    async def frames(self) -> AsyncIterator[list[Event]]:
        """Every day's frames, in order, with the pause (and hold) between days."""
        feed = self.feed
        for index, day in enumerate(self.days):
            if index:
                loading = asyncio.create_task(asyncio.to_thread(self._load, day))
                try:
                    await asyncio.sleep(feed.day_pause_s)
                    if feed.hold_between_days:
                        await self._hold(index)
                    trades, minutes = await loading
                finally:
                    loading.cancel()
            else:
                if self._loaded is None:
                    await self.load()
                assert self._loaded is not None
                trades, minutes = self._loaded
                self._loaded = None
            self.current = day
            self.trades_sent[day.as_of.isoformat()] = len(trades)
            log.info("simulator.day_started", day=day.as_of.isoformat(), trades=len(trades))
            async for frame in file_frames(
                trades,
                feed.speed,
                self.frame_max_events,
                self.window_ms,
                self.minute_aggregates,
                minutes,
                pace=self.pace,
            ):
                yield frame
            self.done.append(day)
            self.current = None
            log.info("simulator.day_done", day=day.as_of.isoformat(), trades=len(trades))

    def status(self) -> dict[str, Any]:
        """The replay as JSON: the day being sent, the days done, whether it holds, the pace."""
        current = self.current
        return {
            "day": current.as_of.isoformat() if current else None,
            "sourceDay": current.source.isoformat() if current else None,
            "days": [day.as_of.isoformat() for day in self.days],
            "daysDone": [day.as_of.isoformat() for day in self.done],
            "dayTrades": dict(self.trades_sent),
            "holding": self.holding,
            "releases": self._releases,
            "pace": self.pace.status(),
        }
