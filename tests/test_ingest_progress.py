"""Progress marks travel with the data: a mark leaves as soon as the feed's time crosses the
marks' grid (a minute's deadline is on it), not at the timer's phase."""

from __future__ import annotations

import asyncio
from typing import cast

from libs.common.runtime.clock import ManualClock
from services.ingest.publishing import FeedPublisher, ProgressMarker

T0 = 1_381_152_600_000  # 2013-10-07 09:30 New York: a minute's start, on any grid


class FakeFeed:
    """What the marker reads of the feed publisher; records the marks it is asked for."""

    def __init__(self) -> None:
        self.gap = None
        self.last_publish_ms = 0
        self.on_published = None
        self.marks: list[float] = []
        self.marked = asyncio.Condition()

    async def mark(self, *, idle: bool, live_time_ms: int = 0, connected: bool = True) -> None:
        async with self.marked:
            self.marks.append(asyncio.get_running_loop().time())
            self.marked.notify_all()


async def wait_for_marks(feed: FakeFeed, count: int) -> None:
    async with asyncio.timeout(2), feed.marked:
        await feed.marked.wait_for(lambda: len(feed.marks) >= count)


async def test_a_mark_leaves_when_the_feed_time_crosses_the_grid_at_most_twice_an_interval() -> (
    None
):
    feed = FakeFeed()
    clock = ManualClock(T0)
    # an interval far longer than the test: every mark below is a crossing's, not the timer's
    marker = ProgressMarker(cast(FeedPublisher, feed), interval_ms=60_000, clock=clock)
    assert feed.on_published == marker.published
    await marker.start()
    try:
        marker.published(T0 + 61_000 - 1)  # the first data: a crossing
        await wait_for_marks(feed, 1)
        clock.set(T0 + 1_000)
        marker.published(T0 + 61_000 - 1)  # the same step of the grid: nothing
        marker.published(T0 + 120_000)  # a crossing, but within half an interval of the last
        await asyncio.sleep(0.05)
        assert len(feed.marks) == 1
        clock.set(T0 + 30_000)  # half an interval after the first crossing
        marker.published(T0 + 120_001)  # still the step of the last crossing: nothing
        await asyncio.sleep(0.05)
        assert len(feed.marks) == 1
        marker.published(T0 + 180_000)  # the next step: marked at once
        await wait_for_marks(feed, 2)
    finally:
        await marker.stop()


async def test_without_crossings_the_timer_marks_every_interval() -> None:
    feed = FakeFeed()
    marker = ProgressMarker(cast(FeedPublisher, feed), interval_ms=50, clock=ManualClock(T0))
    await marker.start()
    try:
        await wait_for_marks(feed, 3)  # a quiet feed (or none yet) is still marked
    finally:
        await marker.stop()
    gaps = [b - a for a, b in zip(feed.marks, feed.marks[1:], strict=False)]
    assert all(gap >= 0.045 for gap in gaps), gaps
