"""The parity report: its JSON shape and its Markdown rendering (summary first, worst first).

``build_report`` assembles a ``DayReport`` from the per-symbol comparisons; ``to_markdown``
renders it for people, ``to_json`` for machines (the same content, every listing capped at
``max_listed`` entries per kind with the totals always complete).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from msgspec import Struct

from libs.common.market.sessions import ts_et
from services.mirror.compare import (
    Duplicate,
    MinuteRef,
    Mismatch,
    SymbolComparison,
    SymbolParity,
)
from services.mirror.completeness import CompletenessSection


class Totals(Struct):
    """Counts over every symbol of the day."""

    matched: int = 0
    mismatched: int = 0
    missingKafka: int = 0
    missingRedis: int = 0
    duplicates: int = 0
    corrections: int = 0
    pending: int = 0
    compared: int = 0
    symbols: int = 0
    parityPct: float | None = None
    conflicts: int = 0
    revisionsBackwards: int = 0
    notReceived: int = 0


class GateDay(Struct, frozen=True):
    """One trading day of the promotion window."""

    day: str
    parityPct: float | None
    compared: int
    passed: bool
    note: str
    completenessPct: float | None = None


class Gate(Struct, frozen=True):
    """The promotion gate: N consecutive trading days, each at or above the target."""

    ready: bool
    days: int
    targetPct: float
    passing: int
    window: list[GateDay]
    reasons: list[str]


class Section(Struct):
    """One comparison (Redis vs Kafka, or ours vs the vendor's) with its listings."""

    tolerance: str
    totals: Totals
    symbols: list[SymbolParity]
    mismatches: list[Mismatch]
    missingKafka: list[MinuteRef]
    missingRedis: list[MinuteRef]
    duplicates: list[Duplicate]
    truncated: dict[str, int] = {}


class DayReport(Struct):
    """The parity report of one New York trading day."""

    day: str
    generatedAtMs: int
    generatedAt: str
    targetPct: float
    minAgeS: float
    settledBeforeMs: int | None
    parity: Section
    gate: Gate | None = None
    completeness: CompletenessSection | None = None
    vendor: Section | None = None
    sources: dict[str, object] = {}


def _sort_key(parity: SymbolParity) -> tuple[float, int, str]:
    problems = parity.mismatched + parity.missingKafka + parity.missingRedis + parity.duplicates
    pct = parity.parityPct if parity.parityPct is not None else 101.0
    return (pct, -problems, parity.symbol)


def build_section(
    comparisons: Sequence[SymbolComparison], tolerance: str, max_listed: int
) -> Section:
    """Totals over the symbols, symbols worst first, listings capped at ``max_listed``."""
    totals = Totals()
    for comparison in comparisons:
        parity = comparison.parity
        totals.matched += parity.matched
        totals.mismatched += parity.mismatched
        totals.missingKafka += parity.missingKafka
        totals.missingRedis += parity.missingRedis
        totals.duplicates += parity.duplicates
        totals.corrections += parity.corrections
        totals.pending += parity.pending
        totals.conflicts += parity.conflicts
        totals.revisionsBackwards += parity.revisionsBackwards
        totals.notReceived += parity.notReceived
    totals.compared = totals.matched + totals.mismatched + totals.missingKafka + totals.missingRedis
    totals.symbols = len(comparisons)
    totals.parityPct = (
        round(100.0 * totals.matched / totals.compared, 4) if totals.compared else None
    )
    ordered = sorted(comparisons, key=lambda comparison: _sort_key(comparison.parity))
    listings: dict[str, list[object]] = {
        "mismatches": [],
        "missingKafka": [],
        "missingRedis": [],
        "duplicates": [],
    }
    truncated: dict[str, int] = {}
    for kind, items in listings.items():
        total = 0
        for comparison in ordered:
            found = getattr(comparison, kind)
            total += len(found)
            room = max_listed - len(items)
            items.extend(found[:room] if room > 0 else [])
        if total > len(items):
            truncated[kind] = total
    return Section(
        tolerance=tolerance,
        totals=totals,
        symbols=[c.parity for c in ordered],
        mismatches=listings["mismatches"],  # type: ignore[arg-type]
        missingKafka=listings["missingKafka"],  # type: ignore[arg-type]
        missingRedis=listings["missingRedis"],  # type: ignore[arg-type]
        duplicates=listings["duplicates"],  # type: ignore[arg-type]
        truncated=truncated,
    )


def to_json(report: DayReport) -> bytes:
    """The report as indented JSON."""
    return msgspec.json.format(msgspec.json.encode(report), indent=2)


def report_dict(report: DayReport) -> dict[str, object]:
    """The report as plain data (for the Kafka record)."""
    data = msgspec.to_builtins(report)
    assert isinstance(data, dict)
    return data


# -- Markdown ----------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value == 100.0:
        return "100 %"
    return f"{value:.3f} %"


def _num(value: float) -> str:
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _diff(value: float) -> str:
    text = _num(abs(value))
    return f"+{text}" if value > 0 else f"-{text}" if value < 0 else "0"


def _minute(ts: str) -> str:
    return ts[11:16] if len(ts) >= 16 else ts


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _section_lines(
    section: Section, *, left: str, right: str, level: str = "##", duplicates: bool = True
) -> list[str]:
    lines: list[str] = []
    totals = section.totals
    headers = [
        "symbol",
        "parity",
        "matched",
        "mismatched",
        f"missing in {right}",
        f"missing in {left}",
        "duplicates",
        "not yet compared",
    ]
    symbol_rows = [
        [
            p.symbol,
            _pct(p.parityPct),
            _num(p.matched),
            _num(p.mismatched),
            _num(p.missingKafka),
            _num(p.missingRedis),
            _num(p.duplicates),
            _num(p.pending),
        ]
        for p in section.symbols
    ]
    if not duplicates:
        del headers[6]
        for row in symbol_rows:
            del row[6]
    lines.append(f"{level} Symbols, worst first")
    lines.append("")
    lines += _table(headers, symbol_rows)
    lines.append("")

    def heading(title: str, kind: str, listed: int) -> None:
        total = section.truncated.get(kind, listed)
        more = f" (first {listed} of {total:,} listed)" if total > listed else ""
        lines.append(f"{level} {title}: {total:,}{more}")
        lines.append("")

    if totals.mismatched:
        heading("Mismatches", "mismatches", len(section.mismatches))
        rows = []
        for mismatch in section.mismatches:
            for diff in mismatch.fields:
                rows.append(
                    (
                        mismatch.symbol,
                        _minute(mismatch.tsET),
                        mismatch.barId,
                        diff.field,
                        _num(diff.redis),
                        _num(diff.other),
                        _diff(diff.diff),
                    )
                )
        lines += _table(
            ["symbol", "minute (ET)", "barId", "field", left, right, f"{right} − {left}"], rows
        )
        lines.append("")
    for kind, title in (
        ("missingKafka", f"Missing in {right}"),
        ("missingRedis", f"Missing in {left}"),
    ):
        refs: list[MinuteRef] = getattr(section, kind)
        if getattr(totals, kind):
            heading(title, kind, len(refs))
            lines += _table(
                ["symbol", "minute (ET)", "barId"],
                [(ref.symbol, _minute(ref.tsET), ref.barId) for ref in refs],
            )
            lines.append("")
    if totals.duplicates:
        heading(f"Duplicates in {right}", "duplicates", len(section.duplicates))
        lines += _table(
            ["symbol", "minute (ET)", "revision", "copies"],
            [(d.symbol, _minute(d.tsET), d.revision, d.copies) for d in section.duplicates],
        )
        lines.append("")
    return lines


def to_markdown(report: DayReport) -> str:
    """The report for people: summary and gate first, then symbols worst first, then every
    mismatch (up to the listing limit), missing bar and duplicate."""
    section = report.parity
    totals = section.totals
    lines = [f"# Shadow-mode parity — {report.day}", ""]
    verdict = (
        "no bars to compare"
        if totals.parityPct is None
        else ("at target" if totals.parityPct >= report.targetPct else "BELOW target")
    )
    lines.append(
        f"**Parity {_pct(totals.parityPct)}** (target {report.targetPct:g} %, {verdict}): "
        f"{totals.matched:,} of {totals.compared:,} symbol-minutes match across "
        f"{totals.symbols} symbol{'s' if totals.symbols != 1 else ''}; "
        f"tolerance {section.tolerance}."
    )
    lines.append("")
    if report.gate is not None:
        gate = report.gate
        state = "READY" if gate.ready else "NOT READY"
        lines.append(
            f"**Promotion gate: {state}** — {gate.passing} of {gate.days} consecutive "
            f"trading days at ≥ {gate.targetPct:g} %."
        )
        lines.append("")
    lines += _table(
        ["outcome", "symbol-minutes"],
        [
            ("matched", _num(totals.matched)),
            ("mismatched", _num(totals.mismatched)),
            ("missing in Kafka (Redis only)", _num(totals.missingKafka)),
            ("missing in Redis (Kafka only)", _num(totals.missingRedis)),
            ("duplicates in Kafka (extra copies)", _num(totals.duplicates)),
            ("corrected in Kafka (revisions > 0)", _num(totals.corrections)),
            ("copies of a revision that disagree (mismatched)", _num(totals.conflicts)),
            ("a revision older than one before it", _num(totals.revisionsBackwards)),
            (
                f"not yet compared (ended less than {report.minAgeS:g} s before the report)"
                if report.minAgeS
                else "not yet compared (no minimum age)",
                _num(totals.pending),
            ),
        ],
    )
    lines.append("")
    lines.append(
        f"Generated {report.generatedAt}"
        + (
            f"; bars ending after {ts_et(report.settledBeforeMs)} not compared yet"
            if report.settledBeforeMs is not None and totals.pending
            else ""
        )
        + "."
    )
    lines.append("")
    if report.gate is not None:
        gate = report.gate
        lines.append(f"## Promotion gate (last {gate.days} trading days)")
        lines.append("")
        lines += _table(
            ["day", "parity", "completeness", "symbol-minutes", "result"],
            [
                (
                    d.day,
                    _pct(d.parityPct),
                    _pct(d.completenessPct),
                    _num(d.compared),
                    ("pass" if d.passed else "FAIL") + (f" — {d.note}" if d.note else ""),
                )
                for d in gate.window
            ],
        )
        lines.append("")
        lines += [f"- {reason}" for reason in gate.reasons]
        lines.append("")
    if report.completeness is not None:
        lines += _completeness_lines(report.completeness)
    lines += _section_lines(section, left="Redis", right="Kafka")
    if report.vendor is not None:
        vendor = report.vendor
        vt = vendor.totals
        lines.append("## Vendor check: our Redis bars vs the vendor's minute aggregates")
        lines.append("")
        lines.append(
            f"**Agreement {_pct(vt.parityPct)}**: {vt.matched:,} of {vt.compared:,} "
            f"symbol-minutes; tolerance {vendor.tolerance}. Not part of the promotion gate."
            + (
                f" {vt.notReceived:,} of our bars are of minutes whose vendor aggregate never "
                "reached us (the feed was not read then): not compared."
                if vt.notReceived
                else ""
            )
        )
        lines.append("")
        lines += _section_lines(vendor, left="ours", right="vendor", level="###", duplicates=False)
    sources = report.sources
    if sources:
        lines.append("## Sources")
        lines.append("")
        lines += [f"- {name}: {value}" for name, value in sources.items()]
        lines.append("")
    return "\n".join(lines)


def _completeness_lines(section: CompletenessSection) -> list[str]:
    totals = section.totals
    lines = ["## Completeness against the source", ""]
    lines.append(
        f"**Ticks {_pct(totals.ticksPct)} · Redis bars {_pct(totals.redisPct)} · Kafka bars "
        f"{_pct(totals.kafkaPct)}** of {totals.minutes:,} symbol-minutes: the source ledger's "
        "trades in Kafka, and each path's bars equal to the bars rebuilt from them."
    )
    lines.append("")
    lines += _table(
        ["figure", "value"],
        [
            ("trades the feed gave (ledger)", _num(totals.ledgerTrades)),
            ("unique trades in Kafka", _num(totals.kafkaTrades)),
            ("missing in Kafka", _num(totals.missingTrades)),
            ("in Kafka, not in the ledger", _num(totals.extraTrades)),
            ("duplicate trades in Kafka", _num(totals.duplicateTrades)),
            ("symbol-minutes inside unfilled feed gaps", _num(totals.gapMinutes)),
            ("dead letters (apart from delivered)", _num(totals.deadLetters)),
        ],
    )
    lines.append("")
    lines += _table(
        ["symbol", "ticks", "Redis bars", "Kafka bars", "trades", "missing", "dupes", "in gaps"],
        [
            (
                c.symbol,
                _pct(c.ticksPct),
                _pct(c.redisPct),
                _pct(c.kafkaPct),
                _num(c.ledgerTrades),
                _num(c.missingTrades),
                _num(c.duplicateTrades),
                _num(c.gapMinutes),
            )
            for c in section.symbols
        ],
    )
    lines.append("")
    if section.gaps:
        lines.append(f"### Feed gaps: {len(section.gaps)}")
        lines.append("")
        lines += _table(
            ["cause", "from (ET)", "to (ET)", "status", "backfilled", "symbols"],
            [
                (
                    gap.cause,
                    ts_et(gap.startMs),
                    ts_et(gap.endMs) if gap.endMs else "open",
                    gap.status,
                    _num(gap.backfilled),
                    ",".join(gap.symbols[:8]),
                )
                for gap in section.gaps
            ],
        )
        lines.append("")
    if section.incomplete:
        more = (
            f" (first {len(section.incomplete)} of {section.truncated:,})"
            if section.truncated
            else ""
        )
        lines.append(f"### Incomplete symbol-minutes{more}")
        lines.append("")
        lines += _table(
            ["symbol", "minute (ET)", "barId", "why"],
            [(i.symbol, _minute(i.tsET), i.barId, i.what) for i in section.incomplete],
        )
        lines.append("")
    return lines
