"""A Polygon-compatible stocks WebSocket server: real tick files or synthetic ticks, plus faults.

It speaks the protocol of ``wss://socket.polygon.io/stocks`` (see ``docs/simulator.md``):
frames are JSON arrays sent as text frames; on connect a ``connected`` status; ``auth`` against
the configured key (``auth_success`` / ``auth_failed``, ``auth_timeout`` when none comes in
time); ``subscribe`` / ``unsubscribe`` with comma lists and ``EV.*`` wildcards answered per
topic; ``auth_required`` for a subscription before auth; a limit of authenticated connections
per key (``max_connections``); and, like Polygon, ``slow_consumer`` for a client whose send
buffer stays above a threshold.

Feeds: replay of one day of real trades (``libs.common.market.tickfiles.read_lean_trades``) for some
symbols, merged in time order at a speed factor, with the simulator's own ``AM`` minute
aggregates; or synthetic trades for N symbols at a target rate, deterministic for a seed. The
feed starts when the first client subscribes, so a test or a demo never misses the beginning.

Faults on command: ``PolygonSimulator.inject(fault, count)`` or ``GET /control/inject`` on the
same port (header ``X-Sim-Key``: the simulator key), or ``python -m services.ingest.simulator
inject FAULT``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import heapq
import hmac
import http.client
import itertools
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final, Self
from urllib.parse import parse_qs, urlsplit

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from libs.common.market.sessions import MINUTE_MS, parse_day
from libs.common.runtime.settings import Secret
from libs.common.schemas import Trade
from services.ingest import protocol
from services.ingest.protocol import (
    DATA_KINDS,
    KIND_OF,
    TRADES,
    Event,
    MinuteAggEvent,
    TradeEvent,
)
from services.ingest.redact import SERVER_LOGGER, redacting_logger

log = structlog.get_logger("ingest.simulator")

KEY_ENV: Final = "SIM_API_KEY"
DEFAULT_KEY: Final = "tickmesh-sim"
"""Key accepted when neither ``--key`` nor ``SIM_API_KEY`` is set (a local simulator only)."""
CONTROL_PREFIX: Final = "/control/"
CONTROL_KEY_HEADER: Final = "X-Sim-Key"

# Polygon's wording where it is documented (docs/simulator.md says which).
MSG_CONNECTED: Final = "Connected Successfully"
MSG_AUTHENTICATED: Final = "authenticated"
MSG_AUTH_FAILED: Final = "authentication failed"
MSG_AUTH_TIMEOUT: Final = "No authentication request received."
MSG_AUTH_REQUIRED: Final = "authentication required"
MSG_MAX_CONNECTIONS: Final = "Maximum number of connections exceeded."
MSG_FORCE_DISCONNECT: Final = "Forced disconnect."
MSG_SLOW_CONSUMER: Final = "Slow consumer: server-side buffer full, disconnecting."

# Close codes: 1008 (policy violation) for the server's protocol-level refusals.
CLOSE_POLICY: Final = 1008
CLOSE_GOING_AWAY: Final = 1001

ODD_LOT: Final = 37
"""Polygon trade condition id of an odd-lot trade (used by the synthetic feed)."""
INTERMARKET_SWEEP: Final = 14
SYNTHETIC_EXCHANGES: Final = (1, 2, 3, 4, 7, 8, 10, 11, 12, 15, 17, 19, 21)


class Fault(StrEnum):
    """Faults the simulator injects on command."""

    DROP = "drop"
    """Abort the TCP connection without a close frame."""
    SLOW_CONSUMER = "slow_consumer"
    """Send the ``slow_consumer`` status and close."""
    MAX_CONNECTIONS = "max_connections"
    """Send the ``max_connections`` status and close."""
    FORCE_DISCONNECT = "force_disconnect"
    """Send the ``force_disconnect`` status and close."""
    MALFORMED = "malformed"
    """Send bad JSON, a non-array, an unknown ``ev`` and a frame mixing good and bad trades."""


_DISCONNECT_STATUS: Final[dict[Fault, tuple[str, str]]] = {
    Fault.SLOW_CONSUMER: (protocol.SLOW_CONSUMER, MSG_SLOW_CONSUMER),
    Fault.MAX_CONNECTIONS: (protocol.MAX_CONNECTIONS, MSG_MAX_CONNECTIONS),
    Fault.FORCE_DISCONNECT: (protocol.FORCE_DISCONNECT, MSG_FORCE_DISCONNECT),
}


# ---- settings ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyntheticFeed:
    """Synthetic trades: ``symbols`` names S0001.., ``rate_per_s`` trades a second in total.

    Symbols are drawn with Zipf-like weights (the first ones are busiest); prices random-walk
    from a seeded start; about ``odd_lot_ratio`` of the trades are odd lots (condition 37) and
    ``sweep_ratio`` intermarket sweeps (14); the rest are regular (no conditions, as Polygon
    sends them). The sequence of trades is fixed by ``seed``; their timestamps are wall time.
    """

    symbols: int = 10
    rate_per_s: float = 1_000.0
    seed: int = 1
    odd_lot_ratio: float = 0.05
    sweep_ratio: float = 0.03

    def __post_init__(self) -> None:
        if self.symbols < 1:
            raise ValueError(f"synthetic symbols must be at least 1, not {self.symbols}")
        if not self.rate_per_s > 0:
            raise ValueError(f"synthetic rate must be positive, not {self.rate_per_s}")


@dataclass(frozen=True, slots=True)
class FileFeed:
    """Replay of one day of real trades for ``symbols`` from the tick files under ``data_dir``.

    ``speed`` 1 is real time, 10 ten times faster, 0 as fast as the clients take them.
    """

    data_dir: Path
    day: date
    symbols: tuple[str, ...]
    speed: float = 1.0

    def __post_init__(self) -> None:
        if not self.symbols:
            raise ValueError("a file feed needs at least one symbol")
        if self.speed < 0:
            raise ValueError(f"speed must be 0 (as fast as possible) or positive, not {self.speed}")


@dataclass(frozen=True, slots=True)
class SimulatorSettings:
    """Everything the simulator needs; the key is a ``Secret`` and never shown."""

    api_key: Secret = field(default_factory=lambda: Secret(DEFAULT_KEY))
    host: str = "127.0.0.1"
    port: int = 8765
    feed: SyntheticFeed | FileFeed = field(default_factory=SyntheticFeed)
    max_connections: int = 1
    auth_timeout_s: float = 10.0
    frame_max_events: int = 100
    frame_window_ms: int = 1
    minute_aggregates: bool = True
    duration_s: float | None = None
    max_events: int | None = None
    start_feed_on_subscribe: bool = True
    slow_consumer_buffer_bytes: int = 4 * 1024 * 1024
    slow_consumer_after_s: float | None = 5.0
    close_timeout_s: float = 2.0
    ping_interval_s: float | None = 20.0
    control: bool = True
    exit_when_feed_done: bool = False

    def __post_init__(self) -> None:
        if self.frame_max_events < 1:
            raise ValueError(f"frame_max_events must be at least 1, not {self.frame_max_events}")
        if self.frame_window_ms < 1:
            raise ValueError(f"frame_window_ms must be at least 1, not {self.frame_window_ms}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {self.max_connections}")


# ---- framing and minute aggregates ---------------------------------------------------------


def frames_of(
    trades: Iterable[TradeEvent], frame_max_events: int, window_ms: int
) -> Iterator[list[TradeEvent]]:
    """Cut time-ordered trades into frames: one ``window_ms`` window (and one minute) per frame,
    at most ``frame_max_events`` events each."""
    frame: list[TradeEvent] = []
    window = -1
    for trade in trades:
        trade_window = trade.t // window_ms
        if frame and (
            trade_window != window
            or len(frame) >= frame_max_events
            or trade.t // MINUTE_MS != frame[0].t // MINUTE_MS
        ):
            yield frame
            frame = []
        if not frame:
            window = trade_window
        frame.append(trade)
    if frame:
        yield frame


@dataclass(slots=True)
class _MinuteAcc:
    open: float
    high: float
    low: float
    close: float
    volume: int = 0
    notional: float = 0.0
    trades: int = 0


@dataclass(slots=True)
class _DayAcc:
    open: float
    volume: int = 0
    notional: float = 0.0


class MinuteAggregator:
    """The simulator's own ``AM`` events, from *all* trades it sends (no condition filtering).

    Feed trades in time order with ``add``; ``advance(t)`` closes the minutes before the minute
    of ``t`` and returns their ``AM`` events (symbols without trades get none, as on Polygon).
    ``op`` is the first price the simulator sent for the symbol, ``av``/``a`` accumulate from
    there.
    """

    def __init__(self) -> None:
        self._minute: int | None = None
        self._bars: dict[str, _MinuteAcc] = {}
        self._days: dict[str, _DayAcc] = {}

    def advance(self, t_ms: int) -> list[MinuteAggEvent]:
        """Close the open minute if ``t_ms`` is in a later one; return its aggregates."""
        minute = t_ms - t_ms % MINUTE_MS
        if self._minute is None:
            self._minute = minute
            return []
        if minute <= self._minute:
            return []
        closed = self.flush()
        self._minute = minute
        return closed

    def add(self, trades: Iterable[Trade]) -> None:
        """Account trades of the open minute."""
        bars = self._bars
        days = self._days
        for trade in trades:
            price = trade.p
            size = trade.s
            bar = bars.get(trade.sym)
            if bar is None:
                bar = bars[trade.sym] = _MinuteAcc(price, price, price, price)
            else:
                if price > bar.high:
                    bar.high = price
                if price < bar.low:
                    bar.low = price
                bar.close = price
            bar.volume += size
            bar.notional += price * size
            bar.trades += 1
            day = days.get(trade.sym)
            if day is None:
                day = days[trade.sym] = _DayAcc(price)
            day.volume += size
            day.notional += price * size

    def flush(self) -> list[MinuteAggEvent]:
        """The aggregates of the open minute (and forget it)."""
        if self._minute is None or not self._bars:
            self._bars = {}
            return []
        start = self._minute
        out = []
        for sym, bar in self._bars.items():
            day = self._days[sym]
            out.append(
                MinuteAggEvent(
                    sym=sym,
                    v=bar.volume,
                    av=day.volume,
                    op=day.open,
                    vw=round(bar.notional / bar.volume, 4) if bar.volume else bar.close,
                    o=bar.open,
                    c=bar.close,
                    h=bar.high,
                    l=bar.low,
                    a=round(day.notional / day.volume, 4) if day.volume else bar.close,
                    z=bar.volume // bar.trades,
                    s=start,
                    e=start + MINUTE_MS,
                )
            )
        self._bars = {}
        return out


class VendorMinutes:
    """``AM`` events from the data vendor's own minute bars (the Lean ``minute/`` files).

    A real feed's ``AM`` is the vendor's aggregate, built by the vendor's rules, so a file feed
    that has the vendor's bars sends those (without VWAP, which the files lack), each once the
    feed has moved past its minute. Same interface as ``MinuteAggregator``.
    """

    def __init__(self, events: Sequence[MinuteAggEvent]) -> None:
        self._events = sorted(events, key=lambda event: (event.s, event.sym))
        self._next = 0

    def advance(self, t_ms: int) -> list[MinuteAggEvent]:
        """The vendor bars of the minutes that ended at or before the minute of ``t_ms``."""
        minute = t_ms - t_ms % MINUTE_MS
        start = self._next
        while self._next < len(self._events) and self._events[self._next].e <= minute:
            self._next += 1
        return self._events[start : self._next]

    def add(self, trades: Iterable[Trade]) -> None:
        """Nothing to account: the vendor already did."""

    def flush(self) -> list[MinuteAggEvent]:
        """The vendor bars not sent yet."""
        rest = self._events[self._next :]
        self._next = len(self._events)
        return rest


# ---- feeds ---------------------------------------------------------------------------------


class SyntheticMarket:
    """Deterministic synthetic trades for ``settings.symbols`` symbols (see ``SyntheticFeed``)."""

    def __init__(self, settings: SyntheticFeed) -> None:
        self.settings = settings
        width = max(4, len(str(settings.symbols)))
        self.symbols = [f"S{index:0{width}d}" for index in range(1, settings.symbols + 1)]
        self._rng = random.Random(settings.seed)
        rng = self._rng
        self._prices = {sym: round(rng.uniform(10.0, 500.0), 2) for sym in self.symbols}
        self._tapes = {sym: 1 + index % 3 for index, sym in enumerate(self.symbols)}
        self._seqs = dict.fromkeys(self.symbols, 0)
        weights = [1.0 / (rank + 1) for rank in range(len(self.symbols))]
        self._cum_weights = list(itertools.accumulate(weights))
        self._trade_ids = itertools.count(1)

    def trades(self, count: int, t_ms: int) -> list[TradeEvent]:
        """The next ``count`` trades, all stamped ``t_ms``."""
        rng = self._rng
        settings = self.settings
        odd = settings.odd_lot_ratio
        sweep = odd + settings.sweep_ratio
        prices = self._prices
        seqs = self._seqs
        out = []
        conditions: tuple[int, ...]
        for sym in rng.choices(self.symbols, cum_weights=self._cum_weights, k=count):
            price = max(0.01, round(prices[sym] * (1.0 + rng.gauss(0.0, 0.0005)), 2))
            prices[sym] = price
            seqs[sym] += rng.randint(1, 4)
            draw = rng.random()
            if draw < odd:
                size, conditions = rng.randint(1, 99), (ODD_LOT,)
            elif draw < sweep:
                size, conditions = 100 * rng.randint(1, 20), (INTERMARKET_SWEEP,)
            else:
                size, conditions = 100 * rng.choice((1, 1, 1, 2, 3, 5, 10)), ()
            out.append(
                TradeEvent(
                    sym,
                    price,
                    size,
                    t_ms,
                    rng.choice(SYNTHETIC_EXCHANGES),
                    conditions,
                    str(next(self._trade_ids)),
                    self._tapes[sym],
                    seqs[sym],
                )
            )
        return out


def find_tick_file(data_dir: Path, symbol: str, day: date) -> Path:
    """The tick file of ``symbol`` on ``day``: ``<data_dir>/**/tick/<sym>/<yyyymmdd>_trade.zip``."""
    name = f"{day:%Y%m%d}_trade.zip"
    direct = data_dir / "tick" / symbol.lower() / name
    if direct.is_file():
        return direct
    found = sorted(data_dir.glob(f"**/tick/{symbol.lower()}/{name}"))
    if not found:
        raise FileNotFoundError(
            f"no tick file for {symbol} on {day} under {data_dir} (looked for tick/"
            f"{symbol.lower()}/{name})"
        )
    return found[0]


def load_day_trades(feed: FileFeed) -> list[TradeEvent]:
    """Read ``feed``'s symbols for its day and merge them in time order (stable by symbol)."""
    from libs.common.market.tickfiles import read_lean_trades

    per_symbol = []
    for symbol in feed.symbols:
        path = find_tick_file(feed.data_dir, symbol, feed.day)
        per_symbol.append([protocol.as_trade_event(trade) for trade in read_lean_trades(path)])
    if len(per_symbol) == 1:
        return per_symbol[0]
    return list(heapq.merge(*per_symbol, key=lambda trade: trade.t))


def load_vendor_minutes(feed: FileFeed) -> list[MinuteAggEvent] | None:
    """The vendor's minute bars of ``feed``'s symbols and day as ``AM`` events, or None when a
    symbol has no ``minute/<sym>/<yyyymmdd>_trade.zip`` beside its tick file."""
    from libs.common.market.tickfiles import read_lean_minute_bars

    events: list[MinuteAggEvent] = []
    for symbol in feed.symbols:
        tick_path = find_tick_file(feed.data_dir, symbol, feed.day)
        minute_path = tick_path.parents[2] / "minute" / tick_path.parent.name / tick_path.name
        if not minute_path.is_file():
            return None
        for bar in read_lean_minute_bars(minute_path, feed.day):
            events.append(
                MinuteAggEvent(
                    sym=symbol,
                    v=bar.volume,
                    o=bar.open,
                    c=bar.close,
                    h=bar.high,
                    l=bar.low,
                    s=bar.start_ms,
                    e=bar.start_ms + MINUTE_MS,
                )
            )
    return events


# ---- sessions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _CloseRequest:
    """Queue item: close the connection after what is queued before it."""

    code: int
    reason: str


class _Session:
    """One client connection: auth state, subscriptions and an outbound queue with one writer.

    Only the writer task calls ``send`` (so frames keep their order); the queue is counted in
    bytes, and ``drained`` is set while it is at or below half the slow-consumer threshold.
    """

    def __init__(self, number: int, ws: ServerConnection, buffer_limit: int) -> None:
        self.number = number
        self.ws = ws
        self.authed = False
        self.closing = False
        self.wild: set[str] = set()
        self.exact: dict[str, set[str]] = {}
        self.queue: collections.deque[Any] = collections.deque()
        self.pending_bytes = 0
        self.buffer_limit = buffer_limit
        self.wake = asyncio.Event()
        self.drained = asyncio.Event()
        self.drained.set()
        self.tasks: list[asyncio.Task[None]] = []
        self.frames_sent = 0

    @property
    def subscribed(self) -> bool:
        """Whether the session has any subscription."""
        return bool(self.wild) or any(self.exact.values())

    def enqueue(self, data: bytes) -> None:
        """Queue one frame for the writer."""
        if self.closing:
            return
        self.queue.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes > self.buffer_limit:
            self.drained.clear()
        self.wake.set()

    def status(self, status: str, message: str) -> None:
        """Queue one status event."""
        self.enqueue(protocol.encode_status(status, message))

    def close_with(self, status: str | None, message: str, code: int = CLOSE_POLICY) -> bool:
        """Drop what is queued, send ``status`` (if any) and close. False if already closing."""
        if self.closing:
            return False
        self.queue.clear()
        self.pending_bytes = 0
        self.drained.set()
        if status is not None:
            self.enqueue(protocol.encode_status(status, message))
        self.closing = True
        self.queue.append(_CloseRequest(code, status or message))
        self.wake.set()
        return True

    def abort(self) -> None:
        """Cut the TCP connection without a close frame."""
        self.closing = True
        self.queue.clear()
        self.ws.transport.abort()

    def select(self, events: list[Event], kinds: frozenset[str]) -> list[Event]:
        """The events of a frame this session subscribed to (``events`` itself if all)."""
        if kinds <= self.wild:
            return events
        if not any(kind in self.wild or self.exact.get(kind) for kind in kinds):
            return []
        wild = self.wild
        exact = self.exact
        selected = []
        for event in events:
            kind = KIND_OF[type(event)]
            if kind in wild or event.sym in exact.get(kind, ()):  # type: ignore[union-attr]
                selected.append(event)
        return selected

    def change(self, topics: Sequence[str], subscribe: bool) -> list[tuple[str, str]]:
        """Apply a subscribe/unsubscribe; the per-topic statuses to answer with."""
        verb = "subscribed to" if subscribe else "unsubscribed to"
        replies = []
        for topic in topics:
            try:
                kind, sym = protocol.split_topic(topic)
            except ValueError:
                replies.append((protocol.ERROR, f"invalid subscription: {topic}"))
                continue
            if kind not in DATA_KINDS:
                replies.append((protocol.ERROR, f"unknown channel: {topic}"))
                continue
            if sym == "*":
                (self.wild.add if subscribe else self.wild.discard)(kind)
            elif subscribe:
                self.exact.setdefault(kind, set()).add(sym)
            else:
                self.exact.get(kind, set()).discard(sym)
            replies.append((protocol.SUCCESS, f"{verb}: {topic}"))
        return replies

    async def write_loop(self) -> None:
        """Send queued frames in order; close on the sentinel."""
        ws = self.ws
        queue = self.queue
        try:
            while True:
                while not queue:
                    self.wake.clear()
                    await self.wake.wait()
                item = queue.popleft()
                if type(item) is _CloseRequest:
                    await ws.close(item.code, item.reason)
                    return
                await ws.send(item, text=True)
                self.frames_sent += 1
                self.pending_bytes -= len(item)
                if self.pending_bytes <= self.buffer_limit // 2:
                    self.drained.set()
        except ConnectionClosed:
            self.closing = True
            self.drained.set()


# ---- the server ----------------------------------------------------------------------------


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

    ``inject(fault, count)`` triggers a fault. ``feed_done`` is set when a finite feed has sent
    everything (the server keeps serving until stopped).
    """

    def __init__(self, settings: SimulatorSettings, feed: AsyncIterator[list[Event]] | None = None):
        self.settings = settings
        self.stats = SimulatorStats()
        self.feed_done = asyncio.Event()
        self._custom_feed = feed
        self._day_trades: list[TradeEvent] | None = None
        self._vendor_minutes: list[MinuteAggEvent] | None = None
        self._server: Server | None = None
        self._sessions: dict[int, _Session] = {}
        self._numbers = itertools.count(1)
        self._feed_task: asyncio.Task[None] | None = None
        self._handler_tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle

    async def start(self) -> None:
        """Load the feed (file feeds read their files here) and bind the server."""
        settings = self.settings
        if isinstance(settings.feed, FileFeed) and self._custom_feed is None:
            self._day_trades = await asyncio.to_thread(load_day_trades, settings.feed)
            if settings.minute_aggregates:
                self._vendor_minutes = await asyncio.to_thread(load_vendor_minutes, settings.feed)
            log.info(
                "simulator.file_feed_loaded",
                trades=len(self._day_trades),
                day=str(settings.feed.day),
                symbols=",".join(settings.feed.symbols),
            )
        self._server = await serve(
            self._handle,
            settings.host,
            settings.port,
            process_request=self._process_request if settings.control else None,
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
            "sessions": sessions,
        }

    # -- faults

    def inject(self, fault: Fault | str, count: int = 1) -> int:
        """Inject a fault; returns the number of sessions it reached.

        Disconnect faults (``drop``, ``slow_consumer``, ``max_connections``,
        ``force_disconnect``) hit up to ``count`` sessions, oldest first (``count=0``: all).
        ``malformed`` sends ``count`` rounds of bad frames to every authenticated session
        (regardless of its subscriptions).
        """
        fault = Fault(fault)
        if count < 0:
            raise ValueError(f"count must be 0 or more, not {count}")
        live = [s for s in self._sessions.values() if not s.closing]
        if fault is Fault.MALFORMED:
            targets = [s for s in live if s.authed]
            for session in targets:
                for _ in range(max(count, 1)):
                    for frame in malformed_frames(_session_symbol(session), _now_ms()):
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

    # -- HTTP control

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if not request.path.startswith(CONTROL_PREFIX):
            return None
        supplied = request.headers.get(CONTROL_KEY_HEADER, "")
        if not hmac.compare_digest(supplied.encode(), self.settings.api_key.reveal().encode()):
            return _json_response(connection, HTTPStatus.UNAUTHORIZED, {"error": "bad key"})
        parts = urlsplit(request.path)
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        if parts.path == CONTROL_PREFIX + "status":
            return _json_response(connection, HTTPStatus.OK, self.stats_dict())
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
        if isinstance(settings.feed, FileFeed):
            assert self._day_trades is not None
            return replay_frames(
                self._day_trades,
                settings.feed.speed,
                settings.frame_max_events,
                settings.frame_window_ms,
                settings.minute_aggregates,
                self._vendor_minutes,
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
            await self._wait_drained(full)
        else:
            await asyncio.sleep(0)

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


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _json_response(connection: ServerConnection, status: HTTPStatus, body: Any) -> Response:
    response = connection.respond(status, json.dumps(body) + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


def malformed_frames(symbol: str, t_ms: int) -> list[bytes]:
    """The frames of one ``malformed`` round, in order.

    1. truncated JSON; 2. a trade object not wrapped in an array; 3. an array with an unknown
    ``ev``; 4. an array of five trades where the 2nd lacks ``p`` and the 4th has ``p`` as a
    string — the 1st, 3rd and 5th are good.
    """
    good = [
        TradeEvent(symbol, 100.0 + n, 100, t_ms, 4, (), f"malformed-good-{n}", 3, n)
        for n in (1, 3, 5)
    ]
    encoded = [protocol.encode_events([event])[1:-1] for event in good]
    missing = b'{"ev":"T","sym":"%s","s":100,"t":%d,"i":"malformed-bad-2"}' % (
        symbol.encode(),
        t_ms,
    )
    ill_typed = b'{"ev":"T","sym":"%s","p":"abc","s":100,"t":%d,"i":"malformed-bad-4"}' % (
        symbol.encode(),
        t_ms,
    )
    mixed = b"[" + b",".join([encoded[0], missing, encoded[1], ill_typed, encoded[2]]) + b"]"
    return [
        b'[{"ev":"T","sym":"%s","p":1' % symbol.encode(),
        b'{"ev":"T","sym":"%s","p":1.0,"s":100,"t":%d}' % (symbol.encode(), t_ms),
        b'[{"ev":"XYZ","sym":"%s","t":%d}]' % (symbol.encode(), t_ms),
        mixed,
    ]


# ---- frame sources -------------------------------------------------------------------------


async def replay_frames(
    trades: Sequence[TradeEvent],
    speed: float,
    frame_max_events: int,
    window_ms: int,
    minute_aggregates: bool = True,
    vendor_minutes: Sequence[MinuteAggEvent] | None = None,
) -> AsyncIterator[list[Event]]:
    """Frames of time-ordered ``trades`` paced at ``speed`` (0: no pacing), AM frames between.

    Each frame is sent when its first trade is due: ``start + (t - t0) / speed``. The AM
    events are the vendor's bars when given, else the simulator's own from all trades.
    """
    loop = asyncio.get_running_loop()
    aggregator: MinuteAggregator | VendorMinutes | None = None
    if minute_aggregates:
        aggregator = (
            VendorMinutes(vendor_minutes) if vendor_minutes is not None else MinuteAggregator()
        )
    if not trades:
        return
    t0 = trades[0].t
    wall0 = loop.time()
    for frame in frames_of(trades, frame_max_events, window_ms):
        t_ms = frame[0].t
        if speed > 0:
            delay = wall0 + (t_ms - t0) / 1000.0 / speed - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        if aggregator is not None:
            closed = aggregator.advance(t_ms)
            if closed:
                yield list(closed)
            aggregator.add(frame)
        yield list(frame)
    if aggregator is not None:
        closed = aggregator.flush()
        if closed:
            yield list(closed)


async def synthetic_frames(
    market: SyntheticMarket,
    rate_per_s: float,
    frame_max_events: int,
    minute_aggregates: bool = True,
    clock_ms: Callable[[], int] = _now_ms,
) -> AsyncIterator[list[Event]]:
    """Endless frames of synthetic trades at ``rate_per_s`` in total, stamped with wall time.

    When it falls behind (a slow client paused it) it catches up by at most one second's worth.
    """
    loop = asyncio.get_running_loop()
    aggregator = MinuteAggregator() if minute_aggregates else None
    start = loop.time()
    emitted = 0
    while True:
        now = loop.time()
        due = math.floor((now - start) * rate_per_s) - emitted
        if due > max(1, rate_per_s):
            skipped = due - max(1, int(rate_per_s))
            emitted += skipped
            due -= skipped
        if due <= 0:
            await asyncio.sleep(max(0.001, (emitted + 1) / rate_per_s - (now - start)))
            continue
        t_ms = clock_ms()
        if aggregator is not None:
            closed = aggregator.advance(t_ms)
            if closed:
                yield list(closed)
        while due > 0:
            count = min(due, frame_max_events)
            frame = market.trades(count, t_ms)
            if aggregator is not None:
                aggregator.add(frame)
            emitted += count
            due -= count
            yield list(frame)


# ---- running -------------------------------------------------------------------------------


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


def add_simulate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``simulate`` options to ``parser`` (reusable under ``python -m services.ingest``)."""
    net = parser.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s)")
    net.add_argument("--port", type=int, default=8765, help="port, 0 for any (default %(default)s)")
    net.add_argument(
        "--key",
        default=None,
        help=f"API key clients must send (default: ${KEY_ENV}, else the built-in local key)",
    )
    net.add_argument("--max-connections", type=int, default=1, help="per key (default 1)")
    net.add_argument("--auth-timeout-s", type=float, default=10.0, help="default %(default)s")
    net.add_argument("--frame-max-events", type=int, default=100, help="default %(default)s")
    net.add_argument(
        "--frame-window-ms",
        type=int,
        default=1,
        help="a frame holds trades of one window of event time (default %(default)s)",
    )
    net.add_argument(
        "--slow-consumer-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="queued bytes above which a client counts as slow (default %(default)s)",
    )
    net.add_argument(
        "--slow-consumer-after-s",
        type=float,
        default=5.0,
        help="how long a client may stay slow before slow_consumer; 0 = never (default 5)",
    )
    net.add_argument("--no-control", action="store_true", help="disable GET /control/*")
    run = parser.add_argument_group("run")
    run.add_argument("--duration-s", type=float, default=None, help="stop after this long")
    run.add_argument("--max-events", type=int, default=None, help="stop the feed after N events")
    run.add_argument("--no-minute-aggs", action="store_true", help="do not send AM events")
    run.add_argument(
        "--exit-when-done",
        action="store_true",
        help="exit once a finite feed (file, --max-events) is sent and the queues are empty",
    )
    files = parser.add_argument_group("tick-file feed")
    files.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("TICKMESH_DATA", "../shared/data")),
        help="directory holding tick/<sym>/<yyyymmdd>_trade.zip (searched recursively)",
    )
    files.add_argument("--date", default=None, help="day to replay, YYYY-MM-DD")
    files.add_argument("--symbols", default=None, help="symbols to replay, e.g. SPY,IBM")
    files.add_argument(
        "--speed", type=float, default=1.0, help="1 real time, 0 as fast as possible"
    )
    synthetic = parser.add_argument_group("synthetic feed")
    synthetic.add_argument(
        "--synthetic-symbols", type=int, default=None, help="N synthetic symbols S0001.."
    )
    synthetic.add_argument("--rate", type=float, default=1_000.0, help="trades/s in total")
    synthetic.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    return parser


def settings_from_args(
    args: argparse.Namespace, environ: dict[str, str] | None = None
) -> SimulatorSettings:
    """Build ``SimulatorSettings`` from parsed ``simulate`` arguments; ``ValueError`` if bad."""
    environ = dict(os.environ) if environ is None else environ
    key = args.key or environ.get(KEY_ENV) or DEFAULT_KEY
    feed: SyntheticFeed | FileFeed
    if args.synthetic_symbols is not None:
        if args.symbols or args.date:
            raise ValueError("choose one feed: --synthetic-symbols or --date/--symbols")
        feed = SyntheticFeed(symbols=args.synthetic_symbols, rate_per_s=args.rate, seed=args.seed)
    elif args.symbols or args.date:
        if not (args.symbols and args.date):
            raise ValueError("a tick-file feed needs both --date and --symbols")
        symbols = tuple(s.strip().upper() for s in args.symbols.split(",") if s.strip())
        feed = FileFeed(args.data, parse_day(args.date), symbols, args.speed)
    else:
        feed = SyntheticFeed(rate_per_s=args.rate, seed=args.seed)
    return SimulatorSettings(
        api_key=Secret(key),
        host=args.host,
        port=args.port,
        feed=feed,
        max_connections=args.max_connections,
        auth_timeout_s=args.auth_timeout_s,
        frame_max_events=args.frame_max_events,
        frame_window_ms=args.frame_window_ms,
        minute_aggregates=not args.no_minute_aggs,
        duration_s=args.duration_s,
        max_events=args.max_events,
        slow_consumer_buffer_bytes=args.slow_consumer_bytes,
        slow_consumer_after_s=args.slow_consumer_after_s or None,
        control=not args.no_control,
        exit_when_feed_done=args.exit_when_done,
    )


def build_parser() -> argparse.ArgumentParser:
    """The standalone parser of ``python -m services.ingest.simulator``."""
    parser = argparse.ArgumentParser(
        prog="python -m services.ingest.simulator",
        description="Polygon-compatible stocks WebSocket simulator (tick files or synthetic). "
        "Fault injection: `inject FAULT` (see --help of inject).",
    )
    return add_simulate_arguments(parser)


def build_inject_parser() -> argparse.ArgumentParser:
    """Parser of ``python -m services.ingest.simulator inject FAULT``."""
    parser = argparse.ArgumentParser(
        prog="python -m services.ingest.simulator inject",
        description="Ask a running simulator to inject a fault (GET /control/inject).",
    )
    parser.add_argument("fault", choices=[fault.value for fault in Fault])
    parser.add_argument("--count", type=int, default=1, help="sessions, or malformed rounds")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--key", default=None, help=f"simulator key (default: ${KEY_ENV})")
    return parser


def inject_remote(
    host: str, port: int, fault: str, count: int, key: str, timeout_s: float = 5.0
) -> dict[str, Any]:
    """Call ``GET /control/inject`` on a running simulator; returns its JSON answer."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.request(
            "GET",
            f"{CONTROL_PREFIX}inject?fault={fault}&count={count}",
            headers={CONTROL_KEY_HEADER: key},
        )
        response = connection.getresponse()
        body: dict[str, Any] = json.loads(response.read() or b"{}")
        if response.status != HTTPStatus.OK:
            raise RuntimeError(f"simulator refused: {response.status} {body.get('error', '')}")
        return body
    finally:
        connection.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve (default) or, with ``inject FAULT``, inject a fault into a running simulator."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["inject"]:
        inject_args = build_inject_parser().parse_args(args_list[1:])
        key = inject_args.key or os.environ.get(KEY_ENV) or DEFAULT_KEY
        try:
            answer = inject_remote(
                inject_args.host, inject_args.port, inject_args.fault, inject_args.count, key
            )
        except (OSError, RuntimeError) as exc:
            print(f"simulator inject: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(answer))
        return 0
    return serve_from_args(build_parser().parse_args(args_list))


def serve_from_args(args: argparse.Namespace) -> int:
    """Serve with parsed ``simulate`` arguments until a signal or the feed's end."""
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"simulator: {exc}", file=sys.stderr)
        return 2
    from libs.common.runtime.logs import configure_logging

    configure_logging("ingest-simulator")
    try:
        asyncio.run(_serve_until_signal(settings))
    except FileNotFoundError as exc:
        print(f"simulator: {exc}", file=sys.stderr)
        return 2
    return 0


async def _serve_until_signal(settings: SimulatorSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await run_simulator(settings, stop)


if __name__ == "__main__":
    sys.exit(main())
