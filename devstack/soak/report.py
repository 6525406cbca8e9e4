"""A soak's result: one row per day, the promotion gate, and the verdict; as Markdown and JSON.

A day falls short when its parity or its completeness (ticks, Redis bars, Kafka bars) is below
the target, when a trade the source sent is neither in Kafka nor inside a feed gap ingest
reported, or when a service was left down. Minutes inside a reported gap stay incomplete
until the gap is backfilled and count against the day (``strict_gaps``, the default); without
it the day's completeness is judged outside them (they are still counted and shown).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from devstack.soak.faults import FaultRecord
from services.mirror.completeness import CompletenessSection
from services.mirror.report import Gate


@dataclass
class DayRow:
    """The figures of one soak day."""

    day: str
    source_day: str
    source: int = 0
    """Trades the simulator sent for the day (from the files)."""
    ledger: int = 0
    """Trades ingest published (the source ledger)."""
    redis: int = 0
    """Unique trades of the day in the Redis tick streams."""
    kafka: int = 0
    """Unique trades of the day in the Kafka tick topics."""
    missing: int = 0
    """Source trades Kafka lacks."""
    missing_in_gap: int = 0
    lost_outside_gap: int = 0
    extra: int = 0
    """Unique trades in Kafka the files lack (the good trades of malformed rounds)."""
    duplicates: int = 0
    """Copies of a trade in Kafka beyond the first (consumers drop them by identity)."""
    bar_duplicates: int = 0
    """Copies of a bar in the Kafka bars topics beyond the first (the reconciler's)."""
    dead_letters: int = 0
    parity_pct: float | None = None
    ticks_pct: float | None = None
    redis_pct: float | None = None
    kafka_pct: float | None = None
    outside_gap_pct: dict[str, float | None] = field(default_factory=dict)
    """Completeness of the minutes outside reported gaps: ticks, redis, kafka."""
    vendor_pct: float | None = None
    minutes: int = 0
    gap_minutes: int = 0
    gaps: int = 0
    faults: list[FaultRecord] = field(default_factory=list)
    unexplained: list[str] = field(default_factory=list)
    services_down: list[str] = field(default_factory=list)
    exited_on_their_own: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0
    load_max: float = 0.0
    """The machine's highest 1-minute load average seen during the day."""

    @property
    def passed(self) -> bool:
        """True when the day is at the target (``judge`` fills ``reasons``)."""
        return not self.reasons

    @property
    def outside_gaps_worst(self) -> float | None:
        """The lowest completeness outside reported gaps (ticks, Redis bars, Kafka bars)."""
        values = [value for value in self.outside_gap_pct.values() if value is not None]
        return min(values) if values else None

    @property
    def verdict(self) -> str:
        """``ok``, ``ok outside gaps`` (minutes inside reported gaps stay incomplete) or
        ``SHORT``."""
        if not self.passed:
            return "SHORT"
        return "ok outside gaps" if self.gap_minutes else "ok"

    def judge(self, target_pct: float, *, strict_gaps: bool) -> None:
        """Fill ``reasons`` with every way the day falls short."""
        reasons = []
        if self.parity_pct is None or self.parity_pct < target_pct:
            reasons.append(f"parity {_pct(self.parity_pct)} below {target_pct:g} %")
        judged = (
            {"ticks": self.ticks_pct, "Redis bars": self.redis_pct, "Kafka bars": self.kafka_pct}
            if strict_gaps
            else {
                "ticks": self.outside_gap_pct.get("ticks"),
                "Redis bars": self.outside_gap_pct.get("redis"),
                "Kafka bars": self.outside_gap_pct.get("kafka"),
            }
        )
        where = "" if strict_gaps else " outside reported gaps"
        for name, pct in judged.items():
            if pct is None or pct < target_pct:
                reasons.append(f"{name} completeness{where} {_pct(pct)} below {target_pct:g} %")
        if self.lost_outside_gap:
            reasons.append(f"{self.lost_outside_gap:,} source trades lost outside any gap")
        if self.services_down:
            reasons.append(f"left down: {', '.join(self.services_down)}")
        if self.exited_on_their_own:
            reasons.append(f"exited on their own: {', '.join(self.exited_on_their_own)}")
        failed = [record.label for record in self.faults if not record.ok]
        if failed:
            reasons.append(f"faults not injected: {', '.join(failed)}")
        for record in self.faults:
            reasons.extend(f"after {record.label}: {harm}" for harm in record.harm)
        self.reasons = reasons

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        out = asdict(self)
        out["faults"] = [record.as_dict() for record in self.faults]
        out["passed"] = self.passed
        return out


def fill_completeness(row: DayRow, section: CompletenessSection | None) -> None:
    """Copy the reconciler's completeness into ``row``, and judge the minutes outside gaps."""
    if section is None:
        return
    totals = section.totals
    row.ledger = totals.ledgerTrades
    row.kafka = totals.kafkaTrades
    row.duplicates = totals.duplicateTrades
    row.ticks_pct, row.redis_pct, row.kafka_pct = totals.ticksPct, totals.redisPct, totals.kafkaPct
    row.minutes = totals.minutes
    row.gap_minutes = totals.gapMinutes
    outside = totals.minutes - totals.gapMinutes
    complete = {
        "ticks": sum(symbol.ticksComplete for symbol in section.symbols),
        "redis": sum(symbol.redisComplete for symbol in section.symbols),
        "kafka": sum(symbol.kafkaComplete for symbol in section.symbols),
    }
    row.outside_gap_pct = {
        name: round(100.0 * count / outside, 4) if outside > 0 else None
        for name, count in complete.items()
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} %" if value < 99.995 else "100 %"


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}" if value < 99.995 else "100"


def _fault_cell(record: FaultRecord) -> str:
    notes = list(record.details.get("gapNotes", []))
    if record.kind == "malformed":
        notes.append(f"{record.details.get('deadLetters', 0)} DL")
    if "restartS" in record.details:
        notes.append(f"up in {record.details['restartS']:.1f} s")
    if "catchUpS" in record.details:
        notes.append(f"caught up {record.details['catchUpS']:.0f} s")
    if "downS" in record.details:
        notes.append(f"down {record.details['downS']:.1f} s")
    notes.extend(record.harm)
    if not record.ok:
        notes.append("NOT INJECTED")
    return record.label + (f" ({'; '.join(notes)})" if notes else "")


HEADER = (
    "| day | source | ledger | Redis | Kafka | missing (in gap) | dup trades/bars | DL "
    "| parity % | ticks % "
    "| Redis bars % | Kafka bars % | vendor % | gap min | outside gaps % | faults | verdict |"
)


def markdown_row(row: DayRow) -> str:
    """The day's row of the table."""
    source = row.day if row.source_day == row.day else f"{row.day} ({row.source_day})"
    faults = "; ".join(_fault_cell(record) for record in row.faults) or "none"
    return (
        f"| {source} | {row.source:,} | {row.ledger:,} | {row.redis:,} | {row.kafka:,} "
        f"| {row.missing:,} ({row.missing_in_gap:,}) | {row.duplicates:,}/{row.bar_duplicates:,} "
        f"| {row.dead_letters:,} "
        f"| {_cell(row.parity_pct)} | {_cell(row.ticks_pct)} | {_cell(row.redis_pct)} "
        f"| {_cell(row.kafka_pct)} | {_cell(row.vendor_pct)} | {row.gap_minutes:,} "
        f"| {_cell(row.outside_gaps_worst)} | {faults} | {row.verdict} |"
    )


def to_markdown(rows: list[DayRow], gate: Gate | None, problems: list[str]) -> str:
    """The table, the faults of each day, the days that fell short, the gate, problems."""
    lines = [HEADER, _separator()]
    lines += [markdown_row(row) for row in rows]
    lines.append("")
    lines.append("Faults and what they did:")
    for row in rows:
        lines.append(
            f"- {row.day}: {row.seconds:.0f} s, {row.gaps} feed gap(s), machine load up to "
            f"{row.load_max:.1f} (1-min average, 2 cores)"
        )
        for record in row.faults:
            lines.append(f"- {row.day} {record.summary()}")
        for note in row.unexplained:
            lines.append(f"- {row.day} {note}")
    short = [row for row in rows if not row.passed]
    gapped = [row for row in rows if row.gap_minutes]
    lines.append("")
    if short:
        lines.append("Days short of the target:")
        for row in short:
            lines.append(f"- {row.day}: " + "; ".join(row.reasons))
    elif gapped:
        lines.append("Every day at the target outside reported feed gaps.")
    else:
        lines.append("Every day at the target.")
    if gapped:
        lines.append("")
        lines.append("Minutes inside reported feed gaps (incomplete until backfilled):")
        for row in gapped:
            lines.append(
                f"- {row.day}: {row.gap_minutes:,} of {row.minutes:,} symbol-minutes, "
                f"{row.missing_in_gap:,} source trades lost inside the gaps; completeness "
                f"{_pct(row.ticks_pct)} (ticks), {_pct(row.redis_pct)} (Redis bars), "
                f"{_pct(row.kafka_pct)} (Kafka bars) with them, {_pct(row.outside_gaps_worst)} "
                "at worst without them"
            )
    lines.append("")
    if gate is not None:
        lines.append(f"Promotion gate: {'READY' if gate.ready else 'NOT READY'}")
        lines.extend(f"- {reason}" for reason in gate.reasons)
    else:
        lines.append("Promotion gate: not evaluated")
    if problems:
        lines.append("")
        lines.append("Problems seen:")
        lines.extend(f"- {problem}" for problem in problems)
    return "\n".join(lines)


def _separator() -> str:
    return "|" + "---|" * (HEADER.count("|") - 1)
