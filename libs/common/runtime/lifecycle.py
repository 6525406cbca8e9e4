"""Components: the lifecycle every long-lived part of a service shares.

A ``Component`` owns a lifecycle whose allowed transitions live in one table
(``TRANSITIONS``), the timers (``every``) and long-running tasks (``spawn``) it declares, and
its incarnations: each ``start`` begins a new one (``incarnation``). Subclasses override hooks
only: ``on_start`` and ``on_stop``. A loop that never receives a message is a task of a
component; a component that takes messages is an ``Actor`` (``runtime.actors``), which adds
a bounded mailbox on top.

Failure has one path: an exception in ``on_start``, a timer or an owned task goes to
``_escalate``, which marks the component failed, cancels the rest of its work and tells its
supervisor through ``failure``. Cancellation is re-raised, never swallowed. Nothing logs and
limps on.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from libs.common.runtime.metrics import metrics_for
from libs.common.runtime.settings import SettingsError

log = structlog.get_logger("tickmesh.runtime")


def raise_if_cancelled(task: asyncio.Task[Any] | None = None) -> None:
    """Raise ``CancelledError`` if this task was asked to stop and a library lost the request.

    On Python 3.11 ``asyncio.wait_for`` (which redis-py uses around socket writes) returns the
    result when its inner call finishes at the same moment as a cancellation, and the
    cancellation is gone; ``Task.cancelling()`` still counts it. A loop that calls this at
    each turn ends as asked instead of running forever; a hot loop passes its ``task`` (looked
    up once) rather than have it looked up at every turn.
    """
    if task is None:
        task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError("cancellation requested earlier (lost by a library call)")


class State(enum.Enum):
    """Lifecycle states of a component."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.NEW: frozenset({State.STARTING}),
    State.STARTING: frozenset({State.RUNNING, State.FAILED, State.STOPPING}),
    State.RUNNING: frozenset({State.STOPPING, State.FAILED}),
    State.STOPPING: frozenset({State.STOPPED, State.FAILED}),
    State.STOPPED: frozenset({State.STARTING}),
    State.FAILED: frozenset({State.STARTING, State.STOPPING}),
}
"""The one table of allowed lifecycle transitions."""


class InvalidTransition(RuntimeError):
    """A component was asked to move to a state its current state does not allow."""


class RuntimeMetrics:
    """Per-component metrics, labelled ``actor`` by name (the label every dashboard uses);
    built once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["actor"]

        def counter(name: str, text: str) -> Counter:
            return Counter(name, text, labels, registry=registry)

        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name, text, labels, registry=registry)

        self.mailbox_depth = gauge("tickmesh_actor_mailbox_depth", "Messages waiting")
        self.mailbox_capacity = gauge("tickmesh_actor_mailbox_capacity", "Mailbox bound")
        self.handled = counter("tickmesh_actor_messages_handled", "Messages handled")
        self.failures = counter("tickmesh_actor_failures", "Failures escalated to the supervisor")
        self.restarts = counter("tickmesh_actor_restarts", "Restarts by the supervisor")
        self.shed = counter("tickmesh_actor_messages_shed", "Messages dropped by a full mailbox")
        self.spilled = counter(
            "tickmesh_actor_messages_spilled", "Messages spilled by a full SPILL mailbox"
        )
        self.stale = counter(
            "tickmesh_actor_messages_stale",
            "Messages an earlier incarnation's own tasks queued, dropped at a restart (their "
            "source delivers them again)",
        )
        self.state = gauge("tickmesh_actor_running", "1 while the component is running")

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None) -> RuntimeMetrics:
        """The metrics of ``registry`` (the default registry when None), created once."""
        return metrics_for(cls, registry)


Work = Callable[[], Awaitable[None]]


class Component:
    """Base class of every long-lived part of a service; subclasses override the hooks."""

    def __init__(self, name: str, *, registry: CollectorRegistry | None = None) -> None:
        self.name = name
        self.metrics = RuntimeMetrics.for_registry(registry)
        self.log = log.bind(actor=name)
        self._state = State.NEW
        self._incarnation = 0
        self._timers: list[tuple[str, float, Work]] = []
        self._task_factories: list[tuple[str, Work]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._failure: asyncio.Future[BaseException] | None = None
        self._failures = self.metrics.failures.labels(name)
        self._running_gauge = self.metrics.state.labels(name)

    # -- hooks -------------------------------------------------------------------------------

    async def on_start(self) -> None:
        """Called before the timers and tasks start; acquire resources here."""

    async def on_stop(self) -> None:
        """Called after the work stopped (or the deadline passed); release resources."""

    # -- what the component runs -------------------------------------------------------------

    def every(self, interval_s: float, function: Work, *, name: str) -> None:
        """Run ``function`` every ``interval_s`` seconds while the component runs."""
        if interval_s <= 0:
            raise ValueError(f"timer {name} of {self.name} needs a positive interval")
        self._timers.append((name, interval_s, function))

    def spawn(self, function: Work, *, name: str) -> None:
        """Run the long-running coroutine ``function()`` while the component runs."""
        self._task_factories.append((name, function))

    # -- state -------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The current lifecycle state."""
        return self._state

    @property
    def incarnation(self) -> int:
        """How many times the component was started; each start is a new incarnation."""
        return self._incarnation

    def _transition(self, new_state: State) -> None:
        if new_state not in TRANSITIONS[self._state]:
            raise InvalidTransition(f"{self.name}: {self._state.value} -> {new_state.value}")
        self.log.debug("actor.transition", old=self._state.value, new=new_state.value)
        self._state = new_state
        self._running_gauge.set(1 if new_state is State.RUNNING else 0)

    @property
    def failure(self) -> asyncio.Future[BaseException]:
        """Resolves with the exception when the component fails (for the supervisor)."""
        if self._failure is None:
            self._failure = asyncio.get_running_loop().create_future()
        return self._failure

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin a new incarnation: ``on_start``, then the timers and owned tasks."""
        self._transition(State.STARTING)
        self._incarnation += 1
        self._failure = asyncio.get_running_loop().create_future()
        self._runtime_before_start()
        try:
            await self.on_start()
        except asyncio.CancelledError:
            self.log.warning("actor.start_cancelled")
            raise
        except Exception as exc:
            self._escalate(exc, where="on_start")
            return
        self._runtime_start_work()
        for name, interval_s, function in self._timers:
            self._tasks.append(
                asyncio.create_task(self._run_timer(name, interval_s, function), name=name)
            )
        for name, factory in self._task_factories:
            self._tasks.append(asyncio.create_task(self._run_owned(name, factory), name=name))
        self._transition(State.RUNNING)
        self.log.info("actor.started", incarnation=self._incarnation)

    def _runtime_before_start(self) -> None:
        """Runtime hook (actors: drop what an earlier incarnation queued)."""

    def _runtime_start_work(self) -> None:
        """Runtime hook (actors: start the message loop)."""

    async def _runtime_drain(self, deadline_s: float) -> None:
        """Runtime hook: finish queued work within ``deadline_s`` (actors: the mailbox)."""

    def _runtime_tasks(self) -> list[asyncio.Task[None]]:
        return list(self._tasks)

    async def _run_timer(self, name: str, interval_s: float, function: Work) -> None:
        try:
            while True:
                await asyncio.sleep(interval_s)
                await function()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._escalate(exc, where=f"timer {name}")

    async def _run_owned(self, name: str, factory: Work) -> None:
        try:
            await factory()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._escalate(exc, where=f"task {name}")

    def _escalate(self, exc: BaseException, *, where: str) -> None:
        """The one failure handler: mark failed, stop owned work, tell the supervisor."""
        if self._state in (State.FAILED, State.STOPPED):
            return
        self._failures.inc()
        if not isinstance(exc, SettingsError):  # the service exits on it with one line
            self.log.error("actor.failed", where=where, error=repr(exc), exc_info=exc)
        if self._state is State.STOPPING:
            return  # already on its way out; stop() finishes the job and reaches STOPPED
        self._transition(State.FAILED)
        current = asyncio.current_task()
        for task in self._runtime_tasks():
            if task is not current and not task.done():
                task.cancel()
        if self._failure is not None and not self._failure.done():
            self._failure.set_result(exc)

    async def stop(self, deadline_s: float = 5.0) -> None:
        """Stop taking new work, finish queued work within ``deadline_s``, then ``on_stop``.

        Owned tasks and timers are cancelled and awaited, so cancellation is never swallowed.
        """
        if self._state in (State.STOPPED, State.NEW):
            return
        self._transition(State.STOPPING)
        for task in self._tasks:
            task.cancel()
        await self._runtime_drain(deadline_s)
        await self._await_cancelled(self._runtime_tasks(), deadline_s)
        self._tasks.clear()
        self._runtime_after_stop()
        try:
            await self.on_stop()
        finally:
            self._transition(State.STOPPED)
            self.log.info("actor.stopped")

    async def _await_cancelled(self, tasks: list[asyncio.Task[None]], deadline_s: float) -> None:
        """Wait for cancelled ``tasks`` to end, cancelling again those still running every
        half second (a library may swallow one cancellation), up to ``deadline_s``; a task
        still running then is logged and left behind rather than hanging the stop."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        pending = {task for task in tasks if not task.done()}
        while pending:
            left = end - loop.time()
            if left <= 0:
                self.log.error(
                    "actor.stop_stuck", tasks=sorted(task.get_name() for task in pending)
                )
                break
            _, pending = await asyncio.wait(pending, timeout=min(0.5, left))
            for task in pending:
                task.cancel()
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: its failure was handled by _escalate

    def _runtime_after_stop(self) -> None:
        """Runtime hook (actors: forget the loop task)."""
