"""Mirror: every Redis channel in the routing table to Kafka, without loss; parity reports.

Components (one hop from here): the forwarder (``forwarder.Forwarder``), the reconciler on a
timer (``reconciler.ScheduledReconciler``) and the heartbeat (``libs.common.io.heartbeat``).
``MIRROR_ROLE`` runs the forwarder and the timed reconciler in one process (``all``) or one
of them (``forward``, ``reconcile``: two processes of the same image, as deployed).
Subcommands: ``run`` (the default), ``reconcile`` (one report on demand), ``routes`` (the
routing table in effect), ``audit`` (does Kafka hold every record Redis published?).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import msgspec

from libs.common.io.redis_io import connect_redis
from libs.common.io.wiring import add_heartbeat, connect_runtime_redis, make_publisher
from libs.common.market import calendar
from libs.common.runtime.cli import ServiceCli
from libs.common.runtime.lifecycle import State
from libs.common.runtime.logs import configure_logging
from libs.common.runtime.service import EXIT_CONFIG, ServiceRuntime, run_main
from services.mirror.audit import Audit, audit
from services.mirror.config import MirrorSettings
from services.mirror.forwarder import Forwarder
from services.mirror.reconcile_cli import add_reconcile_arguments, reconcile_main
from services.mirror.reconciler import ScheduledReconciler
from services.mirror.routing import RoutingTable

CLI = ServiceCli("mirror", __doc__.splitlines()[0], MirrorSettings)


async def build(runtime: ServiceRuntime[MirrorSettings]) -> None:
    """Create the mirror's components under the runtime's supervisor: the forwarder, the timed
    reconciler, or both (``MIRROR_ROLE``), and the heartbeat."""
    settings = runtime.settings
    # the exchange calendar is read now, in a thread: the reconciler's first timed run would
    # otherwise read it on the loop (0.4 s stalled, about 45 MiB)
    await asyncio.to_thread(calendar.load)
    client = await connect_runtime_redis(runtime)
    publisher = make_publisher(runtime, client)
    if settings.role == "reconcile":
        reconciler = ScheduledReconciler(settings, client, registry=runtime.registry)
        runtime.supervisor.add(reconciler)
        runtime.http.add_readiness("reconciler", lambda: reconciler.state is State.RUNNING)
        add_heartbeat(runtime, publisher, lag_ms=reconciler.lag_ms, status=reconciler.status)
        return
    forwarder = Forwarder(settings, client, registry=runtime.registry)
    runtime.supervisor.add(forwarder)
    runtime.http.add_readiness("forwarder", lambda: forwarder.state is State.RUNNING)
    if settings.role == "all" and settings.reconcile_interval_s > 0:
        runtime.supervisor.add(ScheduledReconciler(settings, client, registry=runtime.registry))
    add_heartbeat(
        runtime,
        publisher,
        lag_ms=lambda: int(forwarder.oldest_unacked_s() * 1000),
        status=lambda: "behind" if forwarder.falling_behind else "ok",
    )


def service_name(settings: MirrorSettings) -> str:
    """The name the process logs and heartbeats under: ``mirror-reconciler`` for the timed
    reconciler alone (its heartbeat is not the forwarder's, whose lag the dashboard shows),
    else ``mirror``."""
    return "mirror-reconciler" if settings.role == "reconcile" else "mirror"


def run(_args: argparse.Namespace) -> int:
    """``run``: serve until stopped."""
    settings = CLI.settings()
    return run_main(service_name(settings), settings, build)


def reconcile(args: argparse.Namespace) -> int:
    """``reconcile``: one parity report, printed (and stored and published unless told not)."""
    settings = CLI.settings()
    configure_logging(
        "mirror",
        "warning" if args.quiet else settings.log_level,
        "console" if settings.log_format == "auto" else settings.log_format,
    )
    try:
        return asyncio.run(reconcile_main(settings, args))
    except ValueError as exc:
        print(f"mirror reconcile: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def routes(_args: argparse.Namespace) -> int:
    """``routes``: print the routing table in effect as JSON."""
    settings = CLI.settings()
    table = RoutingTable(settings)
    sys.stdout.write(
        msgspec.json.format(
            msgspec.json.encode({"topicMode": settings.topic_mode, "routes": table.describe()}),
            indent=2,
        ).decode()
    )
    sys.stdout.write("\n")
    return 0


def audit_command(args: argparse.Namespace) -> int:
    """``audit``: does Kafka hold every record Redis published on the routed channels?"""
    settings = CLI.settings()
    configure_logging("mirror", "warning", "console")

    async def main() -> Audit:
        client = await connect_redis(settings, max_wait_s=10, name="tickmesh-mirror-audit")
        try:
            channels = (
                [c.strip() for c in args.channels.split(",") if c.strip()]
                if args.channels
                else None
            )
            return await audit(settings, client, channels=channels)
        finally:
            await client.aclose()

    result = asyncio.run(main())
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(result), indent=2).decode() + "\n")
    return 0 if result.missing == 0 else 1


CLI.command("run", "run the mirror (the default)", run)
CLI.command(
    "audit",
    "compare what Redis published on the routed channels with what Kafka holds (by the "
    "tm-channel/tm-seq headers): published, in Kafka, missing, duplicates; exit 1 if missing",
    audit_command,
).add_argument("--channels", help="comma-separated channels (default: every routed channel)")
add_reconcile_arguments(
    CLI.command(
        "reconcile",
        "compare the Redis bars (bar store) with the Kafka bars (shadow builder) for one day and "
        "print the parity report; also stored for the promotion gate and published to Kafka",
        reconcile,
    )
)
CLI.command("routes", "print the routing table in effect (JSON)", routes)

if __name__ == "__main__":
    sys.exit(CLI.main())
