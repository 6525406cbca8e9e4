"""Ingest decode-and-publish throughput into a real redis-server, vs the official client's parse.

Frames: JSON arrays of 100 trades exactly as the simulator sends them (its synthetic market,
symbols drawn with Zipf-like weights: "1 symbol" is one busy ticker, "1000 symbols" spreads a
frame over dozens of records). The same frames feed every path, in the same run:

- ``ingest decode+publish``: the service's own ``FrameProcessor`` actor. Every frame is put in
  its mailbox as the socket reader would; the clock stops when the last tick is published,
  i.e. decoded, grouped per (frame, symbol), encoded as ``TickBatch`` records and written by
  the sequenced publisher (Lua: INCR + XADD + PUBLISH per record, pipelined, up to 64 frames
  per round trip) to a real redis-server started for the bench (``localstack.RedisServer``).
- ``ingest decode only``: ``protocol.records_of_frame`` (everything but Redis).
- ``official parse``: Polygon's official client (``massive``) turning the same frames into its
  model objects: ``json.loads`` then ``massive.websocket.models.parse`` (what its receive loop
  does per frame). Ratios are against this path.

Each path's best pass over ``--repeat`` interleaved rounds counts. The bench process is pinned
to one CPU (``--cpu``, default 0) and redis-server to another when there is one, so "ticks/s"
is what one Python core sustains with Redis beside it.

Run: ``.venv/bin/python bench/bench_ingest_publish.py [--frames 2000] [--repeat 5]``. Figures and
what limits them: ``docs/ingest.md`` (Throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import redis.asyncio as aioredis
import structlog
from bench_ingest_decode import EVENTS_PER_FRAME, make_frames, official_paths
from prometheus_client import CollectorRegistry
from summary import add_rows
from summary import row as summary_row

from devstack.localstack import RedisServer
from libs.common.io.deadletter import DeadLetters
from libs.common.io.redis_io import Publisher
from libs.common.names import Keys
from services.ingest import protocol
from services.ingest.client import Frame, FrameProcessor, IngestMetrics
from services.ingest.config import BATCH_FRAMES
from services.ingest.publishing import FeedPublisher


async def publish_pass(
    client: aioredis.Redis, frames: Sequence[bytes], round_id: str, batch_frames: int
) -> float:
    """Seconds for the FrameProcessor to decode and publish every frame (fresh keys)."""
    registry = CollectorRegistry()
    publisher = Publisher(client, keys=Keys(f"bench:{round_id}:"), registry=registry)
    processor = FrameProcessor(
        FeedPublisher(publisher, registry=registry),
        DeadLetters(publisher, "bench", registry=registry),
        IngestMetrics(registry),
        queue_size=len(frames) + 1,
        batch_frames=batch_frames,
        registry=registry,
        lag_warning_ms=10**13,  # the frames carry 2023 event times
    )
    total = len(frames) * EVENTS_PER_FRAME
    now_ms = time.time_ns() // 1_000_000
    await processor.start()
    try:
        gc.collect()
        started = time.perf_counter()
        for data in frames:
            processor.tell_nowait(Frame(data, now_ms, started))
        while processor.ticks_published < total:
            await asyncio.sleep(0)
        elapsed = time.perf_counter() - started
    finally:
        await processor.stop()
    if processor.ticks_published != total:
        raise RuntimeError(f"published {processor.ticks_published} of {total} ticks")
    return elapsed


def time_sync(function: Callable[[Any], object], inputs: Sequence[Any]) -> float:
    gc.collect()
    started = time.perf_counter()
    for item in inputs:
        function(item)
    return time.perf_counter() - started


async def run_async(
    client: aioredis.Redis,
    frames_count: int,
    repeat: int,
    symbol_counts: Sequence[int],
    batch_frames: int,
) -> list[dict[str, Any]]:
    official = official_paths()
    parse = official.get("official parse")
    rows: list[dict[str, Any]] = []
    for symbols in symbol_counts:
        as_bytes = make_frames(frames_count, symbols)
        as_text = [frame.decode() for frame in as_bytes]
        records, _ = protocol.records_of_frame(as_bytes[0], 0)
        best = {"ingest decode+publish": float("inf"), "ingest decode only": float("inf")}
        if parse is not None:
            best["official parse"] = float("inf")
        for round_number in range(repeat):
            round_id = f"{symbols}-{round_number}-{time.time_ns()}"
            best["ingest decode+publish"] = min(
                best["ingest decode+publish"],
                await publish_pass(client, as_bytes, round_id, batch_frames),
            )
            await client.flushdb()
            best["ingest decode only"] = min(
                best["ingest decode only"],
                time_sync(lambda f: protocol.records_of_frame(f, 0), as_bytes),
            )
            if parse is not None:
                best["official parse"] = min(best["official parse"], time_sync(parse, as_text))
        ticks = frames_count * EVENTS_PER_FRAME
        reference = best.get("official parse")
        for name, elapsed in best.items():
            rows.append(
                {
                    "symbols": symbols,
                    "recordsPerFrame": len(records),
                    "path": name,
                    "ticksPerS": ticks / elapsed,
                    "usPerFrame": elapsed / frames_count * 1e6,
                    "ratio": (reference / elapsed) if reference else None,
                }
            )
    return rows


def print_table(rows: Sequence[dict[str, Any]]) -> None:
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2_000, help="frames per pass")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the best pass counts")
    parser.add_argument("--symbols", default="1,10,1000", help="symbol counts, comma separated")
    parser.add_argument(
        "--batch-frames",
        type=int,
        default=BATCH_FRAMES,
        help=f"frames per Redis round trip (INGEST_PUBLISH_BATCH_FRAMES, {BATCH_FRAMES})",
    )
    parser.add_argument("--cpu", type=int, default=0, help="CPU for this process (-1: no pin)")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead")
    parser.add_argument("--summary", help="append headline rows here (scripts/bench.sh)")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings+
    symbol_counts = [int(part) for part in args.symbols.split(",") if part.strip()]
    cpus = sorted(os.sched_getaffinity(0))
    server = RedisServer().start()
    try:
        pinned = "not pinned"
        if args.cpu >= 0:
            os.sched_setaffinity(0, {args.cpu})
            others = [cpu for cpu in cpus if cpu != args.cpu]
            if others:
                os.sched_setaffinity(server.pid, set(others))
            pinned = f"bench on CPU {args.cpu}, redis-server on {others or 'the same CPU'}"

        async def go() -> list[dict[str, Any]]:
            client = aioredis.Redis.from_url(server.url)
            try:
                return await run_async(
                    client, args.frames, args.repeat, symbol_counts, args.batch_frames
                )
            finally:
                await client.aclose()

        rows = asyncio.run(go())
    finally:
        server.stop()
    official = {row["symbols"]: row["ticksPerS"] for row in rows if row["path"] == "official parse"}
    add_rows(
        args.summary,
        [
            summary_row(
                "bench_ingest_publish",
                f"decode + publish into redis-server, {row['symbols']} symbols "
                f"({row['recordsPerFrame']} records a frame), ticks/s",
                f"{row['ticksPerS']:,.0f}",
                f"official parse {official[row['symbols']]:,.0f}"
                if row["symbols"] in official
                else "",
                row["ratio"],
                "not like for like: ours decodes and publishes, the official client only parses",
            )
            for row in rows
            if row["path"] == "ingest decode+publish"
        ],
    )
    if args.json:
        print(json.dumps(rows))
        return 0
    print(
        f"ingest decode+publish bench: {args.frames} frames x {EVENTS_PER_FRAME} trades, best of "
        f"{args.repeat}; {args.batch_frames} frames per round trip; {pinned}; "
        f"Python {platform.python_version()} on {platform.machine()}"
    )
    if not any(row["path"] == "official parse" for row in rows):
        print("(official client not installed: pip install massive)")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
