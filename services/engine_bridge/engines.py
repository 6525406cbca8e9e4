"""The engine interface the bridge actor drives, and the factory that picks one from settings.

An engine receives one minute bucket of closed bars (with corrections of earlier minutes and
the open positions) and returns signals and orders. Three engines exist:

- built-in strategies (``strategies.BuiltinEngine``: golden cross, z-score), synchronous and
  wrapped here so the actor can await them like any other;
- the external engine (``external.ExternalEngine``), a subprocess speaking JSON lines;
- the replay engine (``replay.OutputReplay``), which does not decide anything: it plays an
  engine's recorded outputs, so it is an actor of its own rather than an ``Engine``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from services.engine_bridge.config import BridgeSettings
from services.engine_bridge.external import ExternalEngine
from services.engine_bridge.model import EngineInput, EngineOutput, PositionView
from services.engine_bridge.strategies import BuiltinEngine, make_strategy


class Engine(Protocol):
    """What the bridge actor needs of an engine."""

    name: str
    restarts: int

    async def start(self, positions: Sequence[PositionView] = ()) -> None:
        """Get ready; ``positions`` are the portfolio's open positions (after a restart)."""
        ...

    async def decide(self, engine_input: EngineInput) -> tuple[EngineOutput | None, str]:
        """The decision for one bucket, or None and the reason there is none."""
        ...

    async def stop(self) -> None:
        """Release the engine."""
        ...

    def snapshot(self) -> Any:
        """Plain-data state to persist with the portfolio (None when the engine keeps its own)."""
        ...

    def restore(self, data: Any) -> None:
        """Continue from ``snapshot()`` data."""
        ...


class BuiltinAdapter:
    """A synchronous built-in engine behind the async ``Engine`` interface."""

    def __init__(self, engine: BuiltinEngine) -> None:
        self.engine = engine
        self.name = engine.name
        self.restarts = 0

    async def start(self, positions: Sequence[PositionView] = ()) -> None:
        """Nothing to start."""

    async def decide(self, engine_input: EngineInput) -> tuple[EngineOutput | None, str]:
        """The strategy's decision (it cannot time out or crash apart from a bug)."""
        return self.engine.decide(engine_input), ""

    async def stop(self) -> None:
        """Nothing to stop."""

    def snapshot(self) -> Any:
        """The strategy's history."""
        return self.engine.snapshot()

    def restore(self, data: Any) -> None:
        """Continue the strategy's history."""
        self.engine.restore(data)


def make_builtin(settings: BridgeSettings) -> BuiltinEngine:
    """The synchronous built-in engine the settings ask for."""
    return BuiltinEngine(
        make_strategy(settings.strategy, settings),
        signals_every_bar=settings.signals_every_bar,
    )


def make_engine(settings: BridgeSettings, **external_options: Any) -> Engine:
    """The engine of ``settings.engine`` (``builtin`` or ``external``)."""
    if settings.engine == "builtin":
        return BuiltinAdapter(make_builtin(settings))
    if settings.engine == "external":
        external = settings.external
        return ExternalEngine(
            external.command,
            portfolio_id=settings.portfolio_id,
            symbols=settings.symbols,
            timeout_ms=external.timeout_ms,
            start_timeout_ms=external.start_timeout_ms,
            max_timeouts=external.max_timeouts,
            max_restarts=external.max_restarts,
            restart_window_s=external.restart_window_s,
            backoff_initial_ms=external.backoff_initial_ms,
            backoff_max_ms=external.backoff_max_ms,
            **external_options,
        )
    raise ValueError(f"engine {settings.engine!r} is not a deciding engine")


def engine_name(settings: BridgeSettings) -> str:
    """The name records carry for this bridge's engine (``strategy`` of signals)."""
    if settings.engine == "builtin":
        return settings.strategy
    return settings.engine
