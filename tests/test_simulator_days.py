"""The simulator's file feed over several days (each under its own as-of date, on the same
connection) and its overload burst."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from libs.common.market.sessions import NEW_YORK, ny_date
from libs.common.runtime.settings import Secret
from services.ingest import protocol
from services.ingest.protocol import TradeEvent, decode_frame
from services.ingest.simulator import (
    FileFeed,
    Pace,
    PolygonSimulator,
    ReplayDay,
    SimulatorSettings,
    add_simulate_arguments,
    file_frames,
    load_day_trades,
    load_vendor_minutes,
    settings_from_args,
)
from services.ingest.simulator.cli import control_remote
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(120)

KEY = "sim-days-key-31f0"
MONDAY, TUESDAY, THURSDAY = date(2013, 10, 7), date(2013, 10, 8), date(2013, 10, 10)


def _local_time(t_ms: int) -> tuple[int, int, int, int]:
    from datetime import datetime

    local = datetime.fromtimestamp(t_ms / 1000, NEW_YORK)
    return local.hour, local.minute, local.second, local.microsecond // 1000


def test_a_replay_day_parses_source_and_as_of_and_shifts_by_whole_new_york_days() -> None:
    assert ReplayDay.parse("2013-10-07") == ReplayDay(MONDAY, MONDAY)
    day = ReplayDay.parse("2013-10-07:2013-10-10")
    assert day == ReplayDay(MONDAY, THURSDAY) and str(day) == "2013-10-07:2013-10-10"
    assert day.shift_ms == 3 * 86_400_000
    # across the end of daylight saving time the New York time of day is kept, not the hours
    autumn = ReplayDay(date(2013, 10, 31), date(2013, 11, 4))
    assert autumn.shift_ms == 4 * 86_400_000 + 3_600_000


def test_a_day_replayed_under_another_date_keeps_ids_and_new_york_times(
    shared_data: Path,
) -> None:
    feed = FileFeed(shared_data, MONDAY, ("IBM",), speed=0)
    original = load_day_trades(feed)
    moved = load_day_trades(feed, ReplayDay(MONDAY, THURSDAY))
    assert len(moved) == len(original) > 20_000
    assert [t.i for t in moved] == [t.i for t in original]
    assert {ny_date(t.t) for t in moved} == {THURSDAY}
    assert [_local_time(t.t) for t in moved[:50]] == [_local_time(t.t) for t in original[:50]]
    minutes = load_vendor_minutes(feed, ReplayDay(MONDAY, THURSDAY))
    assert minutes is not None and {ny_date(m.s) for m in minutes} == {THURSDAY}


def test_two_days_under_one_as_of_date_are_refused() -> None:
    with pytest.raises(ValueError, match="own as-of day"):
        FileFeed(
            Path("."),
            MONDAY,
            ("IBM",),
            days=(ReplayDay(MONDAY, THURSDAY), ReplayDay(TUESDAY, THURSDAY)),
        )


def _parse(argv: list[str]) -> SimulatorSettings:
    return settings_from_args(add_simulate_arguments(argparse.ArgumentParser()).parse_args(argv))


def test_the_command_line_takes_days_and_still_takes_one_date() -> None:
    single = _parse(["--date", "2013-10-07", "--symbols", "ibm"])
    assert isinstance(single.feed, FileFeed)
    assert single.feed.replay_days == (ReplayDay(MONDAY, MONDAY),)
    week = _parse(
        ["--days", "2013-10-07,2013-10-07:2013-10-10", "--symbols", "IBM", "--hold-between-days"]
    )
    assert isinstance(week.feed, FileFeed)
    assert week.feed.replay_days == (ReplayDay(MONDAY, MONDAY), ReplayDay(MONDAY, THURSDAY))
    assert week.feed.hold_between_days and week.feed.day_pause_s == 3.0
    with pytest.raises(ValueError, match="--date"):
        _parse(["--date", "2013-10-07", "--days", "2013-10-08", "--symbols", "IBM"])


def test_a_burst_makes_the_pace_faster_for_its_time_only() -> None:
    now = [100.0]
    pace = Pace(10.0, clock=lambda: now[0])
    assert pace.seconds_for(1_000) == pytest.approx(0.1)
    pace.burst(5, 3)
    assert pace.seconds_for(1_000) == pytest.approx(0.02)
    assert pace.status() == {"speed": 10.0, "factor": 5, "burstSecondsLeft": 3.0}
    now[0] = 103.0
    assert pace.seconds_for(1_000) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        pace.burst(0.5, 3)


async def test_a_burst_speeds_up_a_replay_in_progress() -> None:
    trades = [TradeEvent("A", 10.0, 100, 1_000 + 100 * n, 4, (), str(n), 1, n) for n in range(11)]
    pace = Pace(1.0)
    pace.burst(20, 30)
    started = time.monotonic()
    frames = [f async for f in file_frames(trades, 1.0, 100, 1, False, pace=pace)]
    assert len(frames) == 11 and time.monotonic() - started < 0.5  # 1 s of feed at 20x


@asynccontextmanager
async def _client(sim: PolygonSimulator) -> AsyncIterator[ClientConnection]:
    async with connect(sim.url) as ws:
        await ws.recv()  # connected
        await ws.send(protocol.encode_auth(KEY))
        await ws.recv()  # auth_success
        await ws.send(protocol.encode_subscribe("T.IBM"))
        await ws.recv()  # subscribed
        yield ws


async def _trades_until(ws: ClientConnection, count: int) -> list[TradeEvent]:
    trades: list[TradeEvent] = []
    async with asyncio.timeout(60):
        while len(trades) < count:
            events, _ = decode_frame(await ws.recv())
            trades.extend(e for e in events if isinstance(e, TradeEvent))
    return trades


async def _status(sim: PolygonSimulator, path: str = "status") -> dict[str, Any]:
    """``GET /control/<path>`` from a thread (the server runs on this loop)."""
    return await asyncio.to_thread(control_remote, "127.0.0.1", sim.port, path, KEY)


async def test_several_days_go_over_one_connection_and_the_status_names_them(
    shared_data: Path,
) -> None:
    feed = FileFeed(
        shared_data,
        MONDAY,
        ("IBM",),
        speed=0,
        days=(ReplayDay(MONDAY, MONDAY), ReplayDay(MONDAY, THURSDAY)),
        day_pause_s=0.2,
        hold_between_days=True,
    )
    per_day = len(load_day_trades(feed))
    settings = SimulatorSettings(
        api_key=Secret(KEY), port=0, feed=feed, minute_aggregates=False, slow_consumer_after_s=None
    )
    async with PolygonSimulator(settings) as sim, _client(sim) as ws:
        first = await _trades_until(ws, per_day)

        async def holding() -> dict[str, Any] | None:
            status = await _status(sim)
            return status if status["holding"] else None

        status = await eventually(holding, message="no hold after the first day")
        assert status["daysDone"] == ["2013-10-07"] and status["day"] is None
        assert status["days"] == ["2013-10-07", "2013-10-10"] and not status["feedDone"]
        assert {ny_date(t.t) for t in first} == {MONDAY}
        assert await _status(sim, "release") == {"releases": 1}
        second = await _trades_until(ws, per_day)
        assert {ny_date(t.t) for t in second} == {THURSDAY}
        assert [t.i for t in second] == [t.i for t in first]

        async def finished() -> dict[str, Any] | None:
            status = await _status(sim)
            return status if status["feedDone"] else None

        done = await eventually(finished)
        assert done["daysDone"] == ["2013-10-07", "2013-10-10"]
        assert done["connectionsTotal"] == 1  # one connection for the whole run


async def test_the_control_endpoint_starts_a_burst_of_a_file_feed_only(
    shared_data: Path,
) -> None:
    feed = FileFeed(shared_data, MONDAY, ("IBM",), speed=1)
    settings = SimulatorSettings(api_key=Secret(KEY), port=0, feed=feed)
    async with PolygonSimulator(settings) as sim:
        answer = await _status(sim, "burst?factor=5&seconds=3")
        assert answer["factor"] == 5 and 0 < answer["burstSecondsLeft"] <= 3
        with pytest.raises(RuntimeError, match="400"):
            await _status(sim, "burst?factor=0&seconds=3")
        assert (await _status(sim))["faults"] == {"burst": 1}
    synthetic = replace(settings, feed=replace(SimulatorSettings().feed))
    async with PolygonSimulator(synthetic) as sim:
        with pytest.raises(RuntimeError, match="file feed"):
            await _status(sim, "burst?factor=5&seconds=3")
