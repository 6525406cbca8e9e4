"""The bar builder's metrics (one set per registry, labelled by source kind)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from libs.common.runtime.metrics import metrics_for


class BuilderMetrics:
    """Metrics of the bar builder; built once per registry, labelled by source kind."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["source"]
        self.ticks = Counter("tickmesh_bars_ticks", "Ticks aggregated", labels, registry=registry)
        self.bars = Counter(
            "tickmesh_bars_published", "Bars published (revision 0)", labels, registry=registry
        )
        self.revisions = Counter(
            "tickmesh_bars_revisions", "Corrections published", labels, registry=registry
        )
        self.republish_skipped = Counter(
            "tickmesh_bars_republish_skipped",
            "Bars rebuilt after a restart for minutes already published, not sent again",
            labels,
            registry=registry,
        )
        self.ticks_skipped = Counter(
            "tickmesh_bars_ticks_skipped",
            "Ticks of minutes published before the last start, read again and not aggregated",
            labels,
            registry=registry,
        )
        self.late = Counter(
            "tickmesh_bars_late_trades",
            "Trades for closed minutes (revised or dropped per the policy)",
            [*labels, "action"],
            registry=registry,
        )
        self.uncommitted = Gauge(
            "tickmesh_bars_uncommitted_channels",
            "Channels with positions not yet safe to commit (a minute still open)",
            labels,
            registry=registry,
        )
        self.lag = Gauge(
            "tickmesh_bars_watermark_lag_ms",
            "Wall time minus the event-time watermark",
            labels,
            registry=registry,
        )
        self.commits = Counter(
            "tickmesh_bars_commits", "Safe position commits", labels, registry=registry
        )
        self.marks = Counter(
            "tickmesh_bars_progress_marks",
            "Progress marks read (each moves the watermark of the symbols it covers)",
            labels,
            registry=registry,
        )
        self.sink_seconds = Histogram(
            "tickmesh_bars_sink_seconds",
            "Time a call of the bar sink took (Redis: store and publish; Kafka: produce until "
            "acknowledged), a minute's close of every symbol in one call",
            labels,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=registry,
        )
        self.duplicate_trades = Counter(
            "tickmesh_bars_duplicate_trades",
            "Trades dropped because one with the same identity was already aggregated",
            labels,
            registry=registry,
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None) -> BuilderMetrics:
        """The metrics of ``registry``, created once."""
        return metrics_for(cls, registry)
