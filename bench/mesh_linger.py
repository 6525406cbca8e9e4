"""The linger comparison of ``bench_mesh.py`` (scenario (d)): what ``INGEST_LINGER_MS`` costs
in latency and saves in work.

Ingest publishes each frame's records in one Redis round trip; with ``INGEST_LINGER_MS`` a
round trip may wait that long for more frames, so fewer, larger round trips carry the same
trades. The comparison runs the synthetic market of scenario (b) twice on fresh stacks, with
the linger at 0 and at the value asked for, at an offered rate the mesh keeps up with (a
saturated mesh's queueing would hide a few milliseconds), and reports each run's latency
from the trade's send stamp to the Redis publish and to Kafka's acknowledgement, the records
the trades travelled in and the CPU ingest and the services spent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mesh_gauge import GAUGE_HEADER, gauge_cell
from summary import LIKE_FOR_LIKE, row


def linger_run(linger_ms: int, result: dict[str, Any], services: Iterable[str]) -> dict[str, Any]:
    """The figures of one run of the comparison, from scenario (b)'s results (``services``:
    the processes whose CPU is summed as the services')."""
    if result.get("error"):
        return {"lingerMs": linger_ms, "error": result["error"], "notes": result.get("notes", [])}
    processes = result.get("processes") or {}
    wanted = set(services)
    services_cpu = sum(p["cpuSeconds"] for name, p in processes.items() if name in wanted)
    return {
        "lingerMs": linger_ms,
        "achievedTicksPerS": result.get("achievedTicksPerS"),
        "recordsPerS": result.get("recordsPerS"),
        "tradesPerRecord": result.get("tradesPerRecord"),
        "windowSeconds": result.get("windowSeconds"),
        "latencyMs": {
            key: (result.get("latencyMs") or {}).get(key) for key in ("tickToRedis", "tickToKafka")
        },
        "ingestCpuSeconds": round(processes.get("ingest", {}).get("cpuSeconds", 0.0), 2),
        "servicesCpuSeconds": round(services_cpu, 2),
        "tradesNotAcknowledged": result.get("tradesNotAcknowledged"),
        "machineGauge": result.get("machineGauge"),
        "notes": result.get("notes", []),
    }


def ms_cell(stats: dict[str, Any] | None, key: str) -> str:
    """A latency statistic in a table cell (ms, one decimal; ``-`` when there is none)."""
    return f"{stats[key]:,.1f}" if stats else "-"


def render_linger(linger: dict[str, Any]) -> list[str]:
    """Scenario (d) as Markdown lines."""
    runs = linger.get("runs") or []
    lines = [
        f"**(d) Ingest's linger**: {linger.get('symbols')} symbols offered "
        f"{linger.get('offeredRate'):,} trades/s, once with INGEST_LINGER_MS=0 and once with "
        f"{linger.get('lingerMs')}, each on a fresh stack ({linger.get('measureSeconds')} s "
        f"measured after a {linger.get('warmupSeconds')} s warm-up).",
        "",
        "| INGEST_LINGER_MS | ticks/s | records/s | trades/record | tick → Redis p50 / p99 ms "
        "| tick → Kafka p50 / p99 ms | ingest CPU s | services CPU s "
        f"| {GAUGE_HEADER} |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        if run.get("error"):
            lines.append(f"| {run['lingerMs']} | {run['error']} | | | | | | | |")
            continue
        redis, kafka = run["latencyMs"]["tickToRedis"], run["latencyMs"]["tickToKafka"]
        lines.append(
            f"| {run['lingerMs']} | {run['achievedTicksPerS'] or 0:,} "
            f"| {run['recordsPerS'] or 0:,} "
            f"| {run['tradesPerRecord']} | {ms_cell(redis, 'p50')} / {ms_cell(redis, 'p99')} "
            f"| {ms_cell(kafka, 'p50')} / {ms_cell(kafka, 'p99')} "
            f"| {run['ingestCpuSeconds']:.1f} "
            f"| {run['servicesCpuSeconds']:.1f} | {gauge_cell(run)} |"
        )
    for run in runs:
        lines += [f"- linger {run['lingerMs']} ms: {note}" for note in run.get("notes", [])]
    return [*lines, ""]


def linger_summary_rows(linger: dict[str, Any]) -> list[dict[str, object]]:
    """The comparison's rows for ``scripts/bench.sh``'s table: the linger's p99 against none."""
    runs = [run for run in linger.get("runs") or [] if not run.get("error")]
    if len(runs) != 2:
        return []
    none, some = runs
    rows = []
    for key, label in (("tickToRedis", "tick → Redis"), ("tickToKafka", "tick → Kafka")):
        base, lingered = none["latencyMs"].get(key), some["latencyMs"].get(key)
        if base and lingered:
            rows.append(
                row(
                    "bench_mesh",
                    f"INGEST_LINGER_MS={some['lingerMs']} at {linger['offeredRate']:,} ticks/s: "
                    f"p99 {label}",
                    f"{lingered['p99']:,.1f} ms",
                    f"linger 0: {base['p99']:,.1f} ms",
                    lingered["p99"] / base["p99"] if base["p99"] else None,
                    LIKE_FOR_LIKE + " (same feed; p50 "
                    f"{lingered['p50']:,.1f} vs {base['p50']:,.1f} ms)",
                )
            )
    rows.append(
        row(
            "bench_mesh",
            f"INGEST_LINGER_MS={some['lingerMs']}: ingest CPU s (trades/record "
            f"{some['tradesPerRecord']} vs {none['tradesPerRecord']})",
            f"{some['ingestCpuSeconds']:.1f}",
            f"linger 0: {none['ingestCpuSeconds']:.1f}",
            some["ingestCpuSeconds"] / none["ingestCpuSeconds"]
            if none["ingestCpuSeconds"]
            else None,
            LIKE_FOR_LIKE + " (same feed and window)",
        )
    )
    return rows
