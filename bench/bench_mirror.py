"""Mirror throughput Redis -> Kafka (records/s, ticks/s) against a naive forwarder, same run.

Everything runs as separate OS processes on this machine, on a private local stack (a fresh
``redis-server`` with the default pub/sub output-buffer limits and the Tansu broker): the
pipelined publisher (``services.mirror.loadgen``, the project's own publish script), the
mirror (``python -m services.mirror run``) and the naive forwarder
(``services.mirror.naive``: one pub/sub message, one Kafka send). Input: one real SPY day
(2013-10-07, 250,601 trades) when the shared data is there, else a synthetic day of the same
size. After every scenario the Kafka side is audited by (channel, seq): "lost" is what Redis
published and Kafka does not hold.

Scenarios:

1. ``naive, 1 trade/message``: the day published once, one message per trade, at full speed;
   the naive forwarder subscribed. Delivered messages/s and what it lost.
2. ``mirror, 1 trade/record, live``: the same load with the mirror subscribed.
3. ``mirror, 100 trades/record, live``: the day published ``--repeat`` times in records of
   100 trades (one record per feed frame and symbol, as ingest publishes), mirror running.
4. ``mirror, 100 trades/record, catch-up``: the same records published first, then the
   mirror started: how fast it empties the streams (restart after an outage).

Rates are records (or ticks) over the time from the first publish (or from the mirror being
ready, for catch-up) to Kafka's acknowledgement of the last record (the mirror's committed
position, polled every 20 ms); the publisher, the mirror, Redis and the broker share the
machine's cores.
Run: ``.venv/bin/python bench/bench_mirror.py [--repeat 4] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec
import redis.asyncio as aioredis
from mesh_gauge import during_cell, during_median, gauged
from summary import LIKE_FOR_LIKE, add_rows, row

from devstack.localstack import RedisServer, TansuBroker, free_port
from devstack.mesh import ServiceProcess
from libs.common.names import Keys
from libs.common.runtime.settings import load_settings
from services.mirror.audit import audit
from services.mirror.config import MirrorSettings

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def data_file() -> Path | None:
    base = Path(
        os.environ.get("TICKMESH_DATA") or REPO.parent / "shared" / "data" / "lean-equity-2013-10"
    )
    path = base / "tick" / "spy" / "20131007_trade.zip"
    return path if path.exists() else None


def source_args() -> list[str]:
    path = data_file()
    return ["--lean", str(path)] if path else ["--synthetic", "250601"]


def mirror_env(redis_url: str, bootstrap: str, name: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "MIRROR_REDIS_URL": redis_url,
        "MIRROR_KAFKA_BOOTSTRAP": bootstrap,
        "MIRROR_KEY_PREFIX": f"{name}:",
        "MIRROR_HTTP_PORT": str(free_port()),
        "MIRROR_HTTP_HOST": "127.0.0.1",
        "MIRROR_LOG_FORMAT": "json",
        "MIRROR_ROUTES": msgspec.json.encode(
            [{"pattern": f"ticks.{name}*", "schema": "TickBatch"}]
        ).decode(),
        "MIRROR_DEADLETTER_TOPIC": f"dlq.{name}",
        "MIRROR_RECONCILE_INTERVAL_S": "0",
        "MIRROR_KAFKA_IDLE_MS": "1500",
    }


def mirror_process(env: dict[str, str], log: Path) -> ServiceProcess:
    """The mirror as an OS process."""
    return ServiceProcess.service(
        "mirror", "mirror", env, log, int(env["MIRROR_HTTP_PORT"]), python=PYTHON, cwd=REPO
    )


def loadgen(
    redis_url: str,
    channel: str,
    prefix: str,
    per_record: int,
    repeat: int,
    started_file: Path | None = None,
) -> subprocess.Popen[str]:
    marker = ["--started-file", str(started_file)] if started_file else []
    return subprocess.Popen(
        [
            PYTHON,
            "-m",
            "services.mirror.loadgen",
            "--redis",
            redis_url,
            "--channel",
            channel,
            "--prefix",
            prefix,
            *source_args(),
            "--per-record",
            str(per_record),
            "--repeat",
            str(repeat),
            "--maxlen",
            "10000000",
            *marker,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> dict[str, object]:
    out, err = process.communicate(timeout=600)
    if process.returncode:
        raise RuntimeError(f"loadgen failed: {err}")
    return json.loads(out.strip().splitlines()[-1])


async def wait_acknowledged(
    redis_url: str, name: str, channel: str, expected: int, timeout_s: float = 900
) -> float:
    """The moment the mirror's committed position reaches ``expected`` (polled every 20 ms)."""
    client = aioredis.Redis.from_url(redis_url)
    key = Keys(f"{name}:").state("positions:mirror")
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            value = await client.hget(key, channel)
            if value is not None and int(value) >= expected:
                return time.time()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the mirror did not reach {expected} on {channel}")
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()


async def audited(redis_url: str, bootstrap: str, name: str, channel: str) -> dict[str, int]:
    settings = load_settings(
        MirrorSettings,
        {
            k: v
            for k, v in mirror_env(redis_url, bootstrap, name).items()
            if k.startswith("MIRROR_")
        },
    )
    client = aioredis.Redis.from_url(redis_url)
    try:
        result = await audit(settings, client, channels=[channel])
    finally:
        await client.aclose()
    return {
        "published": result.published,
        "inKafka": result.inKafka,
        "missing": result.missing,
        "duplicates": result.duplicates,
    }


def run_naive(redis: RedisServer, kafka: TansuBroker, work: Path) -> dict[str, object]:
    name = "naive1"
    channel = f"ticks.{name}SPY"
    ready = work / "naive.ready"
    naive = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "services.mirror.naive",
            "--redis",
            redis.url,
            "--kafka",
            kafka.bootstrap,
            "--pattern",
            f"ticks.{name}*",
            "--topic",
            f"naive.{name}",
            "--idle-exit-s",
            "8",
            "--ready-file",
            str(ready),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not ready.exists():
        time.sleep(0.05)
    loaded = finish(loadgen(redis.url, channel, f"{name}:", 1, 1))
    out, _ = naive.communicate(timeout=900)
    result = json.loads(out.strip().splitlines()[-1])
    published = int(loaded["published"])  # type: ignore[arg-type]
    lost = published - int(result["distinctSeqs"])
    return {
        "scenario": "naive, 1 trade/message",
        "published": published,
        "publishPerS": loaded["recordsPerS"],
        "delivered": result["received"],
        "lost": lost,
        "lostPct": round(100 * lost / published, 2),
        "recordsPerS": result["messagesPerS"],
        "ticksPerS": result["messagesPerS"],
        "seconds": result["seconds"],
        "note": f"re-subscribed {result['reconnects']}x",
    }


def run_mirror_live(
    redis: RedisServer, kafka: TansuBroker, work: Path, name: str, per_record: int, repeat: int
) -> dict[str, object]:
    channel = f"ticks.{name}SPY"
    mirror = mirror_process(mirror_env(redis.url, kafka.bootstrap, name), work / f"{name}.log")
    mirror.start().wait_ready()
    marker = work / f"{name}.started"
    try:
        loaded = finish(loadgen(redis.url, channel, f"{name}:", per_record, repeat, marker))
        published = int(loaded["published"])  # type: ignore[arg-type]
        done = asyncio.run(wait_acknowledged(redis.url, name, channel, published))
    finally:
        mirror.stop()
    seconds = done - float(marker.read_text())
    check = asyncio.run(audited(redis.url, kafka.bootstrap, name, channel))
    ticks = int(loaded["trades"])  # type: ignore[arg-type]
    return {
        "scenario": f"mirror, {per_record} trade{'s' if per_record > 1 else ''}/record, live",
        "published": published,
        "publishPerS": loaded["recordsPerS"],
        "delivered": check["inKafka"],
        "lost": check["missing"],
        "lostPct": round(100 * check["missing"] / published, 2),
        "duplicates": check["duplicates"],
        "seconds": round(seconds, 3),
        "recordsPerS": round(published / seconds),
        "ticksPerS": round(ticks / seconds),
    }


def run_mirror_catch_up(
    redis: RedisServer, kafka: TansuBroker, work: Path, name: str, per_record: int, repeat: int
) -> dict[str, object]:
    channel = f"ticks.{name}SPY"
    loaded = finish(loadgen(redis.url, channel, f"{name}:", per_record, repeat))
    published = int(loaded["published"])  # type: ignore[arg-type]
    mirror = mirror_process(mirror_env(redis.url, kafka.bootstrap, name), work / f"{name}.log")
    try:
        started = mirror.start().wait_ready()
        done = asyncio.run(wait_acknowledged(redis.url, name, channel, published))
    finally:
        mirror.stop()
    seconds = done - started
    check = asyncio.run(audited(redis.url, kafka.bootstrap, name, channel))
    ticks = int(loaded["trades"])  # type: ignore[arg-type]
    return {
        "scenario": f"mirror, {per_record} trades/record, catch-up",
        "published": published,
        "publishPerS": loaded["recordsPerS"],
        "delivered": check["inKafka"],
        "lost": check["missing"],
        "lostPct": round(100 * check["missing"] / published, 2),
        "duplicates": check["duplicates"],
        "seconds": round(seconds, 3),
        "recordsPerS": round(published / seconds),
        "ticksPerS": round(ticks / seconds),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeat",
        type=int,
        default=4,
        help="times the day is published in the 100-trade scenarios",
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--summary", help="append headline rows here (scripts/bench.sh)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-mirror-") as tmp:
        work = Path(tmp)
        redis = RedisServer(
            extra_args=["--client-output-buffer-limit", "pubsub", "32mb", "8mb", "60"]
        )
        kafka = TansuBroker()
        redis.start()
        kafka.start()
        try:
            for label, run in (
                ("naive1", lambda: run_naive(redis, kafka, work)),
                ("live1", lambda: run_mirror_live(redis, kafka, work, "live1", 1, 1)),
                (
                    "live100",
                    lambda: run_mirror_live(redis, kafka, work, "live100", 100, args.repeat),
                ),
                (
                    "catch100",
                    lambda: run_mirror_catch_up(redis, kafka, work, "catch100", 100, args.repeat),
                ),
            ):
                with gauged(work / f"gauge-{label}.txt") as gauge:
                    result = run()
                result["machineGaugeDuring"] = gauge["during"]
                results.append(result)
                print(json.dumps(result), flush=True)
        finally:
            kafka.stop()
            redis.stop()
    source = data_file()
    print()
    print(
        f"input: {'SPY 2013-10-07 (real)' if source else 'synthetic 250,601 trades'}; "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'scenario':<40} {'published':>10} {'in Kafka':>10} {'lost':>14} "
        f"{'records/s':>10} {'ticks/s':>10}  machine gauge ms during it, median (range)"
    )
    for r in results:
        lost = f"{r['lost']:,} ({r['lostPct']} %)"
        print(
            f"{r['scenario']:<40} {r['published']:>10,} {r['delivered']:>10,} {lost:>14} "
            f"{r['recordsPerS']:>10,} {r['ticksPerS']:>10,}  "
            f"{during_cell(r['machineGaugeDuring'])}"
        )
    naive = results[0]
    best = max(results[1:], key=lambda r: r["ticksPerS"])  # type: ignore[arg-type,return-value]
    live100 = results[2]
    print()
    print(
        f"mirror (100 trades/record, live) vs naive: {live100['ticksPerS']:,} vs "
        f"{naive['ticksPerS']:,} ticks/s = {live100['ticksPerS'] / naive['ticksPerS']:.1f}x, "
        f"lost {live100['lost']} vs {naive['lost']:,} ({naive['lostPct']} %)"
    )
    print(
        f"best mirror figure: {best['scenario']}: {best['ticksPerS']:,} ticks/s "
        f"({best['recordsPerS']:,} records/s)"
    )
    live1 = results[1]
    add_rows(
        args.summary,
        [
            row(
                "bench_mirror",
                "mirror, 1 trade/record, live, records/s delivered",
                f"{live1['recordsPerS']:,}",
                f"naive forwarder {naive['recordsPerS']:,}",
                live1["recordsPerS"] / naive["recordsPerS"],  # type: ignore[operator]
                f"{LIKE_FOR_LIKE} (1 trade a message; lost {live1['lost']} vs "
                f"{naive['lost']:,}); target 60,000; machine gauge during each, median ms: "
                f"{during_median(live1['machineGaugeDuring'])} vs "
                f"{during_median(naive['machineGaugeDuring'])}",
            ),
            row(
                "bench_mirror",
                "mirror, 100 trades/record, live, ticks/s",
                f"{live100['ticksPerS']:,}",
                f"naive forwarder {naive['ticksPerS']:,}",
                live100["ticksPerS"] / naive["ticksPerS"],  # type: ignore[operator]
                "not like for like: 100 trades a record vs 1 a message",
            ),
        ],
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
