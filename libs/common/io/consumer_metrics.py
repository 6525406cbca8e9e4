"""The metrics of sequenced consumers (``tickmesh_consumer_*``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from libs.common.runtime.metrics import metrics_for


class ConsumerMetrics:
    """Metrics of sequenced consumers, labelled by consumer name; built once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["consumer"]
        self.delivered = Counter(
            "tickmesh_consumer_records",
            "Records delivered in order",
            [*labels, "kind"],
            registry=registry,
        )
        self.from_stream = Counter(
            "tickmesh_consumer_backfilled_records",
            "Records read from the stream (gaps, sweeps, catch-up)",
            labels,
            registry=registry,
        )
        self.gaps = Counter(
            "tickmesh_consumer_gaps", "Sequence gaps seen on pub/sub", labels, registry=registry
        )
        self.duplicates = Counter(
            "tickmesh_consumer_duplicates", "Duplicate records dropped", labels, registry=registry
        )
        self.lost = Counter(
            "tickmesh_consumer_lost_records",
            "Records trimmed from the stream before they were read",
            labels,
            registry=registry,
        )
        self.doorbells_dropped = Counter(
            "tickmesh_consumer_doorbells_dropped",
            "Pub/sub messages dropped by a full local queue (read from the stream instead)",
            labels,
            registry=registry,
        )
        self.behind = Gauge(
            "tickmesh_consumer_behind_records",
            "Records in the streams not yet delivered (at the last sweep)",
            labels,
            registry=registry,
        )
        self.disconnects = Counter(
            "tickmesh_consumer_subscriber_errors",
            "Pub/sub connection errors",
            labels,
            registry=registry,
        )
        self.resubscribes = Counter(
            "tickmesh_consumer_resubscribes",
            "Pub/sub connections lost and re-established (e.g. cut by Redis at its output-buffer "
            "limit); what was sent meanwhile is read from the streams",
            labels,
            registry=registry,
        )
        self.pubsub_paused = Gauge(
            "tickmesh_consumer_pubsub_paused",
            "1 while pub/sub is paused because the consumer fell behind (reading the streams)",
            labels,
            registry=registry,
        )
        self.falling_behind = Gauge(
            "tickmesh_consumer_falling_behind",
            "1 from when the consumer could not keep up until it caught up again",
            labels,
            registry=registry,
        )
        self.rewinds = Counter(
            "tickmesh_consumer_rewinds",
            "Rewinds to the committed positions (the caller's downstream write failed)",
            labels,
            registry=registry,
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None) -> ConsumerMetrics:
        """The metrics of ``registry`` (the default registry when None), created once."""
        return metrics_for(cls, registry)
