"""What a soak runs and which faults it injects when: a seeded, reproducible schedule.

Every fault happens at a point of a day's feed time (New York time of day), drawn from the
regular session so that data flows around it. The faults of one day are spread over the
session, one per slot of equal length, in a shuffled order, so two faults of a day never land
on top of each other (the effect of each stays its own). A SIGKILL hits one service a day,
the services in turn; the broker pause and the Redis restart happen once a run, each on a
day of its own when there are several; drops, malformed rounds and bursts happen every day.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from pathlib import Path

from libs.common.market.sessions import ny_epoch_ms, ny_midnight_ms
from services.ingest.simulator.settings import ReplayDay

SERVICES = ("ingest", "bars", "bars-shadow", "engine_bridge", "mirror")
"""The services a soak kills, in this order by default (one a day)."""

DEFAULT_WEEK = (
    "2013-10-07",
    "2013-10-08",
    "2013-10-09",
    "2013-10-07:2013-10-10",
    "2013-10-08:2013-10-11",
)
"""Monday to Friday: the three days of the shared data, then two of them again."""


class FaultKind(StrEnum):
    """The faults a soak injects."""

    KILL = "kill"
    """SIGKILL a service, then start it again (the outer supervisor's restart)."""
    BROKER_PAUSE = "broker_pause"
    """SIGSTOP the Kafka broker, SIGCONT it later."""
    REDIS_RESTART = "redis_restart"
    """Stop redis-server (AOF on, so its data survives) and start it again on its port."""
    DROP = "drop"
    """The simulator cuts the WebSocket without a close frame."""
    MALFORMED = "malformed"
    """The simulator sends a round of malformed frames (dead letters expected)."""
    BURST = "burst"
    """The simulator replays several times faster for a few seconds."""


ONCE_A_RUN = (FaultKind.BROKER_PAUSE, FaultKind.REDIS_RESTART)
EVERY_DAY = (FaultKind.KILL, FaultKind.DROP, FaultKind.MALFORMED, FaultKind.BURST)


def parse_faults(text: str) -> frozenset[FaultKind]:
    """``all``, ``none`` or a comma list of fault kinds."""
    words = [word.strip() for word in text.split(",") if word.strip()]
    if words == ["all"]:
        return frozenset(FaultKind)
    if words in ([], ["none"]):
        return frozenset()
    try:
        return frozenset(FaultKind(word) for word in words)
    except ValueError:
        choices = ", ".join(kind.value for kind in FaultKind)
        raise ValueError(f"unknown fault in {text!r}: choose all, none or {choices}") from None


@dataclass
class SoakOptions:
    """Everything a soak run is told."""

    data_dir: Path
    days: list[ReplayDay]
    symbols: list[str]
    speed: float = 600.0
    faults: frozenset[FaultKind] = frozenset(FaultKind)
    seed: int = 7
    kill_order: tuple[str, ...] = SERVICES
    broker_pause_s: float = 20.0
    burst_factor: float = 5.0
    burst_seconds: float = 3.0
    malformed_rounds: int = 1
    day_pause_s: float = 3.0
    grace_ms: int = 1_000
    target_pct: float = 99.9
    strict_gaps: bool = True
    """Count minutes inside reported feed gaps against a day (without backfill they stay
    incomplete; by default a day is judged outside them, and they are listed)."""
    workdir: Path | None = None
    out: Path | None = None


@dataclass(frozen=True)
class PlannedFault:
    """One fault of the schedule."""

    day: int
    """Index of the day in the run."""
    kind: FaultKind
    at_ms: int
    """The feed time at which it fires (epoch ms of the as-of day)."""
    target: str = ""
    """The service of a kill."""


@dataclass
class DayPlan:
    """The faults of one day, in the order they fire."""

    index: int
    day: ReplayDay
    faults: list[PlannedFault] = field(default_factory=list)


def _window(day: date) -> tuple[int, int]:
    """Where faults may land: 09:45 to 15:45 New York time."""
    return ny_epoch_ms(day, 9, 45), ny_epoch_ms(day, 15, 45)


def plan_faults(options: SoakOptions) -> list[DayPlan]:
    """The schedule of a run: reproducible for a seed, days, kinds and kill order."""
    rng = random.Random(options.seed)
    count = len(options.days)
    once: dict[FaultKind, int] = {}
    spare = list(range(count))
    rng.shuffle(spare)
    for kind in ONCE_A_RUN:
        if kind in options.faults:
            once[kind] = spare.pop() if spare else rng.randrange(count)
    plans = []
    for index, day in enumerate(options.days):
        kinds: list[tuple[FaultKind, str]] = []
        for kind in EVERY_DAY:
            if kind not in options.faults:
                continue
            if kind is FaultKind.KILL:
                if options.kill_order:
                    kinds.append((kind, options.kill_order[index % len(options.kill_order)]))
            else:
                kinds.append((kind, ""))
        kinds.extend((kind, "") for kind, on in once.items() if on == index)
        rng.shuffle(kinds)
        start, end = _window(day.as_of)
        slot = (end - start) / max(1, len(kinds))
        faults = []
        for position, (kind, target) in enumerate(kinds):
            low = start + slot * (position + 0.2)
            at = int(low + rng.random() * slot * 0.6)
            faults.append(PlannedFault(index, kind, at - at % 1_000, target))
        plans.append(DayPlan(index, day, faults))
    return plans


def time_of_day(t_ms: int, day: date) -> str:
    """``HH:MM:SS`` New York time of ``t_ms`` on ``day``."""
    seconds = max(0, (t_ms - ny_midnight_ms(day)) // 1000)
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
