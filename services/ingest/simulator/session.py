"""One client connection of the simulator: subscriptions, auth state, send queue."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from services.ingest import protocol
from services.ingest.protocol import (
    DATA_KINDS,
    KIND_OF,
    Event,
)
from services.ingest.simulator.settings import CLOSE_POLICY

log = structlog.get_logger("ingest.simulator")


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
        self.writes = 0
        """Socket writes the frames took (the frames queued together go in one)."""

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
        """Send queued frames in order; close on the sentinel.

        The frames queued when the writer wakes go out together (up to ``WRITE_BYTES``): one
        WebSocket message each, as before, in one socket write. A feed sent as fast as
        possible otherwise costs a system call and a wake-up of the client per frame."""
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
                burst = [item]
                size = len(item)
                while queue and size < WRITE_BYTES and type(queue[0]) is not _CloseRequest:
                    item = queue.popleft()
                    burst.append(item)
                    size += len(item)
                await send_texts(ws, burst)
                self.writes += 1
                self.frames_sent += len(burst)
                self.pending_bytes -= size
                if self.pending_bytes <= self.buffer_limit // 2:
                    self.drained.set()
        except ConnectionClosed:
            self.closing = True
            self.drained.set()


WRITE_BYTES = 256 * 1024
"""Queued frames the simulator's writer joins into one socket write, at most (about)."""


async def send_texts(ws: ServerConnection, frames: list[bytes]) -> None:
    """Send each of ``frames`` as a text message, in order, with one write to the socket.

    Inside websockets' own send context (the connection's state checked first, flow control
    and errors handled on the way out, as in ``send``), the protocol frames every message
    and the bytes go to the transport at once."""
    if len(frames) == 1:
        await ws.send(frames[0], text=True)
        return
    async with ws.send_context():
        protocol = ws.protocol
        for frame in frames:
            protocol.send_text(frame)
        # text frames on an open connection: bytes only (no end-of-stream marker among them)
        ws.transport.write(b"".join(protocol.data_to_send()))
