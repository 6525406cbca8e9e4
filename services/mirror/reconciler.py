"""The reconciler: Redis bars (bar store) vs Kafka bars (shadow builder), per symbol and minute.

``Reconciler.run(day)`` is collect → compare → gate → publish: it reads the sides
(``sides``: both bar sets and the vendor's minute aggregates when the feed supplies them),
compares them (``compare``, pure), stores the day's summary and evaluates the promotion gate
(``gate``: N consecutive trading days, each at or above the target), publishes the report to
``sentio.parity.reports.v1`` (key = day) and sets the Prometheus gauges (``gauges``).
``ScheduledReconciler`` runs it on a timer for today
(ignoring bars younger than the minimum age, which may still be in flight) and, when the day
rolls over, once more for the day that ended; ``python -m services.mirror reconcile`` runs
it on demand for a date.
"""

from __future__ import annotations

import time
from datetime import date, timedelta

import msgspec
import redis.asyncio as aioredis
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from libs.common.io.kafka_io import (
    TopicSpec,
    ensure_topics,
    start_producer,
)
from libs.common.market.calendar import is_trading_day
from libs.common.market.sessions import ny_date, ts_et
from libs.common.names import Keys
from libs.common.runtime.clock import SYSTEM_CLOCK, Clock
from libs.common.runtime.lifecycle import Component
from libs.common.schemas import (
    DECODERS,
    ENCODER,
    AggregateBatch,
    ParityReport,
)
from services.mirror.compare import (
    SymbolComparison,
    Tolerance,
    collapse,
    compare_symbol,
    compare_vendor,
)
from services.mirror.completeness import (
    CompletenessSection,
    build_completeness,
    gap_minutes,
    judge_symbol,
)
from services.mirror.config import MirrorSettings, Route
from services.mirror.gate import DaySummary, GateStore, evaluate_gate
from services.mirror.gauges import ParityGauges
from services.mirror.report import DayReport, build_section, report_dict
from services.mirror.routing import topic_configs
from services.mirror.sides import DaySides, SideReader

log = structlog.get_logger("tickmesh.reconciler")

AGGREGATE_DECODER = DECODERS[AggregateBatch]


class Reconciler:
    """Builds, stores, publishes and measures parity reports."""

    def __init__(
        self,
        settings: MirrorSettings,
        client: aioredis.Redis,
        *,
        clock: Clock = SYSTEM_CLOCK,
        gauges: ParityGauges | None = None,
        registry: CollectorRegistry | None = None,
        read_share: float = 1.0,
    ) -> None:
        self.settings = settings
        self.client = client
        self.clock = clock
        self.listings = settings.listings.build(registry=registry, service="mirror")
        """Primary listings for rebuilding the source's bars (the bars' own sources)."""
        self.keys = Keys(settings.key_prefix)
        self.reader = SideReader(settings, client, listings=self.listings, read_share=read_share)
        self.gate_store = GateStore(client, self.keys)
        self.gauges = gauges
        self.tolerance = Tolerance(settings.reconcile_tolerance)
        self.vendor_tolerance = Tolerance(settings.vendor_tolerance)
        self._producer: AIOKafkaProducer | None = None

    # -- one report --------------------------------------------------------------------------

    async def run(
        self,
        day: date,
        *,
        symbols: list[str] | None = None,
        min_age_s: float | None = None,
        vendor: bool = True,
        store: bool = True,
        publish: bool = True,
        tolerance: Tolerance | None = None,
        vendor_tolerance: Tolerance | None = None,
        max_listed: int | None = None,
    ) -> DayReport:
        """Reconcile ``day``: collect the sides, compare them, judge the gate, publish."""
        settings = self.settings
        min_age_s = settings.reconcile_min_age_s if min_age_s is None else min_age_s
        now_ms = self.clock.now_ms()
        started = time.perf_counter()
        rested_before = self.reader.rested_s
        sides = await self.reader.collect(day, symbols, vendor=vendor)
        read_s = time.perf_counter() - started
        report = self.compare(
            sides,
            now_ms=now_ms,
            min_age_s=min_age_s,
            tolerance=tolerance or self.tolerance,
            vendor_tolerance=vendor_tolerance or self.vendor_tolerance,
            max_listed=settings.report_max_listed if max_listed is None else max_listed,
        )
        # a partial (some symbols) report does not speak for the day
        await self.judge(report, sides, now_ms, store=store and not symbols)
        if publish:
            await self.publish(report)
        if self.gauges is not None:
            self.gauges.update(report)
        totals = report.parity.totals
        log.info(
            "reconcile.report",
            day=report.day,
            parity_pct=totals.parityPct,
            compared=totals.compared,
            mismatched=totals.mismatched,
            missing_kafka=totals.missingKafka,
            missing_redis=totals.missingRedis,
            duplicates=totals.duplicates,
            pending=totals.pending,
            promotion_ready=report.gate.ready if report.gate is not None else False,
            read_s=round(read_s, 3),
            rested_s=round(self.reader.rested_s - rested_before, 3),
            seconds=round(time.perf_counter() - started, 3),
        )
        return report

    def compare(
        self,
        sides: DaySides,
        *,
        now_ms: int,
        min_age_s: float,
        tolerance: Tolerance,
        vendor_tolerance: Tolerance,
        max_listed: int,
    ) -> DayReport:
        """The day's report from its sides (pure: no I/O)."""
        settings = self.settings
        settled_before = now_ms - int(min_age_s * 1000) if min_age_s > 0 else None
        comparisons: list[SymbolComparison] = []
        vendor_comparisons: list[SymbolComparison] = []
        for symbol in sides.symbols:
            redis_bars = sides.redis.get(symbol, {})
            comparisons.append(
                compare_symbol(
                    symbol,
                    redis_bars,
                    sides.kafka.get(symbol, []),
                    tolerance,
                    settled_before_ms=settled_before,
                )
            )
            aggregates = sides.vendor.get(symbol)
            if aggregates is not None:
                vendor_comparisons.append(
                    compare_vendor(
                        symbol,
                        redis_bars,
                        aggregates,
                        vendor_tolerance,
                        settled_before_ms=settled_before,
                        not_received=gap_minutes(
                            sides.gaps, sides.day.toordinal(), symbol, backfilled=True
                        ),
                    )
                )
        kafka_bad = sides.kafka_undecodable
        completeness = self.completeness(sides, settled_before, max_listed)
        return DayReport(
            day=sides.day.isoformat(),
            generatedAtMs=now_ms,
            generatedAt=ts_et(now_ms),
            targetPct=settings.parity_target_pct,
            minAgeS=min_age_s,
            settledBeforeMs=settled_before,
            parity=build_section(comparisons, tolerance.describe(), max_listed),
            completeness=completeness,
            vendor=build_section(vendor_comparisons, vendor_tolerance.describe(), max_listed)
            if vendor_comparisons
            else None,
            sources={
                "redis bar store": f"{sides.redis_count:,} bars ({self.keys.prefix}barstore:*)",
                "kafka bars": f"{sides.kafka_count:,} bars of the day from "
                f"{sides.kafka_records:,} records ({settings.bars_topic()})"
                + (f", {kafka_bad:,} undecodable" if kafka_bad else ""),
                "vendor aggregates": (
                    f"{settings.vendor_channel} (Redis streams), {len(vendor_comparisons)} symbols"
                )
                if sides.vendor_checked
                else "not checked",
            },
        )

    def completeness(
        self, sides: DaySides, settled_before: int | None, max_listed: int
    ) -> CompletenessSection | None:
        """Each symbol's minutes against the source (None when the source was not read)."""
        if sides.ticks is None:
            return None
        day_ordinal = sides.day.toordinal()
        judged = []
        for symbol in sides.symbols:
            expected = {
                bar.startMs: bar
                for bar in sides.ticks.bars(symbol)
                if ny_date(bar.startMs).toordinal() == day_ordinal
            }
            judged.append(
                judge_symbol(
                    symbol,
                    ledger=sides.ledger.get(symbol, {}),
                    kafka_ticks=sides.ticks.counts.get(symbol, {}),
                    duplicates=sides.ticks.duplicates.get(symbol, 0),
                    expected=expected,
                    redis_bars=sides.redis.get(symbol, {}),
                    kafka_bars=collapse(sides.kafka.get(symbol, []))[0],
                    gaps=gap_minutes(sides.gaps, day_ordinal, symbol),
                    settled_before_ms=settled_before,
                )
            )
        return build_completeness(
            judged, sides.gaps, sides.dead_letters, max_listed, day_ordinal=day_ordinal
        )

    async def judge(self, report: DayReport, sides: DaySides, now_ms: int, *, store: bool) -> None:
        """Keep the day's summary (when ``store``) and evaluate the promotion gate."""
        settings = self.settings
        totals = report.parity.totals
        summary = DaySummary(
            report.day,
            totals.parityPct,
            totals.compared,
            totals.matched,
            now_ms,
            sides.kafka_count,
            sides.redis_count,
            report.completeness.totals.worst_pct if report.completeness is not None else None,
            len(report.completeness.incomplete) if report.completeness is not None else 0,
        )
        day = sides.day
        stored = await self.gate_store.get_many(
            day - timedelta(days=offset) for offset in range(31)
        )
        stored[report.day] = summary
        gate = evaluate_gate(
            day, stored, days=settings.gate_days, target_pct=settings.parity_target_pct
        )
        report.gate = gate
        if store:
            # with the gate's verdict, for the readers of the summaries (the dashboard)
            await self.gate_store.put(
                msgspec.structs.replace(
                    summary,
                    gateReady=gate.ready,
                    gatePassing=gate.passing,
                    gateDays=gate.days,
                    gateTargetPct=gate.targetPct,
                    gateReasons=gate.reasons,
                )
            )

    async def _producer_ready(self) -> AIOKafkaProducer:
        settings = self.settings
        if self._producer is None:
            route = Route(
                pattern=settings.parity_topic,
                topic=settings.parity_topic,
                key="none",
                cleanup_policy="compact",
            )
            await ensure_topics(
                settings,
                [
                    TopicSpec(
                        settings.parity_topic,
                        replication_factor=settings.topic_replication,
                        configs=topic_configs(route, settings),
                    ),
                ],
            )
            self._producer = await start_producer(
                settings, client_id="tickmesh-reconciler", max_batch_size=4 * 1_048_576
            )
        return self._producer

    async def close(self) -> None:
        """Stop the report producer, if one was started, and the listings' lookups."""
        self.listings.close()
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def publish(self, report: DayReport) -> None:
        """Send the report to the parity topic, keyed by day."""
        settings = self.settings
        producer = await self._producer_ready()
        totals = report.parity.totals
        seq = int(await self.client.incr(self.keys.state("parity:seq")))
        record = ParityReport(
            seq=seq,
            day=report.day,
            parityPct=totals.parityPct if totals.parityPct is not None else 0.0,
            matched=totals.matched,
            mismatched=totals.mismatched,
            missingRedis=totals.missingRedis,
            missingKafka=totals.missingKafka,
            duplicates=totals.duplicates,
            promotionReady=report.gate.ready if report.gate is not None else False,
            report=report_dict(report),
        )
        try:
            await producer.send_and_wait(
                settings.parity_topic, ENCODER.encode(record), key=report.day.encode()
            )
        except Exception:
            await self.close()  # a fresh producer next time
            raise


class ScheduledReconciler(Component):
    """Reconciles today on a timer; when the day rolls over, the day that ended once more."""

    def __init__(
        self,
        settings: MirrorSettings,
        client: aioredis.Redis,
        *,
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__("mirror.reconciler", registry=registry)
        self.reconciler = Reconciler(
            settings,
            client,
            clock=clock,
            gauges=ParityGauges(registry, settings.gate_days),
            registry=registry,
            read_share=settings.reconcile_read_share,
        )
        self.clock = clock
        self.last_day: date | None = None
        self.last_report: DayReport | None = None
        self.skipped: date | None = None
        """The last day skipped as not a trading day."""
        self.covered_ms = 0
        """When the newest finished report of today began: what it read reached about then."""
        self.last_seconds = 0.0
        """How long the newest finished report of today took."""
        self.every(settings.reconcile_interval_s, self.tick, name="mirror.reconciler.timer")

    def lag_ms(self) -> int:
        """How old the newest report's view is (0 before the first): the interval and the
        report's own time when the reports keep up, more when they do not (the heartbeat's
        lag when the reconciler runs alone)."""
        return max(0, self.clock.now_ms() - self.covered_ms) if self.covered_ms else 0

    def status(self) -> str:
        """``behind`` when the newest report took longer than the interval (its reading at
        ``MIRROR_RECONCILE_READ_SHARE`` cannot keep up with the feed), else ``ok``."""
        return (
            "behind" if self.last_seconds > self.reconciler.settings.reconcile_interval_s else "ok"
        )

    async def on_stop(self) -> None:
        await self.reconciler.close()

    async def tick(self) -> None:
        """One timed run (errors are logged; the next tick tries again). A day the exchange
        does not trade (the calendar's) gets no report: there is nothing to compare and the
        gate does not count it."""
        today = ny_date(self.clock.now_ms())
        try:
            if self.last_day is not None and self.last_day < today:
                await self.reconciler.run(self.last_day, min_age_s=0)
                self.last_day = None
            if not is_trading_day(today):
                if self.skipped != today:
                    self.skipped = today
                    self.log.info("reconcile.not_a_trading_day", day=today.isoformat())
                return
            began_ms, began = self.clock.now_ms(), self.clock.monotonic()
            self.last_report = await self.reconciler.run(today)
            self.covered_ms, self.last_seconds = began_ms, self.clock.monotonic() - began
            self.last_day = today
        except (OSError, ConnectionError, TimeoutError, KafkaError) as exc:
            self.log.warning(
                "reconcile.failed",
                error=repr(exc),
                retry_s=self.reconciler.settings.reconcile_interval_s,
            )
