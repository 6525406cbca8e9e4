"""The bar builder without I/O: safe commits, restarts, rebalances, with a fake source and a
manual clock.

The integration tests (``test_bars_service.py``) run the same actor against Redis and Kafka;
these pin the rules on which its restart safety rests, one at a time.
"""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from libs.common.io.kafka_io import topic_regex
from libs.common.market.aggregator import BarAggregator
from libs.common.market.sessions import MINUTE_MS
from libs.common.names import Keys
from libs.common.runtime.clock import ManualClock
from libs.common.schemas import Bar, Progress, TickBatch, Trade
from services.bars.builder import BarBuilder, TickWork
from services.bars.marks import ClosedMinutes
from services.bars.source import Item, tick_symbol

pytestmark = pytest.mark.timeout(30)

T0 = 1_709_564_400_000  # 2024-03-04 10:00 New York
GRACE_MS = 1_000


def trade(
    symbol: str, t: int, price: float = 10.0, size: int = 100, conditions: tuple[int, ...] = ()
) -> Trade:
    return Trade(sym=symbol, p=price, s=size, t=t, x=4, c=conditions, z=3)


def batch(symbol: str, *times: int, size: int = 100) -> TickBatch:
    return TickBatch(0, symbol, [trade(symbol, t, size=size) for t in times])


class FakeSource:
    """Delivers what the test puts in; remembers commits and opens."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[list[Item]] = asyncio.Queue()
        self.committed: dict[str, int] = {}
        self.opens: list[bool] = []

    async def open(self, *, restart: bool) -> None:
        self.opens.append(restart)

    async def run(self, deliver) -> None:  # type: ignore[no-untyped-def]
        while True:
            await deliver(await self.queue.get())

    async def commit(self, safe: dict[str, int]) -> None:
        for channel, position in safe.items():
            assert position > self.committed.get(channel, -1), "commits only go forward"
            self.committed[channel] = position

    async def close(self) -> None:
        pass


class Harness:
    def __init__(
        self,
        clock: ManualClock,
        policy: str = "none",
        close_on: str = "wall",
        identity_horizon_ms: int = 0,
    ) -> None:
        self.clock = clock
        self.source = FakeSource()
        self.published: list[Bar] = []
        self.closed = ClosedMinutes(None, Keys("test:"), "unit")

        async def sink(bars: list[Bar]) -> None:
            self.published.extend(bars)

        self.builder = BarBuilder(
            "unit.builder",
            lambda symbol: BarAggregator(
                symbol, policy, grace_ms=GRACE_MS, clock=clock, wall_clock=close_on == "wall"
            ),
            self.source,
            sink,
            self.closed,
            tick_interval_ms=10_000,
            clock=clock,
            registry=CollectorRegistry(),
            source_kind="unit",
            close_on=close_on,
            identity_horizon_ms=identity_horizon_ms,
        )

    async def __aenter__(self) -> Harness:
        await self.builder.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.builder.stop()

    async def deliver(self, *items: Item) -> None:
        await self.builder.post(TickWork(list(items)))
        await self.builder.barrier()

    async def advance_to(self, now_ms: int) -> None:
        self.clock.set(now_ms)
        from services.bars.builder import WatermarkTick

        await self.builder.tell(WatermarkTick())
        await self.builder.barrier()

    def bars(self) -> list[tuple[str, int, int, int]]:
        return [
            (b.symbol, (b.startMs - T0) // MINUTE_MS, b.volume, b.revision) for b in self.published
        ]


def test_channel_names_and_topic_patterns_allow_dotted_symbols() -> None:
    assert tick_symbol("ticks.BRK.B") == "BRK.B"
    assert topic_regex("ticks.*") == r"^ticks\..+$"
    import re

    assert re.match(topic_regex("ticks.*"), "ticks.BRK.B")
    assert not re.match(topic_regex("ticks.Z1*"), "ticks.Z2A")


async def test_each_symbol_has_its_own_watermark() -> None:
    """A backlog read channel by channel: A's ticks up to 10:05 first, then B's from 10:01.
    B's trades are not late (a shared watermark would make them so)."""
    clock = ManualClock(10**13)
    harness = Harness(clock)
    await harness.builder.start()
    try:
        await harness.deliver(*[("ticks.A", i, batch("A", T0 + i * 30_000)) for i in range(11)])
        await harness.deliver(
            *[("ticks.B", i, batch("B", T0 + 60_000 + i * 30_000)) for i in range(6)]
        )
        await harness.advance_to(clock.now_ms() + 120_000)
        assert {b[0] for b in harness.bars() if b[1] == 1} == {"A", "B"}
        assert all(revision == 0 for *_, revision in harness.bars())
        assert harness.builder.symbols() == ["A", "B"]
    finally:
        await harness.builder.stop()


async def test_a_position_is_committed_only_when_all_its_ticks_are_in_published_bars() -> None:
    clock = ManualClock(10**13)
    harness = Harness(clock)
    await harness.builder.start()
    try:
        await harness.deliver(("ticks.A", 1, batch("A", T0 + 1_000)))
        await harness.deliver(("ticks.A", 2, batch("A", T0 + 59_000, T0 + 60_500)))  # straddles
        await harness.deliver(("ticks.A", 3, batch("A", T0 + 60_800)))
        assert harness.source.committed == {}  # 10:00 still open (closes at 10:01:01)
        await harness.deliver(("ticks.A", 4, batch("A", T0 + 61_500)))  # watermark 10:01:02
        assert harness.bars() == [("A", 0, 200, 0)]
        assert harness.source.committed == {"ticks.A": 1}  # 2 holds a tick of open 10:01
        await harness.advance_to(clock.now_ms() + 60_000)  # quiet: wall time closes 10:01
        assert harness.bars() == [("A", 0, 200, 0), ("A", 1, 300, 0)]
        assert harness.source.committed == {"ticks.A": 4}
    finally:
        await harness.builder.stop()


async def test_a_minutes_batches_wait_for_their_commit_as_one_entry_per_channel() -> None:
    """Forty batches of 10:00 and five of 10:01 on A's channel wait as two entries (one per
    minute), and 10:00's close commits its last batch. On a channel shared by symbols (a
    partition of the single tick topic) a minute's batches of every symbol share an entry,
    committed only once that minute has closed for each of them."""
    clock = ManualClock(10**13)
    harness = Harness(clock)
    await harness.builder.start()
    try:
        await harness.deliver(*[("ticks.A", i, batch("A", T0 + i * 1_000)) for i in range(1, 41)])
        await harness.deliver(
            *[("ticks.A", 40 + i, batch("A", T0 + 60_000 + i * 100)) for i in range(1, 6)]
        )
        assert [held.position for held in harness.builder._positions._pending["ticks.A"]] == [
            40,
            45,
        ]
        assert harness.source.committed == {}
        await harness.deliver(("ticks.A", 46, batch("A", T0 + 61_500)))  # closes 10:00
        assert harness.bars() == [("A", 0, 4_000, 0)]
        assert harness.source.committed == {"ticks.A": 40}
        shared = [("p#0", 1, batch("B", T0 + 1_000)), ("p#0", 2, batch("B", T0 + 2_000))]
        shared += [("p#0", 3, batch("C", T0 + 3_000)), ("p#0", 4, batch("B", T0 + 4_000))]
        await harness.deliver(*shared)
        held = [(h.position, sorted(h.symbols)) for h in harness.builder._positions._pending["p#0"]]
        assert held == [(4, ["B", "C"])]
        await harness.deliver(("p#0", 5, batch("B", T0 + 61_500)))  # closes B's 10:00 only
        assert "p#0" not in harness.source.committed  # C's 10:00 is still open
        assert [h.position for h in harness.builder._positions._pending["p#0"]] == [4, 5]
        await harness.deliver(("p#0", 6, batch("C", T0 + 61_500)))  # closes C's 10:00
        assert harness.source.committed["p#0"] == 4
    finally:
        await harness.builder.stop()


async def test_a_restart_rewinds_drops_stale_work_and_does_not_rebuild_published_minutes() -> None:
    """After a failure the builder starts afresh: the source is opened with restart=True, work
    queued by the old incarnation is dropped, and re-read ticks of minutes published before
    (10:00, which shared a batch with 10:01) are not aggregated or published again. Here the
    re-read 10:00 trade is a sweep: aggregated alone it would make a price-less 10:00 whose
    volume the policy folds into 10:01."""
    clock = ManualClock(10**13)
    harness = Harness(clock, policy="algoseek")
    builder = harness.builder
    await builder.start()
    straddling = TickBatch(
        0, "A", [trade("A", T0 + 59_000, conditions=(14, 41)), trade("A", T0 + 60_500)]
    )
    first = [
        ("ticks.A", 1, batch("A", T0 + 1_000)),
        ("ticks.A", 2, straddling),
        ("ticks.A", 3, batch("A", T0 + 62_000)),
    ]
    await harness.deliver(*first)
    assert harness.bars() == [("A", 0, 200, 0)] and harness.source.committed == {"ticks.A": 1}
    # the actor fails (e.g. its sink), and the supervisor restarts it
    await builder.post(TickWork([("ticks.A", 4, batch("A", T0 + 63_000))]))
    builder._escalate(RuntimeError("boom"), where="test")
    await builder.stop()
    await builder.start()
    assert harness.source.opens == [False, True] and builder.incarnation == 2
    assert harness.closed.restored == {"A": T0 + MINUTE_MS}
    await builder.barrier()  # the stale TickWork (position 4) went first, and was dropped
    # the source re-delivers from the committed position (1) on
    await harness.deliver(*first[1:], ("ticks.A", 4, batch("A", T0 + 63_000)))
    await harness.advance_to(clock.now_ms() + 120_000)
    assert harness.bars() == [("A", 0, 200, 0), ("A", 1, 300, 0)]  # 10:00 not again
    assert harness.source.committed == {"ticks.A": 4}
    await builder.stop()


async def test_after_a_restart_a_late_trade_revises_and_a_reread_one_counts_once() -> None:
    """10:00 is published, then revised by a late trade (position 4); the builder restarts.
    The source re-delivers from its committed position: the re-read late trade (position 4,
    at or before the position saved with the minute) is already in the minute taken back, so
    nothing changes; a new late trade (position 5) revises 10:00 once more, from 300 to 350,
    as an uninterrupted run would."""
    clock = ManualClock(10**13)
    harness = Harness(clock)
    builder = harness.builder
    await builder.start()
    await harness.deliver(
        ("ticks.A", 1, batch("A", T0 + 1_000)),
        ("ticks.A", 2, batch("A", T0 + 30_000)),
        ("ticks.A", 3, batch("A", T0 + 61_000)),
    )
    await harness.advance_to(clock.now_ms() + 120_000)
    await harness.deliver(("ticks.A", 4, batch("A", T0 + 40_000)))
    assert harness.bars() == [("A", 0, 200, 0), ("A", 1, 100, 0), ("A", 0, 300, 1)]
    builder._escalate(RuntimeError("boom"), where="test")
    await builder.stop()
    await builder.start()
    await harness.deliver(
        ("ticks.A", 3, batch("A", T0 + 61_000)),
        ("ticks.A", 4, batch("A", T0 + 40_000)),
        ("ticks.A", 5, batch("A", T0 + 50_000, size=50)),
    )
    await harness.advance_to(clock.now_ms() + 120_000)
    assert harness.bars()[3:] == [("A", 0, 350, 2)]
    assert builder.builder_metrics.ticks_skipped.labels("unit")._value.get() == 2
    await builder.stop()


async def test_after_a_restart_a_late_trade_for_a_minute_without_trades_makes_its_bar() -> None:
    """10:00 and 10:02 are published, 10:01 had no trade (a feed gap). After a restart the
    gap's trade arrives (a REST backfill, position 4): 10:01 gets its bar; the re-read
    trades of 10:02 (position 3) do not make a partial 10:02 again."""
    clock = ManualClock(10**13)
    harness = Harness(clock)
    builder = harness.builder
    await builder.start()
    await harness.deliver(
        ("ticks.A", 1, batch("A", T0 + 1_000)),
        ("ticks.A", 2, batch("A", T0 + 121_000)),
        ("ticks.A", 3, batch("A", T0 + 122_000, T0 + 181_000)),
    )
    await harness.advance_to(clock.now_ms() + 240_000)
    assert harness.bars() == [("A", 0, 100, 0), ("A", 2, 200, 0), ("A", 3, 100, 0)]
    builder._escalate(RuntimeError("boom"), where="test")
    await builder.stop()
    await builder.start()
    await harness.deliver(
        ("ticks.A", 3, batch("A", T0 + 122_000, T0 + 181_000)),
        ("ticks.A", 4, batch("A", T0 + 61_000, size=70)),
    )
    await harness.advance_to(clock.now_ms() + 240_000)
    assert harness.bars()[3:] == [("A", 1, 70, 0)]
    await builder.stop()


def mark(feed_time: int, idle: bool = False, **seqs: int) -> Progress:
    return Progress(
        0, "ingest", feed_time, {f"ticks.{sym}": seq for sym, seq in seqs.items()}, idle
    )


def numbered(symbol: str, seq: int, *times: int) -> TickBatch:
    return TickBatch(seq, symbol, [trade(symbol, t) for t in times])


async def test_minutes_close_when_the_path_delivered_everything_up_to_them() -> None:
    """A mark says ticks.A was at sequence 3 when the feed was at 10:02: A's 10:00 minute
    closes only once A's ticks up to 3 are read, whatever this process's clock does."""
    clock = ManualClock(10**13)
    async with Harness(clock, close_on="progress") as harness:
        await harness.deliver(("ticks.A", 1, numbered("A", 1, T0 + 1_000)))
        await harness.deliver(("sentio.progress.v1", 1, mark(T0 + 120_000, A=3)))
        clock.advance(3_600_000)  # an hour of wall time: nothing closes on it
        await harness.advance_to(clock.now_ms())
        assert harness.bars() == []
        await harness.deliver(("ticks.A", 2, numbered("A", 2, T0 + 2_000)))
        assert harness.bars() == []  # still one tick short of the mark
        await harness.deliver(("ticks.A", 3, numbered("A", 3, T0 + 3_000)))
        assert harness.bars() == [("A", 0, 300, 0)]
        # the mark's own position is done with at once; A's up to its closed minute
        assert harness.source.committed == {"sentio.progress.v1": 1, "ticks.A": 3}


async def test_closes_queued_while_the_sink_is_busy_go_out_in_one_call() -> None:
    """A mark for A, B and C waits for their second records. A's arrives and its bar goes to
    the sink, which is slow; B's and C's arrive meanwhile, in two messages. Their bars go out
    together in the next call, in order, instead of one call (and one save) each."""
    clock = ManualClock(10**13)
    async with Harness(clock, close_on="progress") as harness:
        calls: list[list[str]] = []
        entered, release = asyncio.Event(), asyncio.Event()

        async def slow_sink(bars: list[Bar]) -> None:
            calls.append([bar.symbol for bar in bars])
            entered.set()
            await release.wait()

        harness.builder.sink = slow_sink
        await harness.deliver(
            *[(f"ticks.{s}", 1, numbered(s, 1, T0 + 1_000)) for s in "ABC"],
            ("sentio.progress.v1", 1, mark(T0 + 120_000, A=2, B=2, C=2)),
        )
        assert calls == []
        await harness.builder.post(TickWork([("ticks.A", 2, numbered("A", 2, T0 + 2_000))]))
        await asyncio.wait_for(entered.wait(), 5)
        for symbol in "BC":
            await harness.builder.post(
                TickWork([(f"ticks.{symbol}", 2, numbered(symbol, 2, T0 + 2_000))])
            )
        release.set()
        await harness.builder.barrier()
        assert calls == [["A"], ["B", "C"]]
        assert harness.source.committed == {"sentio.progress.v1": 1, **dict.fromkeys(
            ("ticks.A", "ticks.B", "ticks.C"), 2
        )}  # fmt: skip


async def test_an_idle_mark_closes_the_last_minute_without_its_grace() -> None:
    clock = ManualClock(10**13)
    async with Harness(clock, close_on="progress") as harness:
        await harness.deliver(("ticks.A", 1, numbered("A", 1, T0 + 59_000)))
        # the feed is at the minute's end, within the grace: not closed...
        await harness.deliver(("sentio.progress.v1", 1, mark(T0 + 60_000, A=1)))
        assert harness.bars() == []
        # ...until the feed says it has nothing more (the end of a replayed day)
        await harness.deliver(("sentio.progress.v1", 2, mark(T0 + 60_000, True, A=1)))
        assert harness.bars() == [("A", 0, 100, 0)]


async def test_a_mark_closes_a_quiet_symbol_and_ignores_other_shards() -> None:
    clock = ManualClock(10**13)
    harness = Harness(clock, close_on="progress")
    harness.builder.owns = lambda symbol: symbol != "Z"
    builder = harness.builder
    await builder.start()
    try:
        await harness.deliver(("ticks.A", 4, numbered("A", 4, T0 + 5_000)))
        # B trades on (A is quiet), Z belongs to another shard and is never read here
        await harness.deliver(("sentio.progress.v1", 1, mark(T0 + 200_000, A=4, B=90, Z=7)))
        assert harness.bars() == [("A", 0, 100, 0)]
        assert "Z" not in builder._marks
    finally:
        await builder.stop()


async def test_a_trade_delivered_twice_is_aggregated_once() -> None:
    clock = ManualClock(10**13)
    async with Harness(clock, close_on="progress") as harness:
        first = Trade(sym="A", p=10.0, s=100, t=T0 + 1_000, x=4, i="77", z=3)
        await harness.deliver(("ticks.A", 1, TickBatch(1, "A", [first])))
        # the same trade again, under another sequence number (a re-published batch)
        await harness.deliver(("ticks.A", 2, TickBatch(2, "A", [first])))
        await harness.deliver(("sentio.progress.v1", 1, mark(T0 + 120_000, A=2)))
        assert harness.bars() == [("A", 0, 100, 0)]


async def test_with_an_identity_horizon_a_trade_sent_again_within_it_is_aggregated_once() -> None:
    clock = ManualClock(10**13)
    async with Harness(clock, close_on="progress", identity_horizon_ms=10_000) as harness:
        first = Trade(sym="A", p=10.0, s=100, t=T0 + 1_000, x=4, i="77", z=3)
        later = Trade(sym="A", p=10.0, s=50, t=T0 + 9_000, x=4, i="78", z=3)
        await harness.deliver(("ticks.A", 1, TickBatch(1, "A", [first, later])))
        await harness.deliver(("ticks.A", 2, TickBatch(2, "A", [first])))  # 8 s later: dropped
        await harness.deliver(("sentio.progress.v1", 1, mark(T0 + 62_000, A=2)))
        assert harness.bars() == [("A", 0, 150, 0)]
        # a whole horizon (and a half) of feed on, the identity is forgotten: sent again then,
        # the trade revises its minute (the daily report counts it as a duplicate)
        on = Trade(sym="A", p=10.0, s=100, t=T0 + 75_000, x=4, i="79", z=3)
        await harness.deliver(("ticks.A", 3, TickBatch(3, "A", [on])))
        await harness.deliver(("ticks.A", 4, TickBatch(4, "A", [first])))
        await harness.deliver(("sentio.progress.v1", 2, mark(T0 + 122_000, A=4)))
        assert harness.bars()[1:] == [("A", 0, 250, 1), ("A", 1, 100, 0)]
        assert harness.builder.ids.horizon_ms == 10_000


async def test_a_marks_close_goes_out_before_the_ticks_queued_after_the_mark() -> None:
    """A's ticks up to the mark, the mark, then A's ticks of the next minutes, in one message
    and in one queued behind it: the mark's bar reaches the sink before any tick after the
    mark is aggregated (they are not part of that close), and all of them are aggregated."""
    clock = ManualClock(10**13)
    async with Harness(clock, close_on="progress") as harness:
        read_at_sink: list[tuple[list[str], int]] = []
        entered, release = asyncio.Event(), asyncio.Event()

        async def sink(bars: list[Bar]) -> None:
            # how far A's channel had been read when these bars went out
            read = harness.builder._last_position.get("ticks.A", 0)
            read_at_sink.append(([bar.symbol for bar in bars], read))
            harness.published.extend(bars)
            entered.set()
            await release.wait()

        harness.builder.sink = sink
        # B's close keeps the sink busy while the next two messages queue up behind it
        await harness.builder.post(
            TickWork(
                [
                    ("ticks.B", 1, numbered("B", 1, T0 + 1_000)),
                    ("sentio.progress.v1", 1, mark(T0 + 61_000, B=1)),
                ]
            )
        )
        await asyncio.wait_for(entered.wait(), 5)
        await harness.builder.post(
            TickWork(
                [
                    ("ticks.A", 1, numbered("A", 1, T0 + 2_000)),
                    ("ticks.A", 2, numbered("A", 2, T0 + 3_000)),
                    ("sentio.progress.v1", 2, mark(T0 + 121_000, A=2, B=1)),
                    ("ticks.A", 3, numbered("A", 3, T0 + 121_500)),
                ]
            )
        )
        await harness.builder.post(TickWork([("ticks.A", 4, numbered("A", 4, T0 + 122_000))]))
        release.set()
        await harness.builder.barrier()
        assert read_at_sink == [(["B"], 0), (["A"], 2)]
        assert harness.bars() == [("B", 0, 100, 0), ("A", 0, 200, 0)]
        await harness.deliver(("sentio.progress.v1", 3, mark(T0 + 200_000, A=4, B=1)))
        assert harness.bars()[2:] == [("A", 2, 200, 0)]
        assert harness.source.committed["ticks.A"] == 4
