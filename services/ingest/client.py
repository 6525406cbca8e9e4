"""The Polygon WebSocket client: a reader that only reads, and a processor that does the rest.

``FeedReader`` owns the connection: connect, auth, subscribe, then read frames and hand them
to the processor's bounded mailbox — nothing else, so processing can never stall the socket
or its keepalive pings. Status frames are handled by the reader itself (they decide about the
connection). It reconnects with exponential backoff and jitter, re-authenticates and
re-subscribes; ``auth_failed`` is fatal (one clear log line, the service exits non-zero, no
hot loop); ``max_connections`` waits longer and says why. Every status is logged and counted.

The edge between them is BLOCK: when the processor's mailbox is full the reader waits, TCP
backpressure builds up at the server, and nothing is dropped on our side. A warning fires when
the mailbox passes ``queue_warning_ratio`` of its bound — well before the reader has to wait
and long before the server's slow-consumer cut-off.

``FrameProcessor`` decodes frames (bad events go to the dead-letter stream with their raw
bytes), groups them per (kind, symbol) and publishes one record per (frame, symbol) with the
sequenced, pipelined publisher, several frames per round trip when it is behind.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple

import structlog
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedOK,
    InvalidHandshake,
    InvalidURI,
)
from websockets.frames import CloseCode

from libs.common.io.deadletter import DeadLetters
from libs.common.runtime.actors import Actor, Overflow
from libs.common.runtime.backoff import Backoff
from libs.common.runtime.clock import SYSTEM_CLOCK, Clock
from libs.common.runtime.lifecycle import Component
from libs.common.runtime.settings import Secret
from services.ingest import protocol
from services.ingest.config import BATCH_FRAMES
from services.ingest.metrics import IngestMetrics
from services.ingest.protocol import DEFAULT_CHANNELS, ChannelNames, StatusEvent
from services.ingest.publishing import FeedPublisher
from services.ingest.redact import CLIENT_LOGGER, redact, redacting_logger

log = structlog.get_logger("tickmesh.ingest")

# Why a session ended (the ``reason`` label of the reconnect counter), besides the statuses
# that end one (``END_STATUSES``).
CONNECT_FAILED: Final = "connect_failed"
"""No WebSocket: refused, DNS, TLS, an HTTP error, or the open timed out."""
HANDSHAKE_TIMEOUT: Final = "handshake_timeout"
"""Connected, but ``connected`` or the auth answer did not come within ``auth_timeout_s``."""
CONNECTION_LOST: Final = "connection_lost"
"""Closed abnormally: dropped (1006), a protocol error, or a close without a status."""
CLOSED: Final = "closed"
"""The server closed normally (1000/1001) without saying why."""
FRAME_TOO_BIG: Final = "frame_too_big"
"""A frame over ``max_frame_bytes``: we closed with 1009 (message too big) before reading it."""

END_STATUSES: Final = protocol.DISCONNECT_STATUSES | {protocol.AUTH_TIMEOUT}
"""Statuses after which the server closes the connection (so we reconnect)."""
_LOUD_STATUSES: Final = END_STATUSES | {
    protocol.AUTH_FAILED,
    protocol.ERROR,
    protocol.AUTH_REQUIRED,
}
_STATUS_PROBE: Final = b'"status"'
_JITTER: Final = 0.2

_WHY: Final[dict[str, str]] = {
    protocol.MAX_CONNECTIONS: "another connection already uses this API key (max_connections); "
    "waiting longer before trying again: close the other session or raise the plan's limit",
    protocol.SLOW_CONSUMER: "the server cut us off for reading too slowly (slow_consumer); "
    "look for ingest.queue_filling warnings before it",
    protocol.FORCE_DISCONNECT: "the server ended the session (force_disconnect)",
    protocol.AUTH_TIMEOUT: "the server did not get our auth in time (auth_timeout)",
    FRAME_TOO_BIG: "a frame over INGEST_MAX_FRAME_BYTES was refused unread (a dead letter); "
    "reconnecting: the gap is recorded, and backfilled when INGEST_BACKFILL is on",
}


class Frame(NamedTuple):
    """One WebSocket frame: its bytes, when it was received (epoch ms, the records' ``tsInit``)
    and the same instant on the monotonic clock (for the publish-latency histogram)."""

    data: bytes
    received_ms: int
    received_s: float = 0.0


class Disconnected(NamedTuple):
    """Sent by the reader after the last frame of a session that ended: the processor opens a
    feed gap once it has published everything read before it."""

    cause: str
    detail: str = ""


class FatalFeedError(Exception):
    """A feed condition a reconnect cannot fix (a refused key, a malformed URL)."""


class FeedDisconnect(Exception):
    """The server ended the session with a status (``slow_consumer``, ``auth_timeout``...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FrameProcessor(Actor[Frame | Disconnected]):
    """Decodes frames and publishes the records (one per frame and symbol) through the
    ``FeedPublisher`` (identity, ledger, gaps, batch tokens).

    Takes up to ``batch_frames`` queued frames per Redis round trip. A retriable Redis error
    is retried with backoff for up to ``publish_retry_s`` while the frames wait (the queue
    fills, the reader pauses); past that the actor fails and its supervisor takes over.
    """

    def __init__(
        self,
        feed: FeedPublisher,
        dead_letters: DeadLetters,
        metrics: IngestMetrics,
        *,
        queue_size: int,
        batch_frames: int = BATCH_FRAMES,
        one_record_per_batch: bool = False,
        linger_ms: int = 0,
        source: str = "polygon.ws",
        lag_warning_ms: int = 5_000,
        channels: ChannelNames = DEFAULT_CHANNELS,
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(
            "ingest.processor", mailbox_size=queue_size, overflow=Overflow.BLOCK, registry=registry
        )
        self.feed = feed
        self.dead_letters = dead_letters
        self.ingest_metrics = metrics
        self.batch_frames = batch_frames
        self.one_record_per_batch = one_record_per_batch
        """One record per symbol per round trip instead of one per frame and symbol."""
        self.linger_s = linger_ms / 1000.0
        self.source = source
        self.lag_warning_ms = lag_warning_ms
        self.channels = channels
        self.clock = clock
        self.lag_ms = 0
        self.ticks_published = 0
        self.frames_published = 0
        self._warned_lag = False
        self._events = {kind: metrics.events.labels(kind) for kind in protocol.DATA_KINDS}
        mailbox = self.mailbox
        metrics.queue_depth.set_function(lambda: len(mailbox))
        metrics.queue_capacity.set(queue_size)

    async def handle(self, message: Frame | Disconnected) -> None:
        batch = [message, *self.take_nowait(self.batch_frames - 1)]
        if self.linger_s and len(batch) < self.batch_frames:
            await asyncio.sleep(self.linger_s)  # more frames for this round trip
            batch += self.take_nowait(self.batch_frames - len(batch))
        frames: list[Frame] = []
        for item in batch:
            if type(item) is Disconnected:
                await self._publish_frames(frames)
                frames = []
                if item.cause == FRAME_TOO_BIG:
                    # the frame was never read: the letter says how big it was, without it
                    letter = self.dead_letters.records(self.source, [(item.detail, b"")])
                    await self.feed.publish(letter, first_trade_ms=0)
                self.feed.open_gap(item.cause, detail=item.detail)
                await self.feed.publish_gap()
            else:
                frames.append(item)  # type: ignore[arg-type]
        await self._publish_frames(frames)

    async def _publish_frames(self, frames: list[Frame]) -> None:
        if not frames:
            return
        records: list[tuple[str, bytes]] = []
        admit = self.feed.admit
        counts = dict.fromkeys(protocol.DATA_KINDS, 0)
        first_trade_ms = newest_event_ms = 0
        decode_frame = protocol.decode_frame
        split_frame = protocol.split_frame
        build_records = protocol.build_records
        channels = self.channels
        # batch records: the frames' groups merged first, so that a symbol's trades of the
        # round trip are admitted in one call (in frame order, as frame by frame)
        merged: protocol.FrameSplit | None = {} if self.one_record_per_batch else None
        received_ms = 0
        for frame in frames:
            events, bad = decode_frame(frame.data)
            if bad:
                # into the same round trip (and retry) as the good records of the batch
                self.ingest_metrics.decode_errors.inc(len(bad))
                records.extend(
                    self.dead_letters.records(self.source, [(item.error, item.raw) for item in bad])
                )
            if not events:
                continue
            split = split_frame(events)
            # Statuses were counted by the reader, which sees every frame that holds one.
            split.pop(protocol.STATUS, None)
            if merged is None:
                admit(split)
                first_trade_ms, newest_event_ms = _tally(
                    split, counts, first_trade_ms, newest_event_ms
                )
                records.extend(build_records(split, frame.received_ms, channels))
            else:
                protocol.merge_split(merged, split)
                received_ms = frame.received_ms
        if merged:
            admit(merged)
            first_trade_ms, newest_event_ms = _tally(merged, counts, 0, 0)
            records.extend(build_records(merged, received_ms, channels))
        if records:
            await self.feed.publish(records, first_trade_ms=first_trade_ms)
        now_s = self.clock.monotonic()
        observe = self.ingest_metrics.publish_latency.observe
        for frame in frames:
            if frame.received_s:
                observe(max(0.0, now_s - frame.received_s))
        self.ingest_metrics.frames.inc(len(frames))
        self.frames_published += len(frames)
        for kind, count in counts.items():
            if count:
                self._events[kind].inc(count)
        self.ticks_published += counts[protocol.TRADES]
        if newest_event_ms:
            self._check_lag(self.clock.now_ms() - newest_event_ms)

    def _check_lag(self, lag_ms: int) -> None:
        self.lag_ms = lag_ms
        self.ingest_metrics.feed_lag.set(lag_ms / 1000.0)
        if lag_ms > self.lag_warning_ms and not self._warned_lag:
            self._warned_lag = True
            self.ingest_metrics.warnings.labels("lag").inc()
            log.warning(
                "ingest.feed_lag_high",
                lag_ms=lag_ms,
                threshold_ms=self.lag_warning_ms,
                hint="events are older than the threshold when published: the feed is "
                "delayed, our clock is off, or we are falling behind",
            )
        elif lag_ms < self.lag_warning_ms // 2 and self._warned_lag:
            self._warned_lag = False
            log.info("ingest.feed_lag_recovered", lag_ms=lag_ms)


_AGG_KINDS: Final = frozenset({protocol.SECOND_AGGS, protocol.MINUTE_AGGS})


def _tally(
    split: protocol.FrameSplit, counts: dict[str, int], first_trade_ms: int, newest_ms: int
) -> tuple[int, int]:
    """Add ``split``'s events to ``counts`` (by kind). Returns the first trade's time (the
    earliest of the groups' first trades, unless ``first_trade_ms`` is set already) and the
    newest of ``newest_ms`` and the groups' last event times (for the feed's lag)."""
    trades = split.get(protocol.TRADES)
    if trades and not first_trade_ms:
        first_trade_ms = min(group[0].t for group in trades.values())  # type: ignore[union-attr]
    for kind, by_symbol in split.items():
        count = 0
        aggregate = kind in _AGG_KINDS
        for group in by_symbol.values():
            count += len(group)
            last = group[-1]
            event_ms = last.e if aggregate else last.t  # type: ignore[union-attr]
            if event_ms > newest_ms:
                newest_ms = event_ms
        counts[kind] += count
    return first_trade_ms, newest_ms


def subscription_topics(symbols: Sequence[str], event_types: Sequence[str]) -> list[str]:
    """``T.SPY``-style topics for every (event type, symbol); ``*`` among the symbols means
    every symbol (``T.*``). Raises ``ValueError`` on an unknown type or no symbols."""
    unknown = [kind for kind in event_types if kind not in protocol.DATA_KINDS]
    if unknown:
        raise ValueError(f"unknown Polygon event types {unknown}; use {list(protocol.DATA_KINDS)}")
    if not event_types:
        raise ValueError("no event types to subscribe to")
    wanted = [symbol.strip().upper() for symbol in symbols if symbol.strip()]
    if not wanted:
        raise ValueError("no symbols to subscribe to (use * for all)")
    if "*" in wanted:
        wanted = ["*"]
    unique = list(dict.fromkeys(wanted))
    return [f"{kind}.{symbol}" for kind in dict.fromkeys(event_types) for symbol in unique]


class FeedReader(Component):
    """Owns the WebSocket: connect, auth, subscribe, read; reconnect with backoff.

    Delays: ``initial_delay_s * 2**(n-1)`` for the n-th consecutive session that delivered no
    data, capped at ``max_delay_s``, at least ``max_connections_delay_s`` after a
    ``max_connections`` refusal, each times a jitter factor in [0.8, 1.2]. A session that
    delivered data resets n. ``auth_failed`` (and a malformed URL) calls ``on_fatal`` once
    with a clear reason and ends the reader: no retry.
    """

    def __init__(
        self,
        url: str,
        api_key: Secret,
        topics: list[str],
        processor: FrameProcessor,
        metrics: IngestMetrics,
        *,
        on_fatal: Callable[[str], None],
        initial_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
        max_connections_delay_s: float = 60.0,
        auth_timeout_s: float = 10.0,
        open_timeout_s: float = 10.0,
        ping_interval_s: float | None = 20.0,
        max_frame_bytes: int = 16 * 1_048_576,
        queue_warning_ratio: float = 0.5,
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__("ingest.reader", registry=registry)
        self.url = url
        self._api_key = api_key
        self.topics = topics
        self.processor = processor
        self.ingest_metrics = metrics
        self.on_fatal = on_fatal
        self.backoff = Backoff(initial_delay_s, max_delay_s, jitter=_JITTER, rng=rng)
        self.max_connections_delay_s = max_connections_delay_s
        self.auth_timeout_s = auth_timeout_s
        self.open_timeout_s = open_timeout_s
        self.ping_interval_s = ping_interval_s
        self.max_frame_bytes = max_frame_bytes
        self._oversized = ""
        self.queue_warning_at = max(1, int(processor.mailbox.maxsize * queue_warning_ratio))
        self.clock = clock
        self.delays: list[float] = []
        """Every reconnect delay used, in order."""
        self.sessions = 0
        """WebSocket connections opened."""
        self.connected = False
        """True while authenticated and subscribed."""
        self.fatal: str | None = None
        """The reason given to ``on_fatal``, once it was called."""
        self._warned_queue = False
        self._warned_full = False
        self._ws_logger = redacting_logger(CLIENT_LOGGER, api_key)
        self.spawn(self._run, name="ingest.reader.connection")

    def __repr__(self) -> str:
        return f"FeedReader(url={self.url!r}, topics={len(self.topics)})"

    def backoff_s(self, failures: int, reason: str) -> float:
        """Delay before reconnecting after the ``failures``-th consecutive failed session."""
        floor_s = self.max_connections_delay_s if reason == protocol.MAX_CONNECTIONS else 0.0
        return self.backoff.delay_s(failures - 1, floor_s=floor_s)

    async def _run(self) -> None:
        failures = 0
        while True:
            reason, flowing = await self._session()
            if self.connected:
                # after the frames of the session: the processor opens the gap in order
                detail = self._oversized if reason == FRAME_TOO_BIG else _WHY.get(reason or "", "")
                await self.processor.tell(Disconnected(reason or "stopped", detail=detail))
            self._set_connected(False)
            if reason is None:
                return
            failures = 1 if flowing else failures + 1
            delay = self.backoff_s(failures, reason)
            self.delays.append(delay)
            self.ingest_metrics.reconnects.labels(reason).inc()
            log.warning(
                "ingest.reconnecting",
                reason=reason,
                delay_s=round(delay, 3),
                attempt=failures,
                why=_WHY.get(reason),
            )
            await asyncio.sleep(delay)

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        self.ingest_metrics.connected.set(1 if connected else 0)

    async def _session(self) -> tuple[str | None, bool]:
        """One connection's life: (why it ended, None when fatal; whether data flowed)."""
        flowing = False
        opened = False
        try:
            async with connect(
                self.url,
                max_size=self.max_frame_bytes,
                max_queue=256,
                ping_interval=self.ping_interval_s,
                ping_timeout=self.ping_interval_s,
                open_timeout=self.open_timeout_s,
                close_timeout=2,
                logger=self._ws_logger,
            ) as socket:
                opened = True
                self.sessions += 1
                await self._handshake(socket)
                self._set_connected(True)
                log.info(
                    "ingest.subscribed",
                    url=self.url,
                    topics=len(self.topics),
                    sample=",".join(self.topics[:5]),
                )
                frames_received = self.ingest_metrics.frames_received
                clock = self.clock
                while True:
                    payload = await socket.recv(decode=False)
                    frames_received.inc()
                    if _STATUS_PROBE in payload:
                        ended, has_data = await self._status_frame(payload)
                        flowing = flowing or has_data
                        if ended:
                            return ended, flowing
                        continue
                    flowing = True
                    await self._enqueue(Frame(payload, clock.now_ms(), clock.monotonic()))
        except FatalFeedError as exc:
            self.fatal = str(exc)
            log.critical("ingest.fatal", reason=self.fatal)
            self.on_fatal(self.fatal)
            return None, flowing
        except InvalidURI as exc:
            self.fatal = f"bad feed URL (INGEST_POLYGON_URL): {exc}"
            log.critical("ingest.fatal", reason=self.fatal)
            self.on_fatal(self.fatal)
            return None, flowing
        except FeedDisconnect as exc:
            return exc.reason, flowing
        except ConnectionClosedOK:
            log.warning("ingest.connection_closed", detail="the server closed without a status")
            return CLOSED, flowing
        except ConnectionClosed as exc:
            if exc.sent is not None and exc.sent.code == CloseCode.MESSAGE_TOO_BIG:
                return self._frame_too_big(exc), flowing
            log.warning("ingest.connection_lost", error=type(exc).__name__, detail=str(exc)[:200])
            return CONNECTION_LOST, flowing
        except TimeoutError:
            if opened:
                log.warning("ingest.handshake_timeout", timeout_s=self.auth_timeout_s)
                return HANDSHAKE_TIMEOUT, flowing
            log.warning("ingest.connect_failed", error="TimeoutError", url=self.url)
            return CONNECT_FAILED, flowing
        except (OSError, InvalidHandshake) as exc:
            reason = CONNECTION_LOST if opened else CONNECT_FAILED
            log.warning(
                f"ingest.{reason}", error=type(exc).__name__, detail=str(exc)[:200], url=self.url
            )
            return reason, flowing

    def _frame_too_big(self, exc: ConnectionClosed) -> str:
        """Count a frame over the limit; its dead letter goes with the ``Disconnected``."""
        self.ingest_metrics.oversized_frames.inc()
        cause = str(exc.__cause__ or exc)
        self._oversized = (
            f"WebSocket frame over INGEST_MAX_FRAME_BYTES={self.max_frame_bytes} from "
            f"{self.url}: {cause} (refused unread; connection reopened)"
        )
        log.warning("ingest.frame_too_big", limit=self.max_frame_bytes, detail=cause[:200])
        return FRAME_TOO_BIG

    async def _handshake(self, socket: ClientConnection) -> None:
        """``connected`` → send auth → ``auth_success`` → send the subscription."""
        await self._expect(socket, protocol.CONNECTED)
        try:
            await socket.send(protocol.encode_auth(self._api_key.reveal()), text=True)
        except ConnectionClosed:
            pass  # the server may have said why before closing (auth_timeout): read on
        await self._expect(socket, protocol.AUTH_SUCCESS)
        await socket.send(protocol.encode_subscribe(self.topics), text=True)

    async def _expect(self, socket: ClientConnection, wanted: str) -> None:
        """Read until the status ``wanted``; an ending status raises, data is passed on."""
        while True:
            payload = await asyncio.wait_for(socket.recv(decode=False), self.auth_timeout_s)
            self.ingest_metrics.frames_received.inc()
            if _STATUS_PROBE not in payload:
                await self._enqueue(Frame(payload, self.clock.now_ms(), self.clock.monotonic()))
                continue
            ended, _ = await self._status_frame(payload, wanted)
            if ended == wanted:
                return
            if ended:
                raise FeedDisconnect(ended)

    async def _status_frame(self, payload: bytes, wanted: str = "") -> tuple[str | None, bool]:
        """Count and log the statuses of a frame; pass any data in it on to the processor.

        Returns (the status that ends the session or is ``wanted``, whether it held data).
        Raises ``FatalFeedError`` on ``auth_failed``.
        """
        events, bad = protocol.decode_frame(payload)
        ended: str | None = None
        has_data = bool(bad)
        by_status: dict[str, list[StatusEvent]] = {}
        for event in events:
            if type(event) is StatusEvent:
                by_status.setdefault(event.status, []).append(event)
            else:
                has_data = True
        for status, group in by_status.items():
            self._log_statuses(status, group)
            if status == protocol.AUTH_FAILED:
                raise FatalFeedError(
                    "the feed refused the API key (auth_failed: "
                    f"{self._redact(group[0].message)!r}): check POLYGON_API_KEY and the plan's "
                    "access to this feed; not retrying"
                )
            if status == wanted or status in END_STATUSES:
                ended = ended or status
        if has_data:
            await self._enqueue(Frame(payload, self.clock.now_ms(), self.clock.monotonic()))
        return ended, has_data

    def _redact(self, text: str) -> str:
        return redact(text, {self._api_key.reveal()} if self._api_key else set())

    def _log_statuses(self, status: str, group: list[StatusEvent]) -> None:
        self.ingest_metrics.statuses.labels(status).inc(len(group))
        level = "warning" if status in _LOUD_STATUSES else "info"
        # One line per status kind and frame: a subscription of 3000 symbols answers with
        # 3000 ``success`` statuses in one frame.
        getattr(log, level)(
            "ingest.status",
            status=status,
            count=len(group),
            message=self._redact(group[0].message)[:200],
        )

    async def _enqueue(self, frame: Frame) -> None:
        processor = self.processor
        mailbox = processor.mailbox
        if not mailbox.put_nowait(frame):
            self.ingest_metrics.queue_full.inc()
            if not self._warned_full:
                self._warned_full = True
                log.warning(
                    "ingest.reader_paused",
                    capacity=mailbox.maxsize,
                    hint="the queue to the processor is full: reading waits (TCP "
                    "backpressure); the server cuts us off as a slow consumer "
                    "if this lasts",
                )
            await processor.tell(frame)
        depth = len(mailbox)
        if depth >= self.queue_warning_at:
            if not self._warned_queue:
                self._warned_queue = True
                self.ingest_metrics.warnings.labels("queue").inc()
                log.warning(
                    "ingest.queue_filling",
                    depth=depth,
                    capacity=mailbox.maxsize,
                    threshold=self.queue_warning_at,
                    hint="processing is slower than the feed; reading pauses when the "
                    "queue is full and the server may then cut us off as a slow "
                    "consumer",
                )
        elif self._warned_queue and depth < self.queue_warning_at // 2:
            self._warned_queue = self._warned_full = False
            log.info("ingest.queue_recovered", depth=depth)
