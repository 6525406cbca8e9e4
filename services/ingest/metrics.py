"""The ingest service's own metrics (the actors and the publisher add theirs)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class IngestMetrics:
    """The ingest service's own metrics (the actors and the publisher add theirs)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.frames = Counter(
            "tickmesh_ingest_frames", "Data frames decoded and published", registry=registry
        )
        self.frames_received = Counter(
            "tickmesh_ingest_frames_received",
            "Frames read from the socket (statuses included)",
            registry=registry,
        )
        self.events = Counter(
            "tickmesh_ingest_events", "Events decoded by type", ["type"], registry=registry
        )
        self.decode_errors = Counter(
            "tickmesh_ingest_decode_errors",
            "Events or frames that failed to decode (each went to the dead-letter stream)",
            registry=registry,
        )
        self.oversized_frames = Counter(
            "tickmesh_ingest_oversized_frames",
            "Frames over INGEST_MAX_FRAME_BYTES (each a dead letter; the connection is reopened)",
            registry=registry,
        )
        self.statuses = Counter(
            "tickmesh_ingest_statuses", "Status messages by status", ["status"], registry=registry
        )
        self.reconnects = Counter(
            "tickmesh_ingest_reconnects", "Reconnects by reason", ["reason"], registry=registry
        )
        self.queue_depth = Gauge(
            "tickmesh_ingest_queue_depth",
            "Frames waiting between reader and processor",
            registry=registry,
        )
        self.queue_capacity = Gauge(
            "tickmesh_ingest_queue_capacity",
            "Bound of the reader-to-processor queue",
            registry=registry,
        )
        self.queue_full = Counter(
            "tickmesh_ingest_queue_full",
            "Times the reader found the queue full and waited (reading paused)",
            registry=registry,
        )
        self.warnings = Counter(
            "tickmesh_ingest_warnings",
            "Warnings fired: queue filling, feed lag high",
            ["kind"],
            registry=registry,
        )
        self.feed_lag = Gauge(
            "tickmesh_ingest_feed_lag_seconds",
            "Now minus the newest event time of the last frames published",
            registry=registry,
        )
        self.publish_latency = Histogram(
            "tickmesh_ingest_publish_latency_seconds",
            "From a frame's receipt to its records being published (queue, decode, Redis)",
            buckets=(
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1.0,
                2.5,
                5.0,
                10.0,
            ),
            registry=registry,
        )
        self.connected = Gauge(
            "tickmesh_ingest_connected", "1 while authenticated and subscribed", registry=registry
        )
