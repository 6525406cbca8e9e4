"""Settings of the bars service (variables ``BARS_*``)."""

from __future__ import annotations

from typing import Annotated, ClassVar

from msgspec import Meta

from libs.common.runtime.settings import CommonSettings


class BarsSettings(CommonSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where bars read ticks, how they are built and where they go."""

    ENV_PREFIX: ClassVar[str] = "BARS_"
    SERVICE: ClassVar[str] = "bars"

    http_port: Annotated[int, Meta(ge=0, le=65535, description="port of the HTTP endpoint")] = 9102
    source: Annotated[str, Meta(description="redis (primary) or kafka (shadow)")] = "redis"
    policy: Annotated[str, Meta(description="condition policy: algoseek, polygon or none")] = (
        "algoseek"
    )
    grace_ms: Annotated[int, Meta(ge=0, description="wait after a minute ends before closing")] = (
        2_000
    )
    late_policy: Annotated[str, Meta(description="revise (revision+1) or drop late trades")] = (
        "revise"
    )
    tick_pattern: Annotated[
        str, Meta(description="Redis channel / Kafka topic pattern of ticks")
    ] = "ticks.*"
    shard_index: Annotated[int, Meta(ge=0, description="this instance's shard")] = 0
    shard_count: Annotated[
        int, Meta(gt=0, description="number of shards (split by symbol hash)")
    ] = 1
    kafka_group: Annotated[str, Meta(description="consumer group of the Kafka source")] = (
        "tickmesh-bars-shadow"
    )
    tick_interval_ms: Annotated[int, Meta(gt=0, description="watermark timer period")] = 250
