"""A pipelined publisher of tick records, for the overload test and the benchmark.

It publishes with the project's own ``Publisher`` (one script call per channel per batch:
sequence, stream entry ``0-<seq>`` and PUBLISH, atomically), so what it sends is exactly
what ingest would; it keeps several large batches in flight at once, because the point here
is to publish faster than a slow subscriber reads.

``python -m services.mirror.loadgen --redis URL --channel ticks.SPY --lean FILE`` prints one
JSON line with what it published.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Self

import msgspec
import redis.asyncio as aioredis

from libs.common.io.redis_io import Publisher
from libs.common.io.security import redis_client, tool_settings
from libs.common.names import Keys
from libs.common.schemas import TickBatch, Trade


def synthetic_trades(symbol: str, count: int, start_ms: int = 1_381_152_600_000) -> list[Trade]:
    """``count`` plausible trades, one millisecond apart."""
    return [
        Trade(
            sym=symbol,
            p=round(168.0 + (i % 500) / 100, 2),
            s=100 * (1 + i % 5),
            t=start_ms + i,
            x=4 + i % 8,
            c=(14,) if i % 7 == 0 else (),
            i=str(i + 1),
            z=1,
            q=i + 1,
        )
        for i in range(count)
    ]


def tick_records(
    trades: Sequence[Trade], per_record: int, symbol: str | None = None
) -> Iterator[bytes]:
    """Encoded TickBatch records (``seq`` 0, for the script) of ``per_record`` trades each."""
    encoder = msgspec.json.Encoder()
    for start in range(0, len(trades), per_record):
        chunk = list(trades[start : start + per_record])
        yield encoder.encode(TickBatch(seq=0, sym=symbol or chunk[0].sym, ticks=chunk))


class PipelinedPublisher:
    """Publishes records on one channel with ``window`` batches of ``chunk`` in flight."""

    def __init__(
        self, url: str, keys: Keys, *, maxlen: int = 2_000_000, chunk: int = 5_000, window: int = 3
    ) -> None:
        self.url = url
        self.keys = keys
        self.maxlen = maxlen
        self.chunk = chunk
        self.window = window
        self.published = 0
        self._client: aioredis.Redis | None = None
        self._publisher: Publisher | None = None

    async def __aenter__(self) -> Self:
        self._client = redis_client(
            tool_settings(redis_url=self.url),
            name="tickmesh-loadgen",
            max_connections=self.window + 2,
        )
        self._publisher = Publisher(self._client, keys=self.keys, stream_maxlen=self.maxlen)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def publish(self, channel: str, records: Iterator[bytes]) -> int:
        """Publish every record on ``channel`` in order; returns how many.

        Batches run concurrently on separate connections, each batch's sequence numbers are
        taken atomically by the script, so a channel's stream stays gap-free (the order of
        records *between* concurrent batches follows the order Redis ran them).
        """
        assert self._publisher is not None
        publisher = self._publisher
        in_flight: set[asyncio.Task[list[int]]] = set()
        count = 0
        batch: list[tuple[str, bytes]] = []
        for record in records:
            batch.append((channel, record))
            if len(batch) >= self.chunk:
                while len(in_flight) >= self.window:
                    done, in_flight = await asyncio.wait(
                        in_flight, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in done:
                        task.result()
                in_flight.add(asyncio.create_task(publisher.publish_many(batch)))
                count += len(batch)
                batch = []
        if batch:
            in_flight.add(asyncio.create_task(publisher.publish_many(batch)))
            count += len(batch)
        for task in in_flight:
            await task
        self.published += count
        return count


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    """Build the records and publish them ``--repeat`` times back to back."""
    if args.lean:
        from libs.common.market.tickfiles import read_lean_trades

        trades = read_lean_trades(args.lean)
    else:
        trades = synthetic_trades(args.symbol, args.synthetic)
    if args.limit:
        trades = trades[: args.limit]
    records = list(tick_records(trades, args.per_record, args.symbol))
    keys = Keys(args.prefix)
    async with PipelinedPublisher(args.redis, keys, maxlen=args.maxlen) as publisher:
        if args.started_file:
            with open(args.started_file, "w") as marker:  # noqa: ASYNC230 - a few bytes
                marker.write(f"{time.time()}\n")  # wall clock: read by another process
        started = time.perf_counter()
        for _ in range(args.repeat):
            await publisher.publish(args.channel, iter(records))
    seconds = time.perf_counter() - started
    return {
        "published": publisher.published,
        "trades": len(trades) * args.repeat,
        "seconds": round(seconds, 3),
        "recordsPerS": round(publisher.published / seconds),
        "ticksPerS": round(len(trades) * args.repeat / seconds),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m services.mirror.loadgen", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--redis", required=True, help="Redis URL")
    parser.add_argument("--channel", required=True, help="channel, e.g. ticks.SPY")
    parser.add_argument("--prefix", default="tm:", help="key prefix (TICKMESH_KEY_PREFIX)")
    parser.add_argument("--lean", help="a Lean trade zip to read the trades from")
    parser.add_argument("--symbol", default="SPY", help="symbol in the records")
    parser.add_argument(
        "--synthetic", type=int, default=100_000, help="synthetic trades when no --lean file"
    )
    parser.add_argument("--limit", type=int, default=0, help="use only the first N trades")
    parser.add_argument("--per-record", type=int, default=1, help="trades per record")
    parser.add_argument("--repeat", type=int, default=1, help="publish the day N times")
    parser.add_argument("--maxlen", type=int, default=2_000_000, help="stream MAXLEN")
    parser.add_argument(
        "--started-file", help="write the wall-clock time of the first publish here"
    )
    result = asyncio.run(main_async(parser.parse_args(argv)))
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
