"""Injecting a soak's faults into the running mesh, and recording what each one did.

``FaultRunner.run`` fires one planned fault and records when (wall time and the feed's time)
and what it did right away: a restart and how long it took, how far the mirror fell behind a
paused broker and how long it took to catch up, how long Redis was down. What a fault caused
downstream (the feed gap it opened, the trades lost in it, the dead letters) is attributed
after the day, from what the tally read in the fault's window (``attribute``). ``LogWatch``
follows every service's JSON log for the events worth reporting: outages ridden out,
supervisor restarts, errors.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from devstack.localstack import LocalStack
from devstack.mesh import Mesh
from devstack.soak.observe import Losses, RedisTally
from devstack.soak.plan import PlannedFault, SoakOptions, time_of_day
from libs.common.market.sessions import ts_et
from libs.common.schemas import FeedGap

NOTABLE = frozenset(
    {
        "supervisor.dependency_down",
        "supervisor.dependency_back",
        "supervisor.restarting",
        "ingest.gap_opened",
        "ingest.gap_closed",
        "mirror.falling_behind",
        "mirror.caught_up",
    }
)
"""Log events a soak keeps besides warnings and errors it does not know."""
_ROUTINE_WARNINGS = frozenset({"deadletter.sent"})


def now_ms() -> int:
    """Wall time, epoch ms."""
    return time.time_ns() // 1_000_000


def wall_text(ms: int) -> str:
    """``HH:MM:SS`` of a wall time (local to the machine)."""
    return datetime.fromtimestamp(ms / 1000).strftime("%H:%M:%S")


@dataclass
class FaultRecord:
    """One fault as it happened, and what it did."""

    day: str
    kind: str
    target: str
    planned: str
    """The feed time (New York) it was planned at."""
    wall_ms: int
    feed_ms: int
    details: dict[str, Any] = field(default_factory=dict)
    effects: list[str] = field(default_factory=list)
    ok: bool = True

    @property
    def label(self) -> str:
        """``kill ingest`` or ``drop``."""
        return f"{self.kind} {self.target}".strip()

    def summary(self) -> str:
        """One line: what, when (feed time ET / wall time) and what it did."""
        when = f"@{ts_et(self.feed_ms)[11:19] if self.feed_ms else '?'} ET"
        return f"{self.label} {when} ({wall_text(self.wall_ms)}): " + "; ".join(self.effects)

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "day": self.day,
            "kind": self.kind,
            "target": self.target,
            "planned": self.planned,
            "wallMs": self.wall_ms,
            "wall": datetime.fromtimestamp(self.wall_ms / 1000, UTC).isoformat(),
            "feedMs": self.feed_ms,
            "feedTime": ts_et(self.feed_ms) if self.feed_ms else None,
            "details": self.details,
            "effects": self.effects,
            "ok": self.ok,
        }


class LogWatch:
    """Follows the services' JSON logs and keeps the notable events, with their wall time."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.offsets: dict[Path, int] = {}
        self.events: list[dict[str, Any]] = []

    def poll(self) -> None:
        """Read what the logs gained since the last poll."""
        for name, service in self.mesh.services.items():
            path = service.log_path
            try:
                with path.open("rb") as log_file:
                    log_file.seek(self.offsets.get(path, 0))
                    data = log_file.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
            self.offsets[path] = self.offsets.get(path, 0) + end
            for line in data[:end].splitlines():
                if not line.startswith(b"{"):
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                level = event.get("level")
                name_of_event = event.get("event")
                if name_of_event in NOTABLE or (
                    level in ("warning", "error", "critical")
                    and name_of_event not in _ROUTINE_WARNINGS
                ):
                    event["_service"] = name
                    event["_ms"] = _event_ms(event)
                    self.events.append(event)

    def between(self, start_ms: int, end_ms: int) -> list[dict[str, Any]]:
        """The notable events logged in ``[start_ms, end_ms)``."""
        return [event for event in self.events if start_ms <= event["_ms"] < end_ms]


def _event_ms(event: dict[str, Any]) -> int:
    try:
        stamp = datetime.fromisoformat(str(event.get("timestamp", "")).replace("Z", "+00:00"))
    except ValueError:
        return 0
    return int(stamp.timestamp() * 1000)


class FaultRunner:
    """Fires planned faults at the mesh and its stack."""

    def __init__(
        self,
        mesh: Mesh,
        stack: LocalStack,
        tally: RedisTally,
        options: SoakOptions,
        tick: Callable[[], None],
    ) -> None:
        self.mesh = mesh
        self.stack = stack
        self.tally = tally
        self.options = options
        self.tick = tick
        """The soak's background duties (tally, logs), run while a fault waits."""

    def run(self, fault: PlannedFault, day: str, feed_ms: int) -> FaultRecord:
        """Fire ``fault``; returns its record (``ok`` False when the fault itself failed)."""
        record = FaultRecord(
            day,
            fault.kind.value,
            fault.target,
            time_of_day(fault.at_ms, self.options.days[fault.day].as_of),
            now_ms(),
            feed_ms,
        )
        try:
            handler = getattr(self, f"_{fault.kind.value}")
            handler(fault, record)
        except Exception as exc:  # the soak goes on and reports the fault that failed
            record.ok = False
            record.effects.append(f"FAILED: {exc!r}"[:300])
        return record

    def _wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.tick()
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))

    def _kill(self, fault: PlannedFault, record: FaultRecord) -> None:
        self.mesh.kill(fault.target)
        seconds = self.mesh.restart(fault.target)
        record.details["restartS"] = round(seconds, 2)
        record.effects.append(f"SIGKILL, restarted, ready in {seconds:.1f} s")

    def _mirror_lag(self) -> float:
        return self.mesh.services["mirror"].metric_sum("tickmesh_mirror_lag_records")

    def _broker_pause(self, fault: PlannedFault, record: FaultRecord) -> None:
        kafka = self.stack.kafka
        assert kafka is not None
        kafka.pause()
        paused_at = time.monotonic()
        peak = 0.0
        try:
            while time.monotonic() - paused_at < self.options.broker_pause_s:
                self._wait(1.0)
                peak = max(peak, self._mirror_lag())
        finally:
            kafka.resume()
        resumed = time.monotonic()
        caught_up = None
        while time.monotonic() - resumed < 180:
            self._wait(0.5)
            lag = self._mirror_lag()
            peak = max(peak, lag)
            if lag == 0:
                caught_up = time.monotonic() - resumed
                break
        record.details.update(
            {"pausedS": self.options.broker_pause_s, "mirrorPeakLag": int(peak)}
            | ({"catchUpS": round(caught_up, 1)} if caught_up is not None else {})
        )
        record.effects.append(
            f"broker frozen {self.options.broker_pause_s:g} s, mirror lag peak {int(peak):,} "
            "records, "
            + (f"caught up {caught_up:.1f} s after" if caught_up is not None else "NOT caught up")
        )
        if caught_up is None:
            record.ok = False

    def _redis_restart(self, fault: PlannedFault, record: FaultRecord) -> None:
        started = time.monotonic()
        self.stack.redis.restart()
        down = time.monotonic() - started
        self._wait(3.0)
        down_services = self.mesh.down()
        record.details.update({"downS": round(down, 2), "servicesDown": down_services})
        record.effects.append(
            f"redis-server stopped and started (AOF), down {down:.1f} s"
            + (f"; DOWN after it: {', '.join(down_services)}" if down_services else "")
        )
        if down_services:
            record.ok = False

    def _drop(self, fault: PlannedFault, record: FaultRecord) -> None:
        answer = self.mesh.simulator_control("inject?fault=drop&count=1")
        record.details["sessions"] = answer.get("sessions")
        record.effects.append(f"WebSocket cut ({answer.get('sessions')} session)")

    def _malformed(self, fault: PlannedFault, record: FaultRecord) -> None:
        rounds = self.options.malformed_rounds
        answer = self.mesh.simulator_control(f"inject?fault=malformed&count={rounds}")
        record.details.update({"rounds": rounds, "sessions": answer.get("sessions")})
        record.effects.append(f"{rounds} malformed round(s) sent")

    def _burst(self, fault: PlannedFault, record: FaultRecord) -> None:
        options = self.options
        before = self.mesh.simulator_status()["eventsGenerated"]
        started = time.monotonic()
        self.mesh.simulator_control(
            f"burst?factor={options.burst_factor:g}&seconds={options.burst_seconds:g}"
        )
        self._wait(options.burst_seconds)
        sent = self.mesh.simulator_status()["eventsGenerated"] - before
        rate = sent / max(0.001, time.monotonic() - started)
        record.details.update(
            {"factor": options.burst_factor, "seconds": options.burst_seconds, "events": sent}
        )
        record.effects.append(
            f"{options.burst_factor:g}x pace for {options.burst_seconds:g} s: {sent:,} events "
            f"({rate:,.0f}/s)"
        )


def attribute(
    records: list[FaultRecord],
    tally: RedisTally,
    logs: LogWatch,
    losses: Losses,
    day_start_ms: int,
    day_end_ms: int,
) -> list[str]:
    """Add to each record of a day what followed it until the next fault: gaps opened (and the
    source trades lost inside them), dead letters, outages ridden out, supervisor restarts.
    Returns what followed no fault (gaps, errors)."""
    unexplained: list[str] = []
    starts = [record.wall_ms - 500 for record in records]
    windows = list(zip(starts, [*starts[1:], day_end_ms], strict=True))
    if not records or day_start_ms < starts[0]:
        for gap in tally.gaps_opened_between(day_start_ms, starts[0] if records else day_end_ms):
            unexplained.append(f"gap {gap.cause} opened with no fault: {_gap_text(gap, losses)}")
    for record, (start, end) in zip(records, windows, strict=True):
        for gap in tally.gaps_opened_between(start, end):
            record.effects.append(f"gap {gap.cause} {_gap_text(gap, losses)}")
            record.details.setdefault("gaps", []).append(gap.gapId)
            minutes = (gap.endMs - gap.startMs) / 60_000 if gap.endMs else 0
            lost = losses.by_gap.get(gap.gapId, 0)
            record.details.setdefault("gapNotes", []).append(
                f"gap {gap.cause} {minutes:.1f} min, {lost:,} lost"
            )
        letters = tally.letters_between(start, end)
        if letters:
            record.effects.append(f"{len(letters)} dead letters")
            record.details["deadLetters"] = len(letters)
        outages: dict[str, set[str]] = {}
        restarts: dict[str, int] = {}
        for event in logs.between(start, end):
            name = event.get("event")
            if name == "supervisor.dependency_down":
                outages.setdefault(str(event.get("dependency")), set()).add(event["_service"])
            elif name == "supervisor.restarting":
                restarts[event["_service"]] = restarts.get(event["_service"], 0) + 1
        for dependency, services in sorted(outages.items()):
            record.effects.append(
                f"{dependency} outage ridden out by {', '.join(sorted(services))}"
            )
        for service, count in sorted(restarts.items()):
            record.effects.append(f"{service}: {count} supervisor restart(s)")
    return unexplained


def _gap_text(gap: FeedGap, losses: Losses) -> str:
    start = ts_et(gap.startMs)[11:19]
    end = ts_et(gap.endMs)[11:19] if gap.endMs else "open"
    minutes = (gap.endMs - gap.startMs) / 60_000 if gap.endMs else 0
    lost = losses.by_gap.get(gap.gapId, 0)
    return f"{start}–{end} ET ({minutes:.1f} feed min, {gap.status}), {lost:,} source trades lost"
