"""The actor runtime: every service is a tree of actors under a supervisor.

An actor owns its state, a bounded mailbox and a lifecycle whose allowed transitions live in
one table (``TRANSITIONS``). Subclasses override hooks only: ``on_start``, ``handle``,
``on_stop``. Periodic timers (``every``) and long-running tasks (``spawn``) belong to the
actor: they start with it, stop with it, and their failure is the actor's failure.

The message loop has one shape: take a message; the stop sentinel ends the loop;
cancellation is logged and re-raised; any other exception goes to ``_escalate``, which marks
the actor failed and tells its supervisor. Nothing logs and limps on.

The ``Supervisor`` restarts a failed child one-for-one after an exponential backoff with
jitter, within a restart budget per time window; past the budget it stops everything and
raises ``RestartBudgetExceeded`` so the process exits non-zero and the outer supervisor
(Docker, Kubernetes) takes over.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from libs.common.runtime.clock import SYSTEM_CLOCK, Clock
from libs.common.runtime.metrics import metrics_for

log = structlog.get_logger("tickmesh.actors")

MessageT = TypeVar("MessageT")


class ActorState(enum.Enum):
    """Lifecycle states of an actor."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


TRANSITIONS: dict[ActorState, frozenset[ActorState]] = {
    ActorState.NEW: frozenset({ActorState.STARTING}),
    ActorState.STARTING: frozenset({ActorState.RUNNING, ActorState.FAILED, ActorState.STOPPING}),
    ActorState.RUNNING: frozenset({ActorState.STOPPING, ActorState.FAILED}),
    ActorState.STOPPING: frozenset({ActorState.STOPPED, ActorState.FAILED}),
    ActorState.STOPPED: frozenset({ActorState.STARTING}),
    ActorState.FAILED: frozenset({ActorState.STARTING, ActorState.STOPPING}),
}
"""The one table of allowed lifecycle transitions."""


class InvalidTransition(RuntimeError):
    """An actor was asked to move to a state its current state does not allow."""


class Overflow(enum.Enum):
    """What a full mailbox does to the sender; every edge states one."""

    BLOCK = "block"
    """Pause the sender until there is room (backpressure)."""
    SHED = "shed"
    """Drop the new message and count it (non-critical paths only)."""
    SPILL = "spill"
    """Hand the message to a spill callback (e.g. the durable stream) and count it."""


class ActorMetrics:
    """Per-actor metrics, labelled by actor name; built once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["actor"]
        self.mailbox_depth = Gauge(
            "tickmesh_actor_mailbox_depth",
            "Messages waiting in the mailbox",
            labels,
            registry=registry,
        )
        self.mailbox_capacity = Gauge(
            "tickmesh_actor_mailbox_capacity", "Mailbox bound", labels, registry=registry
        )
        self.handled = Counter(
            "tickmesh_actor_messages_handled", "Messages handled", labels, registry=registry
        )
        self.failures = Counter(
            "tickmesh_actor_failures",
            "Failures escalated to the supervisor",
            labels,
            registry=registry,
        )
        self.restarts = Counter(
            "tickmesh_actor_restarts", "Restarts by the supervisor", labels, registry=registry
        )
        self.shed = Counter(
            "tickmesh_actor_messages_shed",
            "Messages dropped by a full SHED mailbox",
            labels,
            registry=registry,
        )
        self.spilled = Counter(
            "tickmesh_actor_messages_spilled",
            "Messages spilled by a full SPILL mailbox",
            labels,
            registry=registry,
        )
        self.state = Gauge(
            "tickmesh_actor_running", "1 while the actor is running", labels, registry=registry
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None) -> ActorMetrics:
        """The metrics of ``registry`` (the default registry when None), created once."""
        return metrics_for(cls, registry)


class _Stop:
    """The sentinel that ends an actor's message loop after what is queued before it."""

    __slots__ = ()


_STOP = _Stop()


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
        metrics: ActorMetrics,
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

    async def put(self, message: MessageT) -> bool:
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

    def put_nowait(self, message: MessageT) -> bool:
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
        """Take the oldest message, waiting while the mailbox is empty."""
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

    def take_nowait(self, limit: int) -> list[MessageT]:
        """Take up to ``limit`` queued messages without waiting, stopping at a stop sentinel
        (which stays queued), so a handler can work on several messages at once."""
        taken: list[MessageT] = []
        items = self._items
        while items and len(taken) < limit and items[0] is not _STOP:
            taken.append(items.popleft())
        if taken:
            self._depth.set(len(items))
            for _ in taken:
                self._wake(self._putters)
        return taken

    def drop_stops(self) -> None:
        """Remove stale stop sentinels (left by a stop that timed out) before a restart."""
        if any(item is _STOP for item in self._items):
            self._items = deque(item for item in self._items if item is not _STOP)
            self._depth.set(len(self._items))


class Actor(Generic[MessageT]):
    """Base class of every actor: owns the lifecycle; subclasses override the hooks only."""

    def __init__(
        self,
        name: str,
        *,
        mailbox_size: int = 1024,
        overflow: Overflow = Overflow.BLOCK,
        spill: Callable[[MessageT], Awaitable[None]] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name = name
        self.metrics = ActorMetrics.for_registry(registry)
        self.mailbox: Mailbox[MessageT] = Mailbox(name, mailbox_size, overflow, self.metrics, spill)
        self.log = log.bind(actor=name)
        self._state = ActorState.NEW
        self._timers: list[tuple[str, float, Callable[[], Awaitable[None]]]] = []
        self._task_factories: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._loop_task: asyncio.Task[None] | None = None
        self._failure: asyncio.Future[BaseException] | None = None
        self._handled = self.metrics.handled.labels(name)
        self._failures = self.metrics.failures.labels(name)
        self._running_gauge = self.metrics.state.labels(name)

    # -- hooks -------------------------------------------------------------------------------

    async def on_start(self) -> None:
        """Called before the message loop starts; acquire resources here."""

    async def handle(self, message: MessageT) -> None:
        """Handle one message from the mailbox."""

    async def on_stop(self) -> None:
        """Called after the loop has drained (or the deadline passed); release resources."""

    # -- ownership of timers and tasks -------------------------------------------------------

    def every(
        self, interval_s: float, function: Callable[[], Awaitable[None]], *, name: str
    ) -> None:
        """Run ``function`` every ``interval_s`` seconds while the actor runs."""
        if interval_s <= 0:
            raise ValueError(f"timer {name} of {self.name} needs a positive interval")
        self._timers.append((name, interval_s, function))

    def spawn(self, function: Callable[[], Awaitable[None]], *, name: str) -> None:
        """Run the long-running coroutine ``function()`` while the actor runs."""
        self._task_factories.append((name, function))

    # -- state -------------------------------------------------------------------------------

    @property
    def state(self) -> ActorState:
        """The current lifecycle state."""
        return self._state

    def _transition(self, new_state: ActorState) -> None:
        if new_state not in TRANSITIONS[self._state]:
            raise InvalidTransition(f"actor {self.name}: {self._state.value} -> {new_state.value}")
        self.log.debug("actor.transition", old=self._state.value, new=new_state.value)
        self._state = new_state
        self._running_gauge.set(1 if new_state is ActorState.RUNNING else 0)

    @property
    def failure(self) -> asyncio.Future[BaseException]:
        """Resolves with the exception when the actor fails (for the supervisor)."""
        if self._failure is None:
            self._failure = asyncio.get_running_loop().create_future()
        return self._failure

    # -- sending -----------------------------------------------------------------------------

    async def tell(self, message: MessageT) -> bool:
        """Send a message, honouring the mailbox's overflow policy; False if it was shed."""
        return await self.mailbox.put(message)

    def tell_nowait(self, message: MessageT) -> bool:
        """Send without waiting; False when the mailbox is full."""
        return self.mailbox.put_nowait(message)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Run ``on_start`` then the message loop, timers and owned tasks."""
        self._transition(ActorState.STARTING)
        self._failure = asyncio.get_running_loop().create_future()
        self.mailbox.drop_stops()
        try:
            await self.on_start()
        except asyncio.CancelledError:
            self.log.warning("actor.start_cancelled")
            raise
        except Exception as exc:
            self._escalate(exc, where="on_start")
            return
        self._loop_task = asyncio.create_task(self._run_loop(), name=f"{self.name}.loop")
        for name, interval_s, function in self._timers:
            self._tasks.append(
                asyncio.create_task(self._run_timer(name, interval_s, function), name=name)
            )
        for name, factory in self._task_factories:
            self._tasks.append(asyncio.create_task(self._run_owned(name, factory), name=name))
        self._transition(ActorState.RUNNING)
        self.log.info("actor.started")

    async def _run_loop(self) -> None:
        mailbox = self.mailbox
        handled = self._handled
        while True:
            message = await mailbox.get()
            if message is _STOP:
                return
            try:
                await self.handle(message)
            except asyncio.CancelledError:
                self.log.info("actor.loop_cancelled", state=self._state.value)
                raise
            except Exception as exc:
                self._escalate(exc, where="handle")
                return
            handled.inc()

    async def _run_timer(
        self, name: str, interval_s: float, function: Callable[[], Awaitable[None]]
    ) -> None:
        try:
            while True:
                await asyncio.sleep(interval_s)
                await function()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._escalate(exc, where=f"timer {name}")

    async def _run_owned(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        try:
            await factory()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._escalate(exc, where=f"task {name}")

    def _escalate(self, exc: BaseException, *, where: str) -> None:
        """The one failure handler: mark failed, stop owned work, tell the supervisor."""
        if self._state in (ActorState.FAILED, ActorState.STOPPED):
            return
        self._failures.inc()
        self.log.error("actor.failed", where=where, error=repr(exc), exc_info=exc)
        if self._state is ActorState.STOPPING:
            return  # already on its way out; stop() finishes the job and reaches STOPPED
        self._transition(ActorState.FAILED)
        current = asyncio.current_task()
        for task in [*self._tasks, self._loop_task]:
            if task is not None and task is not current and not task.done():
                task.cancel()
        if self._failure is not None and not self._failure.done():
            self._failure.set_result(exc)

    async def stop(self, deadline_s: float = 5.0) -> None:
        """Stop taking new work, drain the mailbox within ``deadline_s``, then ``on_stop``.

        What is still queued at the deadline stays in the mailbox (a restart resumes it);
        the loop is cancelled and awaited, so cancellation is never swallowed here either.
        """
        if self._state in (ActorState.STOPPED, ActorState.NEW):
            return
        self._transition(ActorState.STOPPING)
        for task in self._tasks:
            task.cancel()
        loop_task = self._loop_task
        if loop_task is not None and not loop_task.done():
            self.mailbox.put_stop()
            done, _ = await asyncio.wait({loop_task}, timeout=deadline_s)
            if not done:
                self.log.warning(
                    "actor.stop_deadline_passed", deadline_s=deadline_s, left=len(self.mailbox)
                )
                loop_task.cancel()
        owned = [task for task in [*self._tasks, loop_task] if task is not None]
        await asyncio.gather(*owned, return_exceptions=True)
        self.mailbox.drop_stops()
        self._tasks.clear()
        self._loop_task = None
        try:
            await self.on_stop()
        finally:
            self._transition(ActorState.STOPPED)
            self.log.info("actor.stopped")


class RestartBudgetExceeded(RuntimeError):
    """A child failed more often than the supervisor's budget allows."""


class Supervisor:
    """One-for-one supervision with backoff, jitter and a restart budget per window."""

    def __init__(
        self,
        name: str,
        *,
        max_restarts: int = 5,
        window_s: float = 60.0,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 30.0,
        jitter: float = 0.2,
        stop_deadline_s: float = 5.0,
        clock: Clock = SYSTEM_CLOCK,
        registry: CollectorRegistry | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.jitter = jitter
        self.stop_deadline_s = stop_deadline_s
        self.children: list[Actor[Any]] = []
        self._clock = clock
        self._rng = rng or random.Random()
        self._metrics = ActorMetrics.for_registry(registry)
        self._restart_times: dict[str, deque[float]] = {}
        self._stopping = asyncio.Event()
        self.log = log.bind(supervisor=name)
        self.delays: list[float] = []
        """Every backoff delay used, in order (for operators and tests)."""

    def add(self, actor: Actor[Any]) -> Actor[Any]:
        """Add a child; children start in the order added and stop in reverse."""
        self.children.append(actor)
        self._restart_times[actor.name] = deque()
        return actor

    def backoff_s(self, restarts_in_window: int) -> float:
        """Delay before the next restart: exponential in recent restarts, with jitter."""
        base = min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, restarts_in_window))
        return base * (1 + self._rng.uniform(-self.jitter, self.jitter))

    async def run(self) -> None:
        """Start the children and supervise them until ``stop``; raise past the budget."""
        for child in self.children:
            await child.start()
        try:
            while not self._stopping.is_set():
                watched: dict[asyncio.Future[Any], Actor[Any] | None] = {
                    child.failure: child for child in self.children
                }
                stop_waiter = asyncio.ensure_future(self._stopping.wait())
                watched[stop_waiter] = None
                try:
                    done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop_waiter.cancel()
                for future in done:
                    failed = watched[future]
                    if failed is not None and not self._stopping.is_set():
                        await self._restart(failed, future.result())
        finally:
            await self._stop_children()

    async def _restart(self, child: Actor[Any], error: BaseException) -> None:
        now = self._clock.monotonic()
        times = self._restart_times[child.name]
        while times and now - times[0] > self.window_s:
            times.popleft()
        if len(times) >= self.max_restarts:
            self.log.critical(
                "supervisor.restart_budget_exceeded",
                actor=child.name,
                restarts=len(times),
                window_s=self.window_s,
                error=repr(error),
                action="exiting non-zero so the container supervisor takes over",
            )
            raise RestartBudgetExceeded(
                f"actor {child.name} failed {len(times) + 1} times within {self.window_s:g} s "
                f"(budget {self.max_restarts}); last error: {error!r}"
            )
        delay = self.backoff_s(len(times))
        self.delays.append(delay)
        times.append(now)
        self.log.warning(
            "supervisor.restarting", actor=child.name, delay_s=round(delay, 3), error=repr(error)
        )
        await child.stop(self.stop_deadline_s)
        await asyncio.sleep(delay)
        if self._stopping.is_set():
            return
        self._metrics.restarts.labels(child.name).inc()
        await child.start()

    def stop(self) -> None:
        """Ask the supervisor to stop its children (what a signal handler calls)."""
        self._stopping.set()

    async def _stop_children(self) -> None:
        for child in reversed(self.children):
            try:
                await child.stop(self.stop_deadline_s)
            except Exception as exc:  # stop every child even if one misbehaves
                self.log.error("supervisor.stop_failed", actor=child.name, error=repr(exc))
