"""The replay engine: the file formats, the shipped sample, a real-day round trip, pacing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from libs.common.io.redis_io import Publisher
from libs.common.names import Keys
from libs.common.runtime.supervisor import Supervisor
from libs.common.schemas import Bar, ExecutedTrade, Heartbeat, Portfolio, Position, Signal, decode
from services.engine_bridge.backtest import backtest_bars, run_info, traded_bars
from services.engine_bridge.config import BridgeSettings
from services.engine_bridge.replay import (
    OutputReplay,
    ReplayBook,
    ReplayFormatError,
    export_replay,
    load_replay,
)
from tests.helpers import eventually
from tests.test_bridge_support import read_channel, spy_day_bars

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "services" / "engine_bridge" / "samples"


def play(results: Path, trades: Path) -> list[tuple[str, msgspec.Struct]]:
    run, minutes = load_replay(results, trades)
    book = ReplayBook(run)
    return [item for minute in minutes for item in book.step(minute)]


def test_the_sample_replays_its_own_trades_and_ends_at_its_summary() -> None:
    results, trades = SAMPLES / "results.json", SAMPLES / "trades.jsonl"
    run, minutes = load_replay(results, trades)
    assert run.portfolioId == "sample" and run.symbols == ["S0001", "S0002"]
    assert len(minutes) == 90 and all(len(m.bars) == 2 for m in minutes)
    outputs = play(results, trades)
    replayed = [r for _, r in outputs if isinstance(r, ExecutedTrade)]
    lines = [msgspec.json.decode(line) for line in trades.read_bytes().splitlines()]
    file_trades = [line for line in lines if line.get("type", "trade") == "trade"]
    assert [(t.tradeId, t.price, t.shares) for t in replayed] == [
        (line["tradeId"], line["price"], line["shares"]) for line in file_trades
    ]
    summary = msgspec.json.decode(results.read_bytes())["summary"]
    final = [r for _, r in outputs if isinstance(r, Portfolio)][-1]
    assert final.equity == summary["endEquity"]
    assert final.portfolioId == "sample"


def test_the_sample_is_what_the_synthetic_feed_makes_today(tmp_path: Path) -> None:
    from devstack.bridge_sample import main

    main(tmp_path)
    for name in ("results.json", "trades.jsonl"):
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes(), (
            f"{name} differs from what the synthetic feed makes now; if the simulator changed "
            "on purpose, run: python -m devstack.bridge_sample"
        )


def test_a_real_day_exported_and_replayed_gives_the_bridge_records_back(
    shared_data: Path, tmp_path: Path
) -> None:
    settings = msgspec.convert({"symbols": ["SPY"]}, BridgeSettings)
    bars = spy_day_bars(shared_data)
    outputs, _, _ = backtest_bars(settings, bars)
    traded = traded_bars(settings, bars)
    results, trades = export_replay(tmp_path, run_info(settings, traded), traded, outputs)
    replayed = play(results, trades)

    def records(items: list, kinds: tuple) -> list[bytes]:  # type: ignore[type-arg]
        return [msgspec.json.encode(r) for _, r in items if isinstance(r, kinds)]

    kinds = (Signal, ExecutedTrade, Position, Portfolio)
    assert records(replayed, kinds) == records(outputs, kinds)
    assert [b for _, b in replayed if isinstance(b, Bar)] == traded
    channels = {channel for channel, r in replayed if isinstance(r, Bar)}
    assert channels == {"bars.SPY.1m"}


def test_replay_files_that_break_the_format_are_refused_with_the_line(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text(
        '{"format":"tickmesh.engine-results","version":1,"run":{},'
        '"price_data":{"X":[{"startMs":60000,"open":1,"high":1,"low":1,'
        '"close":1}]}}'
    )
    trades = tmp_path / "trades.jsonl"
    trades.write_text(
        '{"symbol":"X","timeMs":60000,"action":"BUY","shares":1,"price":1}\n'
        '{"symbol":"X","tsET":"2013-10-07T10:00:00","action":"SELL","shares":1,'
        '"price":1}\n'
    )
    with pytest.raises(ReplayFormatError, match=r"trades.jsonl:2: .*no UTC offset"):
        load_replay(results, trades)
    trades.write_text('{"symbol":"X","timeMs":60000,"action":"BUY","price":1}\n')
    with pytest.raises(ReplayFormatError, match=r"trades.jsonl:1: a trade needs"):
        load_replay(results, trades)
    results.write_text('{"format":"other","version":1,"run":{},"price_data":{}}')
    with pytest.raises(ReplayFormatError, match="format 'other'"):
        load_replay(results, trades)


def test_replay_speed_comes_from_the_contracts_variable() -> None:
    from libs.common.runtime.settings import load_settings

    settings = load_settings(BridgeSettings, {"REPLAY_SPEED_MS": "60000"})
    assert settings.replay.speed_ms == 60_000
    assert load_settings(BridgeSettings, {}).replay.speed_ms == 60


async def test_replay_publishes_one_minute_bucket_every_replay_speed_ms(
    redis_client: object, unique_name: object
) -> None:
    prefix = f"{unique_name('replay')}:"  # type: ignore[operator]
    run, minutes = load_replay(SAMPLES / "results.json", SAMPLES / "trades.jsonl")
    minutes = minutes[:8]
    publisher = Publisher(redis_client, keys=Keys(prefix))  # type: ignore[arg-type]
    registry = CollectorRegistry()
    supervisor = Supervisor("replay-test", registry=registry)
    done = asyncio.Event()
    actor = OutputReplay(
        run,
        minutes,
        publisher,
        speed_ms=150,
        run_id="replay-test",
        on_done=done.set,
        registry=registry,
    )
    supervisor.add(actor)
    task = asyncio.create_task(supervisor.run())
    try:
        await asyncio.wait_for(done.wait(), 20)
    finally:
        supervisor.stop()
        await asyncio.wait_for(task, 10)
    gaps = [b - a for a, b in zip(actor.publish_times, actor.publish_times[1:], strict=False)]
    assert len(gaps) == 7
    assert all(0.10 <= gap <= 0.30 for gap in gaps), gaps
    total = actor.publish_times[-1] - actor.publish_times[0]
    assert 7 * 0.15 - 0.03 <= total <= 7 * 0.15 + 0.25
    portfolios = await read_channel(redis_client, prefix, "sentio.portfolio.minute.v1")
    assert len(portfolios) == 8
    assert decode(portfolios[0], Portfolio).tsET == "2025-10-27T09:30:00-04:00"
    bars = await read_channel(redis_client, prefix, "bars.S0001.1m")
    assert [decode(b, Bar).barId for b in bars] == list(range(1, 9))
    beats = [
        decode(b, Heartbeat)
        for b in await read_channel(redis_client, prefix, "sentio.heartbeat.v1")
    ]
    assert len(beats) == 8 and {(b.mode, b.status) for b in beats} == {("replay", "replaying")}
    assert actor.status() == "done"


@pytest.mark.timeout(90)
async def test_the_replay_command_plays_the_sample_and_exits(
    redis_url: str, redis_client: object, unique_name: object
) -> None:
    prefix = f"{unique_name('replaycli')}:"  # type: ignore[operator]
    env = {
        **os.environ,
        "BRIDGE_REDIS_URL": redis_url,
        "BRIDGE_KEY_PREFIX": prefix,
        "BRIDGE_HTTP_PORT": "0",
        "BRIDGE_LOG_FORMAT": "json",
        "REPLAY_SPEED_MS": "0",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.engine_bridge",
        "replay",
        "--results",
        str(SAMPLES / "results.json"),
        "--trades",
        str(SAMPLES / "trades.jsonl"),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()[-2_000:]

    async def all_published() -> bool:
        portfolios = await read_channel(redis_client, prefix, "sentio.portfolio.minute.v1")
        return len(portfolios) == 90

    await eventually(all_published, timeout=5)
    trades = await read_channel(redis_client, prefix, "sentio.trades.executed.v1")
    lines = [
        msgspec.json.decode(line) for line in (SAMPLES / "trades.jsonl").read_bytes().splitlines()
    ]
    file_trades = [line for line in lines if line.get("type", "trade") == "trade"]
    assert len(trades) == len(file_trades) > 0
    heartbeats = await read_channel(redis_client, prefix, "sentio.heartbeat.v1")
    assert {decode(h, Heartbeat).mode for h in heartbeats} == {"replay"}
