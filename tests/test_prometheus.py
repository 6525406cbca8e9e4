"""A real Prometheus scrapes the running mesh and answers for each service's key series.

Debian's ``prometheus`` (installed with apt when missing; skipped with the reason when that is
impossible) scrapes the four services, run as OS processes against the session's redis-server
and Tansu broker, with the simulator feeding ingest and a shadow bar builder reading Kafka.
The scrape uses deploy/prometheus/alerts.yml as its rule file, so the alert rules are loaded
and evaluated by a real Prometheus too; ``promtool`` checks deploy/'s config and rules.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.localstack import free_port
from devstack.mesh import ServiceProcess
from libs.common.runtime.settings import CommonSettings, env_name
from tests.helpers import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SERVICES = ("ingest", "bars", "engine_bridge", "mirror")
SIM_KEY = "tickmesh-prometheus-test"

# job -> (PromQL, what it proves): each must return at least one series with a value > 0.
KEY_SERIES: dict[str, list[tuple[str, str]]] = {
    "ingest": [
        ('tickmesh_ingest_connected{job="ingest"} == 1', "subscribed to the feed"),
        ('tickmesh_ingest_events_total{job="ingest",type="T"} > 0', "trades decoded"),
        (
            'tickmesh_redis_records_published_total{job="ingest",kind="ticks"} > 0',
            "tick records published on Redis",
        ),
        ('tickmesh_ingest_feed_lag_seconds{job="ingest"} >= 0', "feed lag measured"),
    ],
    "bars": [
        (
            'tickmesh_bars_ticks_total{job="bars",role="primary",source="redis"} > 0',
            "ticks aggregated from Redis",
        ),
        ('tickmesh_bars_watermark_lag_ms{job="bars",role="primary"} >= 0', "watermark lag"),
        (
            'tickmesh_consumer_records_total{job="bars",role="primary"} > 0',
            "ticks read without loss (sequenced consumer)",
        ),
    ],
    "bars-shadow": [
        (
            'tickmesh_bars_watermark_lag_ms{job="bars",role="shadow",source="kafka"} >= 0',
            "the shadow builder runs on Kafka",
        ),
        (
            'tickmesh_bars_ticks_total{job="bars",role="shadow",source="kafka"} > 0',
            "ticks mirrored to Kafka reach the shadow builder",
        ),
    ],
    "engine_bridge": [
        ('tickmesh_bridge_pending_minutes{job="engine_bridge"} >= 0', "minute buckets tracked"),
        ('tickmesh_consumer_behind_records{job="engine_bridge"} >= 0', "bars consumer running"),
    ],
    "mirror": [
        ('tickmesh_mirror_records_total{job="mirror"} > 0', "records acknowledged by Kafka"),
        ('tickmesh_mirror_kafka_up{job="mirror"} == 1', "Kafka reachable"),
        ('tickmesh_mirror_lag_records{job="mirror"} >= 0', "mirror lag measured"),
        (
            'tickmesh_parity_gate_passing_days{job="mirror",role="reconciler"} >= 0',
            "the reconciler runs, in its own process",
        ),
    ],
}
# Every service process (shadow included) answers these; %s is its job and role selector.
COMMON_SERIES = [
    ("tickmesh_up{%s} == 1", "the service runs"),
    ("tickmesh_actor_running{%s} == 1", "its actors run"),
    ("tickmesh_service_info{%s}", "its identity"),
    ('tickmesh_redis_records_published_total{kind="sentio.heartbeat.v1",%s} > 0', "its heartbeats"),
]


def settings_class(service: str) -> type[CommonSettings]:
    module = importlib.import_module(f"services.{service}.config")
    return next(
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, CommonSettings)
        and value.__module__ == module.__name__
    )


# --- Prometheus on this machine -----------------------------------------------------------------


def install_prometheus() -> str | None:
    """Install Debian's prometheus if it is missing; the reason it cannot, or None."""
    if shutil.which("prometheus") and shutil.which("promtool"):
        return None
    if os.geteuid() != 0:
        return "prometheus is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "prometheus is not installed and there is no apt-get"
    # Keep the package's init script from starting a system-wide Prometheus on :9090.
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = not policy.exists()
    if added_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
        ):
            result = subprocess.run(
                command, check=False, capture_output=True, text=True, env=env, timeout=600
            )
            if result.returncode != 0:
                return f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}"
    finally:
        if added_policy:
            policy.unlink()
    if not shutil.which("prometheus"):
        return "apt-get installed prometheus but it is not on PATH"
    return None


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    reason = install_prometheus()
    if reason:
        pytest.skip(reason)
    return shutil.which("prometheus")  # type: ignore[return-value]


def start_process(name: str, command: list[str], env: dict[str, str], logs: Path) -> ServiceProcess:
    """A started subprocess logging to ``<logs>/<name>.log``."""
    return ServiceProcess(name, command, env, logs / f"{name}.log", cwd=ROOT).start()


def base_env() -> dict[str, str]:
    """A clean environment: no TICKMESH_*/service variables inherited from the caller."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "SSL_CERT_FILE")
    return {key: os.environ[key] for key in keep if key in os.environ}


def query(port: int, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def api(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    try:
        yield started
    finally:
        for process in reversed(started):
            process.stop()


def test_promtool_accepts_the_deployed_config_and_alert_rules(prometheus_bin: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package"
    for command in (
        ["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        ["check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
    ):
        result = subprocess.run(
            [promtool, *command], check=False, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, (
            f"promtool {' '.join(command)}:\n{result.stdout}{result.stderr}"
        )


async def test_prometheus_scrapes_every_service_key_series(
    prometheus_bin: str,
    redis_server: object,
    kafka_broker: object,
    tmp_path: Path,
    processes: list[ServiceProcess],
) -> None:
    started = time.monotonic()
    run_id = uuid.uuid4().hex[:8]
    python = sys.executable
    common = {
        **base_env(),
        "TICKMESH_REDIS_URL": redis_server.url,  # type: ignore[attr-defined]
        "TICKMESH_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,  # type: ignore[attr-defined]
        "TICKMESH_KEY_PREFIX": f"tmprom{run_id}:",
        "TICKMESH_HTTP_HOST": "127.0.0.1",
        "TICKMESH_LOG_FORMAT": "json",
        "TICKMESH_HEARTBEAT_INTERVAL_MS": "1000",
    }
    sim_port = free_port()
    processes.append(
        start_process(
            "simulator",
            [
                python,
                "-m",
                "services.ingest.simulator",
                "--host",
                "127.0.0.1",
                "--port",
                str(sim_port),
                "--synthetic-symbols",
                "3",
                "--rate",
                "60",
            ],
            {**base_env(), "SIM_API_KEY": SIM_KEY},
            tmp_path,
        )
    )

    # (job, role, service, extra env): the four services, the shadow bar builder and the
    # mirror's reconciler, as deploy/compose.yaml runs them.
    instances = [
        (
            "ingest",
            "primary",
            "ingest",
            {"INGEST_POLYGON_URL": f"ws://127.0.0.1:{sim_port}", "POLYGON_API_KEY": SIM_KEY},
        ),
        ("bars", "primary", "bars", {}),
        (
            "bars",
            "shadow",
            "bars",
            {"BARS_SOURCE": "kafka", "BARS_KAFKA_GROUP": f"bars-shadow-{run_id}"},
        ),
        ("engine_bridge", "primary", "engine_bridge", {}),
        ("mirror", "primary", "mirror", {"MIRROR_ROLE": "forward"}),
        ("mirror", "reconciler", "mirror", {"MIRROR_ROLE": "reconcile"}),
    ]
    targets: dict[tuple[str, str], int] = {}
    for job, role, service, extra in instances:
        port = free_port()
        targets[(job, role)] = port
        env = {
            **common,
            env_name(settings_class(service), "http_port"): str(port),
            "TICKMESH_RUN_ID": f"{run_id}-{job}-{role}",
            **extra,
        }
        command = [python, "-m", f"services.{service}", "run"]
        processes.append(start_process(f"{job}-{role}", command, env, tmp_path))

    prom_port = free_port()
    jobs: dict[str, list[str]] = {}
    for (job, role), port in targets.items():
        jobs.setdefault(job, []).append(
            f'      - targets: ["127.0.0.1:{port}"]\n        labels: {{role: {role}}}'
        )
    config = tmp_path / "prometheus.yml"
    (tmp_path / "alerts.yml").write_text((DEPLOY / "prometheus" / "alerts.yml").read_text())
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n"
        "rule_files: [alerts.yml]\nscrape_configs:\n"
        + "".join(
            f"  - job_name: {job}\n    static_configs:\n" + "\n".join(entries) + "\n"
            for job, entries in jobs.items()
        )
    )
    processes.append(
        start_process(
            "prometheus",
            [
                prometheus_bin,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
            base_env(),
            tmp_path,
        )
    )

    def diagnose() -> str:
        return "\n".join(
            f"--- {p.name} ({'alive' if p.alive() else 'EXITED'})\n{p.log_tail(1500)}"
            for p in processes
        )

    def all_up() -> bool:
        for process in processes:
            assert process.alive(), f"{process.name} exited\n{diagnose()}"
        result = query(prom_port, "up")
        return len(result) == len(targets) and all(r["value"][1] == "1" for r in result)

    await eventually(
        all_up, timeout=60, interval=0.5, message=lambda: f"not every target is up\n{diagnose()}"
    )
    up_after = time.monotonic() - started

    checks: list[tuple[str, str]] = [
        (promql, why) for series in KEY_SERIES.values() for promql, why in series
    ]
    for job, role in targets:
        checks += [
            (promql % f'job="{job}",role="{role}"', f"{job}/{role}: {why}")
            for promql, why in COMMON_SERIES
        ]
    missing: list[str] = []

    def every_key_series_present() -> bool:
        missing.clear()
        for promql, why in checks:
            if not query(prom_port, promql):
                missing.append(f"{promql}  ({why})")
        return not missing

    await eventually(
        every_key_series_present,
        timeout=90,
        interval=1.0,
        message=lambda: f"series missing: {missing}\n{diagnose()}",
    )

    # Every query of the Grafana dashboard is valid PromQL for this Prometheus, and the
    # panels about series that exist by now show data.
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "tickmesh.json").read_text())
    must_show = (
        "Services up",
        "Feed lag",
        "Ticks/s",
        "Mirror lag",
        "Feed connection",
        "Actor restarts (per 5 min)",
        "Dead letters (per 5 min)",
    )
    empty_panels: list[str] = []

    def key_panels_show_data() -> bool:
        # rate() panels need two scrapes of a counter, so a loaded machine may take a while
        empty_panels.clear()
        for panel in dashboard["panels"]:
            results = [query(prom_port, target["expr"]) for target in panel.get("targets", [])]
            if panel.get("targets") and not any(results):
                empty_panels.append(panel["title"])
        return not set(must_show) & set(empty_panels)

    await eventually(
        key_panels_show_data,
        timeout=45,
        interval=1.0,
        message=lambda: f"dashboard panels showing nothing: {empty_panels}",
    )
    print(f"\n[prometheus] dashboard panels without data yet: {empty_panels}")

    rules = api(prom_port, "/api/v1/rules")
    loaded = {rule["name"] for group in rules["groups"] for rule in group["rules"]}
    assert "TickmeshServiceDown" in loaded, f"alert rules not loaded: {loaded}"
    names = sorted(
        n for n in api(prom_port, "/api/v1/label/__name__/values") if n.startswith("tickmesh_")
    )
    by_job = {
        job: sorted(
            {
                r["metric"]["__name__"]
                for r in query(prom_port, f'{{job="{job}",__name__=~"tickmesh_.+"}}')
            }
        )
        for job in {job for job, _ in targets}
    }
    print(
        f"\n[prometheus] all targets up after {up_after:.1f} s, every key series after "
        f"{time.monotonic() - started:.1f} s; {len(names)} tickmesh series names scraped"
    )
    for job, job_names in sorted(by_job.items()):
        print(f"[prometheus] {job}: {' '.join(job_names)}")
