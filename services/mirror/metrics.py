"""The mirror's own Prometheus metrics (the consumer's are ``tickmesh_consumer_*``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from libs.common.io.deadletter import dead_letter_counter
from libs.common.runtime.metrics import metrics_for


class MirrorMetrics:
    """The mirror's own metrics (the consumer's are ``tickmesh_consumer_*``)."""

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None) -> MirrorMetrics:
        """The metrics of ``registry`` (the default one when None), created once."""
        return metrics_for(cls, registry)

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.records = Counter(
            "tickmesh_mirror_records", "Records acknowledged by Kafka", ["kind"], registry=registry
        )
        self.ticks = Counter(
            "tickmesh_mirror_ticks", "Trades inside acknowledged tick records", registry=registry
        )
        self.bytes = Counter(
            "tickmesh_mirror_bytes", "Payload bytes acknowledged by Kafka", registry=registry
        )
        self.batches = Counter(
            "tickmesh_mirror_batches", "Batches acknowledged by Kafka", registry=registry
        )
        self.ack_seconds = Histogram(
            "tickmesh_mirror_ack_seconds",
            "From sending a batch to its last acknowledgement",
            buckets=(
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
            ),
            registry=registry,
        )
        self.dead_letters = dead_letter_counter(registry)
        self.in_flight = Gauge(
            "tickmesh_mirror_in_flight_records",
            "Records sent and not yet acknowledged",
            registry=registry,
        )
        self.lag_records = Gauge(
            "tickmesh_mirror_lag_records",
            "Records published on Redis and not yet acknowledged by Kafka",
            registry=registry,
        )
        self.oldest_unacked = Gauge(
            "tickmesh_mirror_oldest_unacked_seconds",
            "Age of the oldest unacknowledged batch",
            registry=registry,
        )
        self.falling_behind = Gauge(
            "tickmesh_mirror_falling_behind",
            "1 while the mirror is behind (input overflowing, or Kafka stalled or down)",
            registry=registry,
        )
        self.kafka_up = Gauge(
            "tickmesh_mirror_kafka_up", "0 while Kafka is failing or stalled", registry=registry
        )
        self.kafka_failures = Counter(
            "tickmesh_mirror_kafka_failures",
            "Failed sends (each followed by a rewind and retry)",
            registry=registry,
        )
        self.stalls = Counter(
            "tickmesh_mirror_kafka_stalls",
            "Times the oldest batch went unacknowledged past stall_warn_ms",
            registry=registry,
        )
        self.already_landed = Counter(
            "tickmesh_mirror_already_landed",
            "Records re-read after a restart or a failed send that Kafka already held (not sent "
            "again)",
            registry=registry,
        )
        self.topics_created = Counter(
            "tickmesh_mirror_topics_created", "Topics created", registry=registry
        )
