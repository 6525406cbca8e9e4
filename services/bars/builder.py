"""The bar builder actor: ticks in, closed bars out, positions committed only when safe.

One ``BarBuilder`` owns the aggregation cores (``aggregator.BarAggregator``, one per
symbol, so that each symbol's watermark is its own) and one tick source
(``redis_source.RedisTickSource`` or ``kafka_source.KafkaTickSource``), whose reader runs as a
task of the actor. Its mailbox takes, in order:

- ``TickWork``: decoded tick batches and progress marks from the source, with positions;
- ``WatermarkTick``: sent by its own timer (the lag gauge; with ``close_on="wall"``, quiet
  symbols' bars close with wall time).

Minutes close on the path's progress (``close_on="progress"``, the default): a progress mark
(``sentio.progress.v1``, from ingest) says every tick of a symbol up to the feed's time is on
its channel up to a sequence number; once the builder has read the symbol's ticks up to that
number, the symbol's watermark moves to the feed's time. So a minute closes when this path
has delivered everything up to it, never because this process's clock moved, whatever the
path's lag; a replayed day leaves no mark at the host's date. An ``idle`` mark (the feed has
nothing more for now) closes the minutes that ended by the feed's time.

Restart safety rests on three rules:

1. a source position is committed only once every tick of the batch at that position sits in
   a minute that is closed (and its bar published), so a restart re-reads exactly the ticks
   of the minutes still open, plus at most the part of a closed minute that shared a batch
   with an open one;
2. what was published is remembered per symbol (``ClosedMinutes``: the end of the newest
   published minute, saved after every publication; on the Redis path also recovered from
   the bars streams, which the publish script writes atomically with pub/sub, so a crash
   between publishing and saving loses nothing), and with it, in the same transaction, the
   day's closed minutes as the core holds them and the source position read per channel
   (``MinuteSnapshot``). After a (re)start the core takes those minutes back: a tick of one
   of them at or before the saved position is already in it (not aggregated again), a tick
   after it is a late trade and revises the bar as it would have without the restart (a
   backfill, a trade the feed sent late). Ticks of other minutes at or before the mark
   (published just before a crash, after the last save) are not aggregated again, and no
   bar of such a minute is sent again;
3. every (re)start of the actor starts from scratch: fresh cores and the source rewound to the
   committed positions; what the reader posted for the previous incarnation is dropped by the
   runtime (it comes again).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

import structlog
from prometheus_client import CollectorRegistry

from libs.common import names
from libs.common.market.aggregator import BarAggregator
from libs.common.market.identity import TradeIds
from libs.common.market.sessions import ny_date
from libs.common.runtime.actors import Actor, Overflow
from libs.common.runtime.clock import SYSTEM_CLOCK, Clock
from libs.common.schemas import Bar, Progress, TickBatch, Trade
from services.bars.marks import ClosedMinutes, MinuteSnapshot, RestartGuard
from services.bars.metrics import BuilderMetrics
from services.bars.positions import PendingPositions
from services.bars.source import BarSink, Item, TickSource

log = structlog.get_logger("tickmesh.bars")


class TickWork(NamedTuple):
    """Tick batches from the source, each with the source position it came from (posted by
    the builder's own reader, so a restart drops what an earlier incarnation read)."""

    items: Sequence[Item]
    """In per-channel order."""


class WatermarkTick(NamedTuple):
    """Time passed: close what the wall-clock watermark allows."""


class Barrier(NamedTuple):
    """Resolves ``done`` once everything queued before it is handled (bars published, safe
    positions committed): a way for tools and tests to wait for the builder."""

    done: asyncio.Future[None]


BuilderMessage = TickWork | WatermarkTick | Barrier


class BarBuilder(Actor[BuilderMessage]):
    """Aggregates a source's ticks into bars, publishes them through a sink, commits the
    source's positions once safe. See the module docstring for the restart rules."""

    def __init__(
        self,
        name: str,
        make_aggregator: Callable[[str], BarAggregator],
        source: TickSource,
        sink: BarSink,
        closed: ClosedMinutes,
        *,
        tick_interval_ms: int = 250,
        clock: Clock = SYSTEM_CLOCK,
        registry: CollectorRegistry | None = None,
        mailbox_size: int = 64,
        source_kind: str = "redis",
        close_on: str = "progress",
        owns: Callable[[str], bool] = lambda _symbol: True,
        identity_horizon_ms: int = 0,
    ) -> None:
        super().__init__(
            name, mailbox_size=mailbox_size, overflow=Overflow.BLOCK, registry=registry
        )
        self.make_aggregator = make_aggregator
        """Makes the core of one symbol (given the symbol)."""
        self.aggregators: dict[str, BarAggregator] = {}
        """One core per symbol: each symbol's watermark is its own (see ``_aggregator``)."""
        self._open: set[str] = set()
        """Symbols with a minute still open (the ones the watermark timer advances)."""
        self._watermark = 0
        self.source = source
        self.sink = sink
        self.closed = closed
        self.clock = clock
        self.source_kind = source_kind
        if close_on not in ("progress", "wall"):
            raise ValueError(f"close_on must be progress or wall, not {close_on!r}")
        self.close_on = close_on
        self.owns = owns
        """Which symbols are this builder's (its shard); a mark's others are not its business."""
        self.identity_horizon_ms = identity_horizon_ms
        """How long (feed time) a trade's identity is remembered; 0: two days."""
        self.ids = TradeIds(horizon_ms=identity_horizon_ms)
        self._snapshots: dict[str, MinuteSnapshot] = {}
        """Saved minutes not yet given back to their symbol's core (restored on its first
        tick)."""
        self._guards: dict[str, RestartGuard] = {}
        """Per symbol restored at start: what of its ticks and bars is new to its core."""
        self._touched: set[str] = set()
        """Symbols whose core changed in the current message (their minutes may need saving)."""
        self._seqs: dict[str, int] = {}
        """Per symbol: the newest sequence of its tick channel read."""
        self._marks: dict[str, deque[tuple[int, int, bool]]] = {}
        """Per symbol: marks waiting for its ticks (needed sequence, feed time, idle)."""
        self._marks_waiting = 0
        """Symbols with a mark waiting for their ticks (non-empty queues in ``_marks``)."""
        self._mark_done = False
        """A mark's close is complete, with bars to send: no symbol waits any longer for a
        mark's ticks (set in ``_apply_mark`` and ``_release``; the handler sends and clears)."""
        metrics = BuilderMetrics.for_registry(registry)
        self.builder_metrics = metrics
        self._m_ticks = metrics.ticks.labels(source_kind)
        self._m_bars = metrics.bars.labels(source_kind)
        self._m_revisions = metrics.revisions.labels(source_kind)
        self._m_skipped = metrics.republish_skipped.labels(source_kind)
        self._m_ticks_skipped = metrics.ticks_skipped.labels(source_kind)
        self._m_commits = metrics.commits.labels(source_kind)
        self._m_lag = metrics.lag.labels(source_kind)
        self._m_uncommitted = metrics.uncommitted.labels(source_kind)
        self._m_marks = metrics.marks.labels(source_kind)
        self._m_duplicate_trades = metrics.duplicate_trades.labels(source_kind)
        self._m_sink = metrics.sink_seconds.labels(source_kind)
        self._positions = PendingPositions()
        self._last_position: dict[str, int] = {}
        self._channel_symbols: dict[str, set[str]] = {}
        self._symbol_channels: dict[str, set[str]] = {}
        self.lag_ms = 0
        """Wall time minus the event-time watermark at the last message (for heartbeats)."""
        # safe positions waiting to be committed, by a task of their own (a commit is a round
        # trip, ~10 ms on the embedded broker: inline it would cap the throughput)
        self._to_commit: dict[str, int] = {}
        self._commit_wakeup = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self.every(tick_interval_ms / 1000.0, self._tick, name=f"{name}.watermark")
        self.spawn(self._read, name=f"{name}.read")
        self.spawn(self._committer, name=f"{name}.commit")

    # -- lifecycle ---------------------------------------------------------------------------

    async def on_start(self) -> None:
        self.aggregators = {}
        self.ids = TradeIds(horizon_ms=self.identity_horizon_ms)
        self._touched.clear()
        self._seqs.clear()
        self._marks.clear()
        self._marks_waiting = 0
        self._mark_done = False
        self._open.clear()
        self._positions.clear()
        self._to_commit.clear()
        self._last_position.clear()
        self._channel_symbols.clear()
        self._symbol_channels.clear()
        await self.closed.load()
        self._snapshots = await self.closed.load_snapshots(self.closed.restored)
        self._guards = {
            symbol: RestartGuard(mark, self._snapshots.get(symbol), self.closed.saved.get(symbol))
            for symbol, mark in self.closed.restored.items()
        }
        await self.source.open(restart=self.incarnation > 1)
        log.info(
            "bars.builder_started",
            actor=self.name,
            incarnation=self.incarnation,
            restored_symbols=len(self.closed.restored),
            restored_minutes=sum(len(s.states) for s in self._snapshots.values()),
        )

    async def on_stop(self) -> None:
        try:
            await self.flush_commits()  # last: what the drained work made safe
        except Exception as exc:  # stopping anyway; the next start re-reads
            log.warning("bars.final_commit_failed", actor=self.name, error=repr(exc))
        await self.source.close()
        log.info(
            "bars.builder_stopped",
            actor=self.name,
            open_symbols=len(self._open),
            reason="open minutes are rebuilt from the uncommitted ticks at the next start",
        )

    async def _read(self) -> None:
        async def deliver(items: Sequence[Item]) -> None:
            await self.post(TickWork(items))

        await self.source.run(deliver)

    async def _committer(self) -> None:
        while True:
            await self._commit_wakeup.wait()
            self._commit_wakeup.clear()
            await self.flush_commits()

    async def flush_commits(self) -> None:
        """Commit the safe positions not committed yet (at most one commit in flight)."""
        async with self._commit_lock:
            if not self._to_commit:
                return
            safe, self._to_commit = self._to_commit, {}
            await self.source.commit(safe)
            self._m_commits.inc()

    async def _tick(self) -> None:
        self.tell_nowait(WatermarkTick())

    async def barrier(self, timeout_s: float = 10.0) -> None:
        """Wait until everything queued so far is handled: bars published, safe positions
        committed."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        async with asyncio.timeout(timeout_s):
            await self.tell(Barrier(done))
            await done

    # -- work --------------------------------------------------------------------------------

    async def handle(self, message: BuilderMessage) -> None:
        started = time.perf_counter()
        now = self.clock.now_ms()
        # Tick work queued meanwhile joins it, in order: a minute's close that arrives over
        # several messages (the symbols whose own ticks crossed the deadline, then the
        # progress mark for the rest) goes out in one sink call and one save, not one of each
        # per message, each waiting for the one before.
        # Once the minutes a progress mark closed are all closed (no symbol waits any longer
        # for its ticks up to the mark), their bars go out before the rest is aggregated: what
        # was queued after the mark is not part of that close.
        queued = self.take_nowait(self.mailbox.maxsize) if type(message) is TickWork else []
        bars: list[Bar] = []
        self._mark_done = False
        for item in (message, *queued):
            if type(item) is TickWork:
                items = item.items
                while True:
                    done = self._add(items, now, bars)
                    if self._mark_done:
                        self._mark_done = False
                        if bars:
                            await self._publish(bars, started)
                            await self._commit_safe()
                            bars = []
                    if done == len(items):
                        break
                    items = items[done:]
            elif type(item) is WatermarkTick:
                bars += self._advance(now)
            else:
                assert type(item) is Barrier
                await self._publish(bars, started)
                await self._commit_safe()
                bars = []
                try:
                    await self.flush_commits()
                finally:
                    if not item.done.done():
                        item.done.set_result(None)
        await self._publish(bars, started)
        await self._commit_safe()
        if self._watermark:
            self.lag_ms = max(0, now - self._watermark)
            self._m_lag.set(self.lag_ms)

    def symbols(self) -> list[str]:
        """The symbols this builder has aggregated since it started."""
        return sorted(self.aggregators)

    def _aggregator(self, symbol: str) -> BarAggregator:
        """The core of ``symbol``, created on its first tick.

        A core aggregates one symbol, so its watermark (the newest tick time it has seen) is
        that symbol's own. A watermark shared by several symbols would make whether a trade is
        late depend on how the source interleaves symbols, which differs between a stream
        backlog read channel by channel, Kafka partitions fetched side by side, and live
        pub/sub; per symbol, it depends on that symbol's own ticks (and wall time) only, the
        same on every path.
        """
        aggregator = self.aggregators.get(symbol)
        if aggregator is None:
            aggregator = self.aggregators[symbol] = self.make_aggregator(symbol)
            snapshot = self._snapshots.pop(symbol, None)
            if snapshot is not None and snapshot.states:
                day = aggregator.day_for(int(snapshot.states[0][0]))
                if day is not None:
                    day.restore(
                        symbol,
                        snapshot.states,
                        fold=bool(aggregator.policy.fold_unpriced_volume),
                        opening_seen=snapshot.opening_seen,
                        closing_seen=snapshot.closing_seen,
                    )
        return aggregator

    def _advance(self, now: int) -> list[Bar]:
        if self.close_on != "wall":
            return []  # minutes close on the path's progress, not on this clock
        bars: list[Bar] = []
        for symbol in list(self._open):
            aggregator = self.aggregators[symbol]
            open_before = aggregator.open_since()
            closed = aggregator.advance(now)
            open_after = aggregator.open_since()
            if open_after != open_before:
                self._positions.dirty.update(self._symbol_channels.get(symbol, ()))
                self._touched.add(symbol)
            if closed:
                bars.extend(closed)
                if open_after is None:
                    self._open.discard(symbol)
            self._watermark = max(self._watermark, aggregator.watermark_ms)
        return bars

    def _add(self, items: Sequence[Item], now: int, bars: list[Bar]) -> int:
        """Aggregate ``items`` in order, the bars they close added to ``bars``; returns how many
        items were taken: all, or fewer when a progress mark's close completed (with bars to
        send) before the last."""
        # runs once a record: the instance's collections are read into locals once a call
        taken = 0
        late_revised = late_dropped = 0
        ticks = 0
        last_position = self._last_position
        guards = self._guards
        fresh_of = self.ids.fresh
        aggregators = self.aggregators
        touched, open_symbols, seqs, marks = self._touched, self._open, self._seqs, self._marks
        channel_symbols = self._channel_symbols
        hold = self._positions.hold
        for channel, position, batch in items:
            if self._mark_done and bars and taken:
                break
            taken += 1
            if position <= last_position.get(channel, -1):
                continue  # delivered again
            last_position[channel] = position
            if type(batch) is Progress:
                self._m_marks.inc()
                self._apply_mark(batch, bars)
                hold(channel, position, 0, None)  # done with as soon as it is applied
                continue
            assert type(batch) is TickBatch
            symbol = batch.sym
            trades: Sequence[Trade] = batch.ticks
            newest = 0
            if trades:
                guard = guards.get(symbol)
                if guard is not None:
                    kept = guard.new_trades(channel, position, trades)
                    if len(kept) < len(trades):
                        self._m_ticks_skipped.inc(len(trades) - len(kept))
                    trades = kept
                fresh = fresh_of(symbol, trades)
                if len(fresh) < len(trades):
                    self._m_duplicate_trades.inc(len(trades) - len(fresh))
                trades = fresh
                if trades:
                    aggregator = aggregators.get(symbol)
                    if aggregator is None:
                        aggregator = self._aggregator(symbol)
                    counters = aggregator.counters
                    revised, dropped = counters.late_revised, counters.late_dropped
                    changes = aggregator.changes
                    closed = aggregator.add(trades, now, symbol=symbol)
                    if closed:
                        bars += closed
                    late_revised += counters.late_revised - revised
                    late_dropped += counters.late_dropped - dropped
                    ticks += len(trades)
                    if aggregator.changes != changes:
                        touched.add(symbol)
                    if aggregator.open_minutes:
                        open_symbols.add(symbol)
                    else:
                        open_symbols.discard(symbol)
                    watermark = aggregator.watermark_ms
                    if watermark > self._watermark:
                        self._watermark = watermark
                # the record's newest tick (all of them: a duplicate's minute holds it too)
                for tick in batch.ticks:
                    if tick.t > newest:
                        newest = tick.t
            if batch.seq > seqs.get(symbol, 0):
                seqs[symbol] = batch.seq
                waiting = marks.get(symbol)
                if waiting and waiting[0][0] <= batch.seq:
                    self._release(symbol, batch.seq, bars)
            symbols = channel_symbols.get(channel)
            if symbols is None:
                symbols = channel_symbols[channel] = set()
            if symbol not in symbols:
                symbols.add(symbol)
                self._symbol_channels.setdefault(symbol, set()).add(channel)
            hold(channel, position, newest, symbol if newest else None)
        self._m_ticks.inc(ticks)
        if late_revised or late_dropped:
            late = self.builder_metrics.late
            late.labels(self.source_kind, "revised").inc(late_revised)
            late.labels(self.source_kind, "dropped").inc(late_dropped)
        return taken

    # -- progress ------------------------------------------------------------------------------

    def _apply_mark(self, mark: Progress, bars: list[Bar]) -> None:
        """Move every covered symbol's watermark to the mark's feed time, or queue the mark
        for a symbol whose ticks up to the mark's sequence were not read yet."""
        if self.close_on != "progress":
            return
        feed_time, idle = mark.feedTimeMs, mark.idle
        closed_before = len(bars)
        listed: set[str] = set()
        for channel, needed in mark.ticks.items():
            symbol = names.symbol_of(names.TICKS, channel)
            if symbol is None or not self.owns(symbol):
                continue
            listed.add(symbol)
            if self._seqs.get(symbol, 0) >= needed and not self._marks.get(symbol):
                self._close_to(symbol, feed_time, idle, bars)
                continue
            waiting = self._marks.get(symbol)
            if waiting is None:
                waiting = self._marks[symbol] = deque()
            if waiting and waiting[-1][0] == needed:
                waiting[-1] = (needed, max(feed_time, waiting[-1][1]), idle)
            else:
                if not waiting:
                    self._marks_waiting += 1
                waiting.append((needed, feed_time, idle))
        for symbol in self.aggregators:  # no ticks at all on the feed's side: nothing to wait
            if symbol not in listed and not self._marks.get(symbol):
                self._close_to(symbol, feed_time, idle, bars)
        if len(bars) > closed_before and not self._marks_waiting:
            self._mark_done = True

    def _release(self, symbol: str, seq: int, bars: list[Bar]) -> None:
        """The symbol's ticks were read up to ``seq``: apply the marks that waited for it."""
        waiting = self._marks[symbol]
        feed_time, idle = 0, False
        while waiting and waiting[0][0] <= seq:
            _needed, feed_time, idle = waiting.popleft()
        if feed_time:
            self._close_to(symbol, feed_time, idle, bars)
        if not waiting:
            self._marks_waiting -= 1
            if not self._marks_waiting and bars:
                self._mark_done = True

    def _close_to(self, symbol: str, feed_time: int, idle: bool, bars: list[Bar]) -> None:
        aggregator = self.aggregators.get(symbol)
        if aggregator is None:
            return
        open_before = aggregator.open_since()
        closed = aggregator.advance_to(feed_time, idle=idle)
        open_after = aggregator.open_since()
        if open_after != open_before:
            self._positions.dirty.update(self._symbol_channels.get(symbol, ()))
            self._touched.add(symbol)
        if closed:
            bars.extend(closed)
        if open_after is None:
            self._open.discard(symbol)
        self._watermark = max(self._watermark, aggregator.watermark_ms)

    def _changed_minutes(self) -> list[MinuteSnapshot]:
        """The closed minutes of the symbols touched by this message that changed, with the
        positions read on their channels (saved with the marks)."""
        out: list[MinuteSnapshot] = []
        positions = self._last_position
        for symbol in self._touched:
            aggregator = self.aggregators.get(symbol)
            if aggregator is None:
                continue
            for day in aggregator.retained_days():
                states = day.take_changed()
                if states:
                    out.append(
                        MinuteSnapshot(
                            symbol,
                            ny_date(day.start),
                            states,
                            {
                                channel: positions[channel]
                                for channel in self._symbol_channels.get(symbol, ())
                                if channel in positions
                            },
                            day.opening_seen,
                            day.closing_seen,
                        )
                    )
        self._touched.clear()
        return out

    async def _publish(self, bars: list[Bar], started: float) -> None:
        """Send the bars of one handling, however many messages it took (``started``: when it
        began, ``time.perf_counter``)."""
        guards = self._guards
        fresh = [
            bar
            for bar in bars
            if (guard := guards.get(bar.symbol)) is None or not guard.published_before(bar)
        ]
        if len(fresh) < len(bars):
            self._m_skipped.inc(len(bars) - len(fresh))
        if fresh:
            sending = time.perf_counter()
            await self.sink(fresh)
            sent = time.perf_counter()
            self._m_sink.observe(sent - sending)
            revised = sum(1 for bar in fresh if bar.revision)
            self._m_bars.inc(len(fresh) - revised)
            self._m_revisions.inc(revised)
            if len(fresh) > revised:  # a close: where its time went, one line a close
                log.info(
                    "bars.published",
                    actor=self.name,
                    bars=len(fresh) - revised,
                    revisions=revised,
                    end_ms=max(bar.endMs for bar in fresh if not bar.revision),
                    handle_ms=round((sending - started) * 1000, 1),
                    sink_ms=round((sent - sending) * 1000, 1),
                )
        # the changed minutes are gathered after the bars are out: they are only saved, and
        # a thousand symbols' close takes milliseconds to gather them
        snapshots = self._changed_minutes() if self._touched else []
        if fresh or snapshots:
            await self.closed.save(fresh, snapshots)

    def _open_since(self, symbol: str) -> int | None:
        """The start of ``symbol``'s earliest open minute (None: none is open)."""
        aggregator = self.aggregators.get(symbol)
        return None if aggregator is None else aggregator.open_since()

    async def _commit_safe(self) -> None:
        """Commit each channel up to the last batch whose ticks all sit in closed minutes."""
        safe = self._positions.safe(self._open_since)
        if safe:
            self._to_commit.update(safe)
            self._commit_wakeup.set()
        self._m_uncommitted.set(len(self._positions.waiting))
