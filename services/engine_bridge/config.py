"""Settings of the engine bridge (variables ``BRIDGE_*``; replay pace is ``REPLAY_SPEED_MS``)."""

from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec
from msgspec import Meta

from libs.common.runtime.settings import CommonSettings

ENGINES = ("builtin", "external", "replay")
STRATEGIES = ("golden_cross", "zscore")


class BridgeSettings(CommonSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Which engine runs, and how the paper portfolio trades."""

    ENV_PREFIX: ClassVar[str] = "BRIDGE_"
    ENV_NAMES: ClassVar[dict[str, str]] = {"replay_speed_ms": "REPLAY_SPEED_MS"}
    SERVICE: ClassVar[str] = "engine_bridge"

    http_port: Annotated[int, Meta(ge=0, le=65535, description="port of the HTTP endpoint")] = 9103

    # -- engine ------------------------------------------------------------------------------
    engine: Annotated[str, Meta(description="builtin, external or replay")] = "builtin"
    strategy: Annotated[str, Meta(description="built-in strategy: golden_cross or zscore")] = (
        "golden_cross"
    )
    golden_fast_window: Annotated[int, Meta(gt=0, description="golden cross: fast MA, in bars")] = (
        10
    )
    golden_slow_window: Annotated[int, Meta(gt=1, description="golden cross: slow MA, in bars")] = (
        30
    )
    zscore_return_window: Annotated[
        int, Meta(gt=0, description="zscore: return measured over this many bars")
    ] = 5
    zscore_window: Annotated[
        int, Meta(gt=2, description="zscore: returns in the mean/volatility window")
    ] = 30
    zscore_entry: Annotated[float, Meta(gt=0, description="zscore: |z| that enters")] = 2.0
    zscore_exit: Annotated[
        float, Meta(ge=0, description="zscore: |z| at or below which it exits")
    ] = 0.5
    signals_every_bar: Annotated[
        bool, Meta(description="built-ins: a signal every bar (else only on a change)")
    ] = False

    # -- external engine ---------------------------------------------------------------------
    external_command: Annotated[str, Meta(description="external engine command line (shlex)")] = ""
    external_timeout_ms: Annotated[
        int, Meta(gt=0, description="external engine: reply deadline per minute")
    ] = 2_000
    external_start_timeout_ms: Annotated[
        int, Meta(gt=0, description="external engine: deadline of the hello/ready handshake")
    ] = 10_000
    external_max_timeouts: Annotated[
        int, Meta(gt=0, description="external engine: consecutive timeouts before a restart")
    ] = 3
    external_max_restarts: Annotated[
        int, Meta(ge=0, description="external engine: restarts allowed per window")
    ] = 5
    external_restart_window_s: Annotated[
        float, Meta(gt=0, description="external engine: restart budget window")
    ] = 300.0
    external_backoff_initial_ms: Annotated[
        int, Meta(ge=0, description="external engine: first restart delay")
    ] = 200
    external_backoff_max_ms: Annotated[
        int, Meta(ge=0, description="external engine: longest restart delay")
    ] = 10_000

    # -- replay engine -----------------------------------------------------------------------
    replay_results_path: Annotated[str, Meta(description="replay: results.json")] = ""
    replay_trades_path: Annotated[str, Meta(description="replay: trades.jsonl")] = ""
    replay_bars_channel: Annotated[
        str, Meta(description="replay: channel of the replayed bars ({symbol} is replaced)")
    ] = "bars.{symbol}.1m"
    replay_speed_ms: Annotated[
        int, Meta(ge=0, description="replay: ms per minute bucket (60000 is real time)")
    ] = 60

    # -- input -------------------------------------------------------------------------------
    bar_pattern: Annotated[str, Meta(description="Redis channel pattern of bars")] = "bars.*.1m"
    symbols: Annotated[
        list[str], Meta(description="symbols traded, comma separated (empty: every symbol seen)")
    ] = msgspec.field(default_factory=list)
    input_start: Annotated[
        str, Meta(description="first run only: earliest (whole stream) or latest")
    ] = "latest"
    consumer_name: Annotated[
        str, Meta(description="durable input position name (default engine_bridge:<portfolio>)")
    ] = ""
    bucket_timeout_ms: Annotated[
        int, Meta(gt=0, description="wait for the other symbols' bars of a minute")
    ] = 3_000
    extended_hours: Annotated[
        bool, Meta(description="also trade pre-market and after-hours bars")
    ] = False
    flatten_at_close: Annotated[bool, Meta(description="close every position at bar 390")] = True

    # -- paper broker ------------------------------------------------------------------------
    portfolio_id: Annotated[str, Meta(description="portfolioId of the paper portfolio")] = "paper"
    initial_cash: Annotated[float, Meta(gt=0, description="starting cash of the portfolio")] = (
        100_000.0
    )
    sizing: Annotated[str, Meta(description="shares (fixed count) or notional (fixed dollars)")] = (
        "shares"
    )
    shares_per_trade: Annotated[int, Meta(gt=0, description="sizing=shares: shares per entry")] = (
        100
    )
    notional_per_trade: Annotated[
        float, Meta(gt=0, description="sizing=notional: dollars per entry")
    ] = 10_000.0
    slippage_bps: Annotated[
        float, Meta(ge=0, description="fill price moved against us, in bps")
    ] = 1.0
    commission_per_share: Annotated[float, Meta(ge=0, description="commission per share")] = 0.005
    commission_min: Annotated[float, Meta(ge=0, description="minimum commission per fill")] = 0.0
    stop_pct: Annotated[float, Meta(ge=0, description="stop distance from entry, % (0: none)")] = (
        0.5
    )
    target_pct: Annotated[
        float, Meta(ge=0, description="target distance from entry, % (0: none)")
    ] = 1.0
    allow_short: Annotated[bool, Meta(description="let a SELL open or grow a short position")] = (
        False
    )

    # -- output ------------------------------------------------------------------------------
    signals_channel: Annotated[str, Meta(description="channel of signals")] = (
        "sentio.signals.minute.v1"
    )
    trades_channel: Annotated[str, Meta(description="channel of executed trades")] = (
        "sentio.trades.executed.v1"
    )
    positions_channel: Annotated[str, Meta(description="channel of positions")] = (
        "sentio.positions.state.v1"
    )
    portfolio_channel: Annotated[str, Meta(description="channel of portfolio snapshots")] = (
        "sentio.portfolio.minute.v1"
    )
    gaps_channel: Annotated[str, Meta(description="channel of engine gap reports")] = (
        "sentio.engine.gaps.v1"
    )
    degraded_hold_ms: Annotated[
        int, Meta(ge=0, description="heartbeat says degraded this long after an engine gap")
    ] = 300_000

    def validate(self) -> BridgeSettings:
        """Check the cross-field rules the types cannot; returns self for chaining."""
        from libs.common.runtime.settings import SettingsError

        if self.engine not in ENGINES:
            raise SettingsError(f"BRIDGE_ENGINE={self.engine!r}: want one of {', '.join(ENGINES)}")
        if self.engine == "builtin" and self.strategy not in STRATEGIES:
            raise SettingsError(
                f"BRIDGE_STRATEGY={self.strategy!r}: want one of {', '.join(STRATEGIES)}"
            )
        if self.golden_fast_window >= self.golden_slow_window:
            raise SettingsError(
                "BRIDGE_GOLDEN_FAST_WINDOW must be below BRIDGE_GOLDEN_SLOW_WINDOW "
                f"({self.golden_fast_window} >= {self.golden_slow_window})"
            )
        if self.zscore_exit >= self.zscore_entry:
            raise SettingsError("BRIDGE_ZSCORE_EXIT must be below BRIDGE_ZSCORE_ENTRY")
        if self.engine == "external" and not self.external_command.strip():
            raise SettingsError("BRIDGE_EXTERNAL_COMMAND is required when BRIDGE_ENGINE=external")
        if self.engine == "replay" and not (self.replay_results_path and self.replay_trades_path):
            raise SettingsError(
                "BRIDGE_REPLAY_RESULTS_PATH and BRIDGE_REPLAY_TRADES_PATH are required "
                "when BRIDGE_ENGINE=replay"
            )
        if self.sizing not in ("shares", "notional"):
            raise SettingsError(f"BRIDGE_SIZING={self.sizing!r}: want shares or notional")
        if self.input_start not in ("earliest", "latest"):
            raise SettingsError(f"BRIDGE_INPUT_START={self.input_start!r}: want earliest or latest")
        return self
