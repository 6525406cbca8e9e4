"""One table for every benchmark: rows the benchmarks append, rendered by ``scripts/bench.sh``.

A benchmark given ``--summary PATH`` appends its headline figures to ``PATH`` as JSON lines
(``add_rows``); ``python bench/summary.py PATH`` prints them as one Markdown table. Each row
says what was measured, against what, the ratio, and on what basis: ``like for like`` when
both sides did the same work on the same records (same trades per record), otherwise a label
saying how they differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LIKE_FOR_LIKE = "like for like"


def row(
    bench: str,
    figure: str,
    result: str,
    against: str = "",
    ratio: float | None = None,
    basis: str = "",
) -> dict[str, object]:
    """One line of the table (``ratio`` is result over ``against``, when there is one)."""
    return {
        "bench": bench,
        "figure": figure,
        "result": result,
        "against": against,
        "ratio": None if ratio is None else round(ratio, 2),
        "basis": basis,
    }


def add_rows(path: str | Path | None, rows: list[dict[str, object]]) -> None:
    """Append ``rows`` to the summary file (nothing when ``path`` is None)."""
    if path is None:
        return
    with Path(path).open("a") as out:
        for item in rows:
            out.write(json.dumps(item) + "\n")


def load(path: Path) -> list[dict[str, object]]:
    """The rows of a summary file (an unreadable line is reported as a row, not skipped)."""
    rows: list[dict[str, object]] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            rows.append(row("?", f"line {number} unreadable", line[:60]))
    return rows


def render(rows: list[dict[str, object]]) -> str:
    """The Markdown table."""
    lines = [
        "| bench | figure | result | against | ratio | basis |",
        "|---|---|---:|---:|---:|---|",
    ]
    for item in rows:
        ratio = item.get("ratio")
        shown = f"{ratio:.2f}x" if isinstance(ratio, (int, float)) else ""
        lines.append(
            f"| {item.get('bench', '')} | {item.get('figure', '')} | {item.get('result', '')} "
            f"| {item.get('against', '')} | {shown} | {item.get('basis', '')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the table of a summary file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    print(render(load(args.path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
