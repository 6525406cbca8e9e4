"""Metrics of the engine bridge, built once per registry (the runtime's)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from libs.common.runtime.metrics import metrics_for


class BridgeMetrics:
    """Bars in, records out, engine health."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.bars = Counter(
            "tickmesh_bridge_bars",
            "Bars received, by what became of them "
            "(pending, correction, duplicate, late, outside, ignored, undecodable)",
            ["outcome"],
            registry=registry,
        )
        self.buckets = Counter(
            "tickmesh_bridge_minutes",
            "Minute buckets processed, by how they were released (complete, timed_out, late)",
            ["release"],
            registry=registry,
        )
        self.signals = Counter("tickmesh_bridge_signals", "Signals published", registry=registry)
        self.trades = Counter(
            "tickmesh_bridge_trades", "Executed trades published", registry=registry
        )
        self.rejected = Counter(
            "tickmesh_bridge_orders_rejected",
            "Engine orders the paper broker rejected",
            registry=registry,
        )
        self.engine_timeouts = Counter(
            "tickmesh_bridge_engine_timeouts",
            "Minutes the engine did not answer in time",
            registry=registry,
        )
        self.engine_restarts = Counter(
            "tickmesh_bridge_engine_restarts",
            "Restarts of the external engine",
            registry=registry,
        )
        self.engine_protocol_errors = Counter(
            "tickmesh_bridge_engine_protocol_errors",
            "Unreadable lines from the external engine",
            registry=registry,
        )
        self.gap_reports = Counter(
            "tickmesh_bridge_gap_reports", "Engine gap reports published", registry=registry
        )
        self.gap_minutes = Counter(
            "tickmesh_bridge_gap_minutes",
            "Minutes without an engine decision",
            registry=registry,
        )
        self.lag = Gauge(
            "tickmesh_bridge_lag_seconds",
            "Now minus the end of the newest bar processed",
            registry=registry,
        )
        self.pending = Gauge(
            "tickmesh_bridge_pending_minutes",
            "Minutes waiting for the bars of other symbols",
            registry=registry,
        )
        self.minute_seconds = Histogram(
            "tickmesh_bridge_minute_seconds",
            "Time to process one minute bucket (engine and publish included)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )
        self.replay_minutes = Counter(
            "tickmesh_bridge_replay_minutes", "Replay minute buckets published", registry=registry
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None) -> BridgeMetrics:
        """The metrics of ``registry`` (the default registry when None), created once."""
        return metrics_for(cls, registry)
