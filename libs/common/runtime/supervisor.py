"""Supervision: one-for-one restarts with backoff, within a restart budget.

The ``Supervisor`` starts its children in the order added and stops them in reverse. When a
child fails it is stopped, and started again (a new incarnation) after the ``Backoff`` delay
for the restarts in the window; past the ``RestartBudget`` the supervisor stops everything
and raises ``RestartBudgetExceeded``, so the process exits non-zero and the outer supervisor
(Docker, Kubernetes) takes over.

A failure that ``classify_outage`` attributes to a dependency (Redis or Kafka unreachable:
a restart, a pause) is an outage, not the child's fault: it does not spend the budget. The
child is started again after a backoff capped at ``outage_max_s`` for as long as the outage
lasts; the outage is logged once when it begins and once when the child runs again, and
measured (``tickmesh_dependency_up``, ``tickmesh_dependency_outages_total``,
``tickmesh_dependency_down_seconds_total``).

A failure that is a ``SettingsError`` (Redis or Kafka refused our credentials, a certificate
is not trusted) is neither: no restart can fix it, so it is raised at once and the service
exits with EX_CONFIG naming the variable.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from libs.common.runtime.backoff import Backoff, RestartBudget
from libs.common.runtime.clock import SYSTEM_CLOCK, Clock
from libs.common.runtime.lifecycle import Component, RuntimeMetrics, State
from libs.common.runtime.metrics import metrics_for
from libs.common.runtime.settings import SettingsError

log = structlog.get_logger("tickmesh.runtime")


class RestartBudgetExceeded(RuntimeError):
    """A child failed more often than the supervisor's budget allows."""


class OutageMetrics:
    """Dependency outages seen by a supervisor; built once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["dependency"]
        self.up = Gauge(
            "tickmesh_dependency_up",
            "0 while a dependency is unreachable",
            labels,
            registry=registry,
        )
        self.outages = Counter(
            "tickmesh_dependency_outages",
            "Outages of a dependency ridden out",
            labels,
            registry=registry,
        )
        self.down_seconds = Counter(
            "tickmesh_dependency_down_seconds",
            "Seconds a dependency was unreachable (until the component ran again)",
            labels,
            registry=registry,
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None) -> OutageMetrics:
        """The metrics of ``registry``, created once."""
        return metrics_for(cls, registry)


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
        classify_outage: Callable[[BaseException], str | None] | None = None,
        outage_max_s: float = 5.0,
    ) -> None:
        self.name = name
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.stop_deadline_s = stop_deadline_s
        self.backoff = Backoff(backoff_initial_s, backoff_max_s, jitter=jitter, rng=rng)
        self.children: list[Component] = []
        self._clock = clock
        self._metrics = RuntimeMetrics.for_registry(registry)
        self._budgets: dict[str, RestartBudget] = {}
        self.classify_outage = classify_outage
        """Which dependency an error says is down (None: a real failure)."""
        self.outage_backoff = Backoff(backoff_initial_s, outage_max_s, jitter=jitter, rng=rng)
        self._outage_metrics = OutageMetrics.for_registry(registry)
        self._down: dict[str, float] = {}
        """Dependency -> when its outage began (monotonic), while it lasts."""
        self._stopping = asyncio.Event()
        self.log = log.bind(supervisor=name)
        self.delays: list[float] = []
        """Every backoff delay used, in order (for operators and tests)."""

    def add(self, child: Component) -> Component:
        """Add a child; children start in the order added and stop in reverse."""
        self.children.append(child)
        self._budgets[child.name] = RestartBudget(
            self.max_restarts, self.window_s, clock=self._clock
        )
        return child

    async def run(self) -> None:
        """Start the children and supervise them until ``stop``; raise past the budget."""
        for child in self.children:
            await child.start()
        try:
            while not self._stopping.is_set():
                watched: dict[asyncio.Future[Any], Component | None] = {
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

    async def _restart(self, child: Component, error: BaseException) -> None:
        if isinstance(error, SettingsError):
            # a refused password, an untrusted certificate: no restart or wait can fix it
            raise error
        dependency = self.classify_outage(error) if self.classify_outage is not None else None
        if dependency is not None:
            await self._ride_out(child, dependency, error)
            return
        budget = self._budgets[child.name]
        recent = budget.recent()
        if budget.exhausted():
            self.log.critical(
                "supervisor.restart_budget_exceeded",
                actor=child.name,
                restarts=recent,
                window_s=self.window_s,
                error=repr(error),
                action="exiting non-zero so the container supervisor takes over",
            )
            raise RestartBudgetExceeded(
                f"actor {child.name} failed {recent + 1} times within {self.window_s:g} s "
                f"(budget {self.max_restarts}); last error: {error!r}"
            )
        delay = self.backoff.delay_s(recent)
        self.delays.append(delay)
        budget.spend()
        self.log.warning(
            "supervisor.restarting", actor=child.name, delay_s=round(delay, 3), error=repr(error)
        )
        await self._stop_failed(child)
        await asyncio.sleep(delay)
        if self._stopping.is_set():
            return
        self._metrics.restarts.labels(child.name).inc()
        await child.start()

    async def _stop_failed(self, child: Component) -> None:
        """Stop a failed child before its restart. Its last words (a final commit, a flush)
        may fail for the same reason it did (Redis gone): that is logged, not fatal; the
        restart starts it afresh from its durable state."""
        try:
            await child.stop(self.stop_deadline_s)
        except Exception as exc:
            self.log.warning(
                "supervisor.stop_failed",
                actor=child.name,
                error=repr(exc),
                action="restarting it anyway; it resumes from its durable state",
            )

    async def _ride_out(self, child: Component, dependency: str, error: BaseException) -> None:
        """Restart ``child`` after an outage of ``dependency``, without spending its budget."""
        now = self._clock.monotonic()
        if dependency not in self._down:
            self._down[dependency] = now
            self.outage_backoff.reset()
            self._outage_metrics.up.labels(dependency).set(0)
            self._outage_metrics.outages.labels(dependency).inc()
            self.log.warning(
                "supervisor.dependency_down",
                dependency=dependency,
                actor=child.name,
                error=repr(error),
                action="waiting for it with backoff; the budget is not spent",
            )
        delay = self.outage_backoff.next_s()
        self.delays.append(delay)
        await self._stop_failed(child)
        await asyncio.sleep(delay)
        if self._stopping.is_set():
            return
        self._metrics.restarts.labels(child.name).inc()
        await child.start()
        if child.state is State.RUNNING and dependency in self._down:
            down_s = self._clock.monotonic() - self._down.pop(dependency)
            self._outage_metrics.up.labels(dependency).set(1)
            self._outage_metrics.down_seconds.labels(dependency).inc(down_s)
            self.log.warning(
                "supervisor.dependency_back",
                dependency=dependency,
                actor=child.name,
                down_s=round(down_s, 3),
                attempts=self.outage_backoff.attempts,
            )

    def stop(self) -> None:
        """Ask the supervisor to stop its children (what a signal handler calls)."""
        self._stopping.set()

    async def _stop_children(self) -> None:
        for child in reversed(self.children):
            try:
                await child.stop(self.stop_deadline_s)
            except Exception as exc:  # stop every child even if one misbehaves
                self.log.error("supervisor.stop_failed", actor=child.name, error=repr(exc))
