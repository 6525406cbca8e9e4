"""Fan-out to browsers: numbered server-sent events, resumable, bounded per browser.

Every event is encoded once (``Frame``: the bytes of ``id:``, ``event:`` and ``data:`` lines)
and offered to each connected browser's ``Outbox``. The hub never waits for a browser: it only
puts frames into outboxes, so a slow browser cannot slow the feed, nor the mesh behind it.

- **Ids** are ``<epoch>-<n>``: ``n`` counts events of this process, ``epoch`` names the
  process, so an id from before a restart is recognised as such.
- **Resume**: the newest ``replay_events`` frames are kept; a browser that reconnects with a
  ``Last-Event-ID`` still among them is sent what it missed, in order; any other gets a fresh
  snapshot.
- **Coalescing**: an outbox holds at most one frame per key (a symbol's row, a bar's minute,
  a position): a newer one replaces the older and moves to the end, so the frames a browser
  is sent keep increasing ids. A fast browser never notices; a slow one gets only the latest
  state of each key.
- **Bound**: past ``limit`` frames waiting, the outbox is emptied and the browser is sent a
  fresh snapshot instead (``resync``): what a browser costs in memory is bounded.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict, deque
from collections.abc import Iterable
from itertools import count
from typing import Any, NamedTuple

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.dashboard.view import Event

_ENCODER = msgspec.json.Encoder()


class Frame(NamedTuple):
    """One encoded event."""

    number: int
    key: object
    symbol: str | None
    data: bytes


def sse_frame(name: str, event_id: str | None, payload: bytes) -> bytes:
    """The bytes of one server-sent event (``payload`` is one line of JSON)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: ".encode() + payload + b"\n\n"


class HubMetrics:
    """The dashboard's stream metrics."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.clients = Gauge("tickmesh_dashboard_clients", "Browsers connected", registry=registry)
        self.events = Counter(
            "tickmesh_dashboard_events", "Events published to browsers", ["kind"], registry=registry
        )
        self.coalesced = Counter(
            "tickmesh_dashboard_events_coalesced",
            "Events replaced by a newer one of the same key before a slow browser got them",
            registry=registry,
        )
        self.resyncs = Counter(
            "tickmesh_dashboard_resyncs",
            "Browsers sent a fresh snapshot because their buffer overflowed",
            registry=registry,
        )
        self.resumes = Counter(
            "tickmesh_dashboard_resumes",
            "Reconnections with a Last-Event-ID: replayed (the missed events) or snapshot",
            ["result"],
            registry=registry,
        )
        self.bytes_sent = Counter(
            "tickmesh_dashboard_sent_bytes", "Bytes written to event streams", registry=registry
        )
        self.backlog = Gauge(
            "tickmesh_dashboard_backlog_max_events",
            "The longest outbox of a browser at the last health refresh",
            registry=registry,
        )


class Outbox:
    """What waits for one browser: at most one frame per key, at most ``limit`` frames."""

    def __init__(self, symbol: str | None, limit: int, metrics: HubMetrics) -> None:
        self.symbol = symbol
        self.limit = limit
        self.metrics = metrics
        self.frames: OrderedDict[object, Frame] = OrderedDict()
        self.resync = False
        self.closed = False
        self.wakeup = asyncio.Event()

    def offer(self, frame: Frame) -> None:
        """Queue ``frame`` (replacing the waiting frame of its key); never blocks."""
        if self.resync or (frame.symbol is not None and frame.symbol != self.symbol):
            return
        key = frame.key if frame.key is not None else frame.number
        if self.frames.pop(key, None) is not None:
            self.metrics.coalesced.inc()
        self.frames[key] = frame
        if len(self.frames) > self.limit:
            self.frames.clear()
            self.resync = True
            self.metrics.resyncs.inc()
        self.wakeup.set()

    def drop_through(self, number: int) -> None:
        """Forget frames up to ``number`` (a snapshot taken at ``number`` holds them)."""
        for key in [key for key, frame in self.frames.items() if frame.number <= number]:
            del self.frames[key]

    def take(self) -> list[Frame]:
        """Every waiting frame, in id order."""
        frames = list(self.frames.values())
        self.frames.clear()
        self.wakeup.clear()
        return frames

    async def wait(self, timeout_s: float) -> bool:
        """Wait until something is waiting (True) or ``timeout_s`` passed (False)."""
        if self.frames or self.resync or self.closed:
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await self.wakeup.wait()
        except TimeoutError:
            return False
        return True


class Hub:
    """Numbers, encodes, keeps and fans out the dashboard's events."""

    def __init__(
        self,
        *,
        client_limit: int = 2_000,
        replay_events: int = 10_000,
        registry: CollectorRegistry | None = None,
        epoch: str | None = None,
    ) -> None:
        self.epoch = epoch or secrets.token_hex(4)
        self.client_limit = client_limit
        self.metrics = HubMetrics(registry)
        self._numbers = count(1)
        self.last_number = 0
        self._kept: deque[Frame] = deque(maxlen=replay_events)
        self.outboxes: set[Outbox] = set()

    def event_id(self, number: int) -> str:
        """The ``id:`` of event ``number``."""
        return f"{self.epoch}-{number}"

    def publish(self, events: Iterable[Event]) -> None:
        """Encode, number, keep and offer ``events`` to every browser."""
        for event in events:
            number = next(self._numbers)
            self.last_number = number
            data = sse_frame(event.name, self.event_id(number), _ENCODER.encode(event.data))
            frame = Frame(number, event.key, event.symbol, data)
            self._kept.append(frame)
            self.metrics.events.labels(event.name).inc()
            for outbox in self.outboxes:
                outbox.offer(frame)

    def resync_all(self) -> None:
        """Send every browser a fresh snapshot (the day changed, the feed restarted)."""
        for outbox in self.outboxes:
            outbox.frames.clear()
            outbox.resync = True
            outbox.wakeup.set()

    def connect(self, symbol: str | None) -> Outbox:
        """A new browser watching ``symbol``; it receives every event from now on."""
        outbox = Outbox(symbol, self.client_limit, self.metrics)
        self.outboxes.add(outbox)
        self.metrics.clients.set(len(self.outboxes))
        return outbox

    def disconnect(self, outbox: Outbox) -> None:
        """The browser left."""
        outbox.closed = True
        self.outboxes.discard(outbox)
        self.metrics.clients.set(len(self.outboxes))

    def missed(self, last_event_id: str, symbol: str | None) -> list[Frame] | None:
        """The kept frames after ``last_event_id`` for a browser watching ``symbol``; None when
        the id is of another process or older than what is kept (a snapshot is needed)."""
        epoch, _, number_text = last_event_id.strip().rpartition("-")
        if epoch != self.epoch or not number_text.isdigit():
            self.metrics.resumes.labels("snapshot").inc()
            return None
        number = int(number_text)
        if number > self.last_number:
            self.metrics.resumes.labels("snapshot").inc()
            return None
        oldest = self._kept[0].number if self._kept else self.last_number + 1
        if number + 1 < oldest:
            self.metrics.resumes.labels("snapshot").inc()
            return None
        self.metrics.resumes.labels("replayed").inc()
        return [
            frame
            for frame in self._kept
            if frame.number > number and (frame.symbol is None or frame.symbol == symbol)
        ]

    def backlog(self) -> int:
        """The longest outbox now (also set as a gauge)."""
        longest = max((len(outbox.frames) for outbox in self.outboxes), default=0)
        self.metrics.backlog.set(longest)
        return longest

    def snapshot_frame(self, payload: dict[str, Any]) -> tuple[int, bytes]:
        """The ``snapshot`` event of ``payload``, numbered as of now (the browser resumes
        after it)."""
        number = self.last_number
        return number, sse_frame("snapshot", self.event_id(number), _ENCODER.encode(payload))
