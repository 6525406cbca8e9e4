"""Prometheus gauges of the parity reports."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from services.mirror.report import DayReport


class ParityGauges:
    """Prometheus gauges of the reports; labels kept for the days of the gate window only."""

    def __init__(self, registry: CollectorRegistry | None, keep_days: int) -> None:
        self.keep_days = keep_days
        self.symbol_pct = Gauge(
            "tickmesh_parity_percent",
            "Parity of a symbol on a day",
            ["symbol", "day"],
            registry=registry,
        )
        self.day_pct = Gauge(
            "tickmesh_parity_day_percent",
            "Parity of a day over all symbols",
            ["day"],
            registry=registry,
        )
        self.minutes = Gauge(
            "tickmesh_parity_minutes",
            "Symbol-minutes by outcome",
            ["day", "outcome"],
            registry=registry,
        )
        self.vendor_pct = Gauge(
            "tickmesh_parity_vendor_percent",
            "Agreement of our bars with the vendor's, per symbol and day",
            ["symbol", "day"],
            registry=registry,
        )
        self.ready = Gauge(
            "tickmesh_parity_promotion_ready", "1 when the promotion gate is met", registry=registry
        )
        self.passing = Gauge(
            "tickmesh_parity_gate_passing_days",
            "Consecutive trading days at target, ending at the last report",
            registry=registry,
        )
        self.last_run = Gauge(
            "tickmesh_parity_last_run_timestamp_seconds",
            "When the last report was made",
            registry=registry,
        )
        self._labels: dict[str, list[tuple[Gauge, tuple[str, ...]]]] = {}

    def update(self, report: DayReport) -> None:
        """Set the gauges from ``report``; forget days older than the window."""
        day = report.day
        for gauge, labels in self._labels.pop(day, []):
            try:
                gauge.remove(*labels)
            except KeyError:
                pass
        owned: list[tuple[Gauge, tuple[str, ...]]] = []

        def put(gauge: Gauge, labels: tuple[str, ...], value: float) -> None:
            gauge.labels(*labels).set(value)
            owned.append((gauge, labels))

        totals = report.parity.totals
        if totals.parityPct is not None:
            put(self.day_pct, (day,), totals.parityPct)
        for outcome in (
            "matched",
            "mismatched",
            "missingKafka",
            "missingRedis",
            "duplicates",
            "pending",
        ):
            put(self.minutes, (day, outcome), getattr(totals, outcome))
        for parity in report.parity.symbols:
            if parity.parityPct is not None:
                put(self.symbol_pct, (parity.symbol, day), parity.parityPct)
        if report.vendor is not None:
            for parity in report.vendor.symbols:
                if parity.parityPct is not None:
                    put(self.vendor_pct, (parity.symbol, day), parity.parityPct)
        self._labels[day] = owned
        for old in sorted(self._labels)[: -self.keep_days]:
            for gauge, labels in self._labels.pop(old):
                try:
                    gauge.remove(*labels)
                except KeyError:
                    pass
        if report.gate is not None:
            self.ready.set(1 if report.gate.ready else 0)
            self.passing.set(report.gate.passing)
        self.last_run.set(report.generatedAtMs / 1000)
