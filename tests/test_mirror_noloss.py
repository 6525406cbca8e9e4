"""Proof of no loss: the mirror as a real OS process, killed, starved of its broker, overloaded.

Each test publishes sequenced tick records on Redis exactly as ingest does, runs
``python -m services.mirror run`` against real Redis and the Kafka-protocol broker, disturbs
it, and then audits Kafka: every (channel, seq) Redis ever published must be there. The
figures (published, in Kafka, duplicates; the naive forwarder's loss) are printed and
attached to the test report as properties.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from devstack.localstack import RedisServer, TansuBroker, free_port
from devstack.mesh import ServiceProcess
from libs.common.io.redis_io import Publisher
from libs.common.market.tickfiles import read_lean_trades
from libs.common.names import Keys
from libs.common.runtime.settings import load_settings
from libs.common.schemas import TickBatch, Trade
from services.mirror.audit import Audit, audit
from services.mirror.config import MirrorSettings
from tests.helpers import eventually

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parent.parent
DAY = "20131007"


def mirror_process(env: dict[str, str], log_path: Path) -> ServiceProcess:
    """``python -m services.mirror run`` with its settings in the environment."""
    return ServiceProcess.service(
        "mirror",
        "mirror",
        {**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        log_path,
        int(env["MIRROR_HTTP_PORT"]),
        cwd=REPO,
    )


def mirror_env(redis_url: str, kafka_bootstrap: str, name: str, **extra: str) -> dict[str, str]:
    env = {
        "MIRROR_REDIS_URL": redis_url,
        "MIRROR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "MIRROR_KEY_PREFIX": f"{name}:",
        "MIRROR_HTTP_PORT": str(free_port()),
        "MIRROR_HTTP_HOST": "127.0.0.1",
        "MIRROR_LOG_FORMAT": "json",
        "MIRROR_ROUTES": msgspec.json.encode(
            [{"pattern": f"ticks.{name}*", "schema": "TickBatch"}]
        ).decode(),
        "MIRROR_DEADLETTER_TOPIC": f"dlq.{name}",
        "MIRROR_RECONCILE_INTERVAL_S": "0",
        "MIRROR_HEARTBEAT_INTERVAL_MS": "1000",
        "MIRROR_KAFKA_IDLE_MS": "1500",
        "MIRROR_RUN_ID": name,
    }
    env.update({f"MIRROR_{key.upper()}": value for key, value in extra.items()})
    return env


def real_day_records(
    shared_data: Path, symbols: list[str], per_record: int
) -> Iterator[tuple[str, TickBatch]]:
    """The day's trades of ``symbols`` as (symbol, TickBatch) in time order across symbols."""
    trades: list[Trade] = []
    for symbol in symbols:
        trades += read_lean_trades(shared_data / "tick" / symbol.lower() / f"{DAY}_trade.zip")
    trades.sort(key=lambda trade: trade.t)
    pending: dict[str, list[Trade]] = {}
    for trade in trades:
        batch = pending.setdefault(trade.sym, [])
        batch.append(trade)
        if len(batch) == per_record:
            yield trade.sym, TickBatch(seq=0, sym=trade.sym, ticks=batch)
            pending[trade.sym] = []
    for symbol, batch in pending.items():
        if batch:
            yield symbol, TickBatch(seq=0, sym=symbol, ticks=batch)


class PacedPublisher:
    """Publishes (channel, record) pairs in chunks at a steady pace, in the background."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        items: list[tuple[str, TickBatch]],
        duration_s: float,
    ) -> None:
        self.publisher = Publisher(client, keys=keys, stream_maxlen=5_000_000)
        self.items = items
        self.chunk = max(1, len(items) // max(1, int(duration_s / 0.05)))
        self.published = 0
        self.ticks = 0
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        for start in range(0, len(self.items), self.chunk):
            chunk = self.items[start : start + self.chunk]
            await self.publisher.publish_many(chunk)
            self.published += len(chunk)
            self.ticks += sum(len(record.ticks) for _, record in chunk)
            await asyncio.sleep(0.05)

    def start(self) -> PacedPublisher:
        self.task = asyncio.create_task(self._run())
        return self

    async def done(self) -> None:
        assert self.task is not None
        await self.task


async def caught_up(client: aioredis.Redis, name: str, channels: list[str]) -> bool:
    """True when the mirror's committed position reached every channel's last sequence."""
    keys = Keys(f"{name}:")
    positions = await client.hgetall(keys.state("positions:mirror"))
    for channel in channels:
        published = int(await client.get(keys.seq(channel)) or 0)
        if int(positions.get(channel.encode(), 0)) < published:
            return False
    return True


def report(
    record_property: Callable[[str, object], None], label: str, result: Audit, **more: object
) -> None:
    figures = {
        "published": result.published,
        "inKafka": result.inKafka,
        "missing": result.missing,
        "duplicates": result.duplicates,
        **more,
    }
    record_property(label, json.dumps(figures))
    print(f"\n{label}: {json.dumps(figures)}")


@pytest.fixture
def name(unique_name: Callable[[str], str]) -> str:
    return unique_name("N").replace("-", "")[-36:]


@pytest.mark.timeout(240)
async def test_sigkill_mid_day_and_restart_kafka_holds_every_tick_record(
    redis_client: aioredis.Redis,
    redis_url: str,
    kafka_bootstrap: str,
    name: str,
    shared_data: Path,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    symbols = ["SPY", "IBM", "AIG", "BAC"]
    items = [
        (f"ticks.{name}{symbol}", record)
        for symbol, record in real_day_records(shared_data, symbols, per_record=50)
    ]
    channels = sorted({channel for channel, _ in items})
    env = mirror_env(redis_url, kafka_bootstrap, name)
    settings = load_settings(MirrorSettings, env)
    mirror = mirror_process(env, tmp_path / "mirror.log").start()
    publisher = None
    try:
        await eventually(mirror.ready, timeout=60)
        publisher = PacedPublisher(
            redis_client, Keys(settings.key_prefix), items, duration_s=8
        ).start()
        positions_key = Keys(settings.key_prefix).state("positions:mirror")

        async def some_mirrored() -> bool:
            values = await redis_client.hvals(positions_key)
            return sum(int(v) for v in values) > len(items) // 5

        await eventually(some_mirrored, timeout=60)
        mirror.kill()  # mid-day, mid-batch: nothing drained, nothing flushed
        killed_at = publisher.published
        await asyncio.sleep(1.5)  # records keep coming while no mirror runs
        mirror.start()
        await publisher.done()
        await eventually(
            lambda: caught_up(redis_client, name, channels), timeout=120, message=mirror.log_tail
        )
    finally:
        mirror.stop()
        if publisher is not None and publisher.task is not None:
            publisher.task.cancel()
    result = await audit(settings, redis_client, channels=channels)
    report(
        record_property,
        "sigkill",
        result,
        ticks=publisher.ticks,
        publishedAtKill=killed_at,
        channels=len(channels),
    )
    assert result.published == len(items)
    assert result.missing == 0, [c.firstMissing for c in result.channels if c.missing]
    assert result.inKafka == result.published


@pytest.mark.timeout(240)
async def test_sigkill_with_sends_in_flight_loses_nothing_and_writes_nothing_twice(
    redis_client: aioredis.Redis,
    redis_url: str,
    kafka_bootstrap: str,
    kafka_broker: TansuBroker,
    name: str,
    shared_data: Path,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """The broker stops acknowledging (SIGSTOP) while the mirror sends, so batches are in the
    air when the mirror is SIGKILLed; the broker then wakes up and writes what it had
    received. The restarted mirror reads back what Kafka holds past its committed positions
    and sends only the rest: every record once, none twice."""
    items = [
        (f"ticks.{name}{symbol}", record)
        for symbol, record in real_day_records(shared_data, ["IBM", "AIG"], per_record=20)
    ]
    channels = sorted({channel for channel, _ in items})
    env = mirror_env(redis_url, kafka_bootstrap, name)
    settings = load_settings(MirrorSettings, env)
    mirror = mirror_process(env, tmp_path / "mirror.log").start()
    publisher = None
    in_flight = 0.0
    try:
        await eventually(mirror.ready, timeout=60)
        publisher = PacedPublisher(
            redis_client, Keys(settings.key_prefix), items, duration_s=10
        ).start()
        await asyncio.sleep(2)
        kafka_broker.pause()  # SIGSTOP: sends stay unacknowledged
        try:
            await eventually(
                lambda: mirror.metric_sum("tickmesh_mirror_in_flight_records") > 0, timeout=20
            )
            in_flight = mirror.metric_sum("tickmesh_mirror_in_flight_records")
            mirror.kill()  # with those batches in the air
        finally:
            kafka_broker.resume()
        await asyncio.sleep(1)
        mirror.start()
        await publisher.done()
        await eventually(
            lambda: caught_up(redis_client, name, channels), timeout=120, message=mirror.log_tail
        )
    finally:
        mirror.stop()
        if publisher is not None and publisher.task is not None:
            publisher.task.cancel()
    result = await audit(settings, redis_client, channels=channels)
    landed = [e for e in mirror.events() if e.get("event") == "mirror.read_back"]
    report(
        record_property,
        "sigkill_in_flight",
        result,
        inFlightAtKill=in_flight,
        readBack=[e.get("landed") for e in landed],
    )
    assert in_flight > 0
    assert result.published == len(items)
    assert result.missing == 0, [c.firstMissing for c in result.channels if c.missing]
    assert result.duplicates == 0, [(c.channel, c.duplicates) for c in result.channels]


@pytest.mark.timeout(240)
async def test_broker_paused_20s_nothing_is_lost_and_the_mirror_catches_up(
    redis_client: aioredis.Redis,
    redis_url: str,
    kafka_bootstrap: str,
    kafka_broker: TansuBroker,
    name: str,
    shared_data: Path,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    items = [
        (f"ticks.{name}{symbol}", record)
        for symbol, record in real_day_records(shared_data, ["IBM", "AIG"], per_record=20)
    ]
    channels = sorted({channel for channel, _ in items})
    # a small local queue: the records published during the pause overflow it, so the
    # consumer must fall back on the streams as well
    env = mirror_env(
        redis_url, kafka_bootstrap, name, stall_warn_ms="2000", queue_max_records="500"
    )
    settings = load_settings(MirrorSettings, env)
    mirror = mirror_process(env, tmp_path / "mirror.log").start()
    publisher = None
    try:
        await eventually(mirror.ready, timeout=60)
        publisher = PacedPublisher(
            redis_client, Keys(settings.key_prefix), items, duration_s=26
        ).start()
        await asyncio.sleep(3)
        kafka_broker.pause()  # SIGSTOP
        paused_at = publisher.published
        try:
            await asyncio.sleep(20)
        finally:
            kafka_broker.resume()  # SIGCONT
        resumed_at = publisher.published
        await publisher.done()
        await eventually(
            lambda: caught_up(redis_client, name, channels), timeout=120, message=mirror.log_tail
        )
        await eventually(
            lambda: "mirror.caught_up" in mirror.event_names(), timeout=20, message=mirror.log_tail
        )
    finally:
        mirror.stop()
        if publisher is not None and publisher.task is not None:
            publisher.task.cancel()
    result = await audit(settings, redis_client, channels=channels)
    names = mirror.event_names()
    report(
        record_property,
        "broker_paused_20s",
        result,
        ticks=publisher.ticks,
        publishedWhilePaused=resumed_at - paused_at,
        logged=[
            n
            for n in names
            if n.startswith(("mirror.", "consumer."))
            and n not in ("mirror.started", "mirror.stopped", "consumer.opened")
        ],
    )
    assert result.published == len(items)
    assert result.missing == 0, [c.firstMissing for c in result.channels if c.missing]
    assert "mirror.kafka_stalled" in names
    assert "mirror.falling_behind" in names and "mirror.caught_up" in names
    assert "consumer.falling_behind" in names and "consumer.caught_up" in names


def run_overload(
    shared_data: Path,
    tmp_path: Path,
    kafka_bootstrap: str,
    name: str,
    trades: int,
    repeat: int,
    timeout_s: float,
) -> dict[str, object]:
    """SPY trades one per message, pipelined, on a Redis with the default pub/sub limits;
    the naive forwarder and the mirror both subscribed. Returns the figures."""
    redis = RedisServer(extra_args=["--client-output-buffer-limit", "pubsub", "32mb", "8mb", "60"])
    redis.start()
    env = mirror_env(redis.url, kafka_bootstrap, name)
    settings = load_settings(MirrorSettings, env)
    mirror = mirror_process(env, tmp_path / "mirror.log").start()
    naive_out = tmp_path / "naive.json"
    ready = tmp_path / "naive.ready"
    naive = None
    try:
        deadline = time.monotonic() + 60
        while not mirror.ready():
            assert time.monotonic() < deadline, mirror.log_tail()
            time.sleep(0.2)
        with naive_out.open("wb") as out:
            naive = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "services.mirror.naive",
                    "--redis",
                    redis.url,
                    "--kafka",
                    kafka_bootstrap,
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
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        while not ready.exists():
            assert naive.poll() is None, naive_out.read_text()
            time.sleep(0.1)
        channel = f"ticks.{name}SPY"
        command = [
            sys.executable, "-m", "services.mirror.loadgen", "--redis", redis.url,
            "--channel", channel, "--prefix", settings.key_prefix,
            "--lean", str(shared_data / "tick" / "spy" / f"{DAY}_trade.zip"),
            "--limit", str(trades), "--per-record", "1", "--repeat", str(repeat),
            "--maxlen", "5000000",
        ]  # fmt: skip
        load = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            out, err = load.communicate(timeout=timeout_s / 2)
        except subprocess.TimeoutExpired:
            load.kill()
            out, err = load.communicate()
            raise AssertionError(
                f"the publisher did not finish in {timeout_s / 2:g} s\n--- its stderr\n{err}"
                f"\n--- mirror\n{mirror.log_tail()}"
            ) from None
        assert load.returncode == 0, err
        loaded = json.loads(out.strip().splitlines()[-1])
        naive.wait(timeout_s)
        naive_result = json.loads(naive_out.read_text().strip().splitlines()[-1])

        async def settle() -> Audit:
            client = aioredis.Redis.from_url(redis.url)
            try:
                await eventually(
                    lambda: caught_up(client, name, [channel]),
                    timeout=timeout_s,
                    interval=0.5,
                    message=mirror.log_tail,
                )
                return await audit(settings, client, channels=[channel])
            finally:
                await client.aclose()

        result = asyncio.run(settle())
    finally:
        mirror.stop()
        if naive is not None and naive.poll() is None:
            naive.kill()
        redis.stop()
    published = loaded["published"]
    lost = published - naive_result["distinctSeqs"]
    return {
        "published": published,
        "publishRatePerS": loaded["recordsPerS"],
        "naive": {
            "received": naive_result["received"],
            "lost": lost,
            "lostPct": round(100 * lost / published, 2),
            "reconnects": naive_result["reconnects"],
        },
        "mirror": {
            "inKafka": result.inKafka,
            "missing": result.missing,
            "duplicates": result.duplicates,
        },
        "mirrorLog": [
            event
            for event in mirror.events()
            if str(event.get("event")).startswith(("consumer.", "mirror."))
            and event.get("event") not in ("consumer.opened", "mirror.started", "mirror.stopped")
        ],
    }


def check_overload(
    figures: dict[str, object], record_property: Callable[[str, object], None], label: str
) -> None:
    log = figures.pop("mirrorLog")
    record_property(label, json.dumps(figures))
    print(f"\n{label}: {json.dumps(figures)}")
    for event in log:  # type: ignore[attr-defined]
        print(
            "  mirror log:",
            json.dumps({k: v for k, v in event.items() if k not in ("service", "logger", "level")}),
        )
    naive: dict[str, int] = figures["naive"]  # type: ignore[assignment]
    mirror: dict[str, int] = figures["mirror"]  # type: ignore[assignment]
    assert naive["lost"] > 0, "the naive forwarder was not cut: no overload reproduced"
    assert mirror["missing"] == 0
    assert mirror["inKafka"] == figures["published"]
    names = [event.get("event") for event in log]  # type: ignore[attr-defined]
    assert "consumer.falling_behind" in names or "consumer.resubscribed" in names
    assert "mirror.caught_up" in names or "consumer.caught_up" in names


@pytest.mark.timeout(300)
def test_overload_the_naive_forwarder_loses_messages_and_the_mirror_loses_none(
    kafka_bootstrap: str,
    name: str,
    shared_data: Path,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    figures = run_overload(
        shared_data, tmp_path, kafka_bootstrap, name, trades=0, repeat=1, timeout_s=240
    )
    check_overload(figures, record_property, "overload")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_overload_soak_one_spy_day_four_times_back_to_back(
    kafka_bootstrap: str,
    name: str,
    shared_data: Path,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    figures = run_overload(
        shared_data, tmp_path, kafka_bootstrap, name, trades=0, repeat=4, timeout_s=1500
    )
    check_overload(figures, record_property, "overload_soak")
