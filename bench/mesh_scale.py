"""The scale-out comparison of ``bench_mesh.py --scale``: which setups run, and the report.

One setup is a number of bars shards (each a primary and a shadow process, split by CRC-32 of
the symbol), a number of mirror instances (split by CRC-32 of the channel) and ingest's record
mode (``INGEST_RECORDS``: ``frame``, one record per frame and symbol as the contract asks, or
``batch``, one record per symbol per Redis round trip). Every setup replays the same real day
on a fresh stack, one after another, so the rows compare like with like: the same trades,
the same machine, the same code; only the split (and, for ``batch``, the records the same
trades travel in) differs. The machine's load is recorded at each run's start and end, since
the rows do not run at the same moment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from mesh_gauge import GAUGE_HEADER, gauge_cell, gauge_summary_rows
from summary import LIKE_FOR_LIKE, row

Records = Literal["frame", "batch"]


@dataclass(frozen=True)
class Setup:
    """Bars shards, mirror instances, ingest's record mode."""

    bars_shards: int
    mirror_instances: int
    records: Records

    @property
    def label(self) -> str:
        """``bars x2, mirror x1, frame``."""
        return f"bars x{self.bars_shards}, mirror x{self.mirror_instances}, {self.records}"

    @property
    def slug(self) -> str:
        """A folder name: ``b2-m1-frame``."""
        return f"b{self.bars_shards}-m{self.mirror_instances}-{self.records}"


_SETUP = re.compile(r"(\d+)x(\d+):(frame|batch)")


def parse_setups(text: str) -> list[Setup]:
    """``BARSxMIRROR:RECORDS`` items, comma separated: ``1x1:frame,2x2:batch``."""
    setups = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        found = _SETUP.fullmatch(item)
        if found is None or int(found[1]) < 1 or int(found[2]) < 1:
            raise ValueError(f"setup {item!r}: expected BARSxMIRROR:frame|batch, e.g. 2x1:frame")
        records: Records = "batch" if found[3] == "batch" else "frame"
        setups.append(Setup(int(found[1]), int(found[2]), records))
    if not setups:
        raise ValueError("no setup given")
    return setups


DEFAULT_SETUPS = "1x1:frame,1x1:batch,2x1:frame,1x2:frame,2x2:frame,2x2:batch"
"""The baseline, each split alone, both together; ingest's two record modes at both ends."""

SERVICES = ("ingest", "bars", "bars-shadow", "mirror", "mirror-reconciler", "engine_bridge")
"""The services whose CPU the table shows (the simulator and the servers are in the JSON)."""

_INSTANCE = re.compile(r"-\d+of\d+$")


def service_of(process: str) -> str:
    """The service a process belongs to: ``bars-shadow-2of2`` -> ``bars-shadow``."""
    return _INSTANCE.sub("", process)


def cpu_by_service(processes: dict[str, dict[str, float]]) -> dict[str, list[float]]:
    """CPU seconds of each service's processes, in process-name order."""
    out: dict[str, list[float]] = {}
    for name in sorted(processes):
        out.setdefault(service_of(name), []).append(processes[name]["cpuSeconds"])
    return out


def _rate(to: dict[str, Any] | None) -> str:
    return f"{to['ticksPerS']:,}" if to else "-"


def _cpu(values: list[float] | None) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{sum(values):.1f} ({' + '.join(f'{v:.1f}' for v in values)})"


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def baseline(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run the others are compared with: one bars process, one mirror, one record per
    frame (the default mesh), else the first run with results."""
    done = [run for run in runs if run.get("to")]
    for run in done:
        if (run.get("barsShards"), run.get("mirrorInstances"), run.get("ingestRecords")) == (
            1,
            1,
            "frame",
        ):
            return run
    return done[0] if done else None


def _kafka_rate(run: dict[str, Any] | None) -> float | None:
    return ((run or {}).get("to", {}).get("kafka") or {}).get("ticksPerS")


def render_scale(results: dict[str, Any]) -> str:
    """The comparison as one Markdown table, with the runs' notes."""
    scale = results.get("scale") or {}
    runs: list[dict[str, Any]] = scale.get("runs", [])
    lines = [
        f"### bench_mesh --scale ({results.get('machine')})",
        "",
        f"The real day {scale.get('day')} ({','.join(scale.get('symbols', []))}) at speed 0, "
        "once per setup, each on a fresh stack. ticks/s from the simulator's first frame to the "
        "last tick record acknowledged by Kafka, and to the last bar closed on event time on "
        "each path (each symbol's last minute, which closes on ingest's idle mark, left out). "
        "CPU seconds over the same window, per service (a sum with its instances in "
        "brackets). `batch`: ingest publishes one record per symbol per Redis round trip, the "
        "same trades in fewer, larger records. Baseline: bars x1, mirror x1, frame (the default "
        "mesh). Bars counted are records, corrections included. Cores busy: the CPU of every "
        "process (services, simulator, redis-server, the broker, the bench) over the window. "
        "Machine gauge: CPU ms of a fixed single-core workload before, during and after the "
        "setup's run (`bench/mesh_gauge.py`; lower is faster): how fast the machine ran.",
        "",
        "| setup | trades/record | bars Redis / Kafka | ticks/s → Kafka | → bars, Redis "
        "| → bars, Kafka | vs baseline (Kafka) | CPU s ingest | bars | bars-shadow | mirror "
        "| mirror-reconciler | engine_bridge | services | cores busy | load average (start, end) "
        f"| {GAUGE_HEADER} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    base = _kafka_rate(baseline(runs))
    for run in runs:
        if run.get("skipped") or not run.get("to"):
            reason = run.get("skipped") or "; ".join(run.get("notes", [])) or "no result"
            lines.append(f"| {run.get('setup')} | skipped: {reason} |")
            continue
        to = run["to"]
        kafka = _kafka_rate(run)
        processes = run.get("processes") or {}
        cpu = cpu_by_service(processes)
        total = sum(sum(cpu.get(name, [])) for name in SERVICES)
        busy = sum(p["cpuPct"] for p in processes.values()) / 100
        load = run.get("loadAverage") or ["-", "-"]
        lines.append(
            f"| {run['setup']} | {run.get('tradesPerRecord')} | "
            f"{run.get('barsRedis')} / {run.get('barsKafka')} | {_rate(to.get('kafka'))} | "
            f"{_rate(to.get('barRedisEventTime'))} | {_rate(to.get('barKafkaEventTime'))} | "
            f"{_ratio(kafka, base)} | "
            + " | ".join(_cpu(cpu.get(name)) for name in SERVICES)
            + f" | {total:.1f} | {busy:.2f} | {load[0]}, {load[1]} | {gauge_cell(run)} |"
        )
    notes = [
        f"- {run.get('setup')}: {note}"
        for run in runs
        for note in run.get("notes", [])
        if run.get("to")
    ]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def scale_summary_rows(results: dict[str, Any]) -> list[dict[str, object]]:
    """One headline row per setup for ``scripts/bench.sh``'s table: ticks/s to Kafka against
    the baseline's (the same trades; ``batch`` rows carry them in fewer records)."""
    runs = [run for run in (results.get("scale") or {}).get("runs", []) if run.get("to")]
    first = baseline(runs)
    if first is None:
        return []
    base = _kafka_rate(first)
    rows = []
    for run in runs:
        kafka = _kafka_rate(run)
        if run is first or not kafka:
            continue
        basis = LIKE_FOR_LIKE + " (same day, same trades, runs one after another)"
        if run.get("ingestRecords") != first.get("ingestRecords"):
            basis = (
                f"same trades; {run.get('tradesPerRecord')} vs {first.get('tradesPerRecord')} "
                "trades/record"
            )
        rows.append(
            row(
                "bench_mesh --scale",
                f"real day, ticks/s to Kafka, {run['setup']}",
                f"{kafka:,}",
                f"{first['setup']}: {base:,}" if base else "-",
                kafka / base if base else None,
                basis,
            )
        )
    for run in runs:  # the real-day target, judged on the opt-in layout too
        slowest = _slowest_rate(run)
        if run.get("ingestRecords") == "batch" and slowest:
            rows.append(
                row(
                    "bench_mesh --scale",
                    f"real day, ticks/s to the slowest of Kafka and the bars closed on event "
                    f"time, {run['setup']} ({'met' if slowest >= 100_000 else 'not met'})",
                    f"{slowest:,}",
                    "target 100,000",
                    basis="target, not a ratio (INGEST_RECORDS=batch, an opt-in layout)",
                )
            )
    return rows + gauge_summary_rows(results, "bench_mesh --scale")


def _slowest_rate(run: dict[str, Any]) -> float | None:
    """ticks/s to the slowest of Kafka and the bars closed on event time on each path."""
    to = run.get("to") or {}
    keys = ("kafka", "barRedisEventTime", "barKafkaEventTime")
    rates = [rate for key in keys if (rate := (to.get(key) or {}).get("ticksPerS"))]
    return min(rates) if len(rates) == len(keys) else None
