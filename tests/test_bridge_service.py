"""The bridge against a real redis-server: contract payloads, determinism, restart safety.

Bars go in the way the bar service publishes them (sequenced, on ``bars.<SYM>.1m`` with their
streams); the bridge's records come out of the output channels' streams. Each test works
under a key prefix of its own, so its channels' sequences start at 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from libs.common.io.heartbeat import HeartbeatSender
from libs.common.io.redis_io import Publisher
from libs.common.market.sessions import MINUTE_MS, ny_epoch_ms
from libs.common.names import Keys
from libs.common.runtime.supervisor import Supervisor
from libs.common.schemas import Bar, Heartbeat, Position, decode, encode
from services.engine_bridge.backtest import backtest_bars
from services.engine_bridge.bridge import BridgeActor
from services.engine_bridge.datasets import merge_by_minute
from services.engine_bridge.engines import BuiltinAdapter, make_builtin
from services.engine_bridge.model import EngineGap
from tests.helpers import eventually
from tests.test_bridge_support import (
    DAY,
    OUTPUT_CHANNELS,
    day_bars,
    decode_output,
    publish_bars,
    read_channel,
    series,
    settings_for,
    spy_day_bars,
    strip_seq,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parent.parent
CONTRACT_POSITION = (
    b'{"symbol":"AAPL","tsET":"2025-10-27T14:30:00-04:00","barId":301,"barsHeld":15,'
    b'"shares":100,"entryPrice":150.25,"unrealizedPnl":255.00}'
)


def expected_by_channel(outputs: list) -> dict[str, list[bytes]]:  # type: ignore[type-arg]
    expected: dict[str, list[bytes]] = {channel: [] for channel in OUTPUT_CHANNELS}
    for channel, record in outputs:
        expected.setdefault(channel, []).append(strip_seq(encode(record)))
    return expected


async def published(client: object, prefix: str) -> dict[str, list[bytes]]:
    return {channel: await read_channel(client, prefix, channel) for channel in OUTPUT_CHANNELS}


async def run_bridge_until(
    client: object, prefix: str, bars: list[Bar], minutes: int, **overrides: object
) -> tuple[BridgeActor, HeartbeatSender, dict[str, list[bytes]]]:
    """Run a bridge in-process until ``minutes`` portfolio snapshots are out."""
    settings = settings_for(prefix, **overrides)
    publisher = Publisher(client, keys=Keys(prefix))  # type: ignore[arg-type]
    registry = CollectorRegistry()
    supervisor = Supervisor("bridge-test", registry=registry)
    bridge = BridgeActor(settings, client, publisher, registry=registry)  # type: ignore[arg-type]
    heartbeat = HeartbeatSender(
        "engine_bridge",
        "test",
        "sim",
        publisher,
        interval_ms=200,
        lag_ms=bridge.lag_ms,
        status=bridge.status,
        registry=registry,
    )
    supervisor.add(bridge)
    supervisor.add(heartbeat)
    task = asyncio.create_task(supervisor.run())
    try:
        await publish_bars(publisher, bars)

        newest = max(bar.endMs for bar in bars)

        async def done() -> bool:
            core = bridge.core
            if core is None or core.state.lastBarEndMs < newest:  # every bar seen
                return False
            return len(await read_channel(client, prefix, OUTPUT_CHANNELS[3])) >= minutes

        await eventually(done, timeout=60)
        await heartbeat.beat()
    finally:
        supervisor.stop()
        await asyncio.wait_for(task, 15)
    return bridge, heartbeat, await published(client, prefix)


async def test_the_bridge_publishes_the_cores_records_and_each_decodes_with_the_contract(
    redis_client: object, unique_name: object, shared_data: Path
) -> None:
    prefix = f"{unique_name('bridge')}:"  # type: ignore[operator]
    bars = spy_day_bars(shared_data)
    bridge, _, got = await run_bridge_until(redis_client, prefix, bars, 390)
    outputs, summary, _ = backtest_bars(settings_for(prefix), bars)
    expected = expected_by_channel(outputs)
    for channel in OUTPUT_CHANNELS:
        assert [strip_seq(p) for p in got[channel]] == expected[channel], channel
        seqs = [msgspec.json.decode(p)["seq"] for p in got[channel]]
        assert seqs == list(range(1, len(seqs) + 1)), channel  # per-channel, without gaps
        for payload in got[channel]:
            record = msgspec.structs.asdict(decode_output(channel, payload))
            assert record["tsET"].startswith("2013-10-07T") and record["tsET"].endswith("-04:00")
            assert 1 <= record["barId"] <= 390
    positions = [decode(p, Position) for p in got["sentio.positions.state.v1"]]
    assert max(p.barsHeld for p in positions) > 1  # it counts, it is not stuck at 0
    assert len(got["sentio.trades.executed.v1"]) == summary.trades == 14
    # lagMs is now minus the end of the newest bar seen (the after-hours ones count: they
    # are not traded, but they say how fresh the input is)
    beats = [
        decode(b, Heartbeat)
        for b in await read_channel(redis_client, prefix, "sentio.heartbeat.v1")
    ]
    last_bar_end = max(bar.endMs for bar in bars)
    assert abs(beats[-1].lagMs - (beats[-1].tsMs - last_bar_end)) < 1_000
    assert beats[-1].status == "ok" and beats[0].service == "engine_bridge"
    assert bridge.minutes_done == 390


def test_the_contracts_example_position_decodes_unchanged() -> None:
    position = decode(CONTRACT_POSITION, Position)
    assert position.barsHeld == 15 and position.barId == 301 and position.unrealizedPnl == 255.0
    original = msgspec.json.decode(CONTRACT_POSITION)
    again = msgspec.json.decode(encode(position))
    assert {key: again[key] for key in original} == original


async def test_the_same_day_twice_gives_byte_identical_outputs(
    redis_client: object, unique_name: object, shared_data: Path
) -> None:
    bars = spy_day_bars(shared_data)
    runs = []
    for run in ("first", "second"):
        prefix = f"{unique_name(run)}:"  # type: ignore[operator]
        _, _, got = await run_bridge_until(redis_client, prefix, bars, 390, strategy="zscore")
        runs.append(got)
    for channel in OUTPUT_CHANNELS:
        assert runs[0][channel] == runs[1][channel], channel  # seq included
    assert len(runs[0]["sentio.trades.executed.v1"]) > 0


async def test_an_external_engine_crash_is_reported_on_the_gaps_channel(
    redis_client: object, unique_name: object, tmp_path: Path
) -> None:
    from tests.test_bridge_external import ENGINE_SOURCE

    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SOURCE)
    os.environ["TEST_ENGINE"] = json.dumps({"workdir": str(tmp_path), "crash_at": 4})
    prefix = f"{unique_name('extcrash')}:"  # type: ignore[operator]
    try:
        bridge, _, got = await run_bridge_until(
            redis_client,
            prefix,
            series("SPY", [100.0 + i for i in range(8)]),
            8,
            engine="external",
            external={"command": f"{sys.executable} {script}", "backoff_initial_ms": 10},
        )
    finally:
        del os.environ["TEST_ENGINE"]
    (gap,) = [
        msgspec.json.decode(p, type=EngineGap)
        for p in await read_channel(redis_client, prefix, "sentio.engine.gaps.v1")
    ]
    assert (gap.reason, gap.fromBarId, gap.toBarId, gap.restarts) == ("crash", 4, 4, 1)
    beats = [
        decode(b, Heartbeat)
        for b in await read_channel(redis_client, prefix, "sentio.heartbeat.v1")
    ]
    assert beats[-1].status == "degraded"
    registry = bridge.registry
    assert registry is not None
    assert registry.get_sample_value("tickmesh_bridge_engine_restarts_total") == 1
    assert registry.get_sample_value("tickmesh_bridge_gap_minutes_total") == 1
    assert registry.get_sample_value("tickmesh_bridge_gap_reports_total") == 1
    assert len(got["sentio.portfolio.minute.v1"]) == 8  # the portfolio went on every minute


async def test_an_actor_that_fails_mid_minute_is_restarted_from_the_saved_state(
    redis_client: object, unique_name: object, shared_data: Path
) -> None:
    """The engine raises in the middle of 11:00 once: the supervisor restarts the actor,
    which reloads the portfolio from Redis and redoes that minute; nothing is lost or
    published twice."""
    prefix = f"{unique_name('actorfail')}:"  # type: ignore[operator]
    settings = settings_for(prefix, strategy="zscore")
    failed: list[int] = []

    class FailsOnce(BuiltinAdapter):
        async def decide(self, engine_input):  # type: ignore[no-untyped-def]
            if engine_input.barId == 91 and not failed:
                failed.append(engine_input.barId)
                raise RuntimeError("engine bug, once")
            return await super().decide(engine_input)

    publisher = Publisher(redis_client, keys=Keys(prefix))  # type: ignore[arg-type]
    registry = CollectorRegistry()
    supervisor = Supervisor("bridge-test", registry=registry, backoff_initial_s=0.01)
    bridge = BridgeActor(
        settings,
        redis_client,
        publisher,
        registry=registry,  # type: ignore[arg-type]
        engine_factory=lambda: FailsOnce(make_builtin(settings)),
    )
    supervisor.add(bridge)
    task = asyncio.create_task(supervisor.run())
    bars = spy_day_bars(shared_data)
    try:
        await publish_bars(publisher, bars)

        async def done() -> bool:
            count = len(await read_channel(redis_client, prefix, OUTPUT_CHANNELS[3]))
            return count >= 390

        await eventually(done, timeout=60)
    finally:
        supervisor.stop()
        await asyncio.wait_for(task, 15)
    assert failed == [91]
    assert (
        registry.get_sample_value(
            "tickmesh_actor_restarts_total", {"actor": "engine_bridge.bridge"}
        )
        == 1
    )
    outputs, _, _ = backtest_bars(settings, bars)
    expected = expected_by_channel(outputs)
    got = await published(redis_client, prefix)
    for channel in OUTPUT_CHANNELS:
        assert [strip_seq(p) for p in got[channel]] == expected[channel], channel


async def test_an_engine_past_its_budget_fails_the_actor_and_the_gap_survives_the_restart(
    redis_client: object, unique_name: object, tmp_path: Path
) -> None:
    """The engine crashes on bars 2 and 3; with a budget of one restart the bridge gives up
    inside minute 4. The supervisor restarts the actor, which must not save the half-done
    minute: the new engine decides minute 4, the open gap (2-3) is reported once, and every
    minute's portfolio is published exactly once."""
    from tests.test_bridge_external import ENGINE_SOURCE

    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SOURCE)
    os.environ["TEST_ENGINE"] = json.dumps({"workdir": str(tmp_path), "crash_at": [2, 3]})
    prefix = f"{unique_name('extbudget')}:"  # type: ignore[operator]
    try:
        bridge, _, got = await run_bridge_until(
            redis_client,
            prefix,
            series("SPY", [100.0 + i for i in range(8)]),
            8,
            engine="external",
            external={
                "command": f"{sys.executable} {script}",
                "backoff_initial_ms": 10,
                "max_restarts": 1,
            },
        )
    finally:
        del os.environ["TEST_ENGINE"]
    gaps = [
        msgspec.json.decode(p, type=EngineGap)
        for p in await read_channel(redis_client, prefix, "sentio.engine.gaps.v1")
    ]
    assert [(g.reason, g.fromBarId, g.toBarId, g.minutes) for g in gaps] == [("crash", 2, 3, 2)]
    portfolios = [
        decode_output("sentio.portfolio.minute.v1", p) for p in got["sentio.portfolio.minute.v1"]
    ]
    assert [p.barId for p in portfolios] == list(range(1, 9))  # type: ignore[attr-defined]
    registry = bridge.registry
    assert registry is not None
    assert (
        registry.get_sample_value(
            "tickmesh_actor_restarts_total", {"actor": "engine_bridge.bridge"}
        )
        == 1
    )
    signals = [
        decode_output("sentio.signals.minute.v1", p) for p in got["sentio.signals.minute.v1"]
    ]
    assert [s.barId for s in signals] == [5, 6, 7, 8]  # type: ignore[attr-defined]


# -- restart safety: the bridge as an OS process, SIGKILLed mid-day --------------------------


def two_symbol_day(shared_data: Path) -> list[Bar]:
    return merge_by_minute(day_bars(shared_data, "SPY"), day_bars(shared_data, "IBM"))


def bridge_env(redis_url: str, prefix: str) -> dict[str, str]:
    return {
        **os.environ,
        "BRIDGE_REDIS_URL": redis_url,
        "BRIDGE_KEY_PREFIX": prefix,
        "BRIDGE_HTTP_PORT": "0",
        "BRIDGE_LOG_FORMAT": "json",
        "BRIDGE_SYMBOLS": "SPY,IBM",
        "BRIDGE_STRATEGY": "zscore",
        "BRIDGE_INPUT_START": "earliest",
        "BRIDGE_BUCKET_TIMEOUT_MS": "1500",
        "BRIDGE_PORTFOLIO_ID": "restart",
        "BRIDGE_HEARTBEAT_INTERVAL_MS": "500",
    }


async def start_bridge(env: dict[str, str], log_path: Path) -> asyncio.subprocess.Process:
    log = log_path.open("ab")
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.engine_bridge",
        "run",
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=log,
    )


async def test_a_bridge_killed_mid_day_recovers_its_portfolio_and_fills_nothing_twice(
    redis_url: str,
    redis_client: object,
    unique_name: object,
    shared_data: Path,
    tmp_path: Path,
) -> None:
    """SPY and IBM through the z-score strategy, with the bridge as an OS process:

    1. the morning up to 12:31 is processed (an SPY position is open, entered at 12:30),
       then the bridge is SIGKILLed;
    2. the bars of 12:32-13:59 are published while it is down;
    3. a new process catches up on them and is SIGKILLed again at whatever point it reached;
    4. a third process gets the afternoon.

    What the three published must equal, record for record, one uninterrupted run.
    """
    prefix = f"{unique_name('restart')}:"  # type: ignore[operator]
    env = bridge_env(redis_url, prefix)
    bars = two_symbol_day(shared_data)
    publisher = Publisher(redis_client, keys=Keys(prefix))  # type: ignore[arg-type]
    split = ny_epoch_ms(DAY, 12, 32)
    two_pm = ny_epoch_ms(DAY, 14)
    morning = [b for b in bars if b.startMs < split]
    midday = [b for b in bars if split <= b.startMs < two_pm]
    afternoon = [b for b in bars if b.startMs >= two_pm]
    morning_minutes = (split - ny_epoch_ms(DAY, 9, 30)) // MINUTE_MS
    log_path = tmp_path / "bridge.log"
    processes: list[asyncio.subprocess.Process] = []

    async def portfolio_count() -> int:
        return len(await read_channel(redis_client, prefix, "sentio.portfolio.minute.v1"))

    async def reached(target: int) -> bool:
        return await portfolio_count() >= target

    def log_tail() -> str:
        return log_path.read_text()[-3_000:]

    async def kill(process: asyncio.subprocess.Process) -> int:
        process.send_signal(signal.SIGKILL)
        await process.wait()
        return await portfolio_count()

    try:
        processes.append(await start_bridge(env, log_path))
        await publish_bars(publisher, morning, chunk=20)
        await eventually(lambda: reached(morning_minutes), timeout=60, message=log_tail)
        first_kill = await kill(processes[-1])
        await publish_bars(publisher, midday, chunk=20)  # the bar service goes on meanwhile
        processes.append(await start_bridge(env, log_path))
        await eventually(lambda: reached(morning_minutes + 1), timeout=60, message=log_tail)
        second_kill = await kill(processes[-1])  # somewhere in its catch-up
        processes.append(await start_bridge(env, log_path))
        await publish_bars(publisher, afternoon, chunk=20)
        await eventually(lambda: reached(390), timeout=90, message=log_tail)
        await asyncio.sleep(1.0)  # nothing more may come
        processes[-1].send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(processes[-1].wait(), 20) == 0
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()

    settings = settings_for(
        prefix, symbols=["SPY", "IBM"], strategy="zscore", portfolio_id="restart"
    )
    outputs, summary, _ = backtest_bars(settings, bars)
    expected = expected_by_channel(outputs)
    got = await published(redis_client, prefix)
    for channel in OUTPUT_CHANNELS:
        assert [strip_seq(p) for p in got[channel]] == expected[channel], channel
    assert summary.trades > 0 and len(got["sentio.trades.executed.v1"]) == summary.trades
    trade_ids = [msgspec.json.decode(p)["tradeId"] for p in got["sentio.trades.executed.v1"]]
    assert len(set(trade_ids)) == len(trade_ids)
    started = [
        json.loads(line) for line in log_path.read_text().splitlines() if '"bridge.started"' in line
    ]
    assert [entry["restored"] for entry in started] == [False, True, True]
    assert started[1]["open_positions"] == ["SPY"]  # recovered, not flat
    assert first_kill == morning_minutes and morning_minutes < second_kill <= 390
    print(f"killed after {first_kill} and {second_kill} minutes")
