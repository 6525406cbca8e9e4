"""Test helpers shared by the test modules: ``from tests.helpers import eventually``."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

from libs.common.schemas import Bar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]

BarKey = tuple[str, int]
BarValue = tuple[float, float, float, float, int, float, int]


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


def value_of(bar: Bar) -> BarValue:
    """What a bar says: open, high, low, close, volume, vwap, trades."""
    return (bar.open, bar.high, bar.low, bar.close, bar.volume, bar.vwap, bar.trades)


def final_bars(bars: Iterable[Bar]) -> dict[BarKey, BarValue]:
    """The latest revision of each (symbol, minute)."""
    latest: dict[BarKey, Bar] = {}
    for bar in bars:
        key = (bar.symbol, bar.startMs)
        if key not in latest or bar.revision >= latest[key].revision:
            latest[key] = bar
    return {key: value_of(bar) for key, bar in sorted(latest.items())}


def run_reconcile(
    *args: str, env: Mapping[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``python -m services.mirror reconcile ARGS`` from the repository, with ``env`` over
    this process's environment; asserts that it exited 0 (its stderr's tail if not)."""
    result = subprocess.run(
        [sys.executable, "-m", "services.mirror", "reconcile", *args],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def reconcile_json(day: str, out: Path, env: Mapping[str, str]) -> dict[str, object]:
    """A day's report as JSON, judged now (``--min-age-s 0``) and not stored."""
    run_reconcile(
        *("--date", day, "--min-age-s", "0", "--no-store", "--format", "json"),
        *("--out", str(out)),
        env=env,
    )
    report: dict[str, object] = json.loads(out.read_text())
    return report
