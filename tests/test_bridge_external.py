"""The external engine: a small engine written here speaks the JSON-lines protocol.

The engine (``ENGINE_SOURCE``) is a plain Python script run as a subprocess. Its behaviour is
set by ``TEST_ENGINE`` (JSON): it buys when a bar closes above the previous close and sells
when below, and can crash once at a barId, stall at a barId, hang, or write garbage. It logs
every message it receives to ``received.jsonl`` so the test can check what the bridge sent.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgspec
import pytest

from libs.common.schemas import ExecutedTrade, Signal
from services.engine_bridge.broker import BrokerConfig
from services.engine_bridge.core import BridgeCore, CoreConfig, Outputs
from services.engine_bridge.external import (
    BarsMessage,
    Decision,
    EngineFailed,
    EngineStartError,
    ExternalEngine,
    Hello,
    LogLine,
    Ready,
    StopMessage,
)
from services.engine_bridge.model import EngineGap, PositionView
from tests.test_bridge_support import series

pytestmark = pytest.mark.timeout(60)

ENGINE_SOURCE = r"""
import json, os, sys, time

config = json.loads(os.environ.get("TEST_ENGINE", "{}"))
workdir = config["workdir"]
received = open(os.path.join(workdir, "received.jsonl"), "a")
previous = {}

def send(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()

for line in sys.stdin:
    message = json.loads(line)
    received.write(line)
    received.flush()
    kind = message["type"]
    if kind == "hello":
        if config.get("silent_hello"):
            continue
        send({"type": "log", "level": "info", "message": "hello from the test engine"})
        send({"type": "ready", "name": "test-engine"})
    elif kind == "stop":
        break
    elif kind == "bars":
        bar_id = message["barId"]
        crash_at = config.get("crash_at")
        crash_at = crash_at if isinstance(crash_at, list) else [crash_at]
        crash_marker = os.path.join(workdir, f"crashed-{bar_id}")
        if bar_id in crash_at and not os.path.exists(crash_marker):
            open(crash_marker, "w").close()
            sys.stderr.write("test engine: crashing on purpose\n")
            sys.exit(3)
        if config.get("always_crash"):
            sys.exit(4)
        if config.get("hang"):
            continue
        if bar_id == config.get("stall_at"):
            time.sleep(config.get("stall_s", 1.0))
        if config.get("garbage"):
            sys.stdout.write("this is not json\n")
        signals, orders = [], []
        for bar in message["bars"]:
            symbol, close = bar["symbol"], bar["close"]
            last = previous.get(symbol)
            previous[symbol] = close
            if last is None or close == last:
                continue
            up = close > last
            signals.append({"symbol": symbol, "signal": "BULLISH" if up else "BEARISH",
                            "confidence": 70, "strategy": "test-momentum"})
            orders.append({"symbol": symbol, "action": "BUY" if up else "SELL",
                           "reason": "up-tick" if up else "down-tick"})
        send({"type": "decision", "id": message["id"], "signals": signals, "orders": orders})
"""


def make_engine(tmp_path: Path, **behaviour: object) -> ExternalEngine:
    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SOURCE)
    env = {
        "TEST_ENGINE": json.dumps({"workdir": str(tmp_path), **behaviour}),
        "PATH": "/usr/bin:/bin",
    }
    options: dict[str, object] = {
        "portfolio_id": "ext",
        "symbols": ["SPY"],
        "timeout_ms": 1_000,
        "start_timeout_ms": 5_000,
        "max_timeouts": 2,
        "max_restarts": 3,
        "backoff_initial_ms": 10,
        "backoff_max_ms": 50,
    }
    for key in list(behaviour):
        if key in options or key in ("restart_window_s",):
            options[key] = behaviour.pop(key)
    env["TEST_ENGINE"] = json.dumps({"workdir": str(tmp_path), **behaviour})
    command = [sys.executable, str(script)]
    return ExternalEngine(command, env=env, **options)  # type: ignore[arg-type]


def received(tmp_path: Path) -> list[dict]:  # type: ignore[type-arg]
    path = tmp_path / "received.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def run_through(
    core: BridgeCore, engine: ExternalEngine, bars: list
) -> tuple[Outputs, list[str]]:  # type: ignore[type-arg]
    outputs: Outputs = []
    reasons: list[str] = []
    for bar in bars:
        core.offer(bar, 0)
        while (bucket := core.ready(0)) is not None:
            engine_input = core.begin(bucket)
            output, reason = await engine.decide(engine_input)
            reasons.append(reason)
            outputs.extend(core.finish(output, gap_reason=reason, engine_restarts=engine.restarts))
    return outputs, reasons


def new_core() -> BridgeCore:
    return BridgeCore(
        CoreConfig(
            symbols=("SPY",),
            engine_name="external",
            broker=BrokerConfig(stop_pct=0.0, target_pct=0.0),
        )
    )


async def test_the_protocol_carries_bars_in_and_signals_and_orders_out(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    await engine.start([PositionView("SPY", 100, 99.5, 7)])
    try:
        core = new_core()
        outputs, reasons = await run_through(core, engine, series("SPY", [100, 101, 102, 101, 100]))
    finally:
        await engine.stop()
    assert engine.name == "test-engine" and reasons == [""] * 5
    hello, *bars_messages, stop = received(tmp_path)
    assert hello["type"] == "hello" and hello["protocol"] == 1 and hello["portfolioId"] == "ext"
    assert hello["positions"] == [
        {
            "symbol": "SPY",
            "shares": 100,
            "entryPrice": 99.5,
            "barsHeld": 7,
            "stopPrice": None,
            "targetPrice": None,
        }
    ]
    assert [m["id"] for m in bars_messages] == [1, 2, 3, 4, 5]
    first = bars_messages[0]
    assert first["tsET"] == "2013-10-07T09:30:00-04:00" and first["barId"] == 1
    assert first["bars"][0]["symbol"] == "SPY" and first["bars"][0]["close"] == 100
    assert bars_messages[2]["positions"][0]["shares"] == 100  # the BUY at bar 2 filled
    assert stop == {"type": "stop"}
    signals = [(r.barId, r.signal, r.strategy) for _, r in outputs if isinstance(r, Signal)]
    assert signals == [
        (2, "BULLISH", "test-momentum"),
        (3, "BULLISH", "test-momentum"),
        (4, "BEARISH", "test-momentum"),
        (5, "BEARISH", "test-momentum"),
    ]
    trades = [(r.barId, r.action, r.reason) for _, r in outputs if isinstance(r, ExecutedTrade)]
    assert trades == [(2, "BUY", "up-tick"), (4, "SELL", "down-tick")]


async def test_a_crashed_engine_is_restarted_and_the_gap_is_reported(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, crash_at=3)
    await engine.start()
    try:
        core = new_core()
        bars = series("SPY", [100, 101, 102, 103, 104, 105])
        outputs, reasons = await run_through(core, engine, bars)
    finally:
        await engine.stop()
    assert reasons == ["", "", "crash", "", "", ""]
    assert engine.restarts == 1
    (gap,) = [r for _, r in outputs if isinstance(r, EngineGap)]
    assert (gap.reason, gap.fromBarId, gap.toBarId, gap.minutes) == ("crash", 3, 3, 1)
    assert gap.restarts == 1 and gap.symbols == ["SPY"] and gap.portfolioId == "paper"
    gap_channels = [c for c, r in outputs if isinstance(r, EngineGap)]
    assert gap_channels == ["sentio.engine.gaps.v1"]
    hellos = [m for m in received(tmp_path) if m["type"] == "hello"]
    assert [h["restarts"] for h in hellos] == [0, 1]
    assert hellos[1]["positions"][0]["shares"] == 100  # the restarted engine knows the position
    # the restarted engine has no memory of bar 3 (it crashed on it), so bar 4 is its first
    signals = [r.barId for _, r in outputs if isinstance(r, Signal)]
    assert signals == [2, 5, 6]


async def test_a_late_answer_is_a_timeout_and_its_stale_reply_is_dropped(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, stall_at=2, stall_s=0.8, timeout_ms=500, max_timeouts=3)
    await engine.start()
    try:
        core = new_core()
        outputs, reasons = await run_through(core, engine, series("SPY", [100, 101, 102, 103]))
    finally:
        await engine.stop()
    assert reasons == ["", "timeout", "", ""]
    assert engine.timeouts == 1 and engine.stale_answers == 1 and engine.restarts == 0
    (gap,) = [r for _, r in outputs if isinstance(r, EngineGap)]
    assert (gap.reason, gap.fromBarId, gap.timeouts) == ("timeout", 2, 1)


async def test_a_hung_engine_is_restarted_after_consecutive_timeouts(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, hang=True, timeout_ms=200, max_timeouts=2)
    await engine.start()
    try:
        _, reasons = await run_through(new_core(), engine, series("SPY", [100, 101, 102]))
    finally:
        await engine.stop()
    assert reasons == ["timeout", "timeout", "timeout"]
    assert engine.restarts == 1  # killed after two in a row, restarted for the third


async def test_past_the_restart_budget_the_engine_fails(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, always_crash=True, max_restarts=2)
    await engine.start()
    try:
        with pytest.raises(EngineFailed, match="budget 2"):
            await run_through(new_core(), engine, series("SPY", [100.0] * 6))
    finally:
        await engine.stop()
    assert engine.restarts == 2


async def test_an_engine_that_cannot_start_or_never_says_ready_fails_fast(tmp_path: Path) -> None:
    missing = ExternalEngine([str(tmp_path / "no-such-engine")])
    with pytest.raises(EngineStartError, match="cannot start"):
        await missing.start()
    silent = make_engine(tmp_path, silent_hello=True, start_timeout_ms=300)
    with pytest.raises(EngineStartError, match="did not answer hello"):
        await silent.start()
    await silent.stop()
    assert silent.pid is not None and not silent.alive


async def test_unreadable_lines_are_counted_and_do_not_break_the_protocol(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, garbage=True)
    await engine.start()
    try:
        _, reasons = await run_through(new_core(), engine, series("SPY", [100, 101]))
    finally:
        await engine.stop()
    assert reasons == ["", ""] and engine.protocol_errors == 2


def test_the_documented_session_decodes_with_the_protocol_messages() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "engine_protocol.md").read_text()
    for word in ('"hello"', '"ready"', '"bars"', '"decision"', '"stop"', '"log"', "timeout"):
        assert word in doc
    session = doc.split("```json")[1].split("```")[0].strip().splitlines()
    from_bridge = msgspec.json.Decoder(Hello | BarsMessage | StopMessage)
    from_engine = msgspec.json.Decoder(Ready | Decision | LogLine)
    kinds = []
    for line in session:
        kind = msgspec.json.decode(line)["type"]
        decoder = from_bridge if kind in ("hello", "bars", "stop") else from_engine
        kinds.append(type(decoder.decode(line)).__name__)
    assert kinds == [
        "Hello",
        "Ready",
        "BarsMessage",
        "Decision",
        "LogLine",
        "BarsMessage",
        "Decision",
        "StopMessage",
    ]
