"""Ingest: the Polygon WebSocket (live or simulated) or tick files in; ticks on Redis out.

Actors (one hop from here): heartbeat (libs.common.heartbeat).
"""

from __future__ import annotations

import sys

from libs.common.cli import ServiceCli
from libs.common.service import ServiceRuntime, run_main
from libs.common.wiring import add_heartbeat, connect_runtime_redis, make_publisher
from services.ingest.config import IngestSettings

CLI = ServiceCli("ingest", __doc__.splitlines()[0], IngestSettings)


async def build(runtime: ServiceRuntime) -> None:
    """Create the ingest's actors under the runtime's supervisor."""
    client = await connect_runtime_redis(runtime)
    publisher = make_publisher(runtime, client)
    add_heartbeat(runtime, publisher)


def run(_args: object) -> int:
    """``run``: serve until stopped."""
    return run_main("ingest", CLI.settings(), build)


CLI.command("run", "run the ingest (the default)", run)

if __name__ == "__main__":
    sys.exit(CLI.main())
