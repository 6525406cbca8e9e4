"""Backfill: build 1-minute bars offline from tick files with the same core as the live service.

Input files are Lean trade zips (``tick/<sym>/<yyyymmdd>_trade.zip``: symbol and day from the
path) or Polygon flat-file trade CSVs (gzip or plain, many symbols). Each symbol of each file
is replayed through its own ``BarAggregator`` in file order, in batches, with event time as
the only clock (no wall time offline), so ``grace_ms`` and the revise policy apply to trades
that are out of order by more than the grace, exactly as live. The output holds the final
version of every bar, one JSON object per line with CONTRACT.md's bar fields (no ``seq``),
prices in dollars, ordered by file, symbol and minute.

Primary listings (``libs.common.market.listings``) come from the ``--map-files`` folders, then
the ``map_files`` folder of each Lean file's data set, then the map files tickmesh ships; a
symbol none of them knows is warned about and counted (``primary_listing_unknown``).

Run: ``python -m services.bars.backfill --policy algoseek --out bars.jsonl TICKFILE...``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgspec

from libs.common.market import listings as listing_data
from libs.common.market.aggregator import BarAggregator, BarCounters
from libs.common.market.listings import Listings
from libs.common.market.policies import POLICIES, get_policy
from libs.common.market.tickfiles import read_lean_trades, read_polygon_flatfile_trades
from libs.common.runtime.clock import ManualClock
from libs.common.schemas import Bar, Trade

BATCH_SIZE = 1_000
"""Trades per ``add`` call: the size of a burst of live tick batches."""

BAR_FIELDS = tuple(name for name in Bar.__struct_fields__ if name != "seq")
_ENCODER = msgspec.json.Encoder()


@dataclass
class BackfillSummary:
    """What a backfill read and wrote."""

    policy: str
    out: str
    files: int = 0
    symbols: int = 0
    trades: int = 0
    bars: int = 0
    elapsed_s: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        return json.dumps(asdict(self), sort_keys=False)


def bar_line(bar: Bar) -> bytes:
    """One output line: the bar's contract fields without ``seq``, as JSON."""
    return _ENCODER.encode({name: getattr(bar, name) for name in BAR_FIELDS}) + b"\n"


def read_file(
    path: Path, symbols: set[str] | None = None, listings: Listings | None = None
) -> dict[str, list[Trade]]:
    """The trades of one tick file, per symbol, in file order."""
    if path.name.lower().endswith(".zip"):
        trades = read_lean_trades(path, listings=listings)
        if symbols is not None and trades and trades[0].sym not in symbols:
            return {}
        return {trades[0].sym: trades} if trades else {}
    per_symbol: dict[str, list[Trade]] = {}
    for trade in read_polygon_flatfile_trades(path, symbols):
        bucket = per_symbol.get(trade.sym)
        if bucket is None:
            bucket = per_symbol[trade.sym] = []
        bucket.append(trade)
    return per_symbol


def replay(
    trades: Sequence[Trade],
    policy_name: str,
    grace_ms: int,
    counters: BarCounters,
    listings: Listings | None = None,
) -> list[Bar]:
    """Bars of one symbol's trades replayed in batches; the final version of each bar."""
    symbol = trades[0].sym
    aggregator = BarAggregator(
        symbol,
        get_policy(policy_name, listings=listings),
        grace_ms=grace_ms,
        late_policy="revise",
        clock=ManualClock(0),
    )
    for index in range(0, len(trades), BATCH_SIZE):
        aggregator.add(trades[index : index + BATCH_SIZE], 0, symbol=symbol)
    aggregator.flush()
    for name, value in aggregator.counters.as_dict().items():
        setattr(counters, name, getattr(counters, name) + value)
    return list(aggregator.published().values())


def run_backfill(
    paths: Iterable[str | Path],
    policy_name: str,
    out_path: str | Path,
    grace_ms: int = 0,
    *,
    symbols: Iterable[str] | None = None,
    map_files: Iterable[str | Path] = (),
) -> BackfillSummary:
    """Build bars from ``paths`` under ``policy_name`` and write them to ``out_path``;
    ``map_files``: folders of Lean map files to look in first for primary listings."""
    if policy_name not in POLICIES:
        raise ValueError(f"unknown policy {policy_name!r}; expected one of {sorted(POLICIES)}")
    if grace_ms < 0:
        raise ValueError("grace_ms must not be negative")
    wanted = {symbol.upper() for symbol in symbols} if symbols is not None else None
    started = time.perf_counter()
    summary = BackfillSummary(policy=policy_name, out=str(out_path))
    counters = BarCounters()
    folders = [Path(folder) for folder in map_files]
    seen: set[str] = set()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as handle:
        for raw in paths:
            path = Path(raw)
            summary.files += 1
            listings = listing_data.for_data(path, folders)
            per_symbol = read_file(path, wanted, listings)
            for symbol in sorted(per_symbol):
                trades = per_symbol[symbol]
                seen.add(symbol)
                summary.trades += len(trades)
                bars = replay(trades, policy_name, grace_ms, counters, listings)
                handle.writelines(bar_line(bar) for bar in bars)
                summary.bars += len(bars)
    summary.symbols = len(seen)
    summary.counters = counters.as_dict()
    summary.elapsed_s = round(time.perf_counter() - started, 3)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The backfill's command-line arguments (reusable by the service CLI)."""
    parser.add_argument("--policy", default="algoseek", choices=sorted(POLICIES))
    parser.add_argument("--out", required=True, help="output file, one JSON bar per line")
    parser.add_argument("--grace-ms", type=int, default=0, help="grace before a minute closes")
    parser.add_argument(
        "--symbol",
        action="append",
        dest="symbols",
        default=None,
        help="keep only this symbol (repeatable; default all)",
    )
    parser.add_argument(
        "--map-files",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of Lean map files (<ticker>.csv) for primary listings (repeatable; "
        "looked in before the data set's own map_files and the shipped ones)",
    )
    parser.add_argument(
        "files",
        nargs="+",
        metavar="TICKFILE",
        help="Lean trade zips (tick/spy/20131007_trade.zip) or Polygon flat-file trade CSVs",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build the bars and print the summary as one JSON line."""
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    summary = run_backfill(
        args.files,
        args.policy,
        args.out,
        args.grace_ms,
        symbols=args.symbols,
        map_files=args.map_files,
    )
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
