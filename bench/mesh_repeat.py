"""Scenario (b) of ``bench_mesh.py`` run several times, each on a fresh stack (``--repeat``).

On two busy cores one run's p99 is one draw: the same code gave p99 tick → Kafka from 97 to
321 ms in a row of runs, and tick → bar from 1,098 to 1,589 ms. So the targets are judged on
the median of the runs' p99s, each run's figure beside it. The run whose p99 tick → Kafka is
the median (the lower one of an even count) stands for the others in the tables; the
ceilings, measured in the first run only, go with it.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from mesh_gauge import GAUGE_HEADER, gauge_cell

REPEATED = ("tickToRedis", "tickToKafka", "tickToBarRedis", "tickToBarKafka")
"""The latencies whose p99 every run reports."""
LABELS = {
    "tickToRedis": "tick → Redis",
    "tickToKafka": "tick → Kafka",
    "tickToBarRedis": "tick → bar, Redis",
    "tickToBarKafka": "tick → bar, Kafka",
}


def _p99(run: dict[str, Any], key: str) -> float | None:
    found = (run.get("latencyMs") or {}).get(key)
    return float(found["p99"]) if found else None


def combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run that stands for ``runs`` (see the module docstring), with ``repeats``: each
    run's number, p99s (ms), CPU seconds of all its processes, or its error."""
    if len(runs) == 1:
        return runs[0]
    good = [(number, run) for number, run in enumerate(runs, 1) if not run.get("error")]
    if not good:
        return runs[0]
    ranked = sorted(good, key=lambda item: _p99(item[1], "tickToKafka") or math.inf)
    number, shown = ranked[(len(ranked) - 1) // 2]
    chosen = dict(shown)
    if "ceilings" not in chosen and runs[0].get("ceilings"):
        chosen["ceilings"] = runs[0]["ceilings"]
    repeats = []
    for index, run in enumerate(runs, 1):
        if run.get("error"):
            repeats.append({"run": index, "error": run["error"]})
            continue
        processes = run.get("processes") or {}
        repeats.append(
            {
                "run": index,
                "p99Ms": {key: _p99(run, key) for key in REPEATED},
                "cpuSeconds": round(sum(p["cpuSeconds"] for p in processes.values()), 1),
                "machineGauge": run.get("machineGauge"),
            }
        )
    chosen["repeats"] = repeats
    chosen["repeatShown"] = number
    return chosen


def median_p99(syn: dict[str, Any], key: str) -> tuple[float, list[float]] | None:
    """The median of the runs' p99 of ``key`` and the runs' values (None: a single run)."""
    values = [
        found
        for run in syn.get("repeats") or ()
        if (found := (run.get("p99Ms") or {}).get(key)) is not None
    ]
    if len(values) < 2:
        return None
    return statistics.median(values), values


def render_repeats(syn: dict[str, Any]) -> list[str]:
    """The runs' p99s as a table (nothing for a single run)."""
    repeats = syn.get("repeats")
    if not repeats:
        return []
    lines = [
        f"Scenario (b) ran {len(repeats)} times, each on a fresh stack; the tables above are "
        f"run {syn.get('repeatShown')}'s, the median by p99 tick → Kafka. p99 of each run, ms:",
        "",
        "| run | "
        + " | ".join(LABELS[key] for key in REPEATED)
        + f" | CPU s, all processes | {GAUGE_HEADER} |",
        "|---:|" + "---:|" * (len(REPEATED) + 2),
    ]
    for run in repeats:
        if run.get("error"):
            lines.append(f"| {run['run']} | {run['error']} |" + " |" * (len(REPEATED) + 1))
            continue
        cells = [
            "-" if (value := run["p99Ms"].get(key)) is None else f"{value:,.1f}" for key in REPEATED
        ]
        lines.append(
            f"| {run['run']} | "
            + " | ".join(cells)
            + f" | {run['cpuSeconds']} | {gauge_cell(run)} |"
        )
    medians = [median_p99(syn, key) for key in REPEATED]
    lines.append(
        "| median | "
        + " | ".join("-" if found is None else f"{found[0]:,.1f}" for found in medians)
        + " | | |"
    )
    return [*lines, ""]
