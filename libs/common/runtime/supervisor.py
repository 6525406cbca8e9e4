"""Supervision: one-for-one restarts with backoff, within a restart budget.

The ``Supervisor`` starts its children in the order added and stops them in reverse. When a
child fails it is stopped, and started again (a new incarnation) after the ``Backoff`` delay
for the restarts in the window; past the ``RestartBudget`` the supervisor stops everything
and raises ``RestartBudgetExceeded``, so the process exits non-zero and the outer supervisor
(Docker, Kubernetes) takes over.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from libs.common.runtime.backoff import Backoff, RestartBudget
from libs.common.runtime.clock import SYSTEM_CLOCK, Clock
from libs.common.runtime.lifecycle import Component, RuntimeMetrics

log = structlog.get_logger("tickmesh.runtime")


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
        self.stop_deadline_s = stop_deadline_s
        self.backoff = Backoff(backoff_initial_s, backoff_max_s, jitter=jitter, rng=rng)
        self.children: list[Component] = []
        self._clock = clock
        self._metrics = RuntimeMetrics.for_registry(registry)
        self._budgets: dict[str, RestartBudget] = {}
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
