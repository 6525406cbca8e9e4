"""Injecting a soak's faults into the running mesh, and recording what each one did.

``FaultRunner.run`` fires one planned fault, once ingest is connected to the simulator (a
fault on a feed nobody reads would prove nothing), and records when (wall time and the feed's
time) and what it did right away: a restart and how long it took, how far the mirror fell
behind a paused broker and how long it took to catch up, how long Redis was down and whether
every service rode it out. A fault also waits until ingest has published the feed up to the
previous fault's time, so that the effects of two faults never mix (ingest may run seconds
behind the simulator on a busy day). What a fault caused downstream is attributed after the
day (``attribute``): each feed gap to the last fault before it that opens gaps of its cause
(a drop a lost connection, a kill of ingest an ingest start), with the source trades lost
inside it; each dead letter to the malformed round before it; outages, supervisor restarts
and backpressure from the logs of the fault's wall-time window. ``LogWatch`` follows every
service's JSON log for those events.
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
        "ingest.reader_paused",
        "service.crashed",
        "simulator.disconnected",
        "simulator.slow_consumer",
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
    """False when the fault could not be injected."""
    harm: list[str] = field(default_factory=list)
    """What the mesh did not come through (a service left down, the mirror not caught up)."""

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
            "harm": self.harm,
        }


class LogWatch:
    """Follows the services' JSON logs and keeps the notable events, with their wall time."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.offsets: dict[Path, int] = {}
        self.events: list[dict[str, Any]] = []

    def poll(self) -> None:
        """Read what the logs gained since the last poll (the simulator's too)."""
        processes = dict(self.mesh.services)
        if self.mesh.simulator is not None:
            processes["simulator"] = self.mesh.simulator
        for name, service in processes.items():
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

    def connected(self, timeout_s: float = 60.0) -> int:
        """Wait until ingest has a subscribed session on the simulator; the feed time then."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.tick()
            try:
                status = self.mesh.simulator_status()
                if any(s["authed"] and s["subscriptions"] for s in status["sessions"]):
                    return int(status.get("feedTimeMs") or 0)
            except (OSError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"ingest not connected to the simulator after {timeout_s:g} s")
            time.sleep(0.1)

    def caught_up(self, feed_ms: int, timeout_s: float = 60.0) -> None:
        """Wait until ingest has published the feed up to ``feed_ms``."""
        deadline = time.monotonic() + timeout_s
        ingest = self.mesh.services["ingest"]
        while ingest.metric_sum("tickmesh_ingest_feed_time_seconds") * 1000 < feed_ms:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ingest not past {ts_et(feed_ms)} after {timeout_s:g} s")
            self.tick()
            time.sleep(0.1)

    def run(self, fault: PlannedFault, day: str, feed_ms: int, previous_ms: int = 0) -> FaultRecord:
        """Fire ``fault`` once ingest is connected and has published the feed up to
        ``previous_ms`` (the previous fault's feed time); returns its record (``ok`` False
        when the fault could not be injected)."""
        try:
            if previous_ms:
                self.caught_up(previous_ms)
            feed_ms = self.connected() or feed_ms
        except TimeoutError:
            pass  # fired anyway; the record shows what it reached
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
            record.harm.append("the mirror did not catch up within 180 s")

    def _redis_restart(self, fault: PlannedFault, record: FaultRecord) -> None:
        started = time.monotonic()
        self.stack.redis.restart()
        down = time.monotonic() - started
        self._wait(3.0)
        down_services = self.mesh.down()
        record.details.update({"downS": round(down, 2), "servicesDown": down_services})
        record.effects.append(f"redis-server stopped and started (AOF), down {down:.1f} s")
        for name in down_services:
            process = self.mesh.services[name].process
            code = process.returncode if process is not None else None
            record.harm.append(f"{name} exited (code {code}) instead of riding it out")

    def _drop(self, fault: PlannedFault, record: FaultRecord) -> None:
        answer = self.mesh.simulator_control("inject?fault=drop&count=1")
        record.details["sessions"] = answer.get("sessions")
        if not answer.get("sessions"):
            raise RuntimeError("no session to drop")
        record.effects.append("WebSocket cut")

    def _malformed(self, fault: PlannedFault, record: FaultRecord) -> None:
        rounds = self.options.malformed_rounds
        answer = self.mesh.simulator_control(f"inject?fault=malformed&count={rounds}")
        record.details.update({"rounds": rounds, "sessions": answer.get("sessions")})
        if not answer.get("sessions"):
            raise RuntimeError("no session to send malformed frames to")
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


GAP_CAUSES = {
    "connection_lost": ("drop",),
    "closed": ("drop",),
    "ingest_start": ("kill ingest",),
    "slow_consumer": ("burst", "broker_pause", "redis_restart"),
}
"""The faults that open a gap of each cause (a slow consumer: the simulator cut ingest off)."""


def attribute(
    records: list[FaultRecord],
    tally: RedisTally,
    logs: LogWatch,
    losses: Losses,
    day_start_ms: int,
    day_end_ms: int,
) -> list[str]:
    """Add to each record of a day what it caused (see the module docstring). Returns what no
    fault explains: a gap with no fault of its cause before it (with the simulator's reason
    for closing the session when its log has one), dead letters before any malformed round."""
    unexplained: list[str] = []
    for gap in tally.gaps_opened_between(day_start_ms, day_end_ms):
        kinds = GAP_CAUSES.get(gap.cause, ())
        # the soak notes a fault's wall time before injecting it: its gap opens later
        before = [r for r in records if r.label in kinds and r.wall_ms < gap.openedAtMs]
        # ... and before any other gap of the same cause (that one is the fault's)
        if before and _opened_since(tally, gap, before[-1].wall_ms):
            before = []
        if not before:
            why = _session_end(logs, day_start_ms, gap.openedAtMs)
            unexplained.append(
                f"gap {gap.cause} opened with no fault: {_gap_text(gap, losses)}"
                + (f"; {why}" if why else "")
            )
            continue
        nearest = before[-1]
        nearest.effects.append(f"gap {gap.cause} {_gap_text(gap, losses)}")
        nearest.details.setdefault("gaps", []).append(gap.gapId)
        length = f"{(gap.endMs - gap.startMs) / 60_000:.1f} min" if gap.endMs else "still open"
        lost = losses.by_gap.get(gap.gapId, 0)
        nearest.details.setdefault("gapNotes", []).append(
            f"gap {gap.cause} {length}, {lost:,} lost"
        )
    rounds = [record for record in records if record.kind == "malformed"]
    stray = 0
    for letter in tally.letters_between(day_start_ms, day_end_ms):
        before = [r for r in rounds if r.wall_ms - 1_000 <= letter.tsMs]
        if before:
            record = before[-1]
            record.details["deadLetters"] = record.details.get("deadLetters", 0) + 1
        else:
            stray += 1
    for record in rounds:
        record.effects.append(f"{record.details.get('deadLetters', 0)} dead letters")
    if stray:
        unexplained.append(f"{stray} dead letters before any malformed round")
    starts = [record.wall_ms - 500 for record in records]
    windows = zip(starts, [*starts[1:], day_end_ms], strict=True)
    for record, (start, end) in zip(records, windows, strict=True):
        _log_effects(record, logs.between(start, end))
    return unexplained


def _opened_since(tally: RedisTally, gap: FeedGap, since_ms: int) -> bool:
    """Whether another gap of ``gap``'s cause opened between ``since_ms`` and ``gap``."""
    return any(
        other.gapId != gap.gapId
        and other.cause == gap.cause
        and since_ms < other.openedAtMs < gap.openedAtMs
        for other in tally.gaps.values()
    )


CLOSE_CODES = {1006: "cut without a close frame", 1011: "keepalive ping timeout"}


def _session_end(logs: LogWatch, start_ms: int, end_ms: int) -> str:
    """How the simulator last closed a session before ``end_ms``, from its log."""
    ends = [
        event
        for event in logs.between(start_ms, end_ms)
        if event.get("event") in ("simulator.disconnected", "simulator.slow_consumer")
    ]
    if not ends:
        return ""
    last = ends[-1]
    if last.get("event") == "simulator.slow_consumer":
        return f"the simulator cut ingest off as a slow consumer at {wall_text(last['_ms'])}"
    code = last.get("code")
    reason = CLOSE_CODES.get(code, "") if isinstance(code, int) else ""
    return f"the simulator closed ingest's session at {wall_text(last['_ms'])} with code {code}" + (
        f" ({reason})" if reason else ""
    )


def _log_effects(record: FaultRecord, events: list[dict[str, Any]]) -> None:
    outages: dict[str, set[str]] = {}
    restarts: dict[str, int] = {}
    paused = crashed = 0
    behind = 0
    for event in events:
        name = event.get("event")
        service = event["_service"]
        if name == "supervisor.dependency_down":
            outages.setdefault(str(event.get("dependency")), set()).add(service)
        elif name == "supervisor.restarting":
            restarts[service] = restarts.get(service, 0) + 1
        elif name == "ingest.reader_paused":
            paused += 1
        elif name == "mirror.falling_behind":
            behind = max(behind, int(event.get("lag_records") or 0))
        elif name == "service.crashed":
            crashed += 1
            record.effects.append(f"{service} crashed: {event.get('error')}")
    for dependency, services in sorted(outages.items()):
        record.effects.append(f"{dependency} outage ridden out by {', '.join(sorted(services))}")
    for service, count in sorted(restarts.items()):
        record.effects.append(f"{service}: {count} supervisor restart(s)")
    if paused:
        record.effects.append(f"ingest's reader paused {paused}x (queue full: TCP backpressure)")
    if behind:
        record.effects.append(f"mirror fell behind (lag {behind:,} records), caught up")


def _gap_text(gap: FeedGap, losses: Losses) -> str:
    start = ts_et(gap.startMs)[11:19]
    end = ts_et(gap.endMs)[11:19] if gap.endMs else "open"
    length = f"{(gap.endMs - gap.startMs) / 60_000:.1f} feed min, " if gap.endMs else ""
    lost = losses.by_gap.get(gap.gapId, 0)
    return f"{start}–{end} ET ({length}{gap.status}), {lost:,} source trades lost"
