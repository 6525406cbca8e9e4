"""The walking skeleton: the four services as OS processes, a real day through the simulator.

ingest (simulator, SPY 2013-10-07) → Redis → bars → engine_bridge; mirror → Kafka. SPY's 10:00
bar must reach Kafka ``sentio.prices.minute.v1`` with the vendor's volume for that minute.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from devstack.mesh import Mesh, MeshOptions, read_topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_spy_1000_bar_reaches_kafka_with_the_vendor_volume(
    redis_server,
    kafka_broker,
    shared_data: Path,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    stack = SimpleNamespace(redis=redis_server, kafka=kafka_broker)
    options = MeshOptions(
        workdir=tmp_path,
        data_dir=shared_data,
        day="2013-10-07",
        symbols=["SPY"],
        speed=0.0,
        grace_ms=500,
        shadow=False,
        run_id="e2e",
    )
    mesh = Mesh(stack, options)  # type: ignore[arg-type]
    try:
        mesh.start()
        mesh.wait_feed_done(timeout_s=300)
        mesh.wait_settled(quiet_s=4, timeout_s=300)
        prices = asyncio.run(read_topic(kafka_broker.bootstrap, "sentio.prices.minute.v1"))
        bars = [msgspec.json.decode(value) for value in prices]
        spy_1000 = [
            bar
            for bar in bars
            if bar["symbol"] == "SPY" and bar["tsET"] == "2013-10-07T10:00:00-04:00"
        ]
        assert spy_1000, f"no SPY 10:00 bar among {len(bars)} bars on Kafka"
        assert spy_1000[-1]["volume"] == 337_771
        assert spy_1000[-1]["barId"] == 31
        heartbeats = asyncio.run(read_topic(kafka_broker.bootstrap, "sentio.heartbeat.v1"))
        services = {msgspec.json.decode(value)["service"] for value in heartbeats}
        assert {"ingest", "bars", "engine_bridge", "mirror"} <= services
    finally:
        mesh.stop()
