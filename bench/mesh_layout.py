"""The tick-topic layout comparison of ``bench_mesh.py`` (scenario (e)): the synthetic market
of (b) once more with the other layout of the ticks on Kafka (``TICKMESH_TOPIC_MODE``), on a
fresh stack, set against (b)'s own run.

With a topic per symbol every record a mirror batch carries is a partition of its own in the
produce request, and the shadow builder's fetches list every symbol's partition; with one
topic keyed by symbol a batch is one partition's records. The embedded broker pays per
partition of a request about the same whatever it holds, so the layout decides what the
broker costs at a thousand symbols, and with it the latency to Kafka.
"""

from __future__ import annotations

from typing import Any

from mesh_gauge import GAUGE_HEADER, gauge_cell
from mesh_linger import ms_cell
from summary import LIKE_FOR_LIKE, row

_LABELS = {"single": "one topic", "per-symbol": "a topic per symbol"}


def layout_run(mode: str, result: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run, from scenario (b)'s results."""
    if result.get("error"):
        return {"topicMode": mode, "error": result["error"], "notes": result.get("notes", [])}
    processes = result.get("processes") or {}
    latency = result.get("latencyMs") or {}
    batches = result.get("mirrorBatches") or {}
    return {
        "topicMode": mode,
        "achievedTicksPerS": result.get("achievedTicksPerS"),
        "latencyMs": {
            key: latency.get(key) for key in ("tickToRedis", "tickToKafka", "tickToBarKafka")
        },
        "brokerCpuSeconds": round(processes.get("tansu", {}).get("cpuSeconds", 0.0), 2),
        "mirrorCpuSeconds": round(processes.get("mirror", {}).get("cpuSeconds", 0.0), 2),
        "shadowCpuSeconds": round(processes.get("bars-shadow", {}).get("cpuSeconds", 0.0), 2),
        "recordsPerBatch": round(batches["records"] / batches["batches"], 1)
        if batches.get("batches")
        else None,
        "tradesNotAcknowledged": result.get("tradesNotAcknowledged"),
        "machineGauge": result.get("machineGauge"),
        "notes": result.get("notes", []),
    }


def render_layout(layout: dict[str, Any]) -> list[str]:
    """Scenario (e) as Markdown lines."""
    runs = layout.get("runs") or []
    lines = [
        f"**(e) Tick topics**: the market of (b) ({layout.get('symbols')} symbols, "
        f"{layout.get('offeredRate'):,} trades/s offered) with each layout of the ticks on "
        f"Kafka, each on a fresh stack ({layout.get('measureSeconds')} s measured).",
        "",
        "| ticks on Kafka | ticks/s | tick → Redis p50 / p99 ms | tick → Kafka p50 / p99 ms "
        "| tick → shadow bar p99 ms | records a mirror batch | broker CPU s | mirror CPU s "
        f"| shadow CPU s | {GAUGE_HEADER} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        label = _LABELS.get(run["topicMode"], run["topicMode"])
        if run.get("error"):
            lines.append(f"| {label} | {run['error']} | | | | | | | | |")
            continue
        redis, kafka = run["latencyMs"]["tickToRedis"], run["latencyMs"]["tickToKafka"]
        bar = run["latencyMs"]["tickToBarKafka"]
        lines.append(
            f"| {label} | {run['achievedTicksPerS'] or 0:,} "
            f"| {ms_cell(redis, 'p50')} / {ms_cell(redis, 'p99')} "
            f"| {ms_cell(kafka, 'p50')} / {ms_cell(kafka, 'p99')} | {ms_cell(bar, 'p99')} "
            f"| {run['recordsPerBatch'] or '-'} | {run['brokerCpuSeconds']:.1f} "
            f"| {run['mirrorCpuSeconds']:.1f} | {run['shadowCpuSeconds']:.1f} "
            f"| {gauge_cell(run)} |"
        )
    for run in runs:
        label = _LABELS.get(run["topicMode"], run["topicMode"])
        lines += [f"- {label}: {note}" for note in run.get("notes", [])]
    return [*lines, ""]


def layout_summary_rows(layout: dict[str, Any]) -> list[dict[str, object]]:
    """The comparison's rows for ``scripts/bench.sh``'s table: one topic against a topic per
    symbol, p99 tick → Kafka and the broker's CPU."""
    runs = {run["topicMode"]: run for run in layout.get("runs") or [] if not run.get("error")}
    single, per_symbol = runs.get("single"), runs.get("per-symbol")
    if single is None or per_symbol is None:
        return []
    rows = []
    base, one = per_symbol["latencyMs"].get("tickToKafka"), single["latencyMs"].get("tickToKafka")
    if base and one:
        rows.append(
            row(
                "bench_mesh",
                f"{layout['symbols']} symbols at {layout['offeredRate']:,} ticks/s, ticks in one "
                "topic: p99 tick → Kafka",
                f"{one['p99']:,.1f} ms",
                f"a topic per symbol: {base['p99']:,.1f} ms",
                one["p99"] / base["p99"] if base["p99"] else None,
                LIKE_FOR_LIKE + f" (same feed; p50 {one['p50']:,.1f} vs {base['p50']:,.1f} ms)",
            )
        )
    rows.append(
        row(
            "bench_mesh",
            "ticks in one topic: broker CPU s",
            f"{single['brokerCpuSeconds']:.1f}",
            f"a topic per symbol: {per_symbol['brokerCpuSeconds']:.1f}",
            single["brokerCpuSeconds"] / per_symbol["brokerCpuSeconds"]
            if per_symbol["brokerCpuSeconds"]
            else None,
            LIKE_FOR_LIKE + " (same feed and window)",
        )
    )
    return rows
