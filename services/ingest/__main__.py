"""Ingest: the Polygon WebSocket (live or simulated) or tick files in; ticks on Redis out.

Actors (one hop from here): ``client.FeedReader`` (the socket), ``client.FrameProcessor``
(decode and publish) and ``files.TickFileSource`` (tick files, ``INGEST_SOURCE=files``), plus
the heartbeat. ``simulate`` runs the Polygon-compatible simulator; ``replay FILE...`` is
``run`` with ``INGEST_SOURCE=files``.
"""

from __future__ import annotations

import argparse
import sys

from libs.common.io.deadletter import DeadLetters
from libs.common.io.redis_io import StreamReader
from libs.common.io.wiring import add_heartbeat, connect_runtime_redis, make_publisher
from libs.common.runtime.cli import ServiceCli
from libs.common.runtime.service import EXIT_CONFIG, ServiceRuntime, run_main
from services.ingest.backfill import Backfiller, RestTrades
from services.ingest.client import FeedReader, FrameProcessor, IngestMetrics, subscription_topics
from services.ingest.config import IngestSettings
from services.ingest.files import TickFileSource
from services.ingest.publishing import FeedPublisher, ProgressMarker
from services.ingest.simulator.cli import add_simulate_arguments, serve_from_args

CLI = ServiceCli("ingest", __doc__.splitlines()[0], IngestSettings)

DEAD_LETTER_SOURCE = "polygon.ws"
"""``source`` of the dead letters of the socket path."""


async def build(runtime: ServiceRuntime[IngestSettings]) -> None:
    """Create the ingest components under the runtime's supervisor."""
    settings = runtime.settings

    def fatal(reason: str) -> None:
        # A refused key or an unreadable file: a restart cannot fix it (EX_CONFIG).
        runtime.fail(reason, EXIT_CONFIG)

    client = await connect_runtime_redis(runtime)
    publisher = make_publisher(runtime, client)
    metrics = IngestMetrics(runtime.registry)
    feed = FeedPublisher(
        publisher,
        retry_s=settings.publish_retry_s,
        identity_horizon_ms=settings.identity_horizon_ms,
        symbols=list(settings.symbols),
        registry=runtime.registry,
    )
    if settings.backfill and settings.polygon_api_key:
        rest: RestTrades | None = RestTrades(
            settings.rest_url,
            settings.polygon_api_key,
            max_wait_s=settings.rest_max_wait_s,
            registry=runtime.registry,
        )
        unavailable = ""
    else:
        rest = None
        unavailable = (
            "backfill is off (INGEST_BACKFILL=false)"
            if not settings.backfill
            else "no Polygon API key (POLYGON_API_KEY): gaps stay unfilled"
        )
    runtime.supervisor.add(
        Backfiller(
            feed,
            rest,
            unavailable=unavailable,
            concurrency=settings.rest_concurrency,
            registry=runtime.registry,
        )
    )
    await feed.resume_after_restart(StreamReader(client, publisher.keys))
    await feed.publish_gap()
    if settings.source == "files":
        files = TickFileSource(
            settings.files,
            feed,
            metrics,
            on_fatal=fatal,
            on_done=runtime.supervisor.stop if settings.exit_when_done else None,
            speed=settings.speed,
            symbols=settings.symbols,
            batch_frames=settings.publish_batch_frames,
            one_record_per_batch=settings.records == "batch",
            fill_missing=settings.fill_missing,
            dead_letters=DeadLetters(publisher, "ingest", registry=runtime.registry),
            registry=runtime.registry,
        )
        runtime.http.add_readiness("files", lambda: files.loaded)
        runtime.supervisor.add(files)
        runtime.supervisor.add(
            ProgressMarker(
                feed,
                interval_ms=settings.progress_interval_ms,
                idle_after_ms=settings.idle_after_ms,
                registry=runtime.registry,
            )
        )
        add_heartbeat(
            runtime,
            publisher,
            lag_ms=lambda: files.lag_ms,
            status=lambda: "done" if files.done else "reading",
        )
        return
    topics = subscription_topics(settings.symbols, settings.event_types)
    processor = FrameProcessor(
        feed,
        DeadLetters(publisher, "ingest", registry=runtime.registry),
        metrics,
        queue_size=settings.queue_size,
        batch_frames=settings.publish_batch_frames,
        one_record_per_batch=settings.records == "batch",
        linger_ms=settings.linger_ms,
        source=DEAD_LETTER_SOURCE,
        lag_warning_ms=settings.lag_warning_ms,
        registry=runtime.registry,
    )
    reader = FeedReader(
        settings.polygon_url,
        settings.polygon_api_key,
        topics,
        processor,
        metrics,
        on_fatal=fatal,
        initial_delay_s=settings.reconnect_initial_s,
        max_delay_s=settings.reconnect_max_s,
        max_connections_delay_s=settings.max_connections_backoff_s,
        queue_warning_ratio=settings.queue_warning_ratio,
        max_frame_bytes=settings.max_frame_bytes,
        registry=runtime.registry,
    )
    runtime.http.add_readiness("feed", lambda: reader.connected)
    runtime.supervisor.add(processor)
    runtime.supervisor.add(reader)
    runtime.supervisor.add(
        ProgressMarker(
            feed,
            interval_ms=settings.progress_interval_ms,
            idle_after_ms=settings.idle_after_ms,
            live=settings.mode == "live",
            connected=lambda: reader.connected,
            registry=runtime.registry,
        )
    )
    add_heartbeat(
        runtime,
        publisher,
        lag_ms=lambda: processor.lag_ms,
        status=lambda: "ok" if reader.connected else "disconnected",
    )


def run(_args: argparse.Namespace) -> int:
    """``run``: serve until stopped."""
    return run_main("ingest", CLI.settings(), build)


def simulate(args: argparse.Namespace) -> int:
    """``simulate``: serve the Polygon protocol from tick files or synthetic ticks."""
    return serve_from_args(args)


def fill(args: argparse.Namespace) -> int:
    """``fill``: publish the trades of flat files that the tick streams lack (a lost day),
    as fast as Redis takes them, then exit; the bars revise the minutes they touch."""
    overrides: dict[str, object] = {
        "source": "files",
        "files": list(args.files),
        "fill_missing": True,
        "speed": 0.0,
        "exit_when_done": True,
    }
    if args.symbols:
        overrides["symbols"] = [s.strip() for s in args.symbols.split(",") if s.strip()]
    return run_main("ingest", CLI.settings(**overrides), build)


def files(args: argparse.Namespace) -> int:
    """``files``: ``run`` with ``INGEST_SOURCE=files`` and the files (and options) given."""
    overrides: dict[str, object] = {"source": "files", "files": list(args.files)}
    if args.speed is not None:
        overrides["speed"] = args.speed
    if args.exit_when_done:
        overrides["exit_when_done"] = True
    if args.symbols:
        overrides["symbols"] = [s.strip() for s in args.symbols.split(",") if s.strip()]
    return run_main("ingest", CLI.settings(**overrides), build)


CLI.command("run", "run ingest against the configured WebSocket or files (the default)", run)
_simulate_parser = CLI.command(
    "simulate", "serve a Polygon-compatible WebSocket from tick files or synthetic ticks", simulate
)
add_simulate_arguments(_simulate_parser)
_files_parser = CLI.command(
    "files",
    "publish the trades of tick files (Lean zips, Polygon flat-file CSVs) without a socket",
    files,
    aliases=["replay"],
)
_files_parser.add_argument("files", nargs="+", help="tick files, merged in time order")
_files_parser.add_argument(
    "--speed",
    type=float,
    default=None,
    help="1 real time, 10 faster, 0 no pacing (default: INGEST_SPEED)",
)
_files_parser.add_argument(
    "--symbols",
    default=None,
    help="keep only these symbols, comma separated (default: INGEST_SYMBOLS)",
)
_files_parser.add_argument(
    "--exit-when-done",
    action="store_true",
    help="exit when every file is published (INGEST_EXIT_WHEN_DONE)",
)

_fill_parser = CLI.command(
    "fill",
    "re-publish the trades of a day's flat files that Redis lacks (a lost day), then exit",
    fill,
)
_fill_parser.add_argument("files", nargs="+", help="tick files (Polygon flat files, Lean zips)")
_fill_parser.add_argument("--symbols", default=None, help="keep only these symbols")

if __name__ == "__main__":
    sys.exit(CLI.main())
