"""The Polygon-compatible WebSocket server: sessions, the feed loop, faults and the HTTP
control endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from services.ingest import protocol
from services.ingest.protocol import (
    KIND_OF,
    TRADES,
    Event,
    TradeEvent,
)
from services.ingest.redact import SERVER_LOGGER, redacting_logger
from services.ingest.simulator.days import DayReplay
from services.ingest.simulator.feeds import (
    SyntheticMarket,
    _now_ms,
    file_frames,
    malformed_frames,
    oversized_frame,
    synthetic_frames,
)
from services.ingest.simulator.reference import PREFIX as TICKERS_PREFIX
from services.ingest.simulator.reference import ticker_endpoint
from services.ingest.simulator.rest import PREFIX as REST_PREFIX
from services.ingest.simulator.rest import TradeHistory, TradesEndpoint
from services.ingest.simulator.session import _Session
from services.ingest.simulator.settings import (
    _DISCONNECT_STATUS,
    CLOSE_GOING_AWAY,
    CLOSE_POLICY,
    CONTROL_KEY_HEADER,
    CONTROL_PREFIX,
    MSG_AUTH_FAILED,
    MSG_AUTH_REQUIRED,
    MSG_AUTH_TIMEOUT,
    MSG_AUTHENTICATED,
    MSG_CONNECTED,
    MSG_MAX_CONNECTIONS,
    MSG_SLOW_CONSUMER,
    Fault,
    FileFeed,
    SimulatorSettings,
    SyntheticFeed,
)
from services.ingest.simulator.synthetic_day import synthetic_day_trades

log = structlog.get_logger("ingest.simulator")

FRAMES_PER_YIELD = 32
"""Frames the feed makes before it lets the writers run, at most, when nothing else makes it
wait: a paced feed waits between frames anyway; one sent as fast as possible then goes out in
writes of up to this many frames instead of a write per frame."""


@dataclass
class SimulatorStats:
    """Counters of one simulator run."""

    connections_total: int = 0
    auth_failures: int = 0
    events_generated: int = 0
    frames_generated: int = 0
    slow_consumer_disconnects: int = 0
    faults: dict[str, int] = field(default_factory=dict)


class PolygonSimulator:
    """The simulator: ``await start()``, clients connect to ``url``, ``await stop()``.

    ``inject(fault, count)`` triggers a fault; ``burst(factor, seconds)`` speeds a file feed
    up for a while. ``feed_done`` is set when a finite feed has sent everything (every day of
    a file feed; the server keeps serving until stopped).
    """

    def __init__(self, settings: SimulatorSettings, feed: AsyncIterator[list[Event]] | None = None):
        self.settings = settings
        self.stats = SimulatorStats()
        self.feed_done = asyncio.Event()
        self.feed_time_ms = 0
        """The newest event time of the trades sent (the feed's own clock)."""
        self._unyielded = 0
        """Frames published since the feed last let the writers run."""
        self.history = TradeHistory(settings.history_max_trades)
        """The newest trades the feed produced (served on ``/v3/trades``)."""
        self.rest = TradesEndpoint(self.history, settings.api_key.reveal())
        self.tickers = ticker_endpoint(settings, self.history)
        """``/v3/reference/tickers``: the listing exchange of the symbols it knows."""
        self._custom_feed = feed
        self.replay: DayReplay | None = None
        """The file feed's days (None for a synthetic or custom feed)."""
        self._day_trades: list[TradeEvent] | None = None
        """A synthetic day's trades (``--synthetic-day``)."""
        self._server: Server | None = None
        self._sessions: dict[int, _Session] = {}
        self._numbers = itertools.count(1)
        self._feed_task: asyncio.Task[None] | None = None
        self._handler_tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle

    async def start(self) -> None:
        """Load the feed (file feeds read their files here) and bind the server."""
        settings = self.settings
        if isinstance(settings.feed, SyntheticFeed) and settings.feed.day is not None:
            self._day_trades = await asyncio.to_thread(synthetic_day_trades, settings.feed)
            log.info(
                "simulator.synthetic_day",
                day=settings.feed.day.isoformat(),
                trades=len(self._day_trades),
            )
        elif isinstance(settings.feed, FileFeed) and self._custom_feed is None:
            self.replay = DayReplay(
                settings.feed,
                frame_max_events=settings.frame_max_events,
                window_ms=settings.frame_window_ms,
                minute_aggregates=settings.minute_aggregates,
            )
            await self.replay.load()
        self._server = await serve(
            self._handle,
            settings.host,
            settings.port,
            process_request=self._process_request,
            compression=None,
            close_timeout=settings.close_timeout_s,
            ping_interval=settings.ping_interval_s,
            max_size=2**20,
            # websockets logs received frames at DEBUG, the clients' auth (the key) included.
            logger=redacting_logger(SERVER_LOGGER, settings.api_key),
        )
        log.info("simulator.listening", url=self.url, feed=type(settings.feed).__name__)
        if not settings.start_feed_on_subscribe:
            self._start_feed()

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._server is None:
            raise RuntimeError("the simulator is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """``ws://host:port/stocks``."""
        return f"ws://{self.settings.host}:{self.port}/stocks"

    async def stop(self) -> None:
        """Stop the feed, close every connection (1001) and the server."""
        if self._feed_task is not None:
            self._feed_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feed_task
        for session in list(self._sessions.values()):
            self._close(session, None, "server stopping", CLOSE_GOING_AWAY)
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
        log.info("simulator.stopped", **self.stats_dict())

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    def stats_dict(self) -> dict[str, Any]:
        """Counters plus the current sessions, JSON-ready."""
        sessions = [
            {
                "session": session.number,
                "authed": session.authed,
                "subscriptions": sorted(f"{kind}.*" for kind in session.wild)
                + sorted(f"{kind}.{sym}" for kind, syms in session.exact.items() for sym in syms),
                "pendingBytes": session.pending_bytes,
                "framesSent": session.frames_sent,
                "writes": session.writes,
            }
            for session in self._sessions.values()
        ]
        return {
            "connectionsTotal": self.stats.connections_total,
            "authFailures": self.stats.auth_failures,
            "eventsGenerated": self.stats.events_generated,
            "framesGenerated": self.stats.frames_generated,
            "slowConsumerDisconnects": self.stats.slow_consumer_disconnects,
            "faults": dict(self.stats.faults),
            "feedDone": self.feed_done.is_set(),
            "feedTimeMs": self.feed_time_ms,
            "historyTrades": self.history.kept,
            "historyDropped": self.history.dropped,
            "historyKeptFromMs": self.history.kept_from_ms,
            "sessions": sessions,
            **(self.replay.status() if self.replay is not None else {}),
        }

    # -- faults

    def inject(self, fault: Fault | str, count: int = 1) -> int:
        """Inject a fault; returns the number of sessions it reached.

        Disconnect faults (``drop``, ``slow_consumer``, ``max_connections``,
        ``force_disconnect``) hit up to ``count`` sessions, oldest first (``count=0``: all).
        ``malformed`` sends ``count`` rounds of bad frames to every authenticated session
        (regardless of its subscriptions); ``oversized_frame`` one frame of ``count`` MiB.
        """
        fault = Fault(fault)
        if count < 0:
            raise ValueError(f"count must be 0 or more, not {count}")
        live = [s for s in self._sessions.values() if not s.closing]
        if fault is Fault.REST_THROTTLE:
            self.rest.throttle += max(count, 1)
            targets = []
        elif fault is Fault.OVERSIZED_FRAME:
            targets = [s for s in live if s.authed]
            huge = oversized_frame(max(count, 1) * 1_048_576)
            for session in targets:
                session.enqueue(huge)
        elif fault is Fault.MALFORMED:
            targets = [s for s in live if s.authed]
            for session in targets:
                for _ in range(max(count, 1)):
                    # stamped with the feed's own time (a replayed day's), never the host's
                    stamp = self.feed_time_ms or _now_ms()
                    for frame in malformed_frames(_session_symbol(session), stamp):
                        session.enqueue(frame)
        else:
            targets = live if count == 0 else live[:count]
            for session in targets:
                if fault is Fault.DROP:
                    session.abort()
                else:
                    status, message = _DISCONNECT_STATUS[fault]
                    self._close(session, status, message)
        self.stats.faults[fault.value] = self.stats.faults.get(fault.value, 0) + 1
        log.info("simulator.fault_injected", fault=fault.value, count=count, sessions=len(targets))
        return len(targets)

    def burst(self, factor: float, seconds: float) -> dict[str, float]:
        """Replay a file feed ``factor`` times faster for ``seconds`` (an overload burst)."""
        if self.replay is None:
            raise ValueError("a burst needs a file feed")
        self.replay.pace.burst(factor, seconds)
        self.stats.faults["burst"] = self.stats.faults.get("burst", 0) + 1
        log.info("simulator.burst", factor=factor, seconds=seconds)
        return self.replay.pace.status()

    def release(self) -> int:
        """Let the next day of a file feed start (when it holds between days)."""
        if self.replay is None:
            raise ValueError("release needs a file feed")
        releases = self.replay.release()
        log.info("simulator.released", releases=releases)
        return releases

    # -- HTTP control

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.startswith(REST_PREFIX):
            return self.rest.respond(connection, request)
        if request.path.startswith(TICKERS_PREFIX):
            return self.tickers.respond(connection, request)
        if not request.path.startswith(CONTROL_PREFIX) or not self.settings.control:
            return None
        supplied = request.headers.get(CONTROL_KEY_HEADER, "")
        if not hmac.compare_digest(supplied.encode(), self.settings.api_key.reveal().encode()):
            return _json_response(connection, HTTPStatus.UNAUTHORIZED, {"error": "bad key"})
        parts = urlsplit(request.path)
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        if parts.path == CONTROL_PREFIX + "status":
            return _json_response(connection, HTTPStatus.OK, self.stats_dict())
        if parts.path == CONTROL_PREFIX + "burst":
            try:
                pace = self.burst(float(query.get("factor", "5")), float(query.get("seconds", "3")))
            except ValueError as exc:
                return _json_response(connection, HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return _json_response(connection, HTTPStatus.OK, pace)
        if parts.path == CONTROL_PREFIX + "release":
            try:
                releases = self.release()
            except ValueError as exc:
                return _json_response(connection, HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return _json_response(connection, HTTPStatus.OK, {"releases": releases})
        if parts.path == CONTROL_PREFIX + "inject":
            try:
                fault = Fault(query.get("fault", ""))
                count = int(query.get("count", "1"))
                reached = self.inject(fault, count)
            except ValueError as exc:
                faults = ", ".join(f.value for f in Fault)
                return _json_response(
                    connection, HTTPStatus.BAD_REQUEST, {"error": f"{exc} (faults: {faults})"}
                )
            return _json_response(
                connection, HTTPStatus.OK, {"fault": fault.value, "sessions": reached}
            )
        return _json_response(connection, HTTPStatus.NOT_FOUND, {"error": "unknown control path"})

    # -- connections

    async def _handle(self, ws: ServerConnection) -> None:
        number = next(self._numbers)
        session = _Session(number, ws, self.settings.slow_consumer_buffer_bytes)
        self._sessions[number] = session
        self.stats.connections_total += 1
        # Only the path: some clients put their key in the query string.
        path = urlsplit(ws.request.path).path if ws.request else ""
        bound = log.bind(session=number, path=path)
        bound.info("simulator.connected", remote=str(ws.remote_address))
        writer = asyncio.create_task(session.write_loop(), name=f"sim-writer-{number}")
        session.tasks.append(writer)
        session.status(protocol.CONNECTED, MSG_CONNECTED)
        try:
            await self._read_loop(session, bound)
        except ConnectionClosed:
            pass
        finally:
            # recv() raises only once the connection is closed: nothing is left to send.
            self._sessions.pop(number, None)
            session.closing = True
            session.drained.set()
            for task in session.tasks:
                task.cancel()
            await asyncio.gather(*session.tasks, return_exceptions=True)
            bound.info(
                "simulator.disconnected",
                frames_sent=session.frames_sent,
                code=ws.close_code,
            )

    async def _read_loop(self, session: _Session, bound: Any) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.auth_timeout_s
        ws = session.ws
        while True:
            if not session.authed and not session.closing:
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await ws.recv()
                except TimeoutError:
                    bound.info("simulator.auth_timeout")
                    self._close(session, protocol.AUTH_TIMEOUT, MSG_AUTH_TIMEOUT)
                    continue
            else:
                message = await ws.recv()
            if not session.closing:
                self._on_message(session, message, bound)

    def _close(
        self, session: _Session, status: str | None, message: str, code: int = CLOSE_POLICY
    ) -> bool:
        """Send ``status`` and close ``session``, aborting it if the close stalls."""
        if not session.close_with(status, message, code):
            return False
        session.tasks.append(
            asyncio.create_task(self._watchdog(session), name=f"sim-watchdog-{session.number}")
        )
        return True

    async def _watchdog(self, session: _Session) -> None:
        """Abort a closing connection that has not closed within the close timeout.

        The writer may be stuck sending to a client that stopped reading; ``close`` alone
        would wait behind it.
        """
        await asyncio.sleep(self.settings.close_timeout_s)
        if session.number in self._sessions:
            log.info("simulator.abort_after_close_timeout", session=session.number)
            session.ws.transport.abort()

    def _on_message(self, session: _Session, message: str | bytes, bound: Any) -> None:
        try:
            action = protocol.decode_action(message)
        except Exception:  # any undecodable client message gets the same answer
            session.status(protocol.ERROR, "invalid message: want a JSON object with an action")
            return
        if action.action == "auth":
            self._on_auth(session, action.params, bound)
        elif action.action in ("subscribe", "unsubscribe"):
            if not session.authed:
                session.status(protocol.AUTH_REQUIRED, MSG_AUTH_REQUIRED)
                return
            topics = protocol.parse_topics(action.params)
            if not topics:
                session.status(protocol.ERROR, f"no topics given to {action.action}")
                return
            replies = session.change(topics, action.action == "subscribe")
            session.enqueue(protocol.encode_statuses(replies))
            bound.info("simulator.subscriptions", action=action.action, topics=",".join(topics))
            if session.subscribed:
                self._start_feed()
        else:
            session.status(protocol.ERROR, f"unknown action: {action.action[:40]!r}")

    def _on_auth(self, session: _Session, key: str, bound: Any) -> None:
        if session.authed:
            session.status(protocol.AUTH_SUCCESS, MSG_AUTHENTICATED)
            return
        if not hmac.compare_digest(key.encode(), self.settings.api_key.reveal().encode()):
            self.stats.auth_failures += 1
            bound.info("simulator.auth_failed")
            self._close(session, protocol.AUTH_FAILED, MSG_AUTH_FAILED)
            return
        authed = sum(1 for s in self._sessions.values() if s.authed and not s.closing)
        if authed >= self.settings.max_connections:
            bound.info("simulator.max_connections", limit=self.settings.max_connections)
            self._close(session, protocol.MAX_CONNECTIONS, MSG_MAX_CONNECTIONS)
            return
        session.authed = True
        session.status(protocol.AUTH_SUCCESS, MSG_AUTHENTICATED)
        bound.info("simulator.authenticated")

    # -- the feed

    def _start_feed(self) -> None:
        if self._feed_task is None:
            self._feed_task = asyncio.create_task(self._run_feed(), name="sim-feed")

    def _frames(self) -> AsyncIterator[list[Event]]:
        if self._custom_feed is not None:
            return self._custom_feed
        settings = self.settings
        if self.replay is not None:
            return self.replay.frames()
        assert isinstance(settings.feed, SyntheticFeed)
        if self._day_trades is not None:  # a synthetic day: its trades, paced like a file's
            return file_frames(
                self._day_trades,
                settings.feed.speed,
                settings.frame_max_events,
                settings.frame_window_ms,
                settings.minute_aggregates,
            )
        return synthetic_frames(
            SyntheticMarket(settings.feed),
            settings.feed.rate_per_s,
            settings.frame_max_events,
            settings.minute_aggregates,
        )

    async def _run_feed(self) -> None:
        limit = self.settings.max_events
        stats = self.stats
        log.info("simulator.feed_started")
        try:
            async for events in self._frames():
                if limit is not None and stats.events_generated + len(events) > limit:
                    events = events[: limit - stats.events_generated]
                if events:
                    stats.events_generated += len(events)
                    stats.frames_generated += 1
                    await self.publish(events)
                if limit is not None and stats.events_generated >= limit:
                    break
        finally:
            self.feed_done.set()
            log.info("simulator.feed_done", events=stats.events_generated)

    async def wait_sent(self, poll_s: float = 0.05) -> None:
        """Wait until the feed is done and every session's queue is empty."""
        await self.feed_done.wait()
        # Polled: the session queues are plain deques, kept free of event bookkeeping.
        while any(session.queue for session in self._sessions.values()):  # noqa: ASYNC110
            await asyncio.sleep(poll_s)

    async def publish(self, events: list[Event]) -> None:
        """Send one frame's events to every subscribed session, then honour backpressure.

        A session whose queue is above ``slow_consumer_buffer_bytes`` pauses the feed until it
        drains to half that; if it has not within ``slow_consumer_after_s`` it gets
        ``slow_consumer`` and is closed (``None``: wait as long as it takes).
        """
        kinds = frozenset(KIND_OF[type(event)] for event in events)
        if TRADES in kinds:
            self.feed_time_ms = max(self.feed_time_ms, events[-1].t)  # type: ignore[union-attr]
            self.history.add([e for e in events if isinstance(e, TradeEvent)])
        whole: bytes | None = None
        for session in self._sessions.values():
            if not session.authed or session.closing:
                continue
            selected = session.select(events, kinds)
            if not selected:
                continue
            if selected is events:
                if whole is None:
                    whole = protocol.encode_events(events)
                session.enqueue(whole)
            else:
                session.enqueue(protocol.encode_events(selected))
        full = [s for s in self._sessions.values() if not s.drained.is_set() and not s.closing]
        if full:
            self._unyielded = 0
            await self._wait_drained(full)
        elif self._unyielded >= FRAMES_PER_YIELD:
            self._unyielded = 0
            await asyncio.sleep(0)  # the writers send what is queued, in one write each
        else:
            self._unyielded += 1

    async def _wait_drained(self, sessions: list[_Session]) -> None:
        waits = {asyncio.create_task(session.drained.wait()): session for session in sessions}
        try:
            _, slow = await asyncio.wait(waits, timeout=self.settings.slow_consumer_after_s)
        finally:
            for task in waits:
                task.cancel()
        for task in slow:
            session = waits[task]
            pending_bytes = session.pending_bytes
            if self._close(session, protocol.SLOW_CONSUMER, MSG_SLOW_CONSUMER):
                self.stats.slow_consumer_disconnects += 1
                log.warning(
                    "simulator.slow_consumer", session=session.number, pending_bytes=pending_bytes
                )


def _session_symbol(session: _Session) -> str:
    syms = sorted(session.exact.get(TRADES, ()))
    return syms[0] if syms else "TEST"


def _json_response(connection: ServerConnection, status: HTTPStatus, body: Any) -> Response:
    response = connection.respond(status, json.dumps(body) + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


async def run_simulator(
    settings: SimulatorSettings,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[PolygonSimulator], None] | None = None,
) -> dict[str, Any]:
    """Run the simulator until ``stop`` is set or ``settings.duration_s`` has passed.

    ``on_ready`` is called once it listens. Returns the final counters.
    """
    stop = stop or asyncio.Event()
    simulator = PolygonSimulator(settings)
    await simulator.start()
    try:
        if on_ready is not None:
            on_ready(simulator)
        waits: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait(), name="sim-stop")]
        if settings.exit_when_feed_done:
            waits.append(asyncio.create_task(simulator.wait_sent(), name="sim-feed-sent"))
        try:
            await asyncio.wait(
                waits, timeout=settings.duration_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
    finally:
        await simulator.stop()
    return simulator.stats_dict()
