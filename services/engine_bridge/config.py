"""Settings of the engine bridge (variables ``BRIDGE_*``; replay pace is ``REPLAY_SPEED_MS``).

Groups keep what belongs together and reach the code whole: ``broker`` (the paper broker's
``BrokerConfig``), ``channels`` (``core.Channels``), ``golden`` and ``zscore`` (the built-in
strategies), ``external`` (an engine over stdio) and ``replay`` (engine outputs played back).
Their variables stay flat: ``BRIDGE_SLIPPAGE_BPS``, ``BRIDGE_SIGNALS_CHANNEL``,
``BRIDGE_GOLDEN_FAST_WINDOW``, ``BRIDGE_EXTERNAL_COMMAND``, ``BRIDGE_REPLAY_RESULTS_PATH``.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta

from libs.common import names
from libs.common.runtime.settings import CommonSettings, SettingsGroup
from services.engine_bridge.broker import BrokerConfig
from services.engine_bridge.core import Channels

Engine = Literal["builtin", "external", "replay"]
Strategy = Literal["golden_cross", "zscore"]


class GoldenCrossSettings(SettingsGroup, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The golden cross: a fast moving average crossing a slow one."""

    ENV_TEMPLATE: ClassVar[str] = "golden_{field}"

    fast_window: Annotated[int, Meta(gt=0, description="fast MA, in bars")] = 10
    slow_window: Annotated[int, Meta(gt=1, description="slow MA, in bars")] = 30


class ZScoreSettings(SettingsGroup, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Mean reversion on the z-score of recent returns."""

    ENV_TEMPLATE: ClassVar[str] = "zscore_{field}"

    return_window: Annotated[int, Meta(gt=0, description="return measured over this many bars")] = 5
    window: Annotated[int, Meta(gt=2, description="returns in the mean/volatility window")] = 30
    entry: Annotated[float, Meta(gt=0, description="|z| that enters")] = 2.0
    exit: Annotated[float, Meta(ge=0, description="|z| at or below which it exits")] = 0.5


class ExternalEngineSettings(SettingsGroup, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """An engine run as a process, speaking JSON lines on stdio."""

    ENV_TEMPLATE: ClassVar[str] = "external_{field}"

    command: Annotated[str, Meta(description="command line (shlex)")] = ""
    timeout_ms: Annotated[int, Meta(gt=0, description="reply deadline per minute")] = 2_000
    start_timeout_ms: Annotated[
        int, Meta(gt=0, description="deadline of the hello/ready handshake")
    ] = 10_000
    max_timeouts: Annotated[int, Meta(gt=0, description="timeouts in a row before a restart")] = 3
    max_restarts: Annotated[int, Meta(ge=0, description="restarts allowed per window")] = 5
    restart_window_s: Annotated[float, Meta(gt=0, description="restart budget window")] = 300.0
    backoff_initial_ms: Annotated[int, Meta(ge=0, description="first restart delay")] = 200
    backoff_max_ms: Annotated[int, Meta(ge=0, description="longest restart delay")] = 10_000


class ReplaySettings(SettingsGroup, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """An engine's historical outputs played back (results.json + trades.jsonl)."""

    ENV_TEMPLATE: ClassVar[str] = "replay_{field}"
    ENV_NAMES: ClassVar[dict[str, str]] = {"speed_ms": "REPLAY_SPEED_MS"}

    results_path: Annotated[str, Meta(description="results.json")] = ""
    trades_path: Annotated[str, Meta(description="trades.jsonl")] = ""
    bars_channel: Annotated[
        str, Meta(description="channel of the replayed bars ({symbol} is replaced)")
    ] = names.BARS
    speed_ms: Annotated[int, Meta(ge=0, description="ms per minute bucket (60000: real time)")] = 60


class BridgeSettings(CommonSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Which engine runs, and how the paper portfolio trades."""

    ENV_PREFIX: ClassVar[str] = "BRIDGE_"
    SERVICE: ClassVar[str] = "engine_bridge"

    http_port: Annotated[int, Meta(ge=0, le=65535, description="port of the HTTP endpoint")] = 9103

    # -- engine ------------------------------------------------------------------------------
    engine: Annotated[Engine, Meta(description="who decides")] = "builtin"
    strategy: Annotated[Strategy, Meta(description="built-in strategy")] = "golden_cross"
    signals_every_bar: Annotated[
        bool, Meta(description="built-ins: a signal every bar (else only on a change)")
    ] = False
    golden: Annotated[GoldenCrossSettings, Meta(description="golden cross")] = GoldenCrossSettings()
    zscore: Annotated[ZScoreSettings, Meta(description="zscore")] = ZScoreSettings()
    external: Annotated[ExternalEngineSettings, Meta(description="external engine")] = (
        ExternalEngineSettings()
    )
    replay: Annotated[ReplaySettings, Meta(description="replay of engine outputs")] = (
        ReplaySettings()
    )

    # -- input -------------------------------------------------------------------------------
    bar_pattern: Annotated[str, Meta(description="Redis channel pattern of bars")] = (
        names.BARS_PATTERN
    )
    symbols: Annotated[
        list[str], Meta(description="symbols traded, comma separated (empty: every symbol seen)")
    ] = msgspec.field(default_factory=list)
    input_start: Annotated[
        Literal["earliest", "latest"],
        Meta(description="first run only: the whole stream, or from now"),
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
    flatten_at_close: Annotated[
        bool,
        Meta(description="close every position at the session's last bar (390, 210 early close)"),
    ] = True

    # -- paper portfolio and output ------------------------------------------------------------
    portfolio_id: Annotated[str, Meta(description="portfolioId of the paper portfolio")] = "paper"
    broker: Annotated[BrokerConfig, Meta(description="paper broker")] = BrokerConfig()
    channels: Annotated[Channels, Meta(description="output channels")] = Channels()
    degraded_hold_ms: Annotated[
        int, Meta(ge=0, description="heartbeat says degraded this long after an engine gap")
    ] = 300_000

    def check(self) -> None:
        if self.golden.fast_window >= self.golden.slow_window:
            raise self.invalid(
                "golden.fast_window",
                f"must be below BRIDGE_GOLDEN_SLOW_WINDOW "
                f"({self.golden.fast_window} >= {self.golden.slow_window})",
            )
        if self.zscore.exit >= self.zscore.entry:
            raise self.invalid("zscore.exit", "must be below BRIDGE_ZSCORE_ENTRY")
        if self.engine == "external" and not self.external.command.strip():
            raise self.invalid("external.command", "required when BRIDGE_ENGINE=external")
        if self.engine == "replay" and not (self.replay.results_path and self.replay.trades_path):
            raise self.invalid(
                "replay.results_path",
                "BRIDGE_REPLAY_RESULTS_PATH and BRIDGE_REPLAY_TRADES_PATH are required when "
                "BRIDGE_ENGINE=replay",
            )
