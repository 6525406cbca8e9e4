"""The bridge's own types: what an engine gets and returns, the durable state, the gap report.

The wire records the app consumes (``Signal``, ``ExecutedTrade``, ``Position``, ``Portfolio``,
``Bar``) are the contract's Structs in ``libs.common.schemas``; nothing here redefines them.
``EngineInput``/``EngineOutput`` are also the messages of the external-engine protocol
(``docs/engine_protocol.md``), so their field names are camelCase like every other payload.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import Struct

from libs.common.schemas import Bar

SignalKind = Literal["BULLISH", "BEARISH", "NEUTRAL"]
Action = Literal["BUY", "SELL"]


class EngineSignal(Struct, frozen=True, omit_defaults=True):
    """A signal as an engine states it; the bridge adds time, barId and sequence."""

    symbol: str
    signal: SignalKind
    confidence: float = 50.0
    strategy: str = ""


class Order(Struct, frozen=True, omit_defaults=True):
    """An order from an engine, filled by the paper broker at the close of this minute's bar.

    ``shares`` omitted means *direction*: BUY = be long (sized by settings), SELL = leave the
    long (and go short, sized, when shorting is allowed). ``stopPrice``/``targetPrice`` omitted
    means the broker's ``stop_pct``/``target_pct`` from the fill price.
    """

    symbol: str
    action: Action
    shares: int | None = None
    stopPrice: float | None = None
    targetPrice: float | None = None
    reason: str = ""


class PositionView(Struct, frozen=True):
    """An open position as engines see it."""

    symbol: str
    shares: int
    entryPrice: float
    barsHeld: int
    stopPrice: float | None = None
    targetPrice: float | None = None


class EngineInput(Struct, frozen=True):
    """One minute bucket for an engine: the closed bars (sorted by symbol), corrections of
    earlier minutes, and the positions after this minute's stop and target exits."""

    minuteMs: int
    tsET: str
    barId: int
    bars: list[Bar]
    corrections: list[Bar] = []
    positions: list[PositionView] = []


class EngineOutput(Struct, frozen=True):
    """What an engine decided for one minute bucket."""

    signals: list[EngineSignal] = []
    orders: list[Order] = []


class EngineGap(Struct, frozen=True):
    """Record on the gaps channel: minutes for which the engine gave no decision.

    Published when the engine answers again (or when the bridge stops). Not yet on the
    contract; it starts with ``seq`` like every sequenced record.
    """

    seq: int
    portfolioId: str
    engine: str
    reason: str
    fromTsET: str
    toTsET: str
    fromBarId: int
    toBarId: int
    minutes: int
    symbols: list[str]
    restarts: int = 0
    timeouts: int = 0


class GapState(Struct):
    """An engine gap still open (no decision since ``fromMs``)."""

    reason: str
    fromMs: int
    toMs: int
    minutes: int
    symbols: list[str]
    restarts: int = 0
    timeouts: int = 0


class PositionState(Struct):
    """An open position in the paper broker (``shares`` is signed: negative is short)."""

    symbol: str
    shares: int
    entryPrice: float
    entryMs: int
    entryBarId: int
    barsHeld: int
    lastPrice: float
    stopPrice: float | None = None
    targetPrice: float | None = None


class BrokerState(Struct):
    """Cash, realized PnL and positions of the paper portfolio."""

    cash: float
    realizedPnl: float = 0.0
    commissions: float = 0.0
    positions: dict[str, PositionState] = {}
    fills: int = 0


class BridgeState(Struct):
    """Everything the bridge needs to continue after a crash, saved after every minute.

    ``lastMs`` holds, per symbol, the start of the newest bar already traded, so a bar the
    input delivers again after a restart is recognised and not filled twice. ``pending`` holds
    the bars of minutes not processed yet (their input position may already be committed).
    """

    version: int
    portfolioId: str
    broker: BrokerState
    lastMs: dict[str, int] = {}
    lastBucketMs: int = 0
    lastBarEndMs: int = 0
    buckets: int = 0
    pending: list[Bar] = []
    pendingCorrections: list[Bar] = []
    correctionsSeen: dict[str, int] = {}
    knownSymbols: list[str] = []
    gap: GapState | None = None
    engine: Any = None


STATE_VERSION = 1
STATE_ENCODER = msgspec.json.Encoder()
STATE_DECODER = msgspec.json.Decoder(BridgeState)
ENGINE_INPUT_DECODER = msgspec.json.Decoder(EngineInput)
ENGINE_OUTPUT_DECODER = msgspec.json.Decoder(EngineOutput)
