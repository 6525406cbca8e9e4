"""Wall and monotonic time behind one small interface, so that time-driven code takes a clock
and tests inject a ``ManualClock``."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Wall time source; inject a ``ManualClock`` in tests."""

    def now_ms(self) -> int:
        """Epoch milliseconds, UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin, never going backwards."""
        ...


class SystemClock:
    """The real clock."""

    def now_ms(self) -> int:
        """Epoch milliseconds from the system clock."""
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to; for tests of time-driven logic."""

    def __init__(self, start_ms: int = 0) -> None:
        self._now_ms = start_ms
        self._monotonic = 0.0

    def now_ms(self) -> int:
        """The current manual time."""
        return self._now_ms

    def monotonic(self) -> float:
        """Seconds advanced since creation."""
        return self._monotonic

    def advance(self, ms: int) -> None:
        """Move time forward by ``ms`` milliseconds."""
        if ms < 0:
            raise ValueError("a clock never goes backwards")
        self._now_ms += ms
        self._monotonic += ms / 1000.0

    def set(self, now_ms: int) -> None:
        """Jump to ``now_ms`` (not earlier than now)."""
        self.advance(now_ms - self._now_ms)


SYSTEM_CLOCK = SystemClock()
