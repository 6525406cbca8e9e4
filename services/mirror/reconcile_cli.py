"""``python -m services.mirror reconcile``: one parity report on demand."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from libs.common.io.redis_io import connect_redis
from libs.common.market.sessions import ny_date, parse_day
from libs.common.runtime.clock import SYSTEM_CLOCK
from services.mirror.compare import Tolerance
from services.mirror.config import MirrorSettings
from services.mirror.reconciler import Reconciler
from services.mirror.report import to_json, to_markdown


def add_reconcile_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``reconcile`` subcommand's options."""
    parser.add_argument(
        "--date",
        help="New York trading day, YYYY-MM-DD (default: the newest "
        "day in the bar store, else today)",
    )
    parser.add_argument(
        "--symbols", help="comma-separated symbols (default: every symbol with bars on either side)"
    )
    parser.add_argument(
        "--format",
        choices=("md", "json"),
        default="md",
        help="report format on stdout (default md)",
    )
    parser.add_argument(
        "--out", help="also write the report to this file (.json: JSON, else the --format)"
    )
    parser.add_argument(
        "--tolerance",
        help="allowed difference: exact, 0.001, or "
        "open=0.01,vwap=0.0001 (default MIRROR_RECONCILE_"
        "TOLERANCE)",
    )
    parser.add_argument("--vendor-tolerance", help="tolerance against the vendor's bars")
    parser.add_argument(
        "--min-age-s",
        type=float,
        help="ignore bars that ended less than this long ago (default "
        "MIRROR_RECONCILE_MIN_AGE_S; 0 for a past day)",
    )
    parser.add_argument("--max-listed", type=int, help="entries listed per kind")
    parser.add_argument("--no-vendor", action="store_true", help="skip the vendor check")
    parser.add_argument(
        "--no-store",
        action="store_true",
        help="do not store the day's result for the promotion gate",
    )
    parser.add_argument(
        "--no-publish", action="store_true", help="do not publish to Kafka (MIRROR_PARITY_TOPIC)"
    )
    parser.add_argument(
        "--fail-below-target",
        action="store_true",
        help="exit 3 when the day's parity is below the target",
    )
    parser.add_argument("--quiet", action="store_true", help="only warnings on stderr")


async def reconcile_main(settings: MirrorSettings, args: argparse.Namespace) -> int:
    """Run one report from the command line; print it; returns the exit code."""
    tolerance = Tolerance(args.tolerance) if args.tolerance else None
    vendor_tolerance = Tolerance(args.vendor_tolerance) if args.vendor_tolerance else None
    symbols = [s.strip() for s in args.symbols.split(",") if s.strip()] if args.symbols else None
    client = await connect_redis(settings, max_wait_s=10, name="tickmesh-reconcile")
    try:
        reconciler = Reconciler(settings, client)
        if args.date:
            day = parse_day(args.date)
        else:
            day = await reconciler.reader.latest_day() or ny_date(SYSTEM_CLOCK.now_ms())
        min_age_s = args.min_age_s
        if min_age_s is None and day < ny_date(SYSTEM_CLOCK.now_ms()):
            min_age_s = 0.0  # a past day: nothing is in flight any more
        report = await reconciler.run(
            day,
            symbols=symbols,
            min_age_s=min_age_s,
            vendor=not args.no_vendor,
            store=not args.no_store,
            publish=not args.no_publish,
            tolerance=tolerance,
            vendor_tolerance=vendor_tolerance,
            max_listed=args.max_listed,
        )
        await reconciler.close()
    finally:
        await client.aclose()
    markdown = to_markdown(report)
    rendered = to_json(report).decode() if args.format == "json" else markdown
    sys.stdout.write(rendered + "\n")
    if args.out:
        path = Path(args.out)
        # the command's last step: nothing else is running on the loop
        path.write_text(  # noqa: ASYNC240
            (to_json(report).decode() if path.suffix == ".json" else rendered) + "\n"
        )
    pct = report.parity.totals.parityPct
    if args.fail_below_target and (pct is None or pct < settings.parity_target_pct):
        return 3
    return 0
