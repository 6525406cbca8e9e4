"""The four service images build and run: podman, no Docker engine, no Docker Hub.

``deploy/podman-setup.sh`` installs podman/runc/mmdebstrap and builds the local Python base
image (idempotent); ``deploy/build-images.sh`` builds the four images from the repo root. Each
image then runs with ``--init --network host`` against the session's redis-server and Tansu
broker (the ingest one fed by the simulator, run from the same image), and must answer
``/healthz`` and ``/metrics``, pass its own HEALTHCHECK and run as a non-root user.

Skipped, with the reason, where podman cannot be installed (not root, no apt).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devstack.localstack import free_port
from libs.common.runtime.settings import CommonSettings, env_name
from tests.helpers import eventually

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("ingest", "bars", "engine_bridge", "mirror", "dashboard")
TAG = "test"
PREFIX = "localhost/tickmesh-"
SIM_KEY = "tickmesh-image-test"


def settings_class(service: str) -> type[CommonSettings]:
    """The settings Struct in ``services.<service>.config`` (as deploy/tools/sync_env.py)."""
    import importlib

    module = importlib.import_module(f"services.{service}.config")
    return next(
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, CommonSettings)
        and value.__module__ == module.__name__
    )


def run(
    command: list[str], *, timeout: float, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result


@dataclass(frozen=True)
class Built:
    """What the build produced: image name -> (size in bytes, seconds to build)."""

    images: dict[str, tuple[int, float]]
    setup_s: float
    build_s: float


@pytest.fixture(scope="module")
def built_images() -> Built:
    if os.geteuid() != 0:
        pytest.skip("podman setup needs root (apt-get, /etc/containers)")
    if not shutil.which("podman") and not shutil.which("apt-get"):
        pytest.skip("no podman and no apt-get to install it")
    started = time.monotonic()
    setup = subprocess.run(
        [str(ROOT / "deploy" / "podman-setup.sh")],
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    if setup.returncode == 2:  # the script's "cannot on this machine"
        pytest.skip(f"podman setup impossible here: {setup.stderr.strip()[-500:]}")
    if setup.returncode != 0 and not shutil.which("podman"):
        pytest.skip(f"podman could not be installed: {setup.stderr.strip()[-1000:]}")
    assert setup.returncode == 0, f"deploy/podman-setup.sh failed:\n{setup.stderr[-4000:]}"
    setup_s = time.monotonic() - started

    started = time.monotonic()
    build = subprocess.run(
        [str(ROOT / "deploy" / "build-images.sh"), *SERVICES],
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env={**os.environ, "TAG": TAG, "PREFIX": PREFIX},
    )
    assert build.returncode == 0, f"deploy/build-images.sh failed:\n{build.stderr[-6000:]}"
    build_s = time.monotonic() - started
    images: dict[str, tuple[int, float]] = {}
    for line in build.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[0].startswith(PREFIX):
            size = int(
                run(
                    ["podman", "image", "inspect", "--format", "{{.Size}}", parts[0]], timeout=30
                ).stdout.strip()
            )
            images[parts[0]] = (size, float(parts[5]))
    print(f"\n[images] setup {setup_s:.1f} s, build {build_s:.1f} s")
    for image, (size, seconds) in images.items():
        print(f"[images] {image}: {size / 1e6:.1f} MB, {seconds:.1f} s")
    return Built(images, setup_s, build_s)


class Container:
    """One ``podman run -d --init --network host --read-only`` container, removed at the end."""

    def __init__(
        self, image: str, env: dict[str, str], *, name: str, args: list[str] | None = None
    ) -> None:
        self.name = name
        command = [
            "podman",
            "run",
            "-d",
            "--init",
            "--network",
            "host",
            # as compose runs them: read-only root, /tmp in memory, no capabilities
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--name",
            name,
            # no systemd timer here: the HEALTHCHECK is run on demand below
            "--health-interval",
            "disable",
        ]
        for key, value in env.items():
            command += ["-e", f"{key}={value}"]
        command += [image, *(args or [])]
        run(command, timeout=60)

    def logs(self) -> str:
        result = run(["podman", "logs", "--tail", "60", self.name], timeout=30, check=False)
        return result.stdout + result.stderr

    def running(self) -> bool:
        result = run(
            ["podman", "inspect", "--format", "{{.State.Running}}", self.name],
            timeout=30,
            check=False,
        )
        return result.stdout.strip() == "true"

    def remove(self) -> None:
        run(["podman", "rm", "--force", "--time", "5", self.name], timeout=60, check=False)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def service_env(
    service: str,
    port: int,
    *,
    redis_url: str,
    kafka_bootstrap: str,
    key_prefix: str,
    sim_port: int,
    run_id: str,
) -> dict[str, str]:
    cls = settings_class(service)
    env = {
        "TICKMESH_REDIS_URL": redis_url,
        "TICKMESH_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "TICKMESH_KEY_PREFIX": key_prefix,
        "TICKMESH_LOG_FORMAT": "json",
        "TICKMESH_HEARTBEAT_INTERVAL_MS": "1000",
        "TICKMESH_RUN_ID": f"{run_id}-{service}",
        env_name(cls, "http_port"): str(port),
    }
    if service == "ingest":
        env |= {"INGEST_POLYGON_URL": f"ws://127.0.0.1:{sim_port}", "POLYGON_API_KEY": SIM_KEY}
    if service == "bars":
        env["BARS_KAFKA_GROUP"] = f"bars-{run_id}"
    return env


@pytest.fixture
def containers() -> Iterator[list[Container]]:
    started: list[Container] = []
    try:
        yield started
    finally:
        for container in started:
            container.remove()


async def test_each_image_runs_answers_health_and_metrics_as_non_root(
    built_images: Built,
    redis_server: object,
    kafka_broker: object,
    containers: list[Container],
) -> None:
    run_id = uuid.uuid4().hex[:8]
    redis_url: str = redis_server.url  # type: ignore[attr-defined]
    bootstrap: str = kafka_broker.bootstrap  # type: ignore[attr-defined]
    sim_port = free_port()
    # The simulator from the ingest image, as deploy/compose.yaml runs it (`simulate`).
    containers.append(
        Container(
            f"{PREFIX}ingest:{TAG}",
            {"SIM_API_KEY": SIM_KEY},
            name=f"tickmesh-test-sim-{run_id}",
            args=[
                "simulate",
                "--host",
                "127.0.0.1",
                "--port",
                str(sim_port),
                "--synthetic-symbols",
                "3",
                "--rate",
                "30",
            ],
        )
    )
    ports = {service: free_port() for service in SERVICES}
    by_service: dict[str, Container] = {}
    for service in SERVICES:
        env = service_env(
            service,
            ports[service],
            redis_url=redis_url,
            kafka_bootstrap=bootstrap,
            key_prefix=f"tmimg{run_id}:",
            sim_port=sim_port,
            run_id=run_id,
        )
        container = Container(
            f"{PREFIX}{service}:{TAG}",
            env,
            name=f"tickmesh-test-{service.replace('_', '-')}-{run_id}",
        )
        containers.append(container)
        by_service[service] = container

    for service, container in by_service.items():
        port = ports[service]

        def healthy(port: int = port, container: Container = container) -> bool:
            assert container.running(), f"container exited:\n{container.logs()}"
            return http_get(port, "/healthz")[0] == 200

        await eventually(
            healthy,
            timeout=30,
            interval=0.25,
            message=lambda c=container: f"{c.name}: no /healthz\n{c.logs()}",
        )
        status, metrics = http_get(port, "/metrics")
        assert status == 200 and "tickmesh_up 1.0" in metrics, f"{service}: {metrics[:500]}"
        assert f'service="{service}"' in metrics, f"{service}: tickmesh_service_info missing"
        user = run(["podman", "exec", container.name, "id", "-u"], timeout=30).stdout.strip()
        assert user != "0", f"{service} runs as root"
        health = run(["podman", "healthcheck", "run", container.name], timeout=60, check=False)
        assert health.returncode == 0, (
            f"{service}: the image's HEALTHCHECK failed: {health.stdout}{health.stderr}"
        )

    # The simulator feeds the ingest image: trades decoded and published on Redis.
    def ingest_flowing() -> bool:
        _, metrics = http_get(ports["ingest"], "/metrics")
        return any(
            line.startswith('tickmesh_ingest_events_total{type="T"}')
            and float(line.split()[-1]) > 0
            for line in metrics.splitlines()
        )

    await eventually(
        ingest_flowing,
        timeout=30,
        interval=0.5,
        message=lambda: f"no trades through the ingest image\n{by_service['ingest'].logs()}",
    )


def test_images_are_built_as_declared(built_images: Built) -> None:
    for service in SERVICES:
        image = f"{PREFIX}{service}:{TAG}"
        assert image in built_images.images, f"{image} not built"
        config = json.loads(run(["podman", "image", "inspect", image], timeout=30).stdout)[0]
        # podman's own inspect shows the Docker-format config, with the HEALTHCHECK kept
        health = config.get("Healthcheck") or config["Config"].get("Healthcheck")
        assert health and health["Test"][:3] == ["CMD", "python", "/opt/tickmesh/healthcheck.py"]
        assert config["Config"]["Entrypoint"] == ["python", "-m", f"services.{service}"]
        assert config["Config"]["User"] not in ("", "0", "root")
