"""One backoff and one restart budget, for everything that waits before trying again.

``Backoff`` is exponential with jitter: the delay before attempt ``n`` (from 0) is
``min(max_s, initial_s * 2**n)``, raised to a floor when the caller has one, then multiplied by
a factor drawn from ``[1 - jitter, 1 + jitter]`` with an injected random source. The
supervisor, ingest's reconnects, the mirror's Kafka retries, the external engine's restarts
and ``retry_async`` all use it.

``RestartBudget`` allows at most ``max_restarts`` within any ``window_s`` seconds of an
injected clock; past it the caller gives up (the supervisor exits non-zero, the external
engine reports it failed).
"""

from __future__ import annotations

import random
from collections import deque

from libs.common.runtime.clock import SYSTEM_CLOCK, Clock

_MAX_EXPONENT = 62


class Backoff:
    """Exponential delays with jitter and a cap; see the module docstring."""

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        *,
        jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        if initial_s < 0 or max_s < 0:
            raise ValueError(f"backoff delays must not be negative ({initial_s}, {max_s})")
        if not 0 <= jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), not {jitter}")
        self.initial_s = initial_s
        self.max_s = max_s
        self.jitter = jitter
        self.rng = rng or random.Random()
        self.attempts = 0
        """Delays handed out by ``next_s`` since the last ``reset``."""

    def base_s(self, attempt: int) -> float:
        """The delay before attempt ``attempt`` (from 0) without jitter."""
        return min(self.max_s, self.initial_s * 2 ** min(max(0, attempt), _MAX_EXPONENT))

    def delay_s(self, attempt: int, *, floor_s: float = 0.0) -> float:
        """The delay before attempt ``attempt``: the base, at least ``floor_s``, with jitter."""
        base = max(floor_s, self.base_s(attempt))
        if not self.jitter:
            return base
        return base * self.rng.uniform(1 - self.jitter, 1 + self.jitter)

    def next_s(self, *, floor_s: float = 0.0) -> float:
        """The next delay of a run of failures (``attempts`` counts them)."""
        delay = self.delay_s(self.attempts, floor_s=floor_s)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """A success: the next failure starts from the initial delay again."""
        self.attempts = 0


class RestartBudget:
    """At most ``max_restarts`` restarts within any ``window_s`` seconds."""

    def __init__(self, max_restarts: int, window_s: float, *, clock: Clock = SYSTEM_CLOCK) -> None:
        if max_restarts < 0 or window_s <= 0:
            raise ValueError(f"bad restart budget: {max_restarts} within {window_s} s")
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.clock = clock
        self._times: deque[float] = deque()

    def recent(self) -> int:
        """Restarts within the window ending now."""
        now = self.clock.monotonic()
        times = self._times
        while times and now - times[0] > self.window_s:
            times.popleft()
        return len(times)

    def exhausted(self) -> bool:
        """True when one more restart would pass the budget."""
        return self.recent() >= self.max_restarts

    def spend(self) -> None:
        """Count one restart, now."""
        self._times.append(self.clock.monotonic())
