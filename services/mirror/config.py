"""Settings of the mirror and the reconciler (variables ``MIRROR_*``), and the routing table.

The routing table maps Redis channel patterns to Kafka topics. ``MIRROR_ROUTES`` (a JSON list
of routes) replaces the default table, which is CONTRACT.md's; ``MIRROR_EXTRA_ROUTES`` adds
routes in front of it (the first matching route wins). ``python -m services.mirror routes``
prints the table in effect.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta, Struct

from libs.common import names
from libs.common.market.listings import ListingSettings
from libs.common.runtime.settings import CommonSettings


class Route(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One row of the routing table: which channels go to which topic, keyed how.

    ``topic`` may use ``{channel}`` (the channel's own name) and ``{symbol}`` (the channel's
    second dot-separated word, ``ticks.SPY`` -> ``SPY``). With ``MIRROR_TOPIC_MODE=single``
    a route that names a ``single_topic`` sends every matching channel there instead (one
    topic keyed by symbol, for thousands of symbols). ``key`` is ``channel:<n>`` (the n-th
    word of the channel name), ``field:<name>`` (a field of the record), ``channel`` or
    ``none``. ``schema`` names the record type checked before a record is forwarded (a
    record that does not decode goes to the dead-letter topic); empty checks only the
    sequence number. ``configs`` are topic configs (e.g. ``retention.ms``), over
    ``MIRROR_TOPIC_CONFIGS``.
    """

    pattern: str
    topic: str = "{channel}"
    single_topic: str = ""
    key: str = "channel:1"
    partitions: int = 1
    cleanup_policy: Literal["delete", "compact", "compact,delete"] = "delete"
    schema: str = ""
    configs: dict[str, str] = {}


DEFAULT_ROUTES: tuple[Route, ...] = (
    Route(pattern=names.TICKS_PATTERN, single_topic=names.TICKS_SINGLE_TOPIC, schema="TickBatch"),
    Route(pattern=names.BARS_PATTERN, topic=names.PRICES_TOPIC, schema="Bar"),
    Route(pattern=names.SIGNALS, key="field:symbol", schema="Signal"),
    Route(pattern=names.TRADES, key="field:symbol", schema="ExecutedTrade"),
    Route(pattern=names.POSITIONS, key="field:symbol", cleanup_policy="compact", schema="Position"),
    Route(
        pattern=names.PORTFOLIO,
        key="field:portfolioId",
        cleanup_policy="compact",
        schema="Portfolio",
    ),
    Route(pattern=names.HEARTBEAT, key="field:runId", cleanup_policy="compact", schema="Heartbeat"),
    Route(pattern=names.DEAD_LETTERS, key="field:source", schema="DeadLetter"),
    Route(pattern=names.LEDGER, key="field:source", schema="Ledger"),
    Route(pattern=names.PROGRESS, key="field:source", schema="Progress"),
    Route(pattern=names.FEED_GAPS, key="field:gapId", schema="FeedGap"),
)
"""CONTRACT.md's Kafka topics, as routes from their Redis channels, and the additions of
``docs/contract.md`` (source ledger, progress marks, feed gaps)."""


class MirrorSettings(CommonSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What the mirror forwards to Kafka, and how the reconciler judges parity."""

    ENV_PREFIX: ClassVar[str] = "MIRROR_"
    SERVICE: ClassVar[str] = "mirror"

    http_port: Annotated[int, Meta(ge=0, le=65535, description="port of the HTTP endpoint")] = 9104
    role: Annotated[
        Literal["all", "forward", "reconcile"],
        Meta(
            description="what `run` runs: the forwarder and the timed reconciler in one "
            "process (all), or either alone (forward, reconcile), so that the reconciler's "
            "reading and its day of identities stay out of the forwarder's process"
        ),
    ] = "all"

    # -- routing -------------------------------------------------------------------------------
    routes: Annotated[
        list[Route],
        Meta(
            description="routing table, JSON list of routes; empty = CONTRACT.md's "
            "(see `python -m services.mirror routes`)"
        ),
    ] = msgspec.field(default_factory=list)
    extra_routes: Annotated[
        list[Route], Meta(description="routes checked before the table (JSON list)")
    ] = msgspec.field(default_factory=list)
    topic_configs: Annotated[
        dict[str, str],
        Meta(
            description="configs of every created topic, JSON (e.g. "
            '{"retention.ms":"-1","retention.bytes":"-1"})'
        ),
    ] = msgspec.field(default_factory=dict)
    topic_compaction: Annotated[
        bool,
        Meta(
            description="create compacted topics as compact (off: delete, for brokers "
            "without compaction)"
        ),
    ] = True
    topic_replication: Annotated[int, Meta(ge=1, description="replication factor of topics")] = 1
    deadletter_topic: Annotated[str, Meta(description="Kafka topic of undecodable records")] = (
        names.DEAD_LETTERS
    )

    # -- delivery ------------------------------------------------------------------------------
    consumer_name: Annotated[str, Meta(description="name of the durable Redis positions")] = (
        "mirror"
    )
    start: Annotated[
        Literal["earliest", "latest"],
        Meta(description="where a channel without a stored position starts"),
    ] = "earliest"
    shard_index: Annotated[int, Meta(ge=0, description="this instance's shard")] = 0
    shard_count: Annotated[int, Meta(gt=0, description="shards (split by channel hash)")] = 1
    batch_max_records: Annotated[int, Meta(gt=0, description="records per produce batch")] = 2_000
    queue_max_records: Annotated[
        int, Meta(gt=0, description="pub/sub records queued before falling back on the streams")
    ] = 20_000
    max_in_flight_batches: Annotated[
        int, Meta(gt=0, description="batches sent and not yet acknowledged (backpressure)")
    ] = 4
    sweep_interval_ms: Annotated[int, Meta(gt=0, description="stream sweep period")] = 1_000
    read_count: Annotated[int, Meta(gt=0, description="records per stream read (XRANGE)")] = 1_000
    linger_ms: Annotated[
        int,
        Meta(
            ge=0,
            description="wait this long for more records before sending a batch that is not "
            "full, unless it holds a progress mark (also the Kafka producer's linger)",
        ),
    ] = 20
    max_batch_bytes: Annotated[int, Meta(gt=0, description="Kafka producer batch size")] = 1_048_576
    compression: Annotated[
        Literal["none", "gzip", "snappy", "lz4", "zstd"], Meta(description="Kafka compression")
    ] = "none"
    produce_timeout_ms: Annotated[
        int, Meta(gt=0, description="a produce not acknowledged by then fails and is re-sent")
    ] = 30_000
    stall_warn_ms: Annotated[
        int, Meta(gt=0, description="log when the oldest unacknowledged batch is this old")
    ] = 5_000
    retry_initial_ms: Annotated[int, Meta(gt=0, description="first wait after a failure")] = 200
    retry_max_ms: Annotated[int, Meta(gt=0, description="longest wait between retries")] = 5_000
    validate: Annotated[
        bool, Meta(description="decode each record with its route's schema (bad ones -> DLQ)")
    ] = True

    # -- reconciler ----------------------------------------------------------------------------
    reconcile_interval_s: Annotated[
        float,
        Meta(
            ge=0,
            description="reconcile today every so often (0: never, in `run`; not with "
            "MIRROR_ROLE=forward)",
        ),
    ] = 60.0
    reconcile_read_share: Annotated[
        float,
        Meta(
            gt=0,
            le=1,
            description="share of the time a timed report's reading may take: after each "
            "chunk it waits so long that its work stays below this share (with MIRROR_ROLE=all "
            "of the event loop it shares with the forwarder; alone, of a core; 1: no waiting; "
            "`reconcile` on demand does not wait)",
        ),
    ] = 0.25
    reconcile_min_age_s: Annotated[
        float, Meta(ge=0, description="ignore bars that ended less than this long ago")
    ] = 180.0
    reconcile_tolerance: Annotated[
        str,
        Meta(
            description="allowed absolute difference: 'exact', '0.001', or per field "
            "'open=0.01,vwap=0.0001'"
        ),
    ] = "exact"
    vendor_tolerance: Annotated[
        str,
        Meta(
            description="tolerance against the vendor's minute bars (Polygon rounds "
            "VWAP to 4 decimals)"
        ),
    ] = "vwap=0.00005"
    parity_target_pct: Annotated[
        float, Meta(ge=0, le=100, description="parity a day needs for the gate")
    ] = 99.9
    gate_days: Annotated[
        int, Meta(gt=0, description="consecutive trading days at target before promotion")
    ] = 5
    bars_policy: Annotated[
        Literal["algoseek", "polygon", "none"],
        Meta(description="the bars' policy (BARS_POLICY): the source's bars are rebuilt with it"),
    ] = "algoseek"
    listings: ListingSettings = ListingSettings()
    """Primary listings for that rebuild (``MIRROR_MAP_FILES``, ``MIRROR_REFERENCE_*``: as the
    bars' ``BARS_MAP_FILES``, ``BARS_REFERENCE_*``)."""
    kafka_bars_topic: Annotated[
        str,
        Meta(
            description="Kafka bars of the shadow builder ({symbol}: one per symbol; empty: "
            "where TOPIC_MODE puts them, bars.{symbol}.1m or sentio.bars.v1)"
        ),
    ] = ""
    vendor_channel: Annotated[
        str, Meta(description="Redis channel of the vendor's minute aggregates (empty: none)")
    ] = names.MINUTE_AGGS
    parity_topic: Annotated[str, Meta(description="Kafka topic of the parity reports")] = (
        names.PARITY_TOPIC
    )
    report_max_listed: Annotated[
        int, Meta(ge=0, description="mismatches listed per kind in a report")
    ] = 50
    kafka_idle_ms: Annotated[
        int, Meta(gt=0, description="reading a topic ends after this long without records")
    ] = 1_500

    def check(self) -> None:
        if self.role == "reconcile" and self.reconcile_interval_s <= 0:
            raise self.invalid("reconcile_interval_s", "must be above 0 with MIRROR_ROLE=reconcile")
        if self.shard_index >= self.shard_count:
            raise self.invalid(
                "shard_index", f"must be below MIRROR_SHARD_COUNT={self.shard_count}"
            )

    def bars_topic(self) -> str:
        """The shadow builder's Kafka bars in effect (a ``{symbol}`` template, or one topic)."""
        return self.kafka_bars_topic or names.shadow_bars_topic(self.topic_mode)

    def table(self) -> list[Route]:
        """The routing table in effect: extra routes, then the table (default CONTRACT.md's)."""
        return [*self.extra_routes, *(self.routes or DEFAULT_ROUTES)]
