"""``python -m services.ingest.simulator``: serve, or ``inject FAULT`` into a running one."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import signal
import sys
from collections.abc import Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any

import structlog

from libs.common.market.sessions import parse_day
from libs.common.runtime.loop import event_loop_from_env, run_on_loop, tune_gc
from libs.common.runtime.settings import Secret
from services.ingest.simulator.server import run_simulator
from services.ingest.simulator.settings import (
    CONTROL_KEY_HEADER,
    CONTROL_PREFIX,
    DEFAULT_HISTORY_TRADES,
    DEFAULT_KEY,
    KEY_ENV,
    Fault,
    FileFeed,
    ReplayDay,
    SimulatorSettings,
    SyntheticFeed,
)

log = structlog.get_logger("ingest.simulator")


def add_simulate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``simulate`` options to ``parser`` (reusable under ``python -m services.ingest``)."""
    net = parser.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s)")
    net.add_argument("--port", type=int, default=8765, help="port, 0 for any (default %(default)s)")
    net.add_argument(
        "--key",
        default=None,
        help=f"API key clients must send (default: ${KEY_ENV}, else the built-in local key)",
    )
    net.add_argument("--max-connections", type=int, default=1, help="per key (default 1)")
    net.add_argument("--auth-timeout-s", type=float, default=10.0, help="default %(default)s")
    net.add_argument("--frame-max-events", type=int, default=100, help="default %(default)s")
    net.add_argument(
        "--frame-window-ms",
        type=int,
        default=1,
        help="a frame holds trades of one window of event time (default %(default)s)",
    )
    net.add_argument(
        "--slow-consumer-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="queued bytes above which a client counts as slow (default %(default)s)",
    )
    net.add_argument(
        "--slow-consumer-after-s",
        type=float,
        default=5.0,
        help="how long a client may stay slow before slow_consumer; 0 = never (default 5)",
    )
    net.add_argument("--no-control", action="store_true", help="disable GET /control/*")
    run = parser.add_argument_group("run")
    run.add_argument("--duration-s", type=float, default=None, help="stop after this long")
    run.add_argument("--max-events", type=int, default=None, help="stop the feed after N events")
    run.add_argument("--no-minute-aggs", action="store_true", help="do not send AM events")
    run.add_argument(
        "--exit-when-done",
        action="store_true",
        help="exit once a finite feed (file, --max-events) is sent and the queues are empty",
    )
    run.add_argument(
        "--history-max-trades",
        type=int,
        default=DEFAULT_HISTORY_TRADES,
        help="trades kept for GET /v3/trades, the newest; older ones are gone (410) "
        "(default %(default)s, about 300 bytes each)",
    )
    files = parser.add_argument_group("tick-file feed")
    files.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("TICKMESH_DATA", "../shared/data")),
        help="directory holding tick/<sym>/<yyyymmdd>_trade.zip (searched recursively)",
    )
    files.add_argument("--date", default=None, help="day to replay, YYYY-MM-DD")
    files.add_argument(
        "--days",
        default=None,
        help="days to replay one after the other on the same connections, instead of --date: "
        "SOURCE[:AS_OF],... e.g. 2013-10-07,2013-10-07:2013-10-10 (the trades of SOURCE sent "
        "as AS_OF, each at its New York time of day)",
    )
    files.add_argument(
        "--day-pause-s",
        type=float,
        default=3.0,
        help="quiet time between two days of --days (default %(default)s)",
    )
    files.add_argument(
        "--hold-between-days",
        action="store_true",
        help="after a day's pause, wait for GET /control/release before the next day",
    )
    files.add_argument("--symbols", default=None, help="symbols to replay, e.g. SPY,IBM")
    files.add_argument(
        "--speed", type=float, default=1.0, help="1 real time, 0 as fast as possible"
    )
    synthetic = parser.add_argument_group("synthetic feed")
    synthetic.add_argument(
        "--synthetic-symbols", type=int, default=None, help="N synthetic symbols S0001.."
    )
    synthetic.add_argument("--rate", type=float, default=1_000.0, help="trades/s in total")
    synthetic.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    synthetic.add_argument(
        "--synthetic-day",
        default=None,
        help="YYYY-MM-DD: one trading day in event time per the exchange calendar (--rate per "
        "second of it, paced by --speed; a holiday sends nothing) instead of wall time",
    )
    return parser


def settings_from_args(
    args: argparse.Namespace, environ: dict[str, str] | None = None
) -> SimulatorSettings:
    """Build ``SimulatorSettings`` from parsed ``simulate`` arguments; ``ValueError`` if bad."""
    environ = dict(os.environ) if environ is None else environ
    key = args.key or environ.get(KEY_ENV) or DEFAULT_KEY
    feed: SyntheticFeed | FileFeed
    if args.synthetic_symbols is not None or args.synthetic_day:
        if args.symbols or args.date or args.days:
            raise ValueError("choose one feed: --synthetic-symbols or --date/--days/--symbols")
        day = parse_day(args.synthetic_day) if args.synthetic_day else None
        feed = SyntheticFeed(
            symbols=args.synthetic_symbols or SyntheticFeed().symbols,
            rate_per_s=args.rate,
            seed=args.seed,
            day=day,
            speed=args.speed if day is not None else 0.0,
        )
    elif args.symbols or args.date or args.days:
        if args.date and args.days:
            raise ValueError("choose --date (one day) or --days (several)")
        if not (args.symbols and (args.date or args.days)):
            raise ValueError("a tick-file feed needs both --date and --symbols (or --days)")
        symbols = tuple(s.strip().upper() for s in args.symbols.split(",") if s.strip())
        days = tuple(ReplayDay.parse(text) for text in (args.days or "").split(",") if text.strip())
        feed = FileFeed(
            args.data,
            days[0].source if days else parse_day(args.date),
            symbols,
            args.speed,
            days=days,
            day_pause_s=args.day_pause_s,
            hold_between_days=args.hold_between_days,
        )
    else:
        feed = SyntheticFeed(rate_per_s=args.rate, seed=args.seed)
    return SimulatorSettings(
        api_key=Secret(key),
        host=args.host,
        port=args.port,
        feed=feed,
        max_connections=args.max_connections,
        auth_timeout_s=args.auth_timeout_s,
        frame_max_events=args.frame_max_events,
        frame_window_ms=args.frame_window_ms,
        minute_aggregates=not args.no_minute_aggs,
        duration_s=args.duration_s,
        max_events=args.max_events,
        slow_consumer_buffer_bytes=args.slow_consumer_bytes,
        slow_consumer_after_s=args.slow_consumer_after_s or None,
        control=not args.no_control,
        exit_when_feed_done=args.exit_when_done,
        history_max_trades=args.history_max_trades,
    )


def build_parser() -> argparse.ArgumentParser:
    """The standalone parser of ``python -m services.ingest.simulator``."""
    parser = argparse.ArgumentParser(
        prog="python -m services.ingest.simulator",
        description="Polygon-compatible stocks WebSocket simulator (tick files or synthetic). "
        "Fault injection: `inject FAULT` (see --help of inject).",
    )
    return add_simulate_arguments(parser)


def build_inject_parser() -> argparse.ArgumentParser:
    """Parser of ``python -m services.ingest.simulator inject FAULT``."""
    parser = argparse.ArgumentParser(
        prog="python -m services.ingest.simulator inject",
        description="Ask a running simulator to inject a fault (GET /control/inject).",
    )
    parser.add_argument("fault", choices=[fault.value for fault in Fault])
    parser.add_argument("--count", type=int, default=1, help="sessions, or malformed rounds")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--key", default=None, help=f"simulator key (default: ${KEY_ENV})")
    return parser


def inject_remote(
    host: str, port: int, fault: str, count: int, key: str, timeout_s: float = 5.0
) -> dict[str, Any]:
    """Call ``GET /control/inject`` on a running simulator; returns its JSON answer."""
    return control_remote(
        host, port, f"inject?fault={fault}&count={count}", key, timeout_s=timeout_s
    )


def control_remote(
    host: str, port: int, path: str, key: str, *, timeout_s: float = 5.0
) -> dict[str, Any]:
    """``GET /control/<path>`` on a running simulator (``status``, ``inject?...``); its JSON."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.request("GET", f"{CONTROL_PREFIX}{path}", headers={CONTROL_KEY_HEADER: key})
        response = connection.getresponse()
        body: dict[str, Any] = json.loads(response.read() or b"{}")
        if response.status != HTTPStatus.OK:
            raise RuntimeError(f"simulator refused: {response.status} {body.get('error', '')}")
        return body
    finally:
        connection.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve (default) or, with ``inject FAULT``, inject a fault into a running simulator."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["inject"]:
        inject_args = build_inject_parser().parse_args(args_list[1:])
        key = inject_args.key or os.environ.get(KEY_ENV) or DEFAULT_KEY
        try:
            answer = inject_remote(
                inject_args.host, inject_args.port, inject_args.fault, inject_args.count, key
            )
        except (OSError, RuntimeError) as exc:
            print(f"simulator inject: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(answer))
        return 0
    return serve_from_args(build_parser().parse_args(args_list))


def serve_from_args(args: argparse.Namespace) -> int:
    """Serve with parsed ``simulate`` arguments until a signal or the feed's end."""
    try:
        settings = settings_from_args(args)
        event_loop = event_loop_from_env()
    except ValueError as exc:
        print(f"simulator: {exc}", file=sys.stderr)
        return 2
    from libs.common.runtime.logs import configure_logging

    configure_logging("ingest-simulator")
    tune_gc()
    try:
        run_on_loop(_serve_until_signal(settings), event_loop)
    except FileNotFoundError as exc:
        print(f"simulator: {exc}", file=sys.stderr)
        return 2
    return 0


async def _serve_until_signal(settings: SimulatorSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await run_simulator(settings, stop)


if __name__ == "__main__":
    sys.exit(main())
