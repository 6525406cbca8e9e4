"""Mirror: every Redis channel in the routing table to Kafka, without loss; parity reports.

Actors (one hop from here): heartbeat (libs.common.heartbeat).
"""

from __future__ import annotations

import sys

from libs.common.cli import ServiceCli
from libs.common.service import ServiceRuntime, run_main
from libs.common.wiring import add_heartbeat, connect_runtime_redis, make_publisher
from services.mirror.config import MirrorSettings

CLI = ServiceCli("mirror", __doc__.splitlines()[0], MirrorSettings)


async def build(runtime: ServiceRuntime) -> None:
    """Create the mirror's actors under the runtime's supervisor."""
    client = await connect_runtime_redis(runtime)
    publisher = make_publisher(runtime, client)
    add_heartbeat(runtime, publisher)


def run(_args: object) -> int:
    """``run``: serve until stopped."""
    return run_main("mirror", CLI.settings(), build)


CLI.command("run", "run the mirror (the default)", run)

if __name__ == "__main__":
    sys.exit(CLI.main())
