"""The event loop every process runs on: uvloop by default, the standard one on request.

uvloop (libuv under asyncio's interface) does the same work with less per-callback and
per-socket cost. Every service (``service.run_main``) and the simulator go through
``run_on_loop``: a service's ``EVENT_LOOP`` setting (or ``TICKMESH_EVENT_LOOP`` for the whole
mesh) picks its loop; the simulator reads ``TICKMESH_EVENT_LOOP``.
"""

from __future__ import annotations

import asyncio
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
