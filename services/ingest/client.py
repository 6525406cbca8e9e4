"""The Polygon WebSocket client: a reader that only reads, and a processor that does the rest.

``FeedReader`` owns the connection: connect, auth, subscribe, then read frames and hand them
to the processor's bounded mailbox — nothing else, so processing can never stall the socket
or its keepalive pings. Status frames are handled by the reader itself (they decide about the
connection). It reconnects with exponential backoff and jitter, re-authenticates and
re-subscribes; ``auth_failed`` is fatal (one clear log line, the service exits non-zero, no
hot loop); ``max_connections`` waits longer and says why. Every status is logged and counted.

``FrameProcessor`` decodes frames (bad events go to the dead-letter stream with their raw
bytes), groups them per (kind, symbol) and publishes one record per (frame, symbol) with the
sequenced, pipelined publisher, several frames per round trip when it is behind.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import NamedTuple

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from libs.common.actors import Actor, Overflow
from libs.common.clock import SYSTEM_CLOCK, Clock
from libs.common.deadletter import DeadLetters
from libs.common.redis_io import Publisher
from libs.common.settings import Secret
from services.ingest import protocol

log = structlog.get_logger("tickmesh.ingest")


class Frame(NamedTuple):
    """One WebSocket frame and when it was received (epoch ms)."""

    data: bytes
    received_ms: int


class IngestMetrics:
    """The ingest service's own metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.frames = Counter("tickmesh_ingest_frames", "Frames received", registry=registry)
        self.events = Counter("tickmesh_ingest_events", "Events decoded by type", ["type"],
                              registry=registry)
        self.decode_errors = Counter("tickmesh_ingest_decode_errors",
                                     "Events or frames that failed to decode", registry=registry)
        self.statuses = Counter("tickmesh_ingest_statuses", "Status messages by status",
                                ["status"], registry=registry)
        self.reconnects = Counter("tickmesh_ingest_reconnects", "Reconnects by reason",
                                  ["reason"], registry=registry)
        self.queue_depth = Gauge("tickmesh_ingest_queue_depth",
                                 "Frames waiting between reader and processor", registry=registry)
        self.feed_lag = Gauge("tickmesh_ingest_feed_lag_seconds",
                              "Now minus the newest event time of the last frame",
                              registry=registry)
        self.connected = Gauge("tickmesh_ingest_connected", "1 while authenticated and subscribed",
                               registry=registry)


class FatalFeedError(Exception):
    """A feed condition a reconnect cannot fix (a refused key)."""


class FeedDisconnect(Exception):
    """The server ended the session with a status (``slow_consumer``, ``auth_timeout``...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FrameProcessor(Actor[Frame]):
    """Decodes frames and publishes the records (one per frame and symbol)."""

    def __init__(
        self,
        publisher: Publisher,
        dead_letters: DeadLetters,
        metrics: IngestMetrics,
        *,
        queue_size: int,
        batch_frames: int,
        source: str,
        lag_warning_ms: int,
        queue_warning_ratio: float,
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        # BLOCK: a full queue pauses the reader (TCP backpressure) rather than dropping data;
        # the queue warning fires at queue_warning_ratio, well before that happens.
        super().__init__("ingest.processor", mailbox_size=queue_size, overflow=Overflow.BLOCK,
                         registry=registry)
        self.publisher = publisher
        self.dead_letters = dead_letters
        self.m = metrics
        self.batch_frames = batch_frames
        self.source = source
        self.lag_warning_ms = lag_warning_ms
        self.queue_warning = max(1, int(queue_size * queue_warning_ratio))
        self.clock = clock
        self.lag_ms = 0
        self.ticks_published = 0
        self._warned_queue = False
        self._warned_lag = False

    async def handle(self, message: Frame) -> None:
        frames = [message, *self.mailbox.take_nowait(self.batch_frames - 1)]
        depth = len(self.mailbox)
        self.m.queue_depth.set(depth)
        self._check_queue(depth)
        records: list[tuple[str, bytes]] = []
        newest_event_ms = 0
        for frame in frames:
            events, bad = protocol.decode_frame(frame.data)
            self.m.frames.inc()
            if bad:
                self.m.decode_errors.inc(len(bad))
                for item in bad:
                    await self.dead_letters.send(self.source, item.error, item.raw)
            if not events:
                continue
            split = protocol.split_frame(events)
            for kind, by_symbol in split.items():
                if kind == protocol.STATUS:
                    continue
                count = 0
                for group in by_symbol.values():
                    count += len(group)
                    last_t = getattr(group[-1], "t", 0) or getattr(group[-1], "e", 0)
                    if last_t > newest_event_ms:
                        newest_event_ms = last_t
                self.m.events.labels(kind).inc(count)
                if kind == protocol.TRADES:
                    self.ticks_published += count
            records.extend(protocol.build_records(split, frame.received_ms))
        if records:
            await self.publisher.publish_many(records)
        if newest_event_ms:
            self._check_lag(self.clock.now_ms() - newest_event_ms)

    def _check_queue(self, depth: int) -> None:
        if depth >= self.queue_warning and not self._warned_queue:
            self._warned_queue = True
            log.warning("ingest.queue_filling", depth=depth, capacity=self.mailbox.maxsize,
                        hint="processing is slower than the feed; the server may cut us off as "
                             "a slow consumer if this goes on")
        elif depth < self.queue_warning // 2 and self._warned_queue:
            self._warned_queue = False
            log.info("ingest.queue_recovered", depth=depth)

    def _check_lag(self, lag_ms: int) -> None:
        self.lag_ms = lag_ms
        self.m.feed_lag.set(lag_ms / 1000.0)
        if lag_ms > self.lag_warning_ms and not self._warned_lag:
            self._warned_lag = True
            log.warning("ingest.feed_lag_high", lag_ms=lag_ms, threshold_ms=self.lag_warning_ms)
        elif lag_ms < self.lag_warning_ms // 2 and self._warned_lag:
            self._warned_lag = False
            log.info("ingest.feed_lag_recovered", lag_ms=lag_ms)


def subscription_topics(symbols: list[str], event_types: list[str]) -> list[str]:
    """``T.SPY``-style topics for every (event type, symbol); ``*`` subscribes to all."""
    unknown = [kind for kind in event_types if kind not in protocol.DATA_KINDS]
    if unknown:
        raise ValueError(f"unknown Polygon event types {unknown}; use {protocol.DATA_KINDS}")
    return [f"{kind}.{symbol}" for kind in event_types for symbol in symbols]


class FeedReader(Actor[None]):
    """Owns the WebSocket: connect, auth, subscribe, read; reconnect with backoff."""

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
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__("ingest.reader", mailbox_size=1, registry=registry)
        self.url = url
        self._api_key = api_key
        self.topics = topics
        self.processor = processor
        self.m = metrics
        self.on_fatal = on_fatal
        self.initial_delay_s = initial_delay_s
        self.max_delay_s = max_delay_s
        self.max_connections_delay_s = max_connections_delay_s
        self.auth_timeout_s = auth_timeout_s
        self.clock = clock
        self.rng = rng or random.Random()
        self.delays: list[float] = []
        """Every reconnect delay used, in order."""
        self.connected = False
        self.spawn(self._run, name="ingest.reader.connection")

    def __repr__(self) -> str:
        return f"FeedReader(url={self.url!r}, topics={len(self.topics)})"

    async def _run(self) -> None:
        failures = 0
        while True:
            reason, stable = await self._session()
            self.connected = False
            self.m.connected.set(0)
            if reason is None:
                return
            failures = 0 if stable else failures + 1
            delay = min(self.max_delay_s, self.initial_delay_s * 2 ** failures)
            if reason == protocol.MAX_CONNECTIONS:
                delay = max(delay, self.max_connections_delay_s)
            delay *= self.rng.uniform(0.8, 1.2)
            self.delays.append(delay)
            self.m.reconnects.labels(reason).inc()
            log.warning("ingest.reconnecting", reason=reason, delay_s=round(delay, 2),
                        attempt=failures + 1,
                        why=("another connection uses this key (max_connections); waiting "
                             "longer before trying again" if reason == protocol.MAX_CONNECTIONS
                             else None))
            await asyncio.sleep(delay)

    async def _session(self) -> tuple[str | None, bool]:
        """One connection's life; returns (reason it ended, whether it got data flowing)."""
        flowing = False
        try:
            async with connect(self.url, max_size=None, max_queue=1024, ping_interval=20,
                               ping_timeout=20, open_timeout=10, close_timeout=2) as socket:
                await self._handshake(socket)
                self.connected = True
                self.m.connected.set(1)
                log.info("ingest.subscribed", url=self.url, topics=len(self.topics))
                processor = self.processor
                async for data in socket:
                    payload = data.encode() if isinstance(data, str) else data
                    if b'"status"' in payload[:40]:
                        ended = await self._statuses(payload)
                        if ended:
                            return ended, flowing
                        continue
                    flowing = True
                    await processor.tell(Frame(payload, self.clock.now_ms()))
            return "closed", flowing
        except FatalFeedError as exc:
            self.on_fatal(str(exc))
            return None, flowing
        except FeedDisconnect as exc:
            return exc.reason, flowing
        except (ConnectionClosed, OSError, TimeoutError, InvalidHandshake) as exc:
            log.warning("ingest.connection_lost", error=type(exc).__name__, detail=str(exc)[:200])
            return "connection_error", flowing
        except InvalidURI as exc:
            self.on_fatal(f"bad feed URL: {exc}")
            return None, flowing

    async def _handshake(self, socket) -> None:  # type: ignore[no-untyped-def]
        async def expect(wanted: set[str]) -> str:
            while True:
                frame = await asyncio.wait_for(socket.recv(), self.auth_timeout_s)
                events, _bad = protocol.decode_frame(frame)
                for event in events:
                    if isinstance(event, protocol.StatusEvent):
                        self._count_status(event)
                        if event.status in wanted:
                            return event.status
                        if event.status in protocol.DISCONNECT_STATUSES:
                            raise FeedDisconnect(event.status)

        await expect({protocol.CONNECTED})
        await socket.send(protocol.encode_auth(self._api_key.reveal()).decode())
        status = await expect({protocol.AUTH_SUCCESS, protocol.AUTH_FAILED, protocol.AUTH_TIMEOUT})
        if status == protocol.AUTH_FAILED:
            raise FatalFeedError(
                "the feed refused the API key (auth_failed): check POLYGON_API_KEY and its plan; "
                "not retrying")
        if status == protocol.AUTH_TIMEOUT:
            raise FeedDisconnect(protocol.AUTH_TIMEOUT)
        await socket.send(protocol.encode_subscribe(self.topics).decode())

    def _count_status(self, event: protocol.StatusEvent) -> None:
        self.m.statuses.labels(event.status).inc()
        level = "warning" if event.status in protocol.DISCONNECT_STATUSES or \
            event.status in (protocol.ERROR, protocol.AUTH_REQUIRED) else "info"
        getattr(log, level)("ingest.status", status=event.status, message=event.message)

    async def _statuses(self, payload: bytes) -> str | None:
        events, bad = protocol.decode_frame(payload)
        ended: str | None = None
        data_events = []
        for event in events:
            if isinstance(event, protocol.StatusEvent):
                self._count_status(event)
                if event.status in protocol.DISCONNECT_STATUSES:
                    ended = event.status
            else:
                data_events.append(event)
        if data_events or bad:
            await self.processor.tell(Frame(payload, self.clock.now_ms()))
        return ended
