"""Retrying an async operation under a deadline, with the one ``Backoff``.

The retry loop of tickmesh (connecting to Redis and Kafka, publishing a batch): retry only
what ``retriable`` accepts, wait as ``Backoff`` says (``initial_s`` doubling up to ``max_s``,
±``jitter``), and when the next wait would pass ``max_wait_s``, raise the last error.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from libs.common.runtime.backoff import Backoff
from libs.common.runtime.clock import SYSTEM_CLOCK, Clock

log = structlog.get_logger("tickmesh.retry")

ResultT = TypeVar("ResultT")


async def retry_async(
    operation: Callable[[], Awaitable[ResultT]],
    *,
    retriable: Callable[[BaseException], bool],
    max_wait_s: float,
    what: str,
    initial_s: float = 0.1,
    max_s: float = 5.0,
    jitter: float = 0.2,
    clock: Clock = SYSTEM_CLOCK,
    rng: random.Random | None = None,
    **context: object,
) -> ResultT:
    """``await operation()``, retried as the module says; each retry logs one warning with
    ``what`` and ``context``. Returns the result; raises the last error past the deadline or
    at once for an error that is not retriable."""
    deadline = clock.monotonic() + max_wait_s
    backoff = Backoff(initial_s, max_s, jitter=jitter, rng=rng)
    attempt = 0
    while True:
        attempt += 1
        try:
            result = await operation()
        except Exception as exc:
            base_s = backoff.base_s(attempt - 1)
            if not retriable(exc) or clock.monotonic() + base_s > deadline:
                raise
            log.warning(
                "retry.waiting",
                what=what,
                attempt=attempt,
                delay_s=round(base_s, 2),
                error=type(exc).__name__,
                detail=str(exc)[:200],
                **context,
            )
            await asyncio.sleep(backoff.delay_s(attempt - 1))
            continue
        if attempt > 1:
            log.info("retry.succeeded", what=what, attempts=attempt, **context)
        return result
