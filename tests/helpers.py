"""Test helpers shared by the test modules: ``from tests.helpers import eventually``."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    condition: Callable[[], T | Awaitable[T]],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | Callable[[], str] | None = None,
) -> T:
    """Poll ``condition`` until it returns a truthy value, and return that value.

    ``condition`` may be a plain or an async callable. An exception raised by it counts as
    "not yet" (and is reported if time runs out). On timeout raises ``AssertionError`` with
    ``message`` (a string, or a callable giving one, evaluated then), the last value seen and
    the last exception.
    """
    deadline = time.monotonic() + timeout
    attempts = 0
    last_value: object = None
    last_error: BaseException | None = None
    while True:
        attempts += 1
        try:
            result = condition()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result  # type: ignore[return-value]
            last_value, last_error = result, None
        except AssertionError as error:
            last_error = error
        except Exception as error:
            last_error = error
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(interval)
    what = message() if callable(message) else message
    name = getattr(condition, "__qualname__", repr(condition))
    detail = f"last error {last_error!r}" if last_error is not None else f"last {last_value!r}"
    raise AssertionError(
        f"{what or 'condition not met'}: {name} still false after {timeout:g} s "
        f"({attempts} tries; {detail})"
    )
