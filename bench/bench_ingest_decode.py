"""Ingest decode throughput vs Polygon's official Python client, on the same frames, same run.

Frames: JSON arrays of 100 trades exactly as the simulator sends them (``T`` events of its
synthetic market; symbols drawn with Zipf-like weights, so "1000 symbols" means many distinct
symbols per frame, "1 symbol" is a single busy ticker).

Paths, each timed over every frame (best of ``--repeat`` interleaved rounds, one thread):

- ``ingest``: ``protocol.records_of_frame`` — decode the frame into typed events, group per
  (kind, symbol), build and JSON-encode the ``TickBatch`` records ingest would publish
  (everything but the Redis round trip, which is measured separately).
- ``ingest, plain Trade``: the same with ``strip_event_tag=True`` (ticks copied to ``Trade``).
- ``ingest, decode only``: ``protocol.decode_frame``.
- ``official parse``: what the official client's ``WebSocketClient.connect`` does to turn a
  frame into model objects: ``json.loads`` then ``massive.websocket.models.parse``.
- ``official client loop``: the client's whole per-frame body (status scans, ``parse``, its
  server-error bookkeeping), called through a real ``WebSocketClient``.

The official client receives text frames as ``str`` (``recv()``), ingest as ``bytes``.
Ratios are against ``official parse`` (the stricter comparison).

Run: ``.venv/bin/python bench/bench_ingest_decode.py [--frames 1000] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from summary import LIKE_FOR_LIKE, add_rows
from summary import row as summary_row

from services.ingest import protocol
from services.ingest.simulator import SyntheticFeed, SyntheticMarket

EVENTS_PER_FRAME = 100


def make_frames(frames: int, symbols: int, seed: int = 1) -> list[bytes]:
    """``frames`` simulator frames of ``EVENTS_PER_FRAME`` trades each."""
    market = SyntheticMarket(SyntheticFeed(symbols=symbols, rate_per_s=1.0, seed=seed))
    start_ms = 1_700_000_000_000
    return [
        protocol.encode_events(market.trades(EVENTS_PER_FRAME, start_ms + index))
        for index in range(frames)
    ]


def time_paths(
    paths: dict[str, tuple[Callable[[Any], object], Sequence[Any]]], repeat: int
) -> dict[str, float]:
    """Best wall time per path over ``repeat`` rounds; each round runs every path once, so a
    burst of load from elsewhere hits all paths alike instead of one. GC stays on, as in life."""
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(repeat):
        for name, (function, inputs) in paths.items():
            gc.collect()
            started = time.perf_counter()
            for item in inputs:
                function(item)
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def official_paths() -> dict[str, Callable[[str], object]]:
    """The official client's frame parsing, or nothing when it is not installed."""
    try:
        from massive import WebSocketClient
        from massive.websocket.models import Market, parse
    except ImportError:
        return {}
    logger = logging.getLogger("bench.official")
    logger.setLevel(logging.WARNING)
    client = WebSocketClient(api_key="bench", market=Market.Stocks)
    loads = client.json.loads
    market = client.market

    def official_parse(message: str) -> object:
        return parse(loads(message), logger, market)

    def official_client_loop(message: str) -> object:
        # The body of WebSocketClient.connect's receive loop for one frame (raw=False).
        msg_json = loads(message)
        for event in msg_json:
            if event["ev"] == "status":
                logger.debug("status: %s", event["message"])
        client._log_server_statuses(msg_json)
        parsed = parse(msg_json, logger, market)
        client._flush_server_errors()
        return parsed

    return {"official parse": official_parse, "official client loop": official_client_loop}


def run(frames: int, repeat: int, symbol_counts: Sequence[int]) -> list[dict[str, Any]]:
    """Time every path for every symbol count; one result row per (symbols, path)."""
    official = official_paths()
    rows: list[dict[str, Any]] = []
    for symbols in symbol_counts:
        as_bytes = make_frames(frames, symbols)
        as_text = [frame.decode() for frame in as_bytes]
        ticks = frames * EVENTS_PER_FRAME
        paths: dict[str, tuple[Callable[[Any], object], Sequence[Any]]] = {
            "ingest": (lambda f: protocol.records_of_frame(f, 0), as_bytes),
            "ingest, plain Trade": (
                lambda f: protocol.records_of_frame(f, 0, strip_event_tag=True),
                as_bytes,
            ),
            "ingest, decode only": (protocol.decode_frame, as_bytes),
        }
        for name, function in official.items():
            paths[name] = (function, as_text)
        records, _ = protocol.records_of_frame(as_bytes[0], 0)
        seconds = time_paths(paths, repeat)
        reference = seconds.get("official parse")
        for name, elapsed in seconds.items():
            rows.append(
                {
                    "symbols": symbols,
                    "recordsPerFrame": len(records),
                    "path": name,
                    "ticksPerS": ticks / elapsed,
                    "usPerFrame": elapsed / frames * 1e6,
                    "ratio": (reference / elapsed) if reference else None,
                }
            )
    return rows


def summary_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, object]]:
    """Headline rows: ingest's decode against the official client's parse, per symbol count."""
    official = {row["symbols"]: row for row in rows if row["path"] == "official parse"}
    out = []
    for row in rows:
        if row["path"] != "ingest" or row["symbols"] not in official:
            continue
        reference = official[row["symbols"]]
        out.append(
            summary_row(
                "bench_ingest_decode",
                f"decode, {row['symbols']} symbols ({row['recordsPerFrame']} records a frame), "
                "ticks/s",
                f"{row['ticksPerS']:,.0f}",
                f"official parse {reference['ticksPerS']:,.0f}",
                row["ratio"],
                f"{LIKE_FOR_LIKE} (same frames, {EVENTS_PER_FRAME} trades each)",
            )
        )
    return out


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """A small fixed-width table."""
    print(
        f"{'symbols':>7}  {'rec/frame':>9}  {'path':<22} {'ticks/s':>12} {'us/frame':>9} "
        f"{'x official':>10}"
    )
    for row in rows:
        ratio = f"{row['ratio']:.1f}x" if row["ratio"] else "-"
        print(
            f"{row['symbols']:>7}  {row['recordsPerFrame']:>9}  {row['path']:<22} "
            f"{row['ticksPerS']:>12,.0f} {row['usPerFrame']:>9.1f} {ratio:>10}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, run, print the table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000, help="frames per pass")
    parser.add_argument("--repeat", type=int, default=7, help="rounds; the best pass counts")
    parser.add_argument(
        "--symbols", default="1,10,1000", help="symbol counts to try, comma separated"
    )
    parser.add_argument("--cpu", type=int, default=None, help="pin the process to this CPU")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead")
    parser.add_argument("--summary", help="append headline rows here (scripts/bench.sh)")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    symbol_counts = [int(part) for part in args.symbols.split(",") if part.strip()]
    rows = run(args.frames, args.repeat, symbol_counts)
    add_rows(args.summary, summary_rows(rows))
    if args.json:
        print(json.dumps(rows))
        return 0
    print(
        f"ingest decode bench: {args.frames} frames x {EVENTS_PER_FRAME} trades, best of "
        f"{args.repeat}; Python {platform.python_version()} on {platform.machine()}"
    )
    if not any(row["path"].startswith("official") for row in rows):
        print("(official client not installed: pip install massive)")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
