"""The naive forwarder the mirror is measured against: one pub/sub message, one Kafka send.

It subscribes to a channel pattern and sends each message to Kafka as it arrives (no
sequence check, no stream, no positions), which is what a first attempt looks like. When it
falls behind, Redis cuts it at the pub/sub output-buffer limit and redis-py re-subscribes
without a word: the messages in between are gone and nothing says so. It exists for the
overload test and the benchmark only.

``python -m services.mirror.naive --redis URL --kafka HOST:PORT --pattern 'ticks.*'
--topic naive.ticks`` runs until ``--idle-exit-s`` pass without a message, then prints one
JSON line: messages received and sent, and the span of sequence numbers seen.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

import msgspec
from aiokafka import AIOKafkaProducer
from redis.exceptions import ConnectionError as RedisConnectionError

from libs.common.io.security import kafka_options, redis_client, tool_settings
from libs.common.schemas import seq_of


async def forward(
    redis_url: str,
    kafka_bootstrap: str,
    pattern: str,
    topic: str,
    *,
    idle_exit_s: float,
    ready_file: str | None = None,
) -> dict[str, object]:
    """Forward until idle; returns the counts."""
    settings = tool_settings(redis_url=redis_url, kafka_bootstrap=kafka_bootstrap)
    client = redis_client(settings, name="tickmesh-naive")
    producer = AIOKafkaProducer(
        **kafka_options(settings), acks="all", linger_ms=5, max_batch_size=1_048_576
    )
    await producer.start()
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.psubscribe(pattern)
    if ready_file:
        with open(ready_file, "w") as marker:  # noqa: ASYNC230 - a few bytes, once
            marker.write("ready\n")
    received = 0
    reconnects = 0
    first_at = last_at = 0.0
    seqs: set[int] = set()
    try:
        while True:
            try:
                message = await pubsub.get_message(timeout=idle_exit_s)
            except RedisConnectionError:
                # what a first attempt does (and what redis-py itself does when its retry
                # applies): subscribe again and carry on; what was sent meanwhile is gone
                reconnects += 1
                await pubsub.aclose()
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                await pubsub.psubscribe(pattern)
                continue
            if message is None:
                if received:
                    break
                continue
            if message["type"] != "pmessage":
                continue
            received += 1
            last_at = time.perf_counter()
            if received == 1:
                first_at = last_at
            data = message["data"]
            try:
                seqs.add(seq_of(data))
            except ValueError:
                pass
            await producer.send(topic, data, key=message["channel"])
        await producer.flush()
    finally:
        await pubsub.aclose()
        await producer.stop()
        await client.aclose()
    seconds = max(last_at - first_at, 1e-9)
    return {
        "received": received,
        "sent": received,
        "reconnects": reconnects,
        "distinctSeqs": len(seqs),
        "maxSeq": max(seqs) if seqs else 0,
        "seconds": round(seconds, 3),
        "messagesPerS": round(received / seconds),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m services.mirror.naive", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--redis", required=True)
    parser.add_argument("--kafka", required=True)
    parser.add_argument("--pattern", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--idle-exit-s", type=float, default=5.0)
    parser.add_argument("--ready-file", help="written once subscribed")
    args = parser.parse_args(argv)
    result = asyncio.run(
        forward(
            args.redis,
            args.kafka,
            args.pattern,
            args.topic,
            idle_exit_s=args.idle_exit_s,
            ready_file=args.ready_file,
        )
    )
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
