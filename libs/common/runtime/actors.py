"""Actors: components that take messages through a bounded mailbox.

An ``Actor`` is a ``Component`` (lifecycle, timers, owned tasks, incarnations) plus a mailbox
with a declared overflow policy and one message loop. Subclasses override ``handle`` (and the
component hooks). The loop has one shape: take a message; the stop sentinel ends it;
cancellation is logged and re-raised; any other exception escalates (``Component._escalate``).

Two ways in: ``tell`` / ``tell_nowait`` for other parts of the service, whose messages survive
a restart of the actor (queued work is resumed), and ``post`` for the actor's own tasks (a
reader feeding the actor what it reads). What an incarnation posted and did not get to handle
is dropped by the runtime when the next incarnation starts, and counted
(``tickmesh_actor_messages_stale_total``): the new incarnation reads it again from its source.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, NamedTuple, TypeVar

from prometheus_client import CollectorRegistry

from libs.common.runtime.lifecycle import Component, RuntimeMetrics

MessageT = TypeVar("MessageT")


class Overflow(enum.Enum):
    """What a full mailbox does to the sender; every edge states one."""

    BLOCK = "block"
    """Pause the sender until there is room (backpressure)."""
    SHED = "shed"
    """Drop the new message and count it (non-critical paths only)."""
    SPILL = "spill"
    """Hand the message to a spill callback (e.g. the durable stream) and count it."""


class _Stop:
    """The sentinel that ends an actor's message loop after what is queued before it."""

    __slots__ = ()


_STOP = _Stop()


class _Posted(NamedTuple):
    """A message an actor's own task queued, stamped with the incarnation that owned it."""

    incarnation: int
    message: Any


class Mailbox(Generic[MessageT]):
    """A bounded FIFO with a declared overflow policy.

    The stop sentinel bypasses the bound so that a stop can always be queued behind the
    messages already waiting, which is what lets a stop drain.
    """

    def __init__(
        self,
        name: str,
        maxsize: int,
        overflow: Overflow,
        metrics: RuntimeMetrics,
        spill: Callable[[MessageT], Awaitable[None]] | None = None,
    ) -> None:
        if maxsize < 1:
            raise ValueError(f"mailbox of {name} needs a bound of at least 1, got {maxsize}")
        if overflow is Overflow.SPILL and spill is None:
            raise ValueError(f"mailbox of {name} spills but has no spill callback")
        self.name = name
        self.maxsize = maxsize
        self.overflow = overflow
        self._spill = spill
        self._items: deque[Any] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()
        self._depth = metrics.mailbox_depth.labels(name)
        self._shed = metrics.shed.labels(name)
        self._spilled = metrics.spilled.labels(name)
        metrics.mailbox_capacity.labels(name).set(maxsize)

    def __len__(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        """True when a put would overflow."""
        return len(self._items) >= self.maxsize

    def _wake(self, waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _append(self, item: Any) -> None:
        self._items.append(item)
        self._depth.set(len(self._items))
        self._wake(self._getters)

    async def put(self, message: Any) -> bool:
        """Queue ``message`` per the overflow policy; False when it was shed."""
        while self.full():
            if self.overflow is Overflow.SHED:
                self._shed.inc()
                return False
            if self.overflow is Overflow.SPILL:
                assert self._spill is not None
                self._spilled.inc()
                await self._spill(message)
                return True
            waiter = asyncio.get_running_loop().create_future()
            self._putters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                waiter.cancel()
                raise
        self._append(message)
        return True

    def put_nowait(self, message: Any) -> bool:
        """Queue ``message`` if there is room; False (and counted when shedding) if not."""
        if self.full():
            if self.overflow is Overflow.SHED:
                self._shed.inc()
            return False
        self._append(message)
        return True

    def put_stop(self) -> None:
        """Queue the stop sentinel behind everything already queued, ignoring the bound."""
        self._append(_STOP)

    async def get(self) -> Any:
        """Take the oldest item, waiting while the mailbox is empty."""
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            self._getters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                waiter.cancel()
                raise
        item = self._items.popleft()
        self._depth.set(len(self._items))
        self._wake(self._putters)
        return item

    def take_nowait(self, limit: int) -> list[Any]:
        """Take up to ``limit`` queued items without waiting, stopping at a stop sentinel
        (which stays queued)."""
        taken: list[Any] = []
        items = self._items
        while items and len(taken) < limit and items[0] is not _STOP:
            taken.append(items.popleft())
        if taken:
            self._depth.set(len(items))
            for _ in taken:
                self._wake(self._putters)
        return taken

    def remove(self, unwanted: Callable[[Any], bool]) -> int:
        """Remove the queued items ``unwanted`` accepts; returns how many."""
        kept = deque(item for item in self._items if not unwanted(item))
        removed = len(self._items) - len(kept)
        if removed:
            self._items = kept
            self._depth.set(len(kept))
            for _ in range(removed):
                self._wake(self._putters)
        return removed


class Actor(Component, Generic[MessageT]):
    """A component with a bounded mailbox and one message loop; override ``handle``."""

    def __init__(
        self,
        name: str,
        *,
        mailbox_size: int = 1024,
        overflow: Overflow = Overflow.BLOCK,
        spill: Callable[[MessageT], Awaitable[None]] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__(name, registry=registry)
        self.mailbox: Mailbox[MessageT] = Mailbox(name, mailbox_size, overflow, self.metrics, spill)
        self._loop_task: asyncio.Task[None] | None = None
        self._handled = self.metrics.handled.labels(name)
        self._stale = self.metrics.stale.labels(name)

    async def handle(self, message: MessageT) -> None:
        """Handle one message from the mailbox."""

    # -- sending -----------------------------------------------------------------------------

    async def tell(self, message: MessageT) -> bool:
        """Send a message, honouring the mailbox's overflow policy; False if it was shed."""
        return await self.mailbox.put(message)

    def tell_nowait(self, message: MessageT) -> bool:
        """Send without waiting; False when the mailbox is full."""
        return self.mailbox.put_nowait(message)

    async def post(self, message: MessageT) -> bool:
        """From a task of this actor: queue ``message`` for this incarnation only (dropped by
        the runtime if the actor restarts before handling it)."""
        return await self.mailbox.put(_Posted(self.incarnation, message))

    def take_nowait(self, limit: int) -> list[MessageT]:
        """Take up to ``limit`` more queued messages without waiting, so a handler can work
        on several at once (stale posts are dropped on the way)."""
        out: list[MessageT] = []
        for item in self.mailbox.take_nowait(limit):
            message = self._current(item)
            if message is not _STALE:
                out.append(message)
        return out

    # -- the runtime's part ------------------------------------------------------------------

    def _current(self, item: Any) -> Any:
        if type(item) is _Posted:
            if item.incarnation != self.incarnation:
                self._stale.inc()
                return _STALE
            return item.message
        return item

    def _runtime_before_start(self) -> None:
        incarnation = self.incarnation
        stale = 0

        def unwanted(item: Any) -> bool:
            nonlocal stale
            if item is _STOP:  # left by a stop that passed its deadline
                return True
            if type(item) is _Posted and item.incarnation != incarnation:
                stale += 1
                return True
            return False

        self.mailbox.remove(unwanted)
        if stale:
            self._stale.inc(stale)

    def _runtime_start_work(self) -> None:
        self._loop_task = asyncio.create_task(self._run_loop(), name=f"{self.name}.loop")

    def _runtime_tasks(self) -> list[asyncio.Task[None]]:
        tasks = list(self._tasks)
        if self._loop_task is not None:
            tasks.append(self._loop_task)
        return tasks

    async def _run_loop(self) -> None:
        mailbox = self.mailbox
        handled = self._handled
        while True:
            item = await mailbox.get()
            if item is _STOP:
                return
            message = self._current(item)
            if message is _STALE:
                continue
            try:
                await self.handle(message)
            except asyncio.CancelledError:
                self.log.info("actor.loop_cancelled", state=self.state.value)
                raise
            except Exception as exc:
                self._escalate(exc, where="handle")
                return
            handled.inc()

    async def _runtime_drain(self, deadline_s: float) -> None:
        """Let the loop finish what is queued, within ``deadline_s``; the rest stays queued
        (``tell``-ed messages are resumed by the next incarnation)."""
        loop_task = self._loop_task
        if loop_task is None or loop_task.done():
            return
        self.mailbox.put_stop()
        done, _ = await asyncio.wait({loop_task}, timeout=deadline_s)
        if not done:
            self.log.warning(
                "actor.stop_deadline_passed", deadline_s=deadline_s, left=len(self.mailbox)
            )
            loop_task.cancel()

    def _runtime_after_stop(self) -> None:
        self.mailbox.remove(lambda item: item is _STOP)
        self._loop_task = None


class _StaleMarker:
    __slots__ = ()


_STALE: Any = _StaleMarker()
