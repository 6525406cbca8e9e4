"""``python -m devstack.soak``: the command line of the soak (``bash scripts/soak.sh``)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from devstack.soak.plan import DEFAULT_WEEK, SERVICES, SoakOptions, parse_faults
from devstack.soak.run import Soak, result_json
from services.ingest.simulator.settings import ReplayDay

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = Path(
    os.environ.get("TICKMESH_DATA", REPO.parent / "shared" / "data" / "lean-equity-2013-10")
)


def build_parser() -> argparse.ArgumentParser:
    """The soak's flags."""
    parser = argparse.ArgumentParser(
        prog="scripts/soak.sh",
        description="A week in one command: trading days replayed through the whole mesh "
        "(separate processes on the local stack) with faults at seeded random points; each "
        "day reconciled against the source; a Markdown table, the promotion gate, JSON with "
        "--out. Exits 1 when a day falls short of the target.",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Lean data folder")
    parser.add_argument(
        "--days",
        default=",".join(DEFAULT_WEEK),
        help="SOURCE[:AS_OF],... replayed in order on one connection (default: the week "
        "2013-10-07..09, then the 7th as the 10th and the 8th as the 11th)",
    )
    parser.add_argument("--symbols", default="SPY,IBM,AIG,BAC")
    parser.add_argument(
        "--speed", type=float, default=600.0, help="replay pace (600: a day in about 96 s)"
    )
    parser.add_argument(
        "--faults",
        default="all",
        help="all, none, or a comma list of kill, broker_pause, redis_restart, drop, "
        "malformed, burst (default all)",
    )
    parser.add_argument("--seed", type=int, default=7, help="the schedule's seed (default 7)")
    parser.add_argument(
        "--kill-order",
        default=",".join(SERVICES),
        help="services SIGKILLed, one a day in this order (default %(default)s)",
    )
    parser.add_argument("--broker-pause-s", type=float, default=20.0)
    parser.add_argument("--burst-factor", type=float, default=5.0)
    parser.add_argument("--burst-seconds", type=float, default=3.0)
    parser.add_argument("--malformed-rounds", type=int, default=1)
    parser.add_argument("--day-pause-s", type=float, default=3.0, help="quiet time between days")
    parser.add_argument("--grace-ms", type=int, default=1_000, help="the builders' grace")
    parser.add_argument("--target-pct", type=float, default=99.9)
    parser.add_argument(
        "--lenient-gaps",
        action="store_true",
        help="judge a day's completeness outside reported feed gaps only (for a feed whose "
        "gaps cannot be backfilled; default: minutes inside gaps count against the day)",
    )
    parser.add_argument("--workdir", type=Path, help="logs and Redis data (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    return parser


def options_from_args(args: argparse.Namespace) -> SoakOptions:
    """``SoakOptions`` from parsed flags; ``ValueError`` when one is wrong."""
    days = [ReplayDay.parse(text) for text in args.days.split(",") if text.strip()]
    if not days:
        raise ValueError("--days: no day given")
    kill_order = tuple(name.strip() for name in args.kill_order.split(",") if name.strip())
    unknown = [name for name in kill_order if name not in SERVICES]
    if unknown:
        raise ValueError(f"--kill-order: unknown services {unknown} (choose from {SERVICES})")
    if not args.data.is_dir():
        raise ValueError(f"--data {args.data}: no such folder")
    return SoakOptions(
        data_dir=args.data,
        days=days,
        symbols=[s.strip().upper() for s in args.symbols.split(",") if s.strip()],
        speed=args.speed,
        faults=parse_faults(args.faults),
        seed=args.seed,
        kill_order=kill_order,
        broker_pause_s=args.broker_pause_s,
        burst_factor=args.burst_factor,
        burst_seconds=args.burst_seconds,
        malformed_rounds=args.malformed_rounds,
        day_pause_s=args.day_pause_s,
        grace_ms=args.grace_ms,
        target_pct=args.target_pct,
        strict_gaps=not args.lenient_gaps,
        workdir=args.workdir,
        out=args.out,
    )


def _stop_on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the soak; 0 when every day is at the target, 1 when one falls short."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = options_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    signal.signal(signal.SIGTERM, _stop_on_signal)  # stop the mesh on the way out
    result = Soak(options, say=lambda line: print(line, flush=True)).run()
    print("\n== tickmesh soak ==\n")
    print(result.markdown(), flush=True)
    if options.out is not None:
        options.out.write_text(json.dumps(result_json(result, options), indent=2) + "\n")
        print(f"\nJSON: {options.out}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
