"""The promotion gate: N consecutive trading days, each at the target in parity and in
completeness against the source.

Each day's report leaves a ``DaySummary`` (``libs.common.schemas``: the dashboard reads it too)
in one Redis hash (``GateStore``), with the gate's verdict at that day;
``evaluate_gate`` reads the window ending at a day and says whether Kafka may become the
source of truth, and why not.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, timedelta

import msgspec
import redis.asyncio as aioredis

from libs.common.market.calendar import trading_days_back
from libs.common.names import PARITY_DAYS, Keys
from libs.common.schemas import ENCODER, DaySummary
from services.mirror.report import Gate, GateDay


class GateStore:
    """The day summaries the gate reads, in one Redis hash (field = day)."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.key = keys.state(PARITY_DAYS)

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
    """Promotion readiness at ``day``: the last ``days`` trading days each at ``target_pct`` in
    parity and in completeness.

    Trading days come from the exchange calendar (``libs.common.market.calendar``), never from
    missing data: a holiday is skipped, and a trading day without a report, or whose report
    found nothing to compare, fails. The window is consecutive: one failing day anywhere in
    it means not ready.
    """
    window: list[GateDay] = []
    for trading_day in trading_days_back(day, days):
        if trading_day < day - timedelta(days=lookback_days):
            continue
        name = trading_day.isoformat()
        summary = summaries.get(name)
        if summary is None:
            window.append(GateDay(name, None, 0, False, "no report"))
            continue
        pct = summary.parityPct
        completeness = summary.completenessPct
        notes = []
        if summary.compared == 0:
            notes.append("no bars on either path on a trading day")
        elif pct is None or pct < target_pct:
            notes.append(f"parity below {target_pct:g} %")
        if completeness is None:
            if summary.compared:
                notes.append("completeness against the source not judged")
        elif completeness < target_pct:
            notes.append(f"completeness {completeness:.3f} % below {target_pct:g} %")
        window.append(
            GateDay(name, pct, summary.compared, not notes, "; ".join(notes), completeness)
        )
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
            f"each at ≥ {target_pct:g} % parity and completeness against the source: Kafka "
            "may become the source of truth"
        )
    for entry in window:
        if entry.passed:
            continue
        if entry.note == "no report":
            reasons.append(f"{entry.day}: no parity report (the reconciler did not run that day)")
        else:
            reasons.append(f"{entry.day}: {entry.note} ({entry.compared:,} symbol-minutes)")
    if len(window) < days:
        reasons.append(
            f"only {len(window)} trading days in the last {lookback_days} days; {days} needed"
        )
    return Gate(
        ready=ready,
        days=days,
        targetPct=target_pct,
        passing=passing,
        window=window,
        reasons=reasons,
    )
