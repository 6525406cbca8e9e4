"""Settings of the bars service (variables ``BARS_*``)."""

from __future__ import annotations

import zlib
from typing import Annotated, ClassVar, Literal

from msgspec import Meta

from libs.common import names
from libs.common.market.listings import ListingSettings
from libs.common.runtime.settings import CommonSettings


class BarsSettings(CommonSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where bars read ticks, how they are built and where they go."""

    ENV_PREFIX: ClassVar[str] = "BARS_"
    SERVICE: ClassVar[str] = "bars"

    http_port: Annotated[int, Meta(ge=0, le=65535, description="port of the HTTP endpoint")] = 9102
    source: Annotated[
        Literal["redis", "kafka"], Meta(description="redis (primary) or kafka (shadow)")
    ] = "redis"
    policy: Annotated[
        Literal["algoseek", "polygon", "none"], Meta(description="condition policy")
    ] = "algoseek"
    grace_ms: Annotated[int, Meta(ge=0, description="wait after a minute ends before closing")] = (
        2_000
    )
    late_policy: Annotated[
        Literal["revise", "drop"], Meta(description="revise (revision+1) or drop late trades")
    ] = "revise"
    tick_pattern: Annotated[
        str, Meta(description="Redis channel / Kafka topic pattern of ticks")
    ] = names.TICKS_PATTERN
    shard_index: Annotated[int, Meta(ge=0, description="this instance's shard")] = 0
    shard_count: Annotated[
        int, Meta(gt=0, description="number of shards (split by symbol hash)")
    ] = 1
    kafka_group: Annotated[
        str, Meta(description="name of the Kafka source's positions and marks (its shard's)")
    ] = "tickmesh-bars-shadow"
    tick_interval_ms: Annotated[int, Meta(gt=0, description="watermark timer period")] = 250
    topic_replication: Annotated[
        int, Meta(ge=1, description="Kafka sink: replication factor of the bar topics it creates")
    ] = 1
    close_on: Annotated[
        Literal["progress", "wall"],
        Meta(
            description="progress: minutes close when the path delivered everything up to "
            "them (ingest's progress marks); wall: on this process's clock (no ingest)"
        ),
    ] = "progress"
    redis_read_pause_ms: Annotated[
        int,
        Meta(
            ge=0,
            description="Redis source: after a batch of records that was not full, wait this "
            "long before taking more (fewer, larger batches; a close waits up to this long)",
        ),
    ] = 5
    discover_interval_ms: Annotated[
        int, Meta(gt=0, description="Kafka source: how often new tick topics are looked for")
    ] = 1_000
    listings: ListingSettings = ListingSettings()
    """Where symbols' primary listings come from (``BARS_MAP_FILES``, ``BARS_REFERENCE_*``)."""

    def check(self) -> None:
        if self.shard_index >= self.shard_count:
            raise self.invalid("shard_index", f"must be below BARS_SHARD_COUNT={self.shard_count}")

    def owns(self, symbol: str) -> bool:
        """True when ``symbol`` is this instance's shard (stable across processes and
        restarts: CRC-32 of the symbol)."""
        return zlib.crc32(symbol.encode()) % self.shard_count == self.shard_index

    def state_name(self) -> str:
        """The name of the builder's durable state: ``bars-redis-<i>of<n>`` (its stream
        positions and published marks), ``bars-kafka-<group>[-<i>of<n>]`` (its Kafka
        positions and published marks)."""
        if self.source == "kafka":
            suffix = f"-{self.shard_index}of{self.shard_count}" if self.shard_count > 1 else ""
            return f"bars-kafka-{self.kafka_group}{suffix}"
        return f"bars-redis-{self.shard_index}of{self.shard_count}"
