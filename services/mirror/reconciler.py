"""The reconciler: Redis bars (bar store) vs Kafka bars (shadow builder), per symbol and minute.

``Reconciler.run(day)`` reads both sides (and the vendor's minute aggregates when the feed
supplies them), compares them (``compare``), stores the day's summary for the promotion
gate (a Redis hash under ``Keys.state``), evaluates the gate (N consecutive trading days,
each at or above the target), publishes the report to ``sentio.parity.reports.v1`` (key =
day) and sets the Prometheus gauges. ``ReconcilerActor`` runs it on a timer for today
(ignoring bars younger than the minimum age, which may still be in flight) and, when the day
rolls over, once more for the day that ended; ``python -m services.mirror reconcile`` runs
it on demand for a date.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from datetime import date, timedelta
from pathlib import Path

import msgspec
import redis.asyncio as aioredis
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Gauge

from libs.common.io.barstore import BarStore
from libs.common.io.kafka_io import (
    TopicSpec,
    ensure_topics,
    list_topics,
    read_from_beginning,
    start_producer,
)
from libs.common.io.redis_io import StreamReader, connect_redis
from libs.common.market.sessions import ny_date, parse_day, ts_et
from libs.common.names import Keys
from libs.common.runtime.actors import Actor
from libs.common.runtime.clock import SYSTEM_CLOCK, Clock
from libs.common.schemas import (
    BAR_DECODER,
    DECODERS,
    ENCODER,
    AggregateBatch,
    Bar,
    ParityReport,
    VendorAggregate,
)
from services.mirror.compare import SymbolComparison, Tolerance, compare_symbol, compare_vendor
from services.mirror.config import MirrorSettings, Route
from services.mirror.report import (
    DayReport,
    Gate,
    GateDay,
    build_section,
    report_dict,
    to_json,
    to_markdown,
)
from services.mirror.routing import topic_configs

log = structlog.get_logger("tickmesh.reconciler")

AGGREGATE_DECODER = DECODERS[AggregateBatch]


class DaySummary(msgspec.Struct, frozen=True):
    """What the gate keeps of a day's report."""

    day: str
    parityPct: float | None
    compared: int
    matched: int
    generatedAtMs: int
    kafkaBars: int = 0
    redisBars: int = 0


class GateStore:
    """The day summaries the gate reads, in one Redis hash (field = day)."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.key = keys.state("parity:days")

    async def put(self, summary: DaySummary) -> None:
        """Store (replace) one day's summary."""
        await self.client.hset(self.key, summary.day, ENCODER.encode(summary))

    async def get_many(self, days: Iterable[date]) -> dict[str, DaySummary]:
        """The summaries of ``days`` that exist."""
        names = [day.isoformat() for day in days]
        if not names:
            return {}
        values = await self.client.hmget(self.key, names)
        return {
            name: msgspec.json.decode(value, type=DaySummary)
            for name, value in zip(names, values, strict=True)
            if value is not None
        }


def evaluate_gate(
    day: date,
    summaries: dict[str, DaySummary],
    *,
    days: int,
    target_pct: float,
    lookback_days: int = 30,
) -> Gate:
    """Promotion readiness at ``day``: the last ``days`` trading days each at ``target_pct``.

    Trading days are weekdays; a weekday whose report found no bars on either side is taken
    for a market holiday and skipped (the window reaches further back); a weekday without a
    report fails (the reconciler did not run). The window is consecutive: one failing day
    anywhere in it means not ready.
    """
    window: list[GateDay] = []
    current = day
    oldest = day - timedelta(days=lookback_days)
    skipped: list[str] = []
    while len(window) < days and current >= oldest:
        if current.weekday() < 5:
            name = current.isoformat()
            summary = summaries.get(name)
            if summary is None:
                window.append(GateDay(name, None, 0, False, "no report"))
            elif summary.compared == 0:
                skipped.append(name)
            else:
                pct = summary.parityPct
                passed = pct is not None and pct >= target_pct
                window.append(
                    GateDay(
                        name,
                        pct,
                        summary.compared,
                        passed,
                        "" if passed else f"below {target_pct:g} %",
                    )
                )
        current -= timedelta(days=1)
    window.reverse()
    passing = 0
    for entry in reversed(window):  # consecutive passing days ending at ``day``
        if not entry.passed:
            break
        passing += 1
    ready = len(window) == days and all(entry.passed for entry in window)
    reasons: list[str] = []
    if ready:
        reasons.append(
            f"{days} consecutive trading days ({window[0].day} to {window[-1].day}) "
            f"each at ≥ {target_pct:g} %: Kafka may become the source of truth"
        )
    for entry in window:
        if entry.passed:
            continue
        if entry.note == "no report":
            reasons.append(f"{entry.day}: no parity report (the reconciler did not run that day)")
        else:
            reasons.append(
                f"{entry.day}: parity {entry.parityPct:.3f} % is below "
                f"{target_pct:g} % over {entry.compared:,} symbol-minutes"
            )
    if len(window) < days:
        reasons.append(
            f"only {len(window)} trading days with reports in the last "
            f"{lookback_days} days; {days} are needed"
        )
    if skipped:
        reasons.append(
            f"skipped as no-trading days (no bars on either side): {', '.join(sorted(skipped))}"
        )
    return Gate(
        ready=ready,
        days=days,
        targetPct=target_pct,
        passing=passing,
        window=window,
        reasons=reasons,
    )


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


class Reconciler:
    """Builds, stores, publishes and measures parity reports."""

    def __init__(
        self,
        settings: MirrorSettings,
        client: aioredis.Redis,
        *,
        clock: Clock = SYSTEM_CLOCK,
        gauges: ParityGauges | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.clock = clock
        self.keys = Keys(settings.key_prefix)
        self.store = BarStore(client, self.keys)
        self.gate_store = GateStore(client, self.keys)
        self.gauges = gauges
        self.tolerance = Tolerance(settings.reconcile_tolerance)
        self.vendor_tolerance = Tolerance(settings.vendor_tolerance)
        self._producer: AIOKafkaProducer | None = None

    # -- reading the sides -------------------------------------------------------------------

    def _bars_topic(self, symbol: str) -> str:
        return self.settings.kafka_bars_topic.replace("{symbol}", symbol)

    async def kafka_symbols(self) -> set[str]:
        """Symbols that have a Kafka bars topic (per-symbol topics only)."""
        template = self.settings.kafka_bars_topic
        if "{symbol}" not in template:
            return set()
        prefix, _, suffix = template.partition("{symbol}")
        return {
            topic[len(prefix) : len(topic) - len(suffix)]
            for topic in await list_topics(self.settings)
            if topic.startswith(prefix)
            and topic.endswith(suffix)
            and len(topic) > len(prefix) + len(suffix)
        }

    async def kafka_bars(
        self, symbols: Iterable[str] | None, day: date
    ) -> tuple[dict[str, list[Bar]], int, int]:
        """Kafka bars of ``day`` by symbol (every copy), records read, undecodable records.

        ``symbols`` None: every symbol found (the single-topic layout reads all records).
        """
        wanted = None if symbols is None else set(symbols)
        template = self.settings.kafka_bars_topic
        if "{symbol}" in template:
            names = wanted if wanted is not None else await self.kafka_symbols()
            topics = sorted(self._bars_topic(symbol) for symbol in names)
        else:
            topics = [template]
        found: dict[str, list[Bar]] = {}
        read = bad = 0
        async for records in read_from_beginning(
            self.settings, topics, idle_ms=self.settings.kafka_idle_ms
        ):
            for record in records:
                read += 1
                try:
                    bar = BAR_DECODER.decode(record.value)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    bad += 1
                    continue
                if (wanted is None or bar.symbol in wanted) and ny_date(bar.startMs) == day:
                    found.setdefault(bar.symbol, []).append(bar)
        return found, read, bad

    async def vendor_bars(self, symbol: str, day: date) -> dict[int, VendorAggregate] | None:
        """The vendor's minute aggregates of ``symbol`` on ``day`` by start (None: no stream)."""
        template = self.settings.vendor_channel
        if not template:
            return None
        channel = template.replace("{symbol}", symbol)
        reader = StreamReader(self.client, self.keys)
        if not await self.client.exists(self.keys.stream(channel)):
            return None
        found: dict[int, VendorAggregate] = {}
        cursor = 0
        while True:
            entries = await reader.read(channel, cursor, 1_000)
            if not entries:
                break
            cursor = entries[-1][0]
            for _, payload in entries:
                try:
                    batch = AGGREGATE_DECODER.decode(payload)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                for aggregate in batch.aggs:
                    if aggregate.s and ny_date(aggregate.s) == day:
                        found[aggregate.s] = aggregate
        return found

    async def latest_day(self) -> date | None:
        """The newest day that has bars in the bar store (for a default date)."""
        pattern = f"{self.keys.prefix}barstore:{{*}}:*"
        newest: date | None = None
        async for key in self.client.scan_iter(match=pattern, count=1000):
            try:
                found = date.fromisoformat(key.decode().rsplit(":", 1)[1])
            except ValueError:
                continue
            newest = found if newest is None or found > newest else newest
        return newest

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
        """Reconcile ``day``; store its summary, evaluate the gate, publish, set gauges."""
        settings = self.settings
        tolerance = tolerance or self.tolerance
        vendor_tolerance = vendor_tolerance or self.vendor_tolerance
        min_age_s = settings.reconcile_min_age_s if min_age_s is None else min_age_s
        max_listed = settings.report_max_listed if max_listed is None else max_listed
        now_ms = self.clock.now_ms()
        settled_before = now_ms - int(min_age_s * 1000) if min_age_s > 0 else None
        if symbols:
            names = sorted(set(symbols))
            kafka, kafka_read, kafka_bad = await self.kafka_bars(names, day)
        else:
            kafka, kafka_read, kafka_bad = await self.kafka_bars(None, day)
            names = sorted(set(await self.store.symbols(day)) | set(kafka))
        comparisons: list[SymbolComparison] = []
        vendor_comparisons: list[SymbolComparison] = []
        redis_count = 0
        for symbol in names:
            redis_bars = await self.store.day(symbol, day)
            redis_count += len(redis_bars)
            comparisons.append(
                compare_symbol(
                    symbol,
                    redis_bars,
                    kafka.get(symbol, []),
                    tolerance,
                    settled_before_ms=settled_before,
                )
            )
            if vendor:
                aggregates = await self.vendor_bars(symbol, day)
                if aggregates is not None:
                    vendor_comparisons.append(
                        compare_vendor(
                            symbol,
                            redis_bars,
                            aggregates,
                            vendor_tolerance,
                            settled_before_ms=settled_before,
                        )
                    )
        section = build_section(comparisons, tolerance.describe(), max_listed)
        kafka_count = sum(len(bars) for bars in kafka.values())
        report = DayReport(
            day=day.isoformat(),
            generatedAtMs=now_ms,
            generatedAt=ts_et(now_ms),
            targetPct=settings.parity_target_pct,
            minAgeS=min_age_s,
            settledBeforeMs=settled_before,
            parity=section,
            vendor=build_section(vendor_comparisons, vendor_tolerance.describe(), max_listed)
            if vendor_comparisons
            else None,
            sources={
                "redis bar store": f"{redis_count:,} bars ({self.keys.prefix}barstore:*)",
                "kafka bars": f"{kafka_count:,} bars of the day from {kafka_read:,} records "
                f"({settings.kafka_bars_topic})"
                + (f", {kafka_bad:,} undecodable" if kafka_bad else ""),
                "vendor aggregates": (
                    f"{settings.vendor_channel} (Redis streams), {len(vendor_comparisons)} symbols"
                )
                if vendor
                else "not checked",
            },
        )
        summary = DaySummary(
            report.day,
            section.totals.parityPct,
            section.totals.compared,
            section.totals.matched,
            now_ms,
            kafka_count,
            redis_count,
        )
        if store and not symbols:  # a partial (some symbols) report does not speak for the day
            await self.gate_store.put(summary)
        stored = await self.gate_store.get_many(
            day - timedelta(days=offset) for offset in range(31)
        )
        if not store or symbols:
            stored[report.day] = summary
        report.gate = evaluate_gate(
            day, stored, days=settings.gate_days, target_pct=settings.parity_target_pct
        )
        if publish:
            await self.publish(report)
        if self.gauges is not None:
            self.gauges.update(report)
        log.info(
            "reconcile.report",
            day=report.day,
            parity_pct=section.totals.parityPct,
            compared=section.totals.compared,
            mismatched=section.totals.mismatched,
            missing_kafka=section.totals.missingKafka,
            missing_redis=section.totals.missingRedis,
            duplicates=section.totals.duplicates,
            pending=section.totals.pending,
            promotion_ready=report.gate.ready,
        )
        return report

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
        """Stop the report producer, if one was started."""
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


class ReconcilerActor(Actor[None]):
    """Reconciles today on a timer; when the day rolls over, the day that ended once more."""

    def __init__(
        self,
        settings: MirrorSettings,
        client: aioredis.Redis,
        *,
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__("mirror.reconciler", mailbox_size=1, registry=registry)
        self.reconciler = Reconciler(
            settings, client, clock=clock, gauges=ParityGauges(registry, settings.gate_days)
        )
        self.clock = clock
        self.last_day: date | None = None
        self.last_report: DayReport | None = None
        self.every(settings.reconcile_interval_s, self.tick, name="mirror.reconciler.timer")

    async def on_stop(self) -> None:
        await self.reconciler.close()

    async def tick(self) -> None:
        """One timed run (errors are logged; the next tick tries again)."""
        today = ny_date(self.clock.now_ms())
        try:
            if self.last_day is not None and self.last_day < today:
                await self.reconciler.run(self.last_day, min_age_s=0)
            self.last_report = await self.reconciler.run(today)
            self.last_day = today
        except (OSError, ConnectionError, TimeoutError, KafkaError) as exc:
            self.log.warning(
                "reconcile.failed",
                error=repr(exc),
                retry_s=self.reconciler.settings.reconcile_interval_s,
            )


# -- the command line --------------------------------------------------------------------------


def add_reconcile_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``reconcile`` subcommand's options."""
    parser.add_argument(
        "--date",
        help="New York trading day, YYYY-MM-DD (default: the newest "
        "day in the bar store, else today)",
    )
    parser.add_argument(
        "--symbols", help="comma-separated symbols (default: every symbol with bars on either side)"
    )
    parser.add_argument(
        "--format",
        choices=("md", "json"),
        default="md",
        help="report format on stdout (default md)",
    )
    parser.add_argument(
        "--out", help="also write the report to this file (.json: JSON, else the --format)"
    )
    parser.add_argument(
        "--tolerance",
        help="allowed difference: exact, 0.001, or "
        "open=0.01,vwap=0.0001 (default MIRROR_RECONCILE_"
        "TOLERANCE)",
    )
    parser.add_argument("--vendor-tolerance", help="tolerance against the vendor's bars")
    parser.add_argument(
        "--min-age-s",
        type=float,
        help="ignore bars that ended less than this long ago (default "
        "MIRROR_RECONCILE_MIN_AGE_S; 0 for a past day)",
    )
    parser.add_argument("--max-listed", type=int, help="entries listed per kind")
    parser.add_argument("--no-vendor", action="store_true", help="skip the vendor check")
    parser.add_argument(
        "--no-store",
        action="store_true",
        help="do not store the day's result for the promotion gate",
    )
    parser.add_argument(
        "--no-publish", action="store_true", help="do not publish to Kafka (MIRROR_PARITY_TOPIC)"
    )
    parser.add_argument(
        "--fail-below-target",
        action="store_true",
        help="exit 3 when the day's parity is below the target",
    )
    parser.add_argument("--quiet", action="store_true", help="only warnings on stderr")


async def reconcile_main(settings: MirrorSettings, args: argparse.Namespace) -> int:
    """Run one report from the command line; print it; returns the exit code."""
    tolerance = Tolerance(args.tolerance) if args.tolerance else None
    vendor_tolerance = Tolerance(args.vendor_tolerance) if args.vendor_tolerance else None
    symbols = [s.strip() for s in args.symbols.split(",") if s.strip()] if args.symbols else None
    client = await connect_redis(settings.redis_url, max_wait_s=10, name="tickmesh-reconcile")
    try:
        reconciler = Reconciler(settings, client)
        if args.date:
            day = parse_day(args.date)
        else:
            day = await reconciler.latest_day() or ny_date(SYSTEM_CLOCK.now_ms())
        min_age_s = args.min_age_s
        if min_age_s is None and day < ny_date(SYSTEM_CLOCK.now_ms()):
            min_age_s = 0.0  # a past day: nothing is in flight any more
        report = await reconciler.run(
            day,
            symbols=symbols,
            min_age_s=min_age_s,
            vendor=not args.no_vendor,
            store=not args.no_store,
            publish=not args.no_publish,
            tolerance=tolerance,
            vendor_tolerance=vendor_tolerance,
            max_listed=args.max_listed,
        )
        await reconciler.close()
    finally:
        await client.aclose()
    markdown = to_markdown(report)
    rendered = to_json(report).decode() if args.format == "json" else markdown
    sys.stdout.write(rendered + "\n")
    if args.out:
        path = Path(args.out)
        # the command's last step: nothing else is running on the loop
        path.write_text(  # noqa: ASYNC240
            (to_json(report).decode() if path.suffix == ".json" else rendered) + "\n"
        )
    pct = report.parity.totals.parityPct
    if args.fail_below_target and (pct is None or pct < settings.parity_target_pct):
        return 3
    return 0
