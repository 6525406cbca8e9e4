"""Limits on inputs, for real: ingest (an OS process) meets a 64 MiB WebSocket frame and a
stalled Redis (SIGSTOP). Either way counters move, its memory stays bounded, and it is healthy
and publishing afterwards."""

from __future__ import annotations

import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import redis

from devstack.localstack import RedisServer, free_port
from devstack.mesh import ServiceProcess
from services.ingest.simulator.cli import control_remote, inject_remote

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
KEY = "limits-test-key"
MIB = 1_048_576


def wait_for(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    """Poll ``condition`` (errors count as "not yet") until true, or fail saying ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s:g} s: {what}")


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak so far) of ``pid``, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def http_ok(port: int, path: str) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
        return bool(response.status == 200)


@pytest.fixture
def feed(tmp_path: Path) -> Iterator[int]:
    """The simulator (synthetic trades, never ending) as an OS process; yields its port."""
    port = free_port()
    command = [
        sys.executable, "-m", "services.ingest", "simulate", "--host", "127.0.0.1",
        "--port", str(port), "--key", KEY, "--synthetic-symbols", "3", "--rate", "300",
    ]  # fmt: skip
    simulator = ServiceProcess(
        "simulator", command, {"PATH": "/usr/bin:/bin"}, tmp_path / "simulator.log"
    ).start()
    try:
        wait_for(lambda: control_remote("127.0.0.1", port, "status", KEY), 30, "simulator up")
        yield port
    finally:
        simulator.stop()


def start_ingest(tmp_path: Path, redis_url: str, feed_port: int, **extra: str) -> ServiceProcess:
    http_port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "INGEST_REDIS_URL": redis_url,
        "INGEST_POLYGON_URL": f"ws://127.0.0.1:{feed_port}/stocks",
        "POLYGON_API_KEY": KEY,
        "INGEST_BACKFILL": "false",
        "INGEST_HTTP_HOST": "127.0.0.1",
        "INGEST_HTTP_PORT": str(http_port),
        "INGEST_LOG_FORMAT": "json",
        "INGEST_KEY_PREFIX": f"lim{free_port()}:",
        "INGEST_RECONNECT_INITIAL_S": "0.1",
        **extra,
    }
    ingest = ServiceProcess.service(
        "ingest", "ingest", env, tmp_path / "ingest.log", http_port
    ).start()
    ingest.wait_ready(60)
    return ingest


def test_a_64_mib_frame_is_a_dead_letter_and_ingest_reconnects_with_bounded_memory(
    tmp_path: Path, redis_url: str, feed: int
) -> None:
    ingest = start_ingest(tmp_path, redis_url, feed)
    try:
        frames = lambda: ingest.metric_sum("tickmesh_ingest_frames_total")  # noqa: E731
        wait_for(lambda: frames() > 20, 60, "frames flowing")
        assert ingest.process is not None
        before = memory_kib(ingest.process.pid)
        assert inject_remote("127.0.0.1", feed, "oversized_frame", 64, KEY)["sessions"] == 1
        wait_for(
            lambda: ingest.metric_sum("tickmesh_ingest_oversized_frames_total") == 1,
            60,
            "the oversized frame counted",
        )
        wait_for(
            lambda: (
                ingest.metric_sum("tickmesh_ingest_reconnects_total", reason="frame_too_big") == 1
            ),
            30,
            "one reconnect for it",
        )
        wait_for(lambda: ingest.metric_sum("tickmesh_ingest_connected") == 1, 60, "reconnected")
        after_reconnect = frames()
        wait_for(lambda: frames() > after_reconnect + 20, 60, "frames flowing again")
        letters = ingest.metric_sum("tickmesh_dead_letters_total")
        assert letters == 1, letters
        peak = memory_kib(ingest.process.pid)["VmHWM"]
        grown_mib = (peak - before["VmRSS"]) / 1024
        print(
            f"\n64 MiB frame: RSS before {before['VmRSS'] / 1024:.1f} MiB, "
            f"peak growth {grown_mib:.1f} MiB"
        )
        assert grown_mib < 16, f"peak RSS grew {grown_mib:.1f} MiB for a 64 MiB frame"
        assert http_ok(ingest.http_port or 0, "/healthz")
        assert http_ok(ingest.http_port or 0, "/readyz")
        assert ingest.alive()
    finally:
        ingest.stop()
    client = redis.Redis.from_url(redis_url)
    try:
        prefix = ingest.env["INGEST_KEY_PREFIX"]
        entries = client.xrange(f"{prefix}stream:{{sentio.deadletter.v1}}")
    finally:
        client.close()
    assert len(entries) == 1
    letter = msgspec.json.decode(entries[0][1][b"d"])
    assert "INGEST_MAX_FRAME_BYTES" in letter["error"] and letter["source"] == "polygon.ws"
    assert str(64 * MIB) in letter["error"] and letter["raw"] == ""
    assert "ingest.frame_too_big" in ingest.event_names()


def test_a_stalled_redis_is_ridden_out_with_counters_and_bounded_memory(
    tmp_path: Path, feed: int
) -> None:
    with RedisServer() as server:
        ingest = start_ingest(
            tmp_path,
            server.url,
            feed,
            INGEST_REDIS_SOCKET_TIMEOUT_S="1",
            INGEST_REDIS_CONNECT_TIMEOUT_S="1",
            INGEST_QUEUE_SIZE="500",
        )
        try:
            frames = lambda: ingest.metric_sum("tickmesh_ingest_frames_total")  # noqa: E731
            wait_for(lambda: frames() > 20, 60, "frames flowing")
            assert ingest.process is not None
            before = memory_kib(ingest.process.pid)
            errors_before = ingest.metric_sum("tickmesh_redis_publish_errors_total")
            server.pause()
            try:
                # a publish times out after INGEST_REDIS_SOCKET_TIMEOUT_S: a retriable error,
                # retried with backoff while the bounded queue fills and reading pauses
                wait_for(
                    lambda: (
                        ingest.metric_sum("tickmesh_redis_publish_errors_total")
                        >= errors_before + 2
                    ),
                    60,
                    "publish timeouts counted while Redis is stopped",
                )
                stalled = frames()
                time.sleep(1.0)  # the outage goes on; nothing is published meanwhile
                assert frames() == stalled
                assert ingest.alive()
            finally:
                server.resume()
            wait_for(lambda: frames() > stalled + 20, 60, "publishing again after SIGCONT")
            peak = memory_kib(ingest.process.pid)["VmHWM"]
            grown_mib = (peak - before["VmRSS"]) / 1024
            errors = ingest.metric_sum("tickmesh_redis_publish_errors_total") - errors_before
            print(
                f"\nRedis SIGSTOP: RSS before {before['VmRSS'] / 1024:.1f} MiB, peak growth "
                f"{grown_mib:.1f} MiB, {errors:.0f} publish timeouts"
            )
            assert grown_mib < 32, f"peak RSS grew {grown_mib:.1f} MiB during the stall"
            wait_for(lambda: http_ok(ingest.http_port or 0, "/readyz"), 30, "ready again")
            assert http_ok(ingest.http_port or 0, "/healthz")
            events = ingest.event_names()
            assert "retry.waiting" in events or "supervisor.dependency_down" in events
        finally:
            ingest.stop()
