"""Dashboard: the mesh live in a browser — candles, trades, positions, portfolio, health.

Components (one hop from here): ``feed.DashboardFeed`` reads the Redis channels through the
reliable consumer into the ``view.View`` and hands its events to the ``hub.Hub``, which fans
them out to each browser's bounded outbox; ``web.DashboardWeb`` serves the page, the snapshot
API and the event stream on the service's HTTP server; and the heartbeat.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from libs.common.io.wiring import add_heartbeat, connect_runtime_redis, make_publisher
from libs.common.runtime.cli import ServiceCli
from libs.common.runtime.service import EXIT_CONFIG, ServiceRuntime, run_main
from services.dashboard.config import DashboardSettings
from services.dashboard.feed import DashboardFeed
from services.dashboard.hub import Hub
from services.dashboard.web import Assets, BundleMissing, DashboardWeb

CLI = ServiceCli("dashboard", __doc__.splitlines()[0], DashboardSettings)


async def build(runtime: ServiceRuntime[DashboardSettings], assets: Assets) -> None:
    """Create the feed, the hub and the routes, and the heartbeat."""
    settings = runtime.settings
    client = await connect_runtime_redis(runtime)
    publisher = make_publisher(runtime, client)
    hub = Hub(
        client_limit=settings.client_buffer_events,
        replay_events=settings.replay_events,
        registry=runtime.registry,
    )
    feed = DashboardFeed(
        settings,
        client,
        hub,
        consumer_name=f"dashboard-{settings.effective_run_id()}-{hub.epoch}",
        registry=runtime.registry,
    )
    runtime.supervisor.add(feed)
    runtime.http.add_readiness("feed", lambda: feed.ready)
    DashboardWeb(settings, feed, hub, assets).install(runtime.http)
    add_heartbeat(runtime, publisher)


def run(_args: argparse.Namespace) -> int:
    """``run``: serve until stopped."""
    settings = CLI.settings()
    try:
        assets = Assets.load()
    except BundleMissing as exc:
        print(f"dashboard: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return run_main("dashboard", settings, partial(build, assets=assets))


CLI.command("run", "serve the dashboard (the default)", run)

if __name__ == "__main__":
    sys.exit(CLI.main())
