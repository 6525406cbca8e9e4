"""The dashboard in a real browser: Debian's chromium driven by playwright-core.

A dashboard process runs against the session's redis-server. The bar store holds the first
half hour of one symbol's day (as the bars service leaves it); the page loads and draws it.
Then the engine bridge replays its sample day (two symbols, 90 minutes, its trades) onto Redis
as a real feed would: bars, trades, positions and the portfolio. The browser must see the bars
arrive live, the trades in the table at their ET times (the browser's zone is Tokyo), a trade
marker on the chart, the positions left open, the equity; it fetches nothing from elsewhere
and logs no error. The screenshot is saved under ``test-artifacts/dashboard/``.

Needs node, the front end's npm packages and ``/usr/bin/chromium`` (``scripts/bootstrap.sh
--browser`` installs them; ``scripts/test.sh`` runs it so). Without them the test is skipped
with the reason, except in CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import date
from pathlib import Path

import msgspec
import pytest

from devstack.localstack import free_port
from devstack.mesh import ServiceProcess
from libs.common.market.sessions import bar_id, ny_epoch_ms, ts_et_minute
from libs.common.schemas import Bar

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "services" / "dashboard" / "web"
CHECK = ROOT / "tests" / "browser" / "dashboard_check.mjs"
SAMPLES = ROOT / "services" / "engine_bridge" / "samples"
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
CHROMIUM = Path("/usr/bin/chromium")


def browser_or_skip() -> str:
    """The node executable, when everything the browser test needs is here."""
    node = shutil.which("node")
    missing = []
    if node is None:
        missing.append("node")
    if not (WEB / "node_modules" / "playwright-core").is_dir():
        missing.append("playwright-core (npm ci in services/dashboard/web)")
    if not (WEB / "dist" / "app.js").is_file():
        missing.append("the front-end bundle (npm run build in services/dashboard/web)")
    if not CHROMIUM.exists():
        missing.append("/usr/bin/chromium (apt-get install chromium)")
    if missing:
        reason = f"browser test needs {', '.join(missing)}: run bash scripts/bootstrap.sh --browser"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    assert node is not None
    return node


def dashboard_process(
    redis_url: str, key_prefix: str, workdir: Path, extra: dict[str, str] | None = None
) -> ServiceProcess:
    """The dashboard as its own process on a free loopback port."""
    port = free_port()
    env = {
        **os.environ,
        "TICKMESH_REDIS_URL": redis_url,
        "TICKMESH_KEY_PREFIX": key_prefix,
        "TICKMESH_LOG_FORMAT": "json",
        "TICKMESH_HEARTBEAT_INTERVAL_MS": "1000",
        "DASHBOARD_HTTP_PORT": str(port),
        "DASHBOARD_HEALTH_INTERVAL_MS": "500",
        "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    }
    return ServiceProcess.service(
        "dashboard", "dashboard", env, workdir / "dashboard.log", port, python=sys.executable
    ).start()


def run_browser_check(
    node: str, options: dict[str, object], on_loaded: Callable[[], None]
) -> dict[str, object]:
    """Run the node check; ``on_loaded`` when the page drew its first snapshot. Returns the
    check's result (its failures listed) and prints the screenshot's path."""
    process = subprocess.Popen(
        [node, str(CHECK), json.dumps(options)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.append(process.stderr.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    result: dict[str, object] = {}
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("LOADED"):
            on_loaded()
        elif line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    code = process.wait(timeout=180)
    reader.join(5)
    assert result, f"the browser check printed no result (exit {code}):\n{''.join(errors)[-3000:]}"
    print(f"\n[dashboard] screenshot: {result.get('screenshot')}")
    assert code == 0 and not result["failures"], (
        f"browser check failed: {result['failures']}\nresult: {result}\n{''.join(errors)[-2000:]}"
    )
    return result


def history_bars(symbol: str, day: date, first_open: float, minutes: int) -> list[Bar]:
    """``minutes`` pre-market bars from 09:00 ET, as the bars service stores them."""
    bars = []
    price = first_open
    for index in range(minutes):
        start = ny_epoch_ms(day, 9, index)
        close = round(price * (1 + (0.001 if index % 3 else -0.0015)), 2)
        bars.append(
            Bar(
                seq=0,
                symbol=symbol,
                tsET=ts_et_minute(start),
                barId=bar_id(start),
                open=price,
                high=max(price, close) + 0.05,
                low=min(price, close) - 0.05,
                close=close,
                volume=1_000 + 100 * index,
                vwap=round((price + close) / 2, 4),
                trades=10 + index,
                startMs=start,
                endMs=start + 60_000,
            )
        )
        price = close
    return bars


async def test_page_draws_history_then_live_bars_trades_and_positions_in_et(
    redis_url: str, redis_client: object, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    node = browser_or_skip()
    from libs.common.io.barstore import BarStore
    from libs.common.names import Keys

    prefix = f"{unique_name('dash')}:"
    day = date(2025, 10, 27)
    await BarStore(redis_client, Keys(prefix)).put_many(  # type: ignore[arg-type]
        history_bars("S0001", day, 168.0, 30)
    )
    trades = [
        msgspec.json.decode(line)
        for line in (SAMPLES / "trades.jsonl").read_text().splitlines()
        if line.strip() and '"type":"signal"' not in line
    ]
    net: dict[str, int] = {}
    for trade in trades:
        sign = 1 if trade["action"] == "BUY" else -1
        net[trade["symbol"]] = net.get(trade["symbol"], 0) + sign * trade["shares"]
    open_positions = sum(1 for shares in net.values() if shares)  # as the sample ends
    assert open_positions > 0
    dashboard = dashboard_process(redis_url, prefix, tmp_path)
    bridge = ServiceProcess.service(
        "engine_bridge",
        "engine_bridge",
        {
            **dashboard.env,
            "BRIDGE_ENGINE": "replay",
            "BRIDGE_REPLAY_RESULTS_PATH": str(SAMPLES / "results.json"),
            "BRIDGE_REPLAY_TRADES_PATH": str(SAMPLES / "trades.jsonl"),
            "REPLAY_SPEED_MS": "100",
            "BRIDGE_HTTP_PORT": str(free_port()),
        },
        tmp_path / "engine_bridge.log",
        free_port(),
    )
    try:
        dashboard.wait_ready(30)
        result = run_browser_check(
            node,
            {
                "url": f"http://127.0.0.1:{dashboard.http_port}/",
                "screenshot": str(ARTIFACTS / "dashboard.png"),
                "symbol": "S0001",
                "historyBars": 30,
                "firstBarET": "09:00",
                "liveBars": 80,
                "tradeTimesET": [f"{trade['tsET'][11:19]} ET" for trade in trades],
                "positions": open_positions,
                "timeoutMs": 60_000,
            },
            on_loaded=bridge.start,
        )
        assert result["historyBars"] == 30
        assert result["symbols"] == ["S0001", "S0002"]
        assert Path(str(result["screenshot"])).stat().st_size > 10_000
    finally:
        bridge.stop()
        dashboard.stop()
