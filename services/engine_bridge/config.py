"""Settings of the engine bridge (variables ``BRIDGE_*``; replay pace is ``REPLAY_SPEED_MS``)."""

from __future__ import annotations

from typing import Annotated, ClassVar

from msgspec import Meta

from libs.common.settings import CommonSettings


class BridgeSettings(CommonSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Which engine runs, and how the paper portfolio trades."""

    ENV_PREFIX: ClassVar[str] = "BRIDGE_"
    ENV_NAMES: ClassVar[dict[str, str]] = {"replay_speed_ms": "REPLAY_SPEED_MS"}
    SERVICE: ClassVar[str] = "engine_bridge"

    http_port: Annotated[int, Meta(ge=0, le=65535, description="port of the HTTP endpoint")] = 9103
    engine: Annotated[str, Meta(description="builtin, external or replay")] = "builtin"
    strategy: Annotated[str, Meta(description="built-in strategy: golden_cross or zscore")] = (
        "golden_cross"
    )
    bar_pattern: Annotated[str, Meta(description="Redis channel pattern of bars")] = "bars.*.1m"
    portfolio_id: Annotated[str, Meta(description="portfolioId of the paper portfolio")] = "paper"
    replay_speed_ms: Annotated[int, Meta(ge=0, description="ms per minute bucket in replay")] = 60
