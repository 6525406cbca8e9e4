"""Engine bridge: closed bars in; signals, trades, positions, portfolio and heartbeats out.

Actors (one hop from here): the bridge (``bridge.BridgeActor``: input consumer, core, engine
— built-in ``strategies`` or ``external``), or the replay (``replay.OutputReplay``) when
``BRIDGE_ENGINE=replay``; the heartbeat (``libs.common.io.heartbeat``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec

from libs.common.io.wiring import add_heartbeat, connect_runtime_redis, make_publisher
from libs.common.market import calendar
from libs.common.runtime.cli import ServiceCli
from libs.common.runtime.service import ServiceRuntime, run_main
from services.engine_bridge.config import BridgeSettings

CLI = ServiceCli("engine_bridge", __doc__.splitlines()[0], BridgeSettings)


def for_mode(settings: BridgeSettings) -> BridgeSettings:
    """``settings``, with the heartbeat mode ``replay`` when the engine is the replay."""
    if settings.engine == "replay" and settings.mode != "replay":
        return msgspec.structs.replace(settings, mode="replay")
    return settings


def build_for(
    settings: BridgeSettings, *, exit_when_done: bool = False
) -> Callable[[ServiceRuntime[BridgeSettings]], Awaitable[None]]:
    """The ``build`` of ``run_main`` for these settings."""

    async def build(runtime: ServiceRuntime[BridgeSettings]) -> None:
        # the exchange calendar (the session's last bar) is read now, not on the first bar
        await asyncio.to_thread(calendar.load)
        client = await connect_runtime_redis(runtime)
        publisher = make_publisher(runtime, client)
        if settings.engine == "replay":
            from services.engine_bridge.metrics import BridgeMetrics
            from services.engine_bridge.replay import OutputReplay, load_replay

            run, minutes = load_replay(settings.replay.results_path, settings.replay.trades_path)
            metrics = BridgeMetrics.for_registry(runtime.registry)
            replay = OutputReplay(
                run,
                minutes,
                publisher,
                speed_ms=settings.replay.speed_ms,
                bars_channel=settings.replay.bars_channel,
                channels=settings.channels,
                # the run's own portfolioId unless BRIDGE_PORTFOLIO_ID names another
                portfolio_id=None if settings.portfolio_id == "paper" else settings.portfolio_id,
                run_id=settings.effective_run_id(),
                on_done=runtime.supervisor.stop if exit_when_done else None,
                on_minute=lambda _index: metrics.replay_minutes.inc(),
                registry=runtime.registry,
            )
            runtime.supervisor.add(replay)
            add_heartbeat(runtime, publisher, lag_ms=lambda: replay.lag_ms, status=replay.status)
            return
        from services.engine_bridge.bridge import BridgeActor

        bridge = BridgeActor(settings, client, publisher, registry=runtime.registry)
        runtime.supervisor.add(bridge)
        add_heartbeat(runtime, publisher, lag_ms=bridge.lag_ms, status=bridge.status)

    return build


def run(_args: argparse.Namespace) -> int:
    """``run``: serve until stopped."""
    settings = for_mode(CLI.settings())
    return run_main("engine_bridge", settings, build_for(settings))


def replay(args: argparse.Namespace) -> int:
    """``replay``: play results.json + trades.jsonl once, then exit."""
    base = CLI.settings()
    changes: dict[str, object] = {}
    if args.results:
        changes["results_path"] = args.results
    if args.trades:
        changes["trades_path"] = args.trades
    if args.speed_ms is not None:
        changes["speed_ms"] = args.speed_ms
    settings = for_mode(
        CLI.settings(engine="replay", replay=msgspec.structs.replace(base.replay, **changes))
    )
    return run_main("engine_bridge", settings, build_for(settings, exit_when_done=not args.stay))


def backtest(args: argparse.Namespace) -> int:
    """``backtest``: run bars from files through the built-in strategy, offline."""
    from services.engine_bridge.backtest import backtest_files

    overrides: dict[str, object] = {"engine": "builtin"}
    if args.strategy:
        overrides["strategy"] = args.strategy
    settings = CLI.settings(**overrides)
    summary = backtest_files(
        settings,
        bars_files=[Path(path) for path in args.bars],
        vendor_minute_files=[Path(path) for path in args.vendor_minute],
        export_dir=Path(args.export) if args.export else None,
        outputs_path=Path(args.outputs) if args.outputs else None,
    )
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(summary), indent=2).decode() + "\n")
    return 0


CLI.command("run", "run the bridge (the default)", run)
_replay = CLI.command("replay", "replay an engine's results.json + trades.jsonl, then exit", replay)
_replay.add_argument("--results", help="results.json (default BRIDGE_REPLAY_RESULTS_PATH)")
_replay.add_argument("--trades", help="trades.jsonl (default BRIDGE_REPLAY_TRADES_PATH)")
_replay.add_argument("--speed-ms", type=int, help="ms per minute bucket (default REPLAY_SPEED_MS)")
_replay.add_argument("--stay", action="store_true", help="keep serving after the last minute")
_backtest = CLI.command(
    "backtest", "run bar files through a built-in strategy offline; print the figures", backtest
)
_backtest.add_argument("--bars", action="append", default=[], help="JSON-lines bars (repeatable)")
_backtest.add_argument(
    "--vendor-minute",
    action="append",
    default=[],
    help="LEAN minute zip <dir>/<sym>/<yyyymmdd>_trade.zip (repeatable)",
)
_backtest.add_argument("--strategy", help="golden_cross or zscore (default BRIDGE_STRATEGY)")
_backtest.add_argument("--export", help="write results.json and trades.jsonl into this directory")
_backtest.add_argument("--outputs", help="write every record as JSON lines (channel, record)")

if __name__ == "__main__":
    sys.exit(CLI.main())
