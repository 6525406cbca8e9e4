"""Scale-out on one machine: the whole mesh with the bars in two shards (primary and shadow,
split by symbol) and the mirror as two instances (split by channel) still publishes every bar
once on both paths, carries every tick record to Kafka, and the reconciler finds 100 % parity.

IBM and AIG on 2013-10-07 (the shared data): the two hash to different bar shards and their
tick channels to different mirror instances, so every process carries one symbol's ticks.
Slow (18 s here at a load average of 2, more under load): eight services and the simulator
start on a fresh stack and replay 49,644 trades.
The scale-out naming of ``devstack.mesh`` (fast, no processes) is tested first.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
import redis.asyncio as aioredis

from devstack.localstack import LocalStack
from devstack.mesh import Mesh, MeshOptions, instance_names, mirror_consumer_names, read_topic
from libs.common import names
from libs.common.names import Keys
from libs.common.schemas import BAR_DECODER, Bar
from services.bars.backfill import run_backfill
from services.mirror.config import MirrorSettings
from tests.helpers import BarKey, BarValue, final_bars, reconcile_json

DAY = "2013-10-07"
SYMBOLS = ["IBM", "AIG"]


def test_one_instance_keeps_its_plain_name_and_several_are_numbered_from_one() -> None:
    assert instance_names("bars", 1) == ["bars"]
    assert instance_names("bars-shadow", 2) == ["bars-shadow-1of2", "bars-shadow-2of2"]
    assert mirror_consumer_names(1) == ["mirror"]  # MirrorSettings' default consumer name
    assert mirror_consumer_names(3) == ["mirror-1of3", "mirror-2of3", "mirror-3of3"]


def test_a_mesh_needs_at_least_one_of_each(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        MeshOptions(workdir=tmp_path, bars_shards=0)
    with pytest.raises(ValueError, match="at least 1"):
        MeshOptions(workdir=tmp_path, mirror_instances=0)


def test_a_group_is_the_plain_service_or_its_numbered_instances(tmp_path: Path) -> None:
    mesh = Mesh(None, MeshOptions(workdir=tmp_path))  # type: ignore[arg-type]
    for name in ["bars-1of2", "bars-2of2", "bars-shadow-1of2", "bars-shadow-2of2", "mirror"]:
        mesh.services[name] = object()  # type: ignore[assignment]
    assert mesh.group("bars") == [mesh.services["bars-1of2"], mesh.services["bars-2of2"]]
    assert len(mesh.group("bars-shadow")) == 2
    assert mesh.group("mirror") == [mesh.services["mirror"]]
    assert mesh.group("engine_bridge") == []
    assert mesh.metric_total("engine_bridge", "anything") == 0.0


def test_a_tool_reads_the_mesh_with_the_settings_its_services_get(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The soak's reconciler and the Kafka counts load their settings as the services do
    (this process's environment, the stack, the options' env): a mesh run with
    TICKMESH_TOPIC_MODE=single is reconciled from the single topic, not the per-symbol ones."""
    monkeypatch.setenv("TICKMESH_KAFKA_FETCH_MAX_WAIT_MS", "77")
    stack = SimpleNamespace(
        redis=SimpleNamespace(url="redis://127.0.0.1:6390/0"),
        kafka=SimpleNamespace(bootstrap="127.0.0.1:9099"),
    )
    options = MeshOptions(workdir=tmp_path, env={"TICKMESH_TOPIC_MODE": "single"})
    mesh = Mesh(stack, options)  # type: ignore[arg-type]
    settings = mesh.settings(MirrorSettings)
    assert (settings.topic_mode, settings.kafka_fetch_max_wait_ms) == ("single", 77)
    assert (settings.redis_url, settings.kafka_bootstrap) == (
        "redis://127.0.0.1:6390/0",
        "127.0.0.1:9099",
    )
    assert mesh.kafka_settings().kafka_fetch_max_wait_ms == 77


def assert_published_once(bars: Sequence[Bar], path: str) -> None:
    """Each (symbol, minute) as revision 0 once, then revisions counting up by one."""
    revisions: dict[BarKey, list[int]] = {}
    for bar in bars:
        revisions.setdefault((bar.symbol, bar.startMs), []).append(bar.revision)
    wrong = {key: found for key, found in revisions.items() if found != list(range(len(found)))}
    assert not wrong, f"{path}: published twice or out of order: {wrong}"


def backfilled(data: Path, tmp_path: Path) -> dict[BarKey, BarValue]:
    """The day's bars from the core, offline (what an uninterrupted run ends with)."""
    out = tmp_path / "backfill.jsonl"
    files = [data / "tick" / s.lower() / f"{DAY.replace('-', '')}_trade.zip" for s in SYMBOLS]
    run_backfill(files, "algoseek", out)
    return final_bars(
        msgspec.convert({"seq": 0, **msgspec.json.decode(line)}, Bar)
        for line in out.read_bytes().splitlines()
        if line
    )


async def redis_bars(redis_url: str) -> tuple[list[Bar], dict[str, int]]:
    """Every bar on the Redis bar channels (from their streams, checking that each channel's
    sequence is gapless), and each tick channel's sequence counter."""
    keys = Keys()
    client = aioredis.Redis.from_url(redis_url)
    try:
        bars: list[Bar] = []
        for symbol in SYMBOLS:
            entries = await client.xrange(keys.stream(f"bars.{symbol}.1m"))
            found = [BAR_DECODER.decode(fields[b"d"]) for _, fields in entries]
            assert [bar.seq for bar in found] == list(range(1, len(found) + 1)), symbol
            bars += found
        seqs = await client.mget([keys.seq(f"ticks.{symbol}") for symbol in SYMBOLS])
        return bars, {f"ticks.{s}": int(v) for s, v in zip(SYMBOLS, seqs, strict=True)}
    finally:
        await client.aclose()


def reconcile(stack: LocalStack, out: Path, topic_mode: str) -> dict[str, object]:
    """The reconciler's report of the day (not stored, not published)."""
    assert stack.kafka is not None
    env = {
        "TICKMESH_LOG_LEVEL": "warning",
        "TICKMESH_REDIS_URL": stack.redis.url,
        "TICKMESH_KAFKA_BOOTSTRAP": stack.kafka.bootstrap,
        "TICKMESH_TOPIC_MODE": topic_mode,
    }
    return reconcile_json(DAY, out, env)


@pytest.mark.slow  # 18 s at load 2, up to about a minute under load
@pytest.mark.integration
@pytest.mark.timeout(900)
@pytest.mark.parametrize("topic_mode", ["per-symbol", "single"])
def test_two_bar_shards_and_two_mirrors_publish_every_bar_once_with_full_parity(
    topic_mode: str, shared_data: Path, tmp_path: Path
) -> None:
    """Per-symbol tick topics, or every tick in sentio.ticks.v1 (TOPIC_MODE=single: both
    mirrors write it, both shadow shards read all of it and keep their own symbols, and write
    their bars to sentio.bars.v1)."""
    # the split this test relies on: each symbol its own bar shard and its own mirror
    assert {zlib.crc32(s.encode()) % 2 for s in SYMBOLS} == {0, 1}
    assert {zlib.crc32(f"ticks.{s}".encode()) % 2 for s in SYMBOLS} == {0, 1}
    expected = backfilled(shared_data, tmp_path)
    options = MeshOptions(
        workdir=tmp_path / "mesh",
        data_dir=shared_data,
        day=DAY,
        symbols=SYMBOLS,
        speed=0.0,
        grace_ms=500,
        run_id="scale",
        bars_shards=2,
        mirror_instances=2,
        env={"TICKMESH_TOPIC_MODE": topic_mode},
    )
    with LocalStack() as stack:
        assert stack.kafka is not None
        mesh = Mesh(stack, options)
        try:
            mesh.start()
            split = {"bars", "bars-shadow", "mirror"}
            assert {name for name in mesh.services if name.rsplit("-", 1)[0] in split} == {
                *instance_names("bars", 2),
                *instance_names("bars-shadow", 2),
                *instance_names("mirror", 2),
            }
            mesh.wait_feed_done(timeout_s=300)
            mesh.wait_last_minute_closed()
            mesh.wait_settled(quiet_s=4, timeout_s=300)
            published = {
                name: mesh.services[name].metric_sum("tickmesh_bars_published_total")
                for name in [*instance_names("bars", 2), *instance_names("bars-shadow", 2)]
            }
            mirrored = {
                name: mesh.services[name].metric_sum("tickmesh_mirror_ticks_total")
                for name in instance_names("mirror", 2)
            }
            dead = sum(s.metric_sum("tickmesh_dead_letters_total") for s in mesh.services.values())
            on_redis, tick_seqs = asyncio.run(redis_bars(stack.redis.url))
            bar_topics = {names.channel(names.shadow_bars_topic(topic_mode), s) for s in SYMBOLS}
            on_kafka = [
                bar
                for topic in sorted(bar_topics)
                for value in asyncio.run(read_topic(stack.kafka.bootstrap, topic))
                if (bar := BAR_DECODER.decode(value)).symbol in SYMBOLS
            ]
            counts = mesh.kafka_counts()
        finally:
            mesh.stop()
        report = reconcile(stack, tmp_path / "report.json", topic_mode)

    assert dead == 0
    # every shard and every mirror instance did its share
    assert all(count > 0 for count in published.values()), published
    assert all(count > 0 for count in mirrored.values()), mirrored
    # every bar once on each path, and the bars are the offline core's
    assert_published_once(on_redis, "Redis")
    assert_published_once(on_kafka, "Kafka")
    assert final_bars(on_redis) == expected
    assert final_bars(on_kafka) == expected
    assert len(expected) > 800  # both symbols' whole day
    primary = sum(published[name] for name in instance_names("bars", 2))
    shadow = sum(published[name] for name in instance_names("bars-shadow", 2))
    assert primary == shadow == len(expected)  # revision 0 of every minute, once in all
    # every tick record reached Kafka, through whichever mirror owns its channel
    if topic_mode == "single":
        assert not any(topic.startswith(("ticks.", "bars.")) for topic in counts), sorted(counts)
        assert counts[names.TICKS_SINGLE_TOPIC][1] == sum(tick_seqs.values())
    else:
        for channel, seq in tick_seqs.items():
            assert counts[channel][1] == seq, (channel, counts[channel], seq)
    parity = report["parity"]["totals"]  # type: ignore[index]
    assert parity["parityPct"] == 100.0, parity
    assert parity["compared"] == parity["matched"] == len(expected), parity
    completeness = report["completeness"]["totals"]  # type: ignore[index]
    print(
        f"\n2 bar shards, 2 mirrors, ticks {topic_mode}: {len(expected)} bars on each path, "
        "each once; "
        f"parity {parity['parityPct']} % ({parity['matched']} of {parity['compared']}); "
        f"completeness {completeness}; published per process {published}; ticks mirrored "
        f"per instance {mirrored}"
    )
