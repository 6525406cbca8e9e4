"""The soak itself: the whole mesh through several trading days, faults on a schedule, each day
reconciled once the pipeline has settled.

The local stack runs redis-server with AOF on and a data directory of its own (a Redis restart
keeps the data, as production's does) and the Tansu broker. The mesh is the demo's
(``devstack.mesh``), its simulator replaying the days one after the other on one connection
and holding after each day until the soak has reconciled it. For each day the soak fires the
day's faults when the feed reaches their time, waits for the day's feed to end, for the
builders to close their last minutes on ingest's idle mark and for the mirror to catch up,
then runs the mirror's reconciler on the day (stored, so the promotion gate accumulates) and
compares what the source sent with what Redis and Kafka hold.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

from devstack.localstack import LocalStack
from devstack.mesh import Mesh, MeshOptions, ProcessExited
from devstack.soak.faults import FaultRecord, FaultRunner, LogWatch, attribute, now_ms
from devstack.soak.observe import RedisTally, lost_trades, source_trades
from devstack.soak.plan import DayPlan, SoakOptions, plan_faults, time_of_day
from devstack.soak.report import DayRow, fill_completeness, markdown_row, to_markdown
from libs.common.io.redis_io import connect_redis
from libs.common.market.sessions import ts_et
from services.mirror.config import MirrorSettings
from services.mirror.reconciler import Reconciler
from services.mirror.report import DayReport, Gate, to_json
from services.mirror.sides import DaySides, SideReader

T = TypeVar("T")


class KeepingSideReader(SideReader):
    """The reconciler's reader, keeping the sides it read (the soak needs the Kafka trades
    themselves, not only their counts, and reading them twice would double the day's work)."""

    sides: DaySides | None = None

    async def collect(
        self, day: date, symbols: list[str] | None, *, vendor: bool, source: bool = True
    ) -> DaySides:
        self.sides = await super().collect(day, symbols, vendor=vendor, source=source)
        return self.sides


@dataclass
class SoakResult:
    """What a soak found."""

    rows: list[DayRow] = field(default_factory=list)
    gate: Gate | None = None
    problems: list[str] = field(default_factory=list)
    workdir: Path | None = None

    @property
    def passed(self) -> bool:
        """Every day at the target."""
        return bool(self.rows) and all(row.passed for row in self.rows)

    def markdown(self) -> str:
        """The table and what follows it."""
        return to_markdown(self.rows, self.gate, self.problems)


class Soak:
    """Runs the days of ``options`` through the mesh; ``run()`` returns the result."""

    def __init__(self, options: SoakOptions, say: Callable[[str], None] = print) -> None:
        self.options = options
        self.say = say
        self.workdir = options.workdir or Path(tempfile.mkdtemp(prefix="tickmesh-soak-"))
        self.plans = plan_faults(options)
        self.result = SoakResult(workdir=self.workdir)
        self.exited: list[str] = []
        """Services that exited without being killed, during the current day."""
        self._mesh: Mesh | None = None
        self._tally: RedisTally | None = None
        self._logs: LogWatch | None = None
        self.load_max = 0.0

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> SoakResult:
        """Start the stack and the mesh, run every day, stop everything."""
        options = self.options
        aof_dir = self.workdir / "redis-data"
        aof_dir.mkdir(parents=True, exist_ok=True)
        self.say(f"soak: logs and Redis data in {self.workdir}")
        for plan in self.plans:
            planned = ", ".join(
                f"{f.kind.value}{' ' + f.target if f.target else ''}@"
                f"{time_of_day(f.at_ms, plan.day.as_of)}"
                for f in plan.faults
            )
            self.say(f"soak: {plan.day.as_of} ({plan.day.source}): {planned or 'no faults'}")
        stack = LocalStack(redis_extra_args=["--appendonly", "yes", "--dir", str(aof_dir)])
        with stack:
            mesh = Mesh(
                stack,
                MeshOptions(
                    workdir=self.workdir,
                    data_dir=options.data_dir,
                    days=[str(day) for day in options.days],
                    symbols=list(options.symbols),
                    speed=options.speed,
                    grace_ms=options.grace_ms,
                    day_pause_s=options.day_pause_s,
                    hold_between_days=True,
                    run_id="soak",
                ),
            )
            self._mesh = mesh
            try:
                mesh.start()
                self._tally = RedisTally(stack.redis.url, options.symbols)
                self._logs = LogWatch(mesh)
                runner = FaultRunner(mesh, stack, self._tally, options, self.tick)
                for plan in self.plans:
                    row, report = self.run_day(plan, runner)
                    self.result.rows.append(row)
                    self.result.gate = report.gate if report is not None else None
                    self.say(f"soak: {markdown_row(row)}")
                    if plan.index + 1 < len(self.plans):
                        mesh.release_next_day()
                self.result.problems.extend(
                    f"{row.day}: {note}" for row in self.result.rows for note in row.unexplained
                )
                self.result.problems.extend(self.problems())
            finally:
                mesh.stop()
                if self._tally is not None:
                    self._tally.close()
        return self.result

    def tick(self) -> None:
        """Background duties, run every loop and while a fault waits."""
        self.load_max = max(self.load_max, os.getloadavg()[0])
        if self._tally is not None:
            self._tally.poll()
        if self._logs is not None:
            self._logs.poll()

    def _guard(self, action: Callable[[], T], what: str, attempts: int = 5) -> T:
        """Run ``action``; a service that exited on its own is noted and started again."""
        for _ in range(attempts - 1):
            try:
                return action()
            except ProcessExited as exc:
                self._revive(str(exc).splitlines()[0])
        return action()

    def _revive(self, why: str) -> None:
        mesh = self._mesh
        assert mesh is not None
        for name in mesh.down():
            process = mesh.services[name].process
            self.exited.append(f"{name} (exit {process.returncode if process else '?'})")
            self.say(f"soak: {name} exited on its own ({why}); starting it again")
            mesh.restart(name)

    # -- one day ---------------------------------------------------------------------------

    def run_day(self, plan: DayPlan, runner: FaultRunner) -> tuple[DayRow, DayReport | None]:
        """Replay one day with its faults, let the mesh settle, reconcile the day."""
        mesh = self._mesh
        assert mesh is not None and self._tally is not None and self._logs is not None
        day = plan.day.as_of.isoformat()
        started_ms, started = now_ms(), time.monotonic()
        self.exited = []
        self.load_max = 0.0
        pending = list(plan.faults)
        records: list[FaultRecord] = []
        deadline = time.monotonic() + 3_600
        while True:
            self.tick()
            if mesh.down():
                self._revive("found down")
            try:
                status = mesh.simulator_status()
            except (OSError, RuntimeError):
                time.sleep(0.5)
                continue
            if day in status.get("daysDone", ()):
                break
            if status.get("day") == day and pending:
                feed_ms = int(status.get("feedTimeMs") or 0)
                if feed_ms >= pending[0].at_ms:
                    fault = pending.pop(0)
                    previous_ms = records[-1].feed_ms if records else 0
                    record = runner.run(fault, day, feed_ms, previous_ms)
                    records.append(record)
                    self.say(f"soak: {day} {record.summary()}")
                    continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"the simulator did not finish {day} within an hour")
            time.sleep(0.25)
        for fault in pending:
            self.say(f"soak: {day} {fault.kind.value} not fired: the feed ended before its time")
        self.say(f"soak: {day} feed done; waiting for the mesh to settle")
        self._guard(mesh.wait_last_minute_closed, "closing the last minutes")
        self._settle()
        self.tick()
        ended_ms = now_ms()
        report, sides = asyncio.run(self.reconcile(plan.day.as_of))
        reports = self.workdir / "reports"
        reports.mkdir(exist_ok=True)
        (reports / f"{day}.json").write_bytes(to_json(report))
        return self._row(plan, records, report, sides, started_ms, ended_ms, started), report

    def _settle(self) -> None:
        """Until the mirror has forwarded everything and no counter moves."""
        mesh = self._mesh
        assert mesh is not None
        quiet_s = 3 + self.options.grace_ms / 1000
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            self.tick()
            self._guard(lambda: mesh.wait_settled(quiet_s=quiet_s, timeout_s=600), "settling")
            if mesh.services["mirror"].metric_sum("tickmesh_mirror_lag_records") == 0:
                return
        raise TimeoutError("the mirror did not catch up within 10 minutes")

    async def reconcile(self, day: date) -> tuple[DayReport, DaySides | None]:
        """The mirror's reconciler on ``day``: stored for the gate, not published."""
        mesh = self._mesh
        assert mesh is not None
        settings = mesh.settings(MirrorSettings)  # the mesh's layout, security and names
        client = await connect_redis(settings.redis_url, max_wait_s=30, name="tickmesh-soak")
        try:
            reconciler = Reconciler(settings, client)
            reader = KeepingSideReader(
                settings, client, listings=reconciler.listings, keep_trades=True
            )
            reconciler.reader = reader
            report = await reconciler.run(day, min_age_s=0, store=True, publish=False)
            await reconciler.close()
            return report, reader.sides
        finally:
            await client.aclose()

    def _row(
        self,
        plan: DayPlan,
        records: list[FaultRecord],
        report: DayReport,
        sides: DaySides | None,
        started_ms: int,
        ended_ms: int,
        started: float,
    ) -> DayRow:
        mesh, tally, logs = self._mesh, self._tally, self._logs
        assert mesh is not None and tally is not None and logs is not None
        options = self.options
        row = DayRow(plan.day.as_of.isoformat(), plan.day.source.isoformat())
        source = source_trades(options.data_dir, options.symbols, plan.day)
        row.source = len(source)
        fill_completeness(row, report.completeness)
        row.parity_pct = report.parity.totals.parityPct
        row.bar_duplicates = report.parity.totals.duplicates
        row.vendor_pct = report.vendor.totals.parityPct if report.vendor is not None else None
        day_tally = tally.day(plan.day.as_of)
        row.redis = day_tally.trades
        kafka_trades = (
            itertools.chain.from_iterable(sides.ticks.trades.values())
            if sides is not None and sides.ticks is not None
            else iter(())
        )
        gaps = list(tally.gaps.values())
        losses = lost_trades(source, kafka_trades, gaps)
        row.missing, row.missing_in_gap = losses.missing, losses.in_gap
        row.lost_outside_gap, row.extra = len(losses.outside_gap), losses.extra
        row.dead_letters = len(tally.letters_between(started_ms, ended_ms))
        row.gaps = len(tally.gaps_opened_between(started_ms, ended_ms))
        row.unexplained = attribute(records, tally, logs, losses, started_ms, ended_ms)
        for trade in losses.outside_gap[:5]:
            row.unexplained.append(
                f"lost outside any gap: {trade.sym} {ts_et(trade.t)} id {trade.identity()}"
            )
        row.faults = records
        row.services_down = mesh.down()
        row.exited_on_their_own = list(self.exited)
        row.seconds = round(time.monotonic() - started, 1)
        row.load_max = round(self.load_max, 2)
        row.judge(options.target_pct, strict_gaps=options.strict_gaps)
        return row

    def problems(self) -> list[str]:
        """What the soak saw that no fault explains: error log lines, trimmed records."""
        found: list[str] = []
        tally, logs = self._tally, self._logs
        if tally is not None and tally.trimmed:
            found.append(
                f"{tally.trimmed:,} tick records trimmed from Redis before the tally read them"
            )
        if logs is not None:
            found.extend(error_lines(logs.events))
        return found


def error_lines(events: list[dict[str, Any]]) -> list[str]:
    """Error and critical log lines, counted per service and event; an actor failure within
    2 s of its service's supervisor noting a dependency down or back (an outage it rode out)
    is counted apart."""
    outage_marks: dict[str, list[int]] = {}
    for event in events:
        if event.get("event") in ("supervisor.dependency_down", "supervisor.dependency_back"):
            outage_marks.setdefault(event["_service"], []).append(event["_ms"])
    counts: dict[tuple[str, str, str], int] = {}
    ridden: dict[str, int] = {}
    for event in events:
        if event.get("level") not in ("error", "critical"):
            continue
        service = event["_service"]
        if event.get("event") == "actor.failed" and any(
            abs(mark - event["_ms"]) <= 2_000 for mark in outage_marks.get(service, ())
        ):
            ridden[service] = ridden.get(service, 0) + 1
            continue
        key = (service, str(event.get("level")), str(event.get("event")))
        counts[key] = counts.get(key, 0) + 1
    found = [
        f"{service}: {count} {level} log line(s) {name!r}"
        for (service, level, name), count in sorted(counts.items())
    ]
    if ridden:
        found.append(
            "actor failures ridden out as dependency outages (expected): "
            + ", ".join(f"{service} {count}" for service, count in sorted(ridden.items()))
        )
    return found


def result_json(result: SoakResult, options: SoakOptions) -> dict[str, Any]:
    """The result as JSON-ready data."""
    import msgspec

    return {
        "options": {
            "days": [str(day) for day in options.days],
            "symbols": options.symbols,
            "speed": options.speed,
            "faults": sorted(kind.value for kind in options.faults),
            "seed": options.seed,
            "targetPct": options.target_pct,
            "strictGaps": options.strict_gaps,
        },
        "passed": result.passed,
        "days": [row.as_dict() for row in result.rows],
        "gate": msgspec.to_builtins(result.gate) if result.gate is not None else None,
        "problems": result.problems,
        "workdir": str(result.workdir) if result.workdir else None,
    }
