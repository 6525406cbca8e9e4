"""The Polygon simulator: protocol behaviour, feeds and injected faults, seen by a raw client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from libs.common.runtime.settings import Secret
from services.ingest import protocol
from services.ingest.framing import frames_of
from services.ingest.protocol import MinuteAggEvent, TradeEvent, decode_frame
from services.ingest.simulator import (
    Fault,
    MinuteAggregator,
    PolygonSimulator,
    SimulatorSettings,
    SyntheticFeed,
    SyntheticMarket,
    add_simulate_arguments,
    file_frames,
    inject_remote,
    malformed_frames,
    run_simulator,
    settings_from_args,
)
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(60)

KEY = "sim-test-key-5d1c"
BASE = SimulatorSettings(
    api_key=Secret(KEY),
    port=0,
    feed=SyntheticFeed(symbols=5, rate_per_s=5_000, seed=7),
    auth_timeout_s=5.0,
    close_timeout_s=2.0,
)


@asynccontextmanager
async def simulator(**overrides: Any) -> AsyncIterator[PolygonSimulator]:
    async with PolygonSimulator(replace(BASE, **overrides)) as sim:
        yield sim


async def recv_events(ws: ClientConnection, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The next frame, as JSON."""
    async with asyncio.timeout(timeout):
        message = await ws.recv()
    events = json.loads(message)
    assert isinstance(events, list)
    return events


async def recv_status(ws: ClientConnection, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The next frame that holds status events (data frames before it are skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            events = await recv_events(ws, timeout)
            statuses = [event for event in events if event["ev"] == "status"]
            if statuses:
                return statuses


async def drain_until_closed(ws: ClientConnection, timeout: float = 10.0) -> list[str | bytes]:
    """Everything the server still sends until it closes."""
    received: list[str | bytes] = []
    async with asyncio.timeout(timeout):
        try:
            while True:
                received.append(await ws.recv())
        except ConnectionClosed:
            return received


@asynccontextmanager
async def session(
    sim: PolygonSimulator, auth: bool = True, **kwargs: Any
) -> AsyncIterator[ClientConnection]:
    """A raw client, past the ``connected`` status (and authenticated unless told not to)."""
    async with connect(sim.url, **kwargs) as ws:
        assert await recv_events(ws) == [
            {"ev": "status", "status": "connected", "message": "Connected Successfully"}
        ]
        if auth:
            await ws.send(protocol.encode_auth(KEY))
            assert (await recv_events(ws))[0]["status"] == "auth_success"
        yield ws


async def subscribe(ws: ClientConnection, topics: str) -> list[dict[str, Any]]:
    await ws.send(protocol.encode_subscribe(topics))
    return await recv_status(ws)


# ---- protocol ------------------------------------------------------------------------------


async def test_a_new_connection_gets_the_connected_status_as_a_text_frame() -> None:
    async with simulator() as sim, connect(sim.url) as ws:
        message = await ws.recv()
        assert isinstance(message, str)
        assert json.loads(message) == [
            {"ev": "status", "status": "connected", "message": "Connected Successfully"}
        ]


async def test_auth_with_the_right_key_succeeds() -> None:
    async with simulator() as sim, session(sim, auth=False) as ws:
        await ws.send(protocol.encode_auth(KEY))
        assert await recv_events(ws) == [
            {"ev": "status", "status": "auth_success", "message": "authenticated"}
        ]


async def test_auth_with_a_wrong_key_fails_and_closes() -> None:
    async with simulator() as sim, session(sim, auth=False) as ws:
        await ws.send(protocol.encode_auth("not-the-key"))
        assert await recv_events(ws) == [
            {"ev": "status", "status": "auth_failed", "message": "authentication failed"}
        ]
        await drain_until_closed(ws)
        assert ws.close_code == 1008
        assert sim.stats.auth_failures == 1


async def test_no_auth_within_the_timeout_gets_auth_timeout_and_a_close() -> None:
    async with simulator(auth_timeout_s=0.2) as sim, session(sim, auth=False) as ws:
        assert await recv_events(ws) == [
            {
                "ev": "status",
                "status": "auth_timeout",
                "message": "No authentication request received.",
            }
        ]
        await drain_until_closed(ws)
        assert ws.close_code == 1008


async def test_subscribing_before_auth_gets_auth_required_and_auth_still_works_after() -> None:
    async with simulator() as sim, session(sim, auth=False) as ws:
        statuses = await subscribe(ws, "T.S0001")
        assert statuses == [
            {"ev": "status", "status": "auth_required", "message": "authentication required"}
        ]
        await ws.send(protocol.encode_auth(KEY))
        assert (await recv_events(ws))[0]["status"] == "auth_success"


async def test_subscribe_and_unsubscribe_answer_each_topic_with_polygon_wording() -> None:
    async with simulator() as sim, session(sim) as ws:
        statuses = await subscribe(ws, "T.S0001, Q.S0001,AM.*,XX.S0001,nonsense")
        assert [(s["status"], s["message"]) for s in statuses] == [
            ("success", "subscribed to: T.S0001"),
            ("success", "subscribed to: Q.S0001"),
            ("success", "subscribed to: AM.*"),
            ("error", "unknown channel: XX.S0001"),
            ("error", "invalid subscription: nonsense"),
        ]
        await ws.send(protocol.encode_unsubscribe(["T.S0001", "AM.*"]))
        statuses = await recv_status(ws)
        assert [(s["status"], s["message"]) for s in statuses] == [
            ("success", "unsubscribed to: T.S0001"),
            ("success", "unsubscribed to: AM.*"),
        ]
        (state,) = sim.stats_dict()["sessions"]
        assert state["subscriptions"] == ["Q.S0001"]


async def test_an_unknown_action_or_a_non_json_message_gets_an_error_status() -> None:
    async with simulator() as sim, session(sim) as ws:
        await ws.send(json.dumps({"action": "dance", "params": "T.*"}))
        (status,) = await recv_status(ws)
        assert status["status"] == "error" and "dance" in status["message"]
        await ws.send("{not json")
        (status,) = await recv_status(ws)
        assert status["status"] == "error"


async def test_a_second_connection_over_the_limit_gets_max_connections_and_is_closed() -> None:
    async with simulator(max_connections=1) as sim, session(sim) as first:
        async with session(sim, auth=False) as second:
            await second.send(protocol.encode_auth(KEY))
            assert await recv_events(second) == [
                {
                    "ev": "status",
                    "status": "max_connections",
                    "message": "Maximum number of connections exceeded.",
                }
            ]
            await drain_until_closed(second)
            assert second.close_code == 1008
        statuses = await subscribe(first, "T.S0001")  # the first one is unaffected
        assert statuses[0]["status"] == "success"
    async with simulator(max_connections=2) as sim, session(sim), session(sim):
        assert sum(s["authed"] for s in sim.stats_dict()["sessions"]) == 2


async def test_a_freed_connection_slot_can_be_used_again() -> None:
    async with simulator(max_connections=1) as sim:
        async with session(sim):
            pass
        await eventually(lambda: not sim.stats_dict()["sessions"])
        async with session(sim) as ws:
            assert (await subscribe(ws, "T.S0001"))[0]["status"] == "success"


# ---- synthetic feed ------------------------------------------------------------------------


async def collect_trades(ws: ClientConnection, count: int) -> list[TradeEvent]:
    trades: list[TradeEvent] = []
    async with asyncio.timeout(10):
        while len(trades) < count:
            events, bad = decode_frame(await ws.recv())
            assert bad == []
            trades.extend(event for event in events if isinstance(event, TradeEvent))
    return trades


async def test_the_synthetic_feed_sends_trades_only_for_subscribed_symbols() -> None:
    async with simulator() as sim, session(sim) as ws:
        await subscribe(ws, "T.S0002,T.S0003")
        trades = await collect_trades(ws, 100)
        assert {trade.sym for trade in trades} == {"S0002", "S0003"}

        await ws.send(protocol.encode_unsubscribe("T.S0002"))
        await recv_status(ws)  # frames after this answer were cut after the change
        trades = await collect_trades(ws, 50)
        assert {trade.sym for trade in trades} == {"S0003"}


async def test_a_wildcard_subscription_gets_every_symbol_with_polygon_shaped_trades() -> None:
    async with simulator() as sim, session(sim) as ws:
        await subscribe(ws, "T.*")
        trades = await collect_trades(ws, 500)
    assert {trade.sym for trade in trades} == {f"S000{n}" for n in range(1, 6)}
    now_ms = time.time() * 1000
    for trade in trades:
        assert trade.p > 0 and trade.s > 0 and abs(trade.t - now_ms) < 60_000
        assert trade.i and trade.z in (1, 2, 3) and trade.x > 0
    by_symbol: dict[str, list[int]] = {}
    for trade in trades:
        by_symbol.setdefault(trade.sym, []).append(trade.q)
    for sequence in by_symbol.values():
        assert sequence == sorted(sequence) and len(set(sequence)) == len(sequence)


async def test_no_data_is_sent_without_a_subscription() -> None:
    async with simulator(start_feed_on_subscribe=False) as sim, session(sim) as ws:
        await eventually(lambda: sim.stats.events_generated > 100)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await ws.recv()


async def test_the_feed_stops_after_max_events() -> None:
    async with simulator(max_events=300) as sim, session(sim) as ws:
        await subscribe(ws, "T.*")
        trades = await collect_trades(ws, 300)
        assert len(trades) == 300
        await eventually(lambda: sim.feed_done.is_set())
        assert sim.stats.events_generated == 300


def test_synthetic_market_is_deterministic_for_a_seed_and_mostly_regular() -> None:
    settings = SyntheticFeed(symbols=1200, rate_per_s=1, seed=11)
    first = SyntheticMarket(settings).trades(5_000, 1_000)
    again = SyntheticMarket(settings).trades(5_000, 1_000)
    other = SyntheticMarket(replace(settings, seed=12)).trades(5_000, 1_000)

    assert first == again and first != other
    assert SyntheticMarket(settings).symbols[:2] == ["S0001", "S0002"]
    regular = sum(1 for trade in first if trade.c == ())
    odd_lots = [trade for trade in first if trade.c == (37,)]
    assert regular > 0.85 * len(first) and odd_lots
    assert all(trade.s < 100 for trade in odd_lots)
    assert len({trade.i for trade in first}) == len(first)


# ---- framing and minute aggregates ---------------------------------------------------------


def trade(sym: str, t: int, p: float = 10.0, s: int = 100) -> TradeEvent:
    return TradeEvent(sym, p, s, t, 4, (), f"{sym}-{t}", 1, t)


def test_frames_hold_one_time_window_and_at_most_the_maximum_events() -> None:
    trades = [trade("A", 1000), trade("B", 1000), trade("A", 1000), trade("A", 1001)]
    assert [len(f) for f in frames_of(trades, 2, 1)] == [2, 1, 1]
    assert [len(f) for f in frames_of(trades, 100, 5)] == [4]
    across_minute = [trade("A", 59_999), trade("A", 60_000)]
    assert [len(f) for f in frames_of(across_minute, 100, 1000)] == [1, 1]


def test_minute_aggregates_come_from_all_trades_of_the_closed_minute() -> None:
    aggregator = MinuteAggregator()
    assert aggregator.advance(60_000) == []
    aggregator.add([trade("A", 60_001, 10.0, 100), trade("A", 60_500, 12.0, 300)])
    aggregator.add([trade("B", 61_000, 5.0, 50)])
    assert aggregator.advance(119_999) == []
    (a_bar, b_bar) = aggregator.advance(120_000)
    assert a_bar == MinuteAggEvent(
        sym="A",
        v=400,
        av=400,
        op=10.0,
        vw=11.5,
        o=10.0,
        c=12.0,
        h=12.0,
        l=10.0,
        a=11.5,
        z=200,
        s=60_000,
        e=120_000,
    )
    assert b_bar.sym == "B" and b_bar.v == 50
    aggregator.add([trade("A", 120_001, 11.0, 100)])
    (a_next,) = aggregator.flush()
    assert a_next.av == 500 and a_next.op == 10.0 and a_next.o == 11.0


async def test_a_replay_at_speed_zero_sends_trades_and_am_between_minutes() -> None:
    trades = [trade("A", 60_000), trade("B", 60_000), trade("A", 61_000), trade("A", 120_500)]
    frames = [frame async for frame in file_frames(trades, 0, 100, 1)]
    kinds = [[type(event).__name__ for event in frame] for frame in frames]
    assert kinds == [
        ["TradeEvent", "TradeEvent"],
        ["TradeEvent"],
        ["MinuteAggEvent", "MinuteAggEvent"],
        ["TradeEvent"],
        ["MinuteAggEvent"],
    ]


async def test_a_replay_at_speed_one_paces_by_event_time() -> None:
    trades = [trade("A", 1_000), trade("A", 1_150), trade("A", 1_300)]
    started = time.monotonic()
    stamps = []
    async for _ in file_frames(trades, 1.0, 100, 1, minute_aggregates=False):
        stamps.append(time.monotonic() - started)
    assert stamps[0] < 0.1 and 0.12 < stamps[1] < 0.6 and 0.27 < stamps[2] < 0.9


async def test_a_custom_feed_is_served_as_given() -> None:
    async def feed() -> AsyncIterator[list[protocol.Event]]:
        yield [trade("SPY", 1_381_152_600_000, 168.1)]

    async with PolygonSimulator(BASE, feed=feed()) as sim, session(sim) as ws:
        await subscribe(ws, "T.SPY")
        (spy,) = await collect_trades(ws, 1)
        assert spy.p == 168.1 and spy.t == 1_381_152_600_000


async def test_frames_sent_as_fast_as_possible_share_socket_writes_and_stay_separate() -> None:
    count = 1_000

    async def feed() -> AsyncIterator[list[protocol.Event]]:
        for n in range(count):
            yield [trade("SPY", 1_381_152_600_000 + n, 100.0 + n / 100)]

    async with PolygonSimulator(BASE, feed=feed()) as sim, session(sim) as ws:
        await subscribe(ws, "T.SPY")
        frames = []
        async with asyncio.timeout(10):
            while len(frames) < count:
                events, bad = decode_frame(await ws.recv())
                assert bad == []
                frames.append([event for event in events if isinstance(event, TradeEvent)])
        # one message per frame, in the feed's order
        assert [len(frame) for frame in frames] == [1] * count
        assert [frame[0].t for frame in frames] == [1_381_152_600_000 + n for n in range(count)]
        (stats,) = sim.stats_dict()["sessions"]
        assert stats["framesSent"] >= count
        # the feed lets the writer run every FRAMES_PER_YIELD frames: a write each time, not
        # one per frame
        assert stats["writes"] <= count // 10, stats


# ---- faults --------------------------------------------------------------------------------


async def test_drop_cuts_the_connection_without_a_close_frame() -> None:
    async with simulator() as sim, session(sim) as ws:
        await subscribe(ws, "T.*")
        assert sim.inject(Fault.DROP) == 1
        await drain_until_closed(ws)
        assert ws.close_code == 1006  # abnormal closure: no close frame was received


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("slow_consumer", "Slow consumer: server-side buffer full, disconnecting."),
        ("max_connections", "Maximum number of connections exceeded."),
        ("force_disconnect", "Forced disconnect."),
    ],
)
async def test_a_disconnect_fault_sends_its_status_then_closes(fault: str, message: str) -> None:
    async with simulator() as sim, session(sim) as ws:
        await subscribe(ws, "T.*")
        await collect_trades(ws, 10)
        assert sim.inject(fault) == 1
        rest = await drain_until_closed(ws)
        statuses = [e for m in rest for e in json.loads(m) if e["ev"] == "status"]
        assert statuses == [{"ev": "status", "status": fault, "message": message}]
        assert ws.close_code == 1008
        assert sim.stats.faults == {fault: 1}


async def test_a_fault_hits_count_sessions_oldest_first() -> None:
    async with (
        simulator(max_connections=3) as sim,
        session(sim) as first,
        session(sim) as second,
        session(sim) as third,
    ):
        assert sim.inject("force_disconnect", count=2) == 2
        await drain_until_closed(first)
        await drain_until_closed(second)
        assert (await subscribe(third, "T.S0001"))[0]["status"] == "success"


async def test_malformed_sends_bad_frames_whose_good_events_survive_decoding() -> None:
    async with simulator() as sim, session(sim) as ws:
        await subscribe(ws, "Q.S0001")  # no trade flow: the next frames are the fault's
        assert sim.inject(Fault.MALFORMED) == 1
        frames = [await ws.recv() for _ in range(4)]
    decoded = [decode_frame(frame) for frame in frames]
    assert [len(events) for events, _ in decoded] == [0, 0, 0, 3]
    assert [len(bad) for _, bad in decoded] == [1, 1, 1, 2]
    assert "truncated" in decoded[0][1][0].error
    assert "Expected `array`" in decoded[1][1][0].error
    assert "'XYZ'" in decoded[2][1][0].error
    good, bad = decoded[3]
    good_ids = [event.i.rsplit("-", 1)[0] for event in good]  # type: ignore[union-attr]
    assert good_ids == [f"malformed-good-{n}" for n in (1, 3, 5)]
    assert [b"malformed-bad-2" in item.raw for item in bad] == [True, False]
    assert "missing required field `p`" in bad[0].error and "$.p" in bad[1].error


def test_malformed_frames_use_the_given_symbol() -> None:
    frames = malformed_frames("IBM", 5)
    assert all(b"IBM" in frame for frame in frames)


async def test_a_client_that_stops_reading_gets_slow_consumer() -> None:
    async with simulator(
        feed=SyntheticFeed(symbols=50, rate_per_s=200_000, seed=1),
        slow_consumer_buffer_bytes=64 * 1024,
        slow_consumer_after_s=0.3,
        close_timeout_s=20.0,
    ) as sim:
        # max_queue=1: the client stops reading the socket as soon as one frame waits.
        async with session(sim, max_queue=1) as ws:
            await ws.send(protocol.encode_subscribe("T.*"))
            await eventually(lambda: sim.stats.slow_consumer_disconnects == 1, timeout=30)
            rest = await drain_until_closed(ws, timeout=20)
        statuses = [e for m in rest for e in json.loads(m) if e["ev"] == "status"]
        assert statuses[-1]["status"] == "slow_consumer"
        assert ws.close_code == 1008


async def test_the_http_control_endpoint_injects_faults_with_the_key_only() -> None:
    async with simulator() as sim, session(sim) as ws:
        with pytest.raises(RuntimeError, match="401"):
            await asyncio.to_thread(inject_remote, "127.0.0.1", sim.port, "drop", 1, "wrong")
        with pytest.raises(RuntimeError, match="400"):
            await asyncio.to_thread(inject_remote, "127.0.0.1", sim.port, "explode", 1, KEY)
        answer = await asyncio.to_thread(
            inject_remote, "127.0.0.1", sim.port, "force_disconnect", 1, KEY
        )
        assert answer == {"fault": "force_disconnect", "sessions": 1}
        rest = await drain_until_closed(ws)
        assert json.loads(rest[-1])[0]["status"] == "force_disconnect"


# ---- running, CLI and secrets --------------------------------------------------------------


async def test_run_simulator_stops_after_its_duration() -> None:
    ready: list[PolygonSimulator] = []
    started = time.monotonic()
    stats = await run_simulator(replace(BASE, duration_s=0.3), on_ready=ready.append)
    assert ready and 0.25 < time.monotonic() - started < 5
    assert stats["connectionsTotal"] == 0


async def test_run_simulator_can_exit_once_a_finite_feed_is_sent() -> None:
    settings = replace(BASE, max_events=200, exit_when_feed_done=True, duration_s=20)

    async def client(sim: PolygonSimulator) -> int:
        async with session(sim) as ws:
            await subscribe(ws, "T.*")
            return len(await collect_trades(ws, 200))

    tasks: list[asyncio.Task[int]] = []
    stats = await run_simulator(
        settings, on_ready=lambda sim: tasks.append(asyncio.create_task(client(sim)))
    )
    assert stats["eventsGenerated"] == 200 and await tasks[0] == 200


def test_the_command_line_builds_settings_and_never_prints_the_key() -> None:
    import argparse

    parser = add_simulate_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--port", "0", "--synthetic-symbols", "3000", "--rate", "50000"])
    settings = settings_from_args(args, environ={"SIM_API_KEY": "env-key-123"})
    assert settings.api_key.reveal() == "env-key-123"
    assert isinstance(settings.feed, SyntheticFeed) and settings.feed.symbols == 3000
    assert "env-key-123" not in repr(settings)
    file_args = parser.parse_args(["--date", "2013-10-07", "--symbols", "spy,ibm", "--speed", "0"])
    file_settings = settings_from_args(file_args, environ={})
    assert file_settings.feed.symbols == ("SPY", "IBM")  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="both --date and --symbols"):
        settings_from_args(parser.parse_args(["--symbols", "SPY"]), environ={})
    with pytest.raises(ValueError, match="choose one feed"):
        settings_from_args(
            parser.parse_args(["--synthetic-symbols", "3", "--symbols", "SPY"]), environ={}
        )


def test_the_module_help_works_on_its_own() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.ingest.simulator", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0 and "--synthetic-symbols" in result.stdout


async def test_the_key_never_appears_in_log_lines() -> None:
    with structlog.testing.capture_logs() as logs:
        async with simulator() as sim:
            async with session(sim) as ws:
                await subscribe(ws, "T.S0001")
            async with connect(f"{sim.url}?apiKey={KEY}") as ws:
                await ws.recv()
                await ws.send(protocol.encode_auth(KEY + "-wrong"))
                await drain_until_closed(ws)
    assert logs and not any(KEY in repr(entry) for entry in logs)


async def test_the_file_feed_replays_real_trades_when_the_tick_reader_is_available() -> None:
    from pathlib import Path

    from libs.common.market.sessions import parse_day
    from services.ingest.simulator import FileFeed

    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not data.is_dir():
        pytest.skip(f"no tick data at {data}")
    feed = FileFeed(data, parse_day("2013-10-07"), ("IBM", "AIG"), speed=0)
    async with simulator(feed=feed, max_events=2_000) as sim, session(sim) as ws:
        await subscribe(ws, "T.IBM,T.AIG")
        trades = await collect_trades(ws, 500)
    assert {trade.sym for trade in trades} <= {"IBM", "AIG"}
    assert [t.t for t in trades] == sorted(t.t for t in trades)
    assert all(1_381_132_800_000 <= t.t < 1_381_219_200_000 for t in trades)  # 2013-10-07 UTC


def test_file_feed_sends_the_vendors_own_minute_bars_as_am(shared_data) -> None:  # type: ignore[no-untyped-def]
    from datetime import date

    from services.ingest.simulator import FileFeed, load_vendor_minutes

    feed = FileFeed(data_dir=shared_data, day=date(2013, 10, 7), symbols=("SPY",), speed=0)
    events = load_vendor_minutes(feed)
    assert events is not None and len(events) == 828
    ten = [e for e in events if e.s == 1_381_154_400_000]  # 10:00 ET
    assert ten[0].v == 337_771 and ten[0].e - ten[0].s == 60_000


async def test_vendor_minute_bars_follow_the_trades_of_their_minute() -> None:
    from services.ingest.protocol import MinuteAggEvent, TradeEvent
    from services.ingest.simulator import file_frames

    trades = [TradeEvent(sym="A", p=1.0, s=1, t=t) for t in (0, 30_000, 60_000, 130_000)]
    vendor = [
        MinuteAggEvent(sym="A", v=v, s=s, e=s + 60_000)
        for s, v in ((0, 2), (60_000, 1), (120_000, 1))
    ]
    frames = [frame async for frame in file_frames(trades, 0, 100, 1, True, vendor)]
    kinds = [
        (type(f[0]).__name__, f[0].s if isinstance(f[0], MinuteAggEvent) else f[0].t)
        for f in frames
    ]
    assert kinds == [
        ("TradeEvent", 0),
        ("TradeEvent", 30_000),
        ("MinuteAggEvent", 0),
        ("TradeEvent", 60_000),
        ("MinuteAggEvent", 60_000),
        ("TradeEvent", 130_000),
        ("MinuteAggEvent", 120_000),
    ]
