"""Built-in strategies: a moving-average crossover and a rolling-return z-score.

Each strategy keeps per-symbol history and turns one closed bar into at most one signal and
at most one order. Signals are published when the stance changes (or every bar with
``signals_every_bar``); orders only on a change of stance, so a stop-out is not re-entered
until the strategy changes its mind. State is plain data (``snapshot``/``restore``) so the
bridge persists it with the portfolio and a restart continues exactly where it stopped.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import msgspec
from msgspec import Struct

from libs.common.schemas import Bar
from services.engine_bridge.model import (
    EngineInput,
    EngineOutput,
    EngineSignal,
    Order,
    SignalKind,
)


class SymbolHistory(Struct):
    """What a strategy remembers of one symbol."""

    closes: list[float] = []
    lastMs: int = 0
    stance: str = "NEUTRAL"
    started: bool = False
    returns: list[float] = []


class Decision(Struct, frozen=True):
    """A strategy's view of one bar: the stance, its confidence and the order it implies."""

    stance: SignalKind
    confidence: float
    order: str | None = None
    reason: str = ""


class Strategy(Protocol):
    """One built-in strategy."""

    name: str

    def decide(self, history: SymbolHistory, bar: Bar) -> Decision | None:
        """Update ``history`` with ``bar``; the decision, or None while warming up."""
        ...


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


class GoldenCross:
    """Long when the fast moving average of closes is above the slow one.

    Confidence grows with the distance between the averages: 50 at the cross, 100 at 5 bps
    apart or more. A cross up is a BUY; a cross down a SELL (leave the long).
    """

    name = "golden_cross"

    def __init__(self, fast_window: int, slow_window: int) -> None:
        if not 0 < fast_window < slow_window:
            raise ValueError(f"need 0 < fast < slow windows, got {fast_window}, {slow_window}")
        self.fast_window = fast_window
        self.slow_window = slow_window

    def decide(self, history: SymbolHistory, bar: Bar) -> Decision | None:
        closes = history.closes
        closes.append(bar.close)
        del closes[: -self.slow_window]
        if len(closes) < self.slow_window:
            return None
        fast = _mean(closes[-self.fast_window :])
        slow = _mean(closes)
        spread_bps = (fast - slow) / slow * 10_000.0 if slow else 0.0
        stance: SignalKind = (
            "BULLISH" if spread_bps > 0 else "BEARISH" if spread_bps < 0 else "NEUTRAL"
        )
        confidence = round(min(100.0, 50.0 + abs(spread_bps) * 10.0), 1)
        order = None
        if history.started and stance != history.stance:
            if stance == "BULLISH":
                order = "BUY"
            elif stance == "BEARISH":
                order = "SELL"
        reason = f"MA{self.fast_window} {fast:.4f} vs MA{self.slow_window} {slow:.4f}"
        return Decision(stance, confidence, order, reason)


class ZScore:
    """Mean reversion on the z-score of the rolling return.

    The return over ``return_window`` bars is compared with the mean and volatility (standard
    deviation) of the last ``window`` such returns. ``z <= -entry`` is BULLISH (stretched down,
    expect a bounce: BUY); ``z >= entry`` is BEARISH (SELL); the stance falls back to NEUTRAL
    once ``|z| <= exit`` (leaving a long sells it). Between the thresholds the stance holds.
    Confidence is ``|z| / entry × 50``, capped at 100.
    """

    name = "zscore"

    def __init__(self, return_window: int, window: int, entry: float, exit: float) -> None:
        if window < 3 or return_window < 1 or not 0 <= exit < entry:
            raise ValueError("need window >= 3, return window >= 1 and 0 <= exit < entry")
        self.return_window = return_window
        self.window = window
        self.entry = entry
        self.exit = exit

    def decide(self, history: SymbolHistory, bar: Bar) -> Decision | None:
        closes = history.closes
        closes.append(bar.close)
        del closes[: -(self.return_window + 1)]
        if len(closes) <= self.return_window:
            return None
        base = closes[0]
        returns = history.returns
        returns.append(bar.close / base - 1.0 if base else 0.0)
        del returns[: -self.window]
        if len(returns) < self.window:
            return None
        mean = _mean(returns)
        variance = math.fsum((r - mean) ** 2 for r in returns) / (len(returns) - 1)
        volatility = math.sqrt(variance)
        z = (returns[-1] - mean) / volatility if volatility > 0 else 0.0
        previous = history.stance
        stance: SignalKind
        if z <= -self.entry:
            stance = "BULLISH"
        elif z >= self.entry:
            stance = "BEARISH"
        elif abs(z) <= self.exit:
            stance = "NEUTRAL"
        else:
            stance = previous  # type: ignore[assignment]
        order = None
        if history.started and stance != previous:
            if stance == "BULLISH":
                order = "BUY"
            elif previous == "BULLISH" or stance == "BEARISH":
                order = "SELL"
        confidence = round(min(100.0, abs(z) / self.entry * 50.0), 1)
        return Decision(stance, confidence, order, f"z {z:.2f}")


class StrategyState(Struct):
    """Snapshot of a built-in engine."""

    strategy: str
    symbols: dict[str, SymbolHistory] = {}


class BuiltinEngine:
    """Runs one built-in strategy over every symbol of a minute bucket (synchronously)."""

    def __init__(self, strategy: Strategy, *, signals_every_bar: bool = False) -> None:
        self.strategy = strategy
        self.name = strategy.name
        self.signals_every_bar = signals_every_bar
        self.symbols: dict[str, SymbolHistory] = {}

    def decide(self, engine_input: EngineInput) -> EngineOutput:
        """Signals and orders for one minute bucket."""
        for correction in engine_input.corrections:
            self.correct(correction)
        signals: list[EngineSignal] = []
        orders: list[Order] = []
        for bar in engine_input.bars:
            history = self.symbols.get(bar.symbol)
            if history is None:
                history = self.symbols[bar.symbol] = SymbolHistory()
            if bar.startMs <= history.lastMs:
                continue
            history.lastMs = bar.startMs
            decision = self.strategy.decide(history, bar)
            if decision is None:
                continue
            changed = not history.started or decision.stance != history.stance
            if changed or self.signals_every_bar:
                signals.append(
                    EngineSignal(bar.symbol, decision.stance, decision.confidence, self.name)
                )
            if decision.order is not None:
                orders.append(
                    Order(
                        bar.symbol,
                        decision.order,  # type: ignore[arg-type]
                        reason=f"{self.name} {decision.stance}: {decision.reason}",
                    )
                )
            history.stance = decision.stance
            history.started = True
        return EngineOutput(signals=signals, orders=orders)

    def correct(self, bar: Bar) -> None:
        """A correction of the newest bar replaces its close in the history."""
        history = self.symbols.get(bar.symbol)
        if history is not None and history.lastMs == bar.startMs and history.closes:
            history.closes[-1] = bar.close

    def snapshot(self) -> Any:
        """Plain-data state for the bridge's durable state."""
        return msgspec.to_builtins(StrategyState(self.name, self.symbols))

    def restore(self, data: Any) -> None:
        """Continue from a snapshot (ignored when it belongs to another strategy)."""
        if not data:
            return
        state = msgspec.convert(data, StrategyState)
        if state.strategy == self.name:
            self.symbols = state.symbols


def make_strategy(name: str, settings: Any) -> Strategy:
    """The built-in strategy ``name`` with its parameters from the bridge settings."""
    if name == "golden_cross":
        return GoldenCross(settings.golden.fast_window, settings.golden.slow_window)
    if name == "zscore":
        zscore = settings.zscore
        return ZScore(zscore.return_window, zscore.window, zscore.entry, zscore.exit)
    raise ValueError(f"unknown built-in strategy {name!r}")
