"""The event loop every process runs on (uvloop by default, the standard one on request),
and how often its cyclic garbage collector runs.

uvloop (libuv under asyncio's interface) does the same work with less per-callback and
per-socket cost. Every service (``service.run_main``) and the simulator go through
``run_on_loop``: a service's ``EVENT_LOOP`` setting (or ``TICKMESH_EVENT_LOOP`` for the whole
mesh) picks its loop; the simulator reads ``TICKMESH_EVENT_LOOP``.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Literal, TypeVar

EventLoop = Literal["uvloop", "asyncio"]
EVENT_LOOP_ENV = "TICKMESH_EVENT_LOOP"

T = TypeVar("T")


def loop_factory(kind: EventLoop) -> Callable[[], asyncio.AbstractEventLoop]:
    """The constructor of a ``kind`` loop."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_on_loop(main: Coroutine[Any, Any, T], kind: EventLoop = "uvloop") -> T:
    """Run ``main`` to completion on a new loop of ``kind`` (as ``asyncio.run`` does)."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main)


def event_loop_from_env(environ: Mapping[str, str] | None = None) -> EventLoop:
    """``TICKMESH_EVENT_LOOP`` for processes without service settings; ``ValueError`` if bad."""
    value = (os.environ if environ is None else environ).get(EVENT_LOOP_ENV, "uvloop")
    if value == "uvloop":
        return "uvloop"
    if value == "asyncio":
        return "asyncio"
    raise ValueError(f"{EVENT_LOOP_ENV}={value!r}: expected uvloop or asyncio")


GC_GEN0_THRESHOLD = 50_000
"""Container allocations between two young-generation collections (Python's own: 700).

A service allocates a few objects per trade and keeps many (trade identities, open minutes):
at Python's threshold the cyclic collector ran some 1,500 times over 200,000 tick records
and took 44 % of decoding and de-duplicating them; at 50,000 it runs 16 times and the loop
is 1.8x as fast. Objects without cycles are freed by reference counting either way."""


def tune_gc(gen0: int = GC_GEN0_THRESHOLD) -> None:
    """Collect the young generation every ``gen0`` allocations (0: Python's default, 700),
    the older ones at Python's usual ratios to it."""
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0 or 700, gen1, gen2)
