"""The tick-file source: ingest reads tick files itself, without a socket (``INGEST_SOURCE=files``).

``TickFileSource`` reads every file of ``INGEST_FILES`` with ``tickfiles.read_trades``
(Lean/AlgoSeek trade zips and Polygon flat-file trade CSVs, gzip or plain), keeps the symbols
asked for, merges the files in time order (stable: equal times keep the order of the files,
then of the lines), cuts frames exactly as the simulator does (``framing.frames_of``: one
``frame_window_ms`` window of event time and one minute per frame, at most
``frame_max_events`` trades) and publishes them through the same path as the socket's frames
(``protocol.split_frame`` → ``protocol.build_records`` → the sequenced publisher): one
``TickBatch`` per (frame, symbol) on ``ticks.<SYM>``, its ticks the same ``T`` events the
simulator would have sent. A day read from files and the same day sent through the
simulator therefore publish the same ticks in the same records; only ``tsInit`` differs.

Pacing: frame k is published at ``start + (t_k - t_0) / speed``; ``speed=0`` publishes as fast
as Redis takes it, up to ``batch_frames`` frames per round trip. ``lag_ms`` (and the feed-lag
gauge) is how far behind that schedule the source runs (0 without pacing). When every frame
is out the actor logs a summary and calls ``on_done`` (the service stops with exit code 0
when ``INGEST_EXIT_WHEN_DONE`` is set, else idles). After a restart by its supervisor it
resumes after the last frame it published.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from operator import attrgetter
from pathlib import Path

import msgspec
import structlog
from prometheus_client import CollectorRegistry

from libs.common import names
from libs.common.io.deadletter import DeadLetters
from libs.common.io.redis_io import StreamReader
from libs.common.market.identity import TradeIds, day_bounds
from libs.common.market.tickfiles import read_trades
from libs.common.runtime.clock import SYSTEM_CLOCK, Clock
from libs.common.runtime.lifecycle import Component
from libs.common.schemas import DECODERS, ENCODER, FeedGap
from services.ingest import protocol
from services.ingest.client import IngestMetrics
from services.ingest.config import BATCH_FRAMES
from services.ingest.framing import frames_of
from services.ingest.protocol import DEFAULT_CHANNELS, ChannelNames, TradeEvent
from services.ingest.publishing import FeedPublisher

log = structlog.get_logger("tickmesh.ingest.files")

_BY_TIME = attrgetter("t")
SOURCE = "files"
"""The dead letters' ``source`` for lines of the tick files that do not parse."""


def load_trades(
    paths: Sequence[str | Path],
    symbols: Iterable[str] = ("*",),
    bad: list[tuple[str, bytes]] | None = None,
) -> list[TradeEvent]:
    """The trades of every file, as ``T`` events merged in time order (stable by file order).

    ``symbols`` keeps only those tickers (``*`` keeps all). Each file is sorted by time first
    (stable), since a flat file is ordered by ticker, then time. Lines that do not parse are
    appended to ``bad`` as (error, raw line); without ``bad`` the first raises ``ValueError``.
    """
    on_bad = None if bad is None else lambda error, raw: bad.append((error, raw))
    wanted = {symbol.strip().upper() for symbol in symbols if symbol.strip()}
    keep_all = not wanted or "*" in wanted
    per_file: list[list[TradeEvent]] = []
    for path in paths:
        events = [
            protocol.as_trade_event(trade)
            for trade in read_trades(path, on_bad=on_bad)
            if keep_all or trade.sym.upper() in wanted
        ]
        events.sort(key=_BY_TIME)
        per_file.append(events)
    if len(per_file) == 1:
        return per_file[0]
    return list(heapq.merge(*per_file, key=_BY_TIME))


class TickFileSource(Component):
    """Publishes the trades of tick files as the socket path would, paced by ``speed``."""

    def __init__(
        self,
        files: Sequence[str | Path],
        feed: FeedPublisher,
        metrics: IngestMetrics,
        *,
        on_fatal: Callable[[str], None],
        on_done: Callable[[], None] | None = None,
        speed: float = 1.0,
        symbols: Iterable[str] = ("*",),
        frame_max_events: int = 100,
        frame_window_ms: int = 1,
        batch_frames: int = BATCH_FRAMES,
        one_record_per_batch: bool = False,
        channels: ChannelNames = DEFAULT_CHANNELS,
        fill_missing: bool = False,
        dead_letters: DeadLetters | None = None,
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__("ingest.files", registry=registry)
        self.dead_letters = dead_letters
        """Where lines that do not parse go (without: the first one is fatal)."""
        if speed < 0:
            raise ValueError(f"speed must be 0 (no pacing) or positive, not {speed}")
        self.files = [str(path) for path in files]
        self.feed = feed
        digest = hashlib.sha256("\n".join(self.files).encode()).hexdigest()[:16]
        self.position_key = feed.publisher.keys.state(f"ingest:files:{digest}")
        """Frames of these files already published (resumed after a process restart)."""
        self.ingest_metrics = metrics
        self.on_fatal = on_fatal
        self.on_done = on_done
        self.speed = speed
        self.symbols = list(symbols)
        self.frame_max_events = frame_max_events
        self.frame_window_ms = frame_window_ms
        self.batch_frames = batch_frames
        self.one_record_per_batch = one_record_per_batch
        """One record per symbol per round trip instead of one per frame and symbol."""
        self.channels = channels
        self.fill_missing = fill_missing
        """Publish only the trades the tick streams lack (a lost day, after the fact), then
        mark that day's feed gaps filled."""
        self._known: TradeIds | None = TradeIds() if fill_missing else None
        """With ``fill_missing``: the files' days as the tick streams held them at load."""
        self.clock = clock
        self.loaded = False
        """True once the files are read (readiness)."""
        self.done = False
        self.trades_total = 0
        self.ticks_published = 0
        self.frames_published = 0
        self.lag_ms = 0
        self._frames: list[list[TradeEvent]] | None = None
        self._next_frame = 0
        self._started: float | None = None
        self.spawn(self._run, name="ingest.files.feed")

    def __repr__(self) -> str:
        return f"TickFileSource(files={len(self.files)}, speed={self.speed:g})"

    async def _run(self) -> None:
        if self._frames is None:
            started = time.perf_counter()
            bad: list[tuple[str, bytes]] | None = [] if self.dead_letters else None
            try:
                trades = await asyncio.to_thread(load_trades, self.files, self.symbols, bad)
            except (OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
                reason = f"cannot read the tick files (INGEST_FILES): {exc}"
                log.critical("ingest.files_unreadable", reason=reason)
                self.on_fatal(reason)
                return
            if bad and self.dead_letters is not None:
                # each bad line is a dead letter; the good ones are replayed
                self.ingest_metrics.decode_errors.inc(len(bad))
                for start in range(0, len(bad), 1_000):
                    chunk = bad[start : start + 1_000]
                    await self.feed.publish(self.dead_letters.records(SOURCE, chunk))
                log.warning("ingest.files_bad_lines", lines=len(bad), first=bad[0][0][:300])
            self._frames = list(frames_of(trades, self.frame_max_events, self.frame_window_ms))
            self.trades_total = len(trades)
            if self.fill_missing:
                known = await self._remember_days()
                log.info("ingest.files_fill", trades=len(trades), already_published=known)
            else:
                stored = await self.feed.publisher.client.get(self.position_key)
                if stored:
                    self._next_frame = min(int(stored), len(self._frames))
                    log.info(
                        "ingest.files_resumed", frame=self._next_frame, frames=len(self._frames)
                    )
            self.loaded = True
            log.info(
                "ingest.files_loaded",
                files=len(self.files),
                trades=len(trades),
                frames=len(self._frames),
                symbols=len({t.sym for t in trades}),
                seconds=round(time.perf_counter() - started, 2),
            )
        if not self.done:
            await self._publish_paced(self._frames)
            if self.fill_missing:
                await self._mark_gaps_filled()
            self._known = None
            self._finish()

    def _days(self) -> dict[tuple[int, int], set[str]]:
        """(start, end) in epoch ms of each New York day the files hold -> their symbols."""
        days: dict[tuple[int, int], set[str]] = {}
        for frame in self._frames or ():
            bounds = day_bounds(frame[0].t)
            days.setdefault(bounds, set()).update(trade.sym for trade in frame)
        return days

    async def _remember_days(self) -> int:
        """Note every trade of the files' days already on the tick streams (in ``_known``,
        held until the files are replayed)."""
        known = 0
        assert self._known is not None
        for (start, end), symbols in self._days().items():
            known += await self.feed.remember_published(
                sorted(symbols), start, end - 1, self._known
            )
        return known

    async def _mark_gaps_filled(self) -> None:
        """The files' days are whole now: their gaps (of the files' symbols) are filled."""
        days = self._days()
        client = self.feed.publisher.client
        reader = StreamReader(client, self.feed.publisher.keys)
        latest: dict[str, FeedGap] = {}
        for seq, payload in await reader.read(names.FEED_GAPS, 0, 1_000_000):
            try:
                gap = DECODERS[FeedGap].decode(payload)
            except msgspec.DecodeError as exc:  # its consumers dead-letter it
                log.warning("ingest.gap_undecodable", seq=seq, error=str(exc)[:300])
                continue
            latest[gap.gapId] = gap
        names_of_files = ", ".join(Path(f).name for f in self.files)
        for gap in latest.values():
            if gap.status == "backfilled":
                continue
            for (start, end), symbols in days.items():
                inside = start <= gap.startMs < end and (not gap.endMs or gap.endMs < end)
                covered = "*" in gap.symbols or set(gap.symbols) <= symbols
                if inside and covered:
                    filled = msgspec.structs.replace(
                        gap, seq=0, status="backfilled", detail=f"filled from {names_of_files}"
                    )
                    await self.feed.publish([(names.FEED_GAPS, ENCODER.encode(filled))])
                    log.info("ingest.gap_filled_from_files", gap=gap.gapId)

    async def _publish_paced(self, frames: list[list[TradeEvent]]) -> None:
        start = self._next_frame
        if start >= len(frames):
            return
        loop = asyncio.get_running_loop()
        speed = self.speed
        t0 = frames[start][0].t
        wall0 = loop.time()
        self._started = time.perf_counter()
        batch_end = start
        for index in range(start, len(frames)):
            if speed > 0:
                due = wall0 + (frames[index][0].t - t0) / 1000.0 / speed
                if due > loop.time():
                    if batch_end > self._next_frame:
                        await self._publish(frames, batch_end)
                    wait = due - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                self.lag_ms = max(0, int((loop.time() - due) * 1000))
                self.ingest_metrics.feed_lag.set(self.lag_ms / 1000.0)
            batch_end = index + 1
            if batch_end - self._next_frame >= self.batch_frames:
                await self._publish(frames, batch_end)
        if batch_end > self._next_frame:
            await self._publish(frames, batch_end)

    async def _publish(self, frames: list[list[TradeEvent]], end: int) -> None:
        """Publish frames ``[self._next_frame, end)`` in one pipelined round trip."""
        started = time.perf_counter()
        now_ms = self.clock.now_ms()
        records: list[tuple[str, bytes]] = []
        ticks = 0
        first_trade_ms = 0
        merged: protocol.FrameSplit = {}
        for frame in frames[self._next_frame : end]:
            split = protocol.split_frame(frame)
            self.feed.admit(split, self._known)
            if self.one_record_per_batch:
                protocol.merge_split(merged, split)
            else:
                records.extend(protocol.build_records(split, now_ms, self.channels))
            ticks += len(frame)
            first_trade_ms = first_trade_ms or frame[0].t
        if merged:
            records.extend(protocol.build_records(merged, now_ms, self.channels))
        key = self.position_key
        await self.feed.publish(
            records,
            first_trade_ms=0 if self.fill_missing else first_trade_ms,
            also=None if self.fill_missing else (lambda pipe: pipe.set(key, end)),
        )
        count = end - self._next_frame
        self._next_frame = end
        self.frames_published += count
        self.ticks_published += ticks
        self.ingest_metrics.frames.inc(count)
        self.ingest_metrics.events.labels(protocol.TRADES).inc(ticks)
        self.ingest_metrics.publish_latency.observe(time.perf_counter() - started)

    def _finish(self) -> None:
        self.done = True
        self.lag_ms = 0
        self.ingest_metrics.feed_lag.set(0)
        elapsed = time.perf_counter() - self._started if self._started is not None else 0.0
        log.info(
            "ingest.files_done",
            trades=self.ticks_published,
            frames=self.frames_published,
            seconds=round(elapsed, 2),
            ticks_per_s=round(self.ticks_published / elapsed) if elapsed > 0 else None,
            then="exit" if self.on_done is not None else "idle",
        )
        if self.on_done is not None:
            self.on_done()
