"""A pipelined publisher of tick records, for the overload test and the benchmark.

It publishes through the project's own sequencing script (``redis_io``: INCR, XADD with id
``0-<seq>``, PUBLISH, atomically), so what it sends is exactly what ingest would, but it
writes the ``EVALSHA`` commands as raw RESP in large pipelined chunks: redis-py's command
packing caps a Python publisher at tens of thousands of records a second, and the point here
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
from urllib.parse import urlparse

import msgspec

from libs.common.redis_io import _PUBLISH_LUA, Keys, record_tail
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


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class PipelinedPublisher:
    """Raw-RESP pipelined ``EVALSHA`` of the publish script on one connection."""

    def __init__(
        self, url: str, keys: Keys, *, maxlen: int = 2_000_000, chunk: int = 2_000, window: int = 4
    ) -> None:
        self.url = url
        self.keys = keys
        self.maxlen = str(maxlen).encode()
        self.chunk = chunk
        self.window = window
        self.published = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._sha = b""

    async def __aenter__(self) -> Self:
        parsed = urlparse(self.url)
        self._reader, self._writer = await asyncio.open_connection(
            parsed.hostname or "127.0.0.1", parsed.port or 6379, limit=2**24
        )
        script = _PUBLISH_LUA.encode()
        self._writer.write(b"*3\r\n" + _bulk(b"SCRIPT") + _bulk(b"LOAD") + _bulk(script))
        line = await self._reader.readline()
        if not line.startswith(b"$"):
            raise RuntimeError(f"SCRIPT LOAD failed: {line!r}")
        self._sha = (await self._reader.readline()).strip()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()
            await self._writer.wait_closed()

    def _command(self, channel: bytes, seq_key: bytes, stream_key: bytes, tail: bytes) -> bytes:
        return b"".join(
            (
                b"*8\r\n$7\r\nEVALSHA\r\n",
                _bulk(self._sha),
                b"$1\r\n2\r\n",
                _bulk(seq_key),
                _bulk(stream_key),
                _bulk(channel),
                _bulk(tail),
                _bulk(self.maxlen),
            )
        )

    async def _read_replies(self, count: int) -> None:
        assert self._reader is not None
        for _ in range(count):
            line = await self._reader.readline()
            if not line.startswith(b":"):
                raise RuntimeError(f"publish failed: {line!r}")

    async def publish(self, channel: str, records: Iterator[bytes]) -> int:
        """Publish every record on ``channel``; returns how many."""
        assert self._writer is not None
        writer = self._writer
        seq_key = self.keys.seq(channel).encode()
        stream_key = self.keys.stream(channel).encode()
        name = channel.encode()
        room = asyncio.Semaphore(self.window)
        chunks: asyncio.Queue[int | None] = asyncio.Queue()

        async def read_replies() -> None:
            while (count := await chunks.get()) is not None:
                await self._read_replies(count)
                room.release()

        reader = asyncio.create_task(read_replies())
        count = 0
        buffer: list[bytes] = []
        try:
            for record in records:
                buffer.append(self._command(name, seq_key, stream_key, record_tail(record)))
                if len(buffer) >= self.chunk:
                    await room.acquire()
                    writer.write(b"".join(buffer))
                    await writer.drain()
                    chunks.put_nowait(len(buffer))
                    count += len(buffer)
                    buffer = []
            if buffer:
                await room.acquire()
                writer.write(b"".join(buffer))
                await writer.drain()
                chunks.put_nowait(len(buffer))
                count += len(buffer)
            chunks.put_nowait(None)
            await reader
        finally:
            if not reader.done():
                reader.cancel()
        self.published += count
        return count


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    """Build the records and publish them ``--repeat`` times back to back."""
    if args.lean:
        from libs.common.tickfiles import read_lean_trades

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
