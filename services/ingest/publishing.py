"""Publishing what the feed gave: ticks with one identity each, their ledger, gaps, progress.

``FeedPublisher`` is the one way ingest writes to Redis, for the socket path and the
tick-file source alike:

- ``admit`` drops trades already published (``SourceBook``), before records are built;
- ``publish`` sends a batch of records together with the ledger of its ticks and, when a gap
  was open and trades flow again, the gap's closing record, all in one pipelined round trip
  with a batch token (a retry after a lost reply applies nothing twice), retried with backoff
  for up to ``retry_s``. A batch that still failed is kept, token and all, and sent first by
  the next ``publish`` (the processor's next incarnation, once Redis is back): its trades are
  already admitted and its ledger drawn, so dropping it would lose them without a trace;
- ``open_gap`` records a time the feed was not read (a disconnect, an ingest start after a
  previous run), and the next batch with trades closes it at its first event time;
- ``mark`` publishes a ``Progress`` record: the feed's time and each tick channel's sequence,
  which downstream builders use to close minutes (progress travels with the data).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple, cast

import msgspec
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio.client import Pipeline

from libs.common import names
from libs.common.io.redis_io import RETRIABLE, Publisher, StreamReader
from libs.common.market.identity import TradeIds
from libs.common.runtime.clock import SYSTEM_CLOCK, Clock
from libs.common.runtime.lifecycle import Component
from libs.common.runtime.metrics import metrics_for
from libs.common.runtime.retry import retry_async
from libs.common.schemas import DECODERS, ENCODER, TICK_BATCH_DECODER, FeedGap, Progress
from services.ingest import protocol
from services.ingest.ledger import SourceBook
from services.ingest.protocol import Event, FrameSplit, TradeEvent

log = structlog.get_logger("tickmesh.ingest")

_PROGRESS_DECODER = DECODERS[Progress]


class _Sealed(NamedTuple):
    """A batch ready to send: its records (the ledger and a gap's close included), token and
    what its success tells the book."""

    records: list[tuple[str, bytes]]
    token: str
    newest_ms: int
    """The feed's time this batch brings, claimed once Redis has it."""
    sealed_ms: int
    carries_feed: bool
    """It holds trades or a ledger (the feed's data, not only a letter or a gap)."""
    closed: FeedGap | None
    also: Callable[[Pipeline], object] | None


class FeedMetrics:
    """Metrics of what the feed gave; built once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duplicates = Counter(
            "tickmesh_ingest_duplicate_trades",
            "Trades dropped because a trade with the same identity was already published",
            registry=registry,
        )
        self.gaps = Counter(
            "tickmesh_ingest_gaps", "Feed gaps opened, by cause", ["cause"], registry=registry
        )
        self.gaps_open = Gauge(
            "tickmesh_ingest_gaps_open",
            "Feed gaps open now (1 while not reading)",
            registry=registry,
        )
        self.gap_seconds = Counter(
            "tickmesh_ingest_gap_feed_seconds",
            "Seconds of feed (event time) inside closed gaps",
            registry=registry,
        )
        self.feed_time = Gauge(
            "tickmesh_ingest_feed_time_seconds",
            "The feed's own clock: the newest event time published",
            registry=registry,
        )
        self.marks = Counter(
            "tickmesh_ingest_progress_marks", "Progress marks published", registry=registry
        )
        self.unsent = Gauge(
            "tickmesh_ingest_unsent_batches",
            "Batches whose publish failed past the retry budget, kept to be sent first",
            registry=registry,
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None) -> FeedMetrics:
        """The metrics of ``registry``, created once."""
        return metrics_for(cls, registry)


class FeedPublisher:
    """See the module docstring."""

    def __init__(
        self,
        publisher: Publisher,
        *,
        source: str = "ingest",
        retry_s: float = 30.0,
        identity_horizon_ms: int = 0,
        symbols: list[str] | None = None,
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
    ) -> None:
        self.publisher = publisher
        self.source = source
        self.retry_s = retry_s
        self.symbols = symbols or ["*"]
        self.book = SourceBook(source, horizon_ms=identity_horizon_ms)
        self.clock = clock
        self.rng = rng or random.Random()
        self.metrics = FeedMetrics.for_registry(registry)
        self._tokens = itertools.count(1)
        self._token_prefix = uuid.uuid4().hex[:12]
        self.gap: FeedGap | None = None
        """The gap open now (the feed is not being read, or has not resumed yet)."""
        self.last_publish_ms = 0
        """Wall time of the last batch that carried feed data."""
        self.on_gap_closed: Callable[[FeedGap], None] | None = None
        """Called with each gap once its closing record is published (the backfill)."""
        self.on_published: Callable[[int], None] | None = None
        """Called with the feed's time after each round trip that carried feed data (the
        progress marker)."""
        self._unsent: deque[_Sealed] = deque()
        """Sealed batches not yet on Redis, in order (one while a publish is under way; more
        after a publish failed past ``retry_s``)."""
        self._sending = asyncio.Lock()
        self._kept = False
        """A publish failed and left batches queued (``tickmesh_ingest_unsent_batches``)."""

    # -- identity ----------------------------------------------------------------------------

    def admit(self, split: FrameSplit, known: TradeIds | None = None) -> None:
        """Drop already published trades from ``split`` (in place); ``known``: identities
        read back from the tick streams (``remember_published``)."""
        trades = split.get(protocol.TRADES)
        if not trades:
            return
        admit = self.book.admit
        kept: dict[str, list[Event]] = {}
        for sym, group in trades.items():
            fresh = admit(sym, cast(list[TradeEvent], group), known)
            if fresh:
                kept[sym] = cast(list[Event], fresh)
        if kept:
            split[protocol.TRADES] = kept
        else:
            del split[protocol.TRADES]

    # -- gaps --------------------------------------------------------------------------------

    def open_gap(self, cause: str, *, detail: str = "", start_ms: int | None = None) -> FeedGap:
        """Note that the feed stopped being read (``start_ms``: the feed's time then)."""
        if self.gap is not None:
            return self.gap
        now = self.clock.now_ms()
        self.gap = FeedGap(
            0,
            f"{self.source}-{now}-{uuid.uuid4().hex[:6]}",
            self.source,
            cause,
            list(self.symbols),
            self.book.feed_time_ms if start_ms is None else start_ms,
            openedAtMs=now,
            detail=detail,
        )
        self.metrics.gaps.labels(cause).inc()
        self.metrics.gaps_open.set(1)
        log.warning(
            "ingest.gap_opened",
            cause=cause,
            gap=self.gap.gapId,
            start_ms=self.gap.startMs,
            detail=detail or None,
        )
        return self.gap

    def _close_gap(self, end_ms: int) -> FeedGap:
        assert self.gap is not None
        closed = msgspec.structs.replace(
            self.gap, endMs=end_ms, status="closed", closedAtMs=self.clock.now_ms()
        )
        self.gap = None
        self.metrics.gaps_open.set(0)
        self.metrics.gap_seconds.inc(max(0, end_ms - closed.startMs) / 1000)
        log.warning(
            "ingest.gap_closed",
            cause=closed.cause,
            gap=closed.gapId,
            start_ms=closed.startMs,
            end_ms=end_ms,
            feed_seconds=round(max(0, end_ms - closed.startMs) / 1000, 3),
        )
        return closed

    async def resume_after_restart(self, client_reader: StreamReader) -> None:
        """At start: if an earlier run published progress, the feed was not read from its
        last mark until now; open that gap (closed by the first trades)."""
        last = await client_reader.last_seq(names.PROGRESS)
        if not last:
            return
        entries = await client_reader.read(names.PROGRESS, last - 1, 1)
        if not entries:
            return
        try:
            mark = _PROGRESS_DECODER.decode(entries[-1][1])
        except msgspec.DecodeError as exc:  # its consumers dead-letter it; we cannot resume
            log.warning("ingest.progress_undecodable", error=str(exc)[:300])
            return
        if mark.source != self.source:
            return
        self.book.feed_time_ms = self.book.published_time_ms = mark.feedTimeMs
        self.book.channels.update(mark.ticks)
        self.open_gap("ingest_start", detail="not reading between the last run and this one")

    async def remember_published(
        self, symbols: Iterable[str], low_ms: int, high_ms: int, into: TradeIds
    ) -> int:
        """Read back the trades the tick streams hold with ``low_ms <= t <= high_ms`` and note
        their identities in ``into`` (passed to ``admit`` as ``known``), so that none is
        published twice, however long ago it was (a process that restarted has not seen them;
        the book forgets after its horizon). Returns how many were read."""
        reader = StreamReader(self.publisher.client, self.publisher.keys)
        seen = 0
        for symbol in symbols:
            channel = names.channel(names.TICKS, symbol)
            upto = await reader.last_seq(channel)
            while upto > 0:
                entries = await reader.read(channel, max(0, upto - 1_000), 1_000, upto)
                if not entries:
                    break
                oldest = high_ms
                for entry_seq, payload in entries:
                    try:
                        ticks = TICK_BATCH_DECODER.decode(payload).ticks
                    except msgspec.DecodeError as exc:  # its consumers dead-letter it
                        log.warning(
                            "ingest.readback_undecodable",
                            channel=channel,
                            seq=entry_seq,
                            error=str(exc)[:300],
                        )
                        continue
                    kept = [t for t in ticks if low_ms <= t.t <= high_ms]
                    into.remember(kept)
                    seen += len(kept)
                    if ticks:
                        oldest = min(oldest, ticks[0].t)
                if oldest < low_ms:
                    break
                upto = entries[0][0] - 1
        return seen

    # -- publishing --------------------------------------------------------------------------

    async def publish(
        self,
        records: list[tuple[str, bytes]],
        *,
        first_trade_ms: int = 0,
        also: Callable[[Pipeline], object] | None = None,
    ) -> list[int]:
        """Publish ``records`` with their ledger (and a gap's close) in one round trip, after
        any batch kept from a failed publish; ``also`` queues a state write on the same
        pipeline. Returns the records' sequences ([] when there was nothing to send)."""
        sealed = self._seal(records, first_trade_ms, also)
        if sealed is not None:
            self._unsent.append(sealed)
        seqs: list[int] = []
        async with self._sending:
            while self._unsent:
                head = self._unsent[0]
                try:
                    sent = await self._send(head)
                except Exception:
                    self._kept = True
                    self.metrics.unsent.set(len(self._unsent))
                    log.error(
                        "ingest.publish_failed",
                        batches_kept=len(self._unsent),
                        records_kept=sum(len(batch.records) for batch in self._unsent),
                        action="kept; sent first, with the same token, by the next publish",
                    )
                    raise
                self._unsent.popleft()
                if head is sealed:
                    seqs = sent
            if self._kept:  # the kept batches are out (the gauge is set only around a failure)
                self._kept = False
                self.metrics.unsent.set(0)
        return seqs

    def _seal(
        self,
        records: list[tuple[str, bytes]],
        first_trade_ms: int,
        also: Callable[[Pipeline], object] | None,
    ) -> _Sealed | None:
        """The batch as it will go out: the ledger of what was admitted since the last one,
        the open gap's close if trades flow again, a token. Runs without a wait, so that
        batches are sealed in the order their trades were admitted."""
        now = self.clock.now_ms()
        book = self.book
        ledger = book.ledger(now)
        if ledger is not None:
            self.metrics.duplicates.inc(ledger.duplicates)
            records = [*records, (names.LEDGER, ENCODER.encode(ledger))]
        closed: FeedGap | None = None
        if self.gap is not None and first_trade_ms:
            closed = self._close_gap(first_trade_ms)
            records = [*records, (names.FEED_GAPS, ENCODER.encode(closed))]
        if not records and also is None:
            return None
        token = f"{self._token_prefix}-{next(self._tokens)}"
        return _Sealed(
            records,
            token,
            book.feed_time_ms,
            now,
            bool(first_trade_ms) or ledger is not None,
            closed,
            also,
        )

    async def _send(self, sealed: _Sealed) -> list[int]:
        """One sealed batch to Redis (retried for up to ``retry_s``), then the book."""
        records, token, also = sealed.records, sealed.token, sealed.also
        publisher = self.publisher
        seqs = await retry_async(
            lambda: publisher.publish_many(records, token=token, also=also),
            retriable=lambda exc: isinstance(exc, RETRIABLE),
            max_wait_s=self.retry_s,
            what="ingest publish",
            clock=self.clock,
            rng=self.rng,
            records=len(records),
        )
        book = self.book
        ticks_prefix = names.template_parts(names.TICKS)[0]
        book.published(
            (
                (channel, seq)
                for (channel, _), seq in zip(records, seqs, strict=True)
                if channel.startswith(ticks_prefix)
            ),
            sealed.newest_ms,
        )
        if sealed.carries_feed:
            self.last_publish_ms = sealed.sealed_ms
            if self.on_published is not None:
                self.on_published(book.published_time_ms)
        if sealed.closed is not None and self.on_gap_closed is not None:
            self.on_gap_closed(sealed.closed)
        self.metrics.feed_time.set(book.feed_time_ms / 1000)
        return seqs

    async def publish_gap(self) -> None:
        """Publish the open gap's opening record (the feed stopped being read)."""
        if self.gap is not None:
            await self.publish([(names.FEED_GAPS, ENCODER.encode(self.gap))])

    async def mark(self, *, idle: bool, live_time_ms: int = 0, connected: bool = True) -> None:
        """Publish a progress mark of what is on Redis now."""
        progress = self.book.progress(
            self.clock.now_ms(), idle=idle, live_time_ms=live_time_ms, connected=connected
        )
        if not progress.feedTimeMs:
            return  # nothing published yet: nothing to say
        await self.publisher.publish(names.PROGRESS, progress)
        self.metrics.marks.inc()


class ProgressMarker(Component):
    """Publishes a progress mark every ``interval_ms``, and as soon as the feed's time crosses
    a multiple of ``interval_ms``.

    The second rule lets progress travel with the data: a minute's deadline (its end plus a
    builder's grace, whole seconds) is on that grid, so the mark that lets a builder close the
    minute leaves with the first batch past the deadline instead of up to an interval later,
    at the timer's phase. A feed faster than the wall clock (a replay) crosses the grid at
    every batch: those marks are at most one per half interval. Any mark restarts the timer,
    so a steady live feed is marked about once an interval, on the grid.

    The mark says ``idle`` when no feed data was published for ``idle_after_ms`` (the end of
    a replayed day: builders may close what is up to the feed's time). A live feed's time also
    follows the wall clock (minus ``live_lag_ms``) while it is connected, so quiet symbols'
    minutes close on time; a replay's time is its trades' alone.
    """

    def __init__(
        self,
        feed: FeedPublisher,
        *,
        interval_ms: int = 500,
        idle_after_ms: int = 2_000,
        live: bool = False,
        live_lag_ms: int = 1_000,
        connected: Callable[[], bool] = lambda: True,
        clock: Clock = SYSTEM_CLOCK,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__("ingest.progress", registry=registry)
        self.feed = feed
        self.idle_after_ms = idle_after_ms
        self.live = live
        self.live_lag_ms = live_lag_ms
        self.connected = connected
        self.clock = clock
        self.interval_ms = interval_ms
        self._step = 0
        """The feed's time in intervals, as of the last crossing."""
        self._last_crossing_ms = -interval_ms
        """Wall time of the last mark made for a crossing."""
        self._wake = asyncio.Event()
        feed.on_published = self.published
        self.spawn(self._run, name="ingest.progress")

    def published(self, feed_time_ms: int) -> None:
        """The feed's time after a round trip: mark now if it crossed the grid."""
        step = feed_time_ms // self.interval_ms
        if step <= self._step:
            return
        self._step = step
        now = self.clock.now_ms()
        if now - self._last_crossing_ms >= self.interval_ms // 2:
            self._last_crossing_ms = now
            self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.interval_ms / 1000):
                    await self._wake.wait()
            except TimeoutError:
                pass  # the timer: no mark for an interval
            self._wake.clear()
            await self.tick()

    async def tick(self) -> None:
        """Publish one mark now."""
        now = self.clock.now_ms()
        connected = self.connected() and self.feed.gap is None
        idle = now - self.feed.last_publish_ms > self.idle_after_ms
        live_time = now - self.live_lag_ms if self.live and connected else 0
        await self.feed.mark(
            idle=idle and not self.live, live_time_ms=live_time, connected=connected
        )
