"""The whole mesh on one machine, as separate OS processes: for the demo and end-to-end tests.

``Mesh`` starts, against a ``LocalStack``, the Polygon simulator and the services — ingest,
bars (Redis, primary), bars (Kafka, shadow), engine_bridge, the mirror's forwarder and its
timed reconciler (``mirror-reconciler``) — each as ``python -m services.<name> run`` with its
settings in the environment and its JSON log in a file. It waits until the simulator has
replayed its feed and the pipeline has settled, then reads the figures of the run from the
services' ``/metrics`` and from Kafka.

Scale-out: ``MeshOptions.bars_shards`` runs the bars (primary and shadow) as that many shards
and ``mirror_instances`` the mirror as that many instances split by channel, each its own
process, port and log. One instance keeps its plain name (``bars``, ``bars-shadow``,
``mirror``); several are named ``<name>-<k>of<n>``, k counting from 1 (``bars-1of2`` is
``BARS_SHARD_INDEX=0``). ``Mesh.group`` and ``Mesh.metric_total`` see a group as one service.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from devstack.localstack import LocalStack, free_port
from libs.common.io.kafka_io import list_topics, read_from_beginning
from libs.common.runtime.settings import CommonSettings, SettingsT, load_settings
from services.ingest.simulator.cli import control_remote

SIM_KEY = "tickmesh-demo-key"
RECONCILER = "mirror-reconciler"
"""The process of the mirror's timed reconciler (``MIRROR_ROLE=reconcile``)."""
IDLE_AFTER_S = 2.0
"""ingest's ``INGEST_IDLE_AFTER_MS`` as the mesh runs it."""


@dataclass
class MeshOptions:
    """What the mesh replays and how."""

    workdir: Path
    data_dir: Path | None = None
    day: str | None = None
    days: list[str] | None = None
    """Several days on one connection instead of ``day``: ``SOURCE[:AS_OF]`` each (the
    simulator's ``--days``)."""
    day_pause_s: float = 3.0
    hold_between_days: bool = False
    """After each day (and its pause) the simulator waits for ``release_next_day``."""
    symbols: list[str] = field(default_factory=lambda: ["SPY", "IBM", "AIG", "BAC"])
    speed: float = 0.0
    synthetic_symbols: int = 20
    synthetic_rate: int = 5_000
    duration_s: float = 20.0
    grace_ms: int = 1_000
    simulator_history_trades: int | None = None
    """The simulator's ``--history-max-trades`` (None: its default)."""
    shadow: bool = True
    strategy: str = "golden_cross"
    run_id: str = "demo"
    dashboard: bool = False
    """Also run the dashboard (on ``dashboard_port``, a free one when 0)."""
    dashboard_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    """Extra variables for every process: security settings (``TICKMESH_KAFKA_SASL_*``,
    ``TICKMESH_REDIS_SSL_*``) and each service's own credentials (``INGEST_REDIS_USERNAME``)."""
    bars_shards: int = 1
    """Bars shards by symbol (``BARS_SHARD_COUNT``): this many primary processes and, with
    ``shadow``, this many shadow processes."""
    mirror_instances: int = 1
    """Mirror instances split by channel (``MIRROR_SHARD_COUNT``), each with its own stored
    positions (``MIRROR_CONSUMER_NAME``); the scheduled reconciler runs beside them, once, in
    its own process (``mirror-reconciler``)."""

    def __post_init__(self) -> None:
        if self.bars_shards < 1 or self.mirror_instances < 1:
            raise ValueError(
                f"bars_shards ({self.bars_shards}) and mirror_instances "
                f"({self.mirror_instances}) must be at least 1"
            )


def instance_names(base: str, count: int) -> list[str]:
    """The process names of ``count`` instances of ``base``: ``[base]`` for one, else
    ``base-1ofN`` ... ``base-NofN``."""
    return [base] if count == 1 else [f"{base}-{k}of{count}" for k in range(1, count + 1)]


def mirror_consumer_names(count: int) -> list[str]:
    """The ``MIRROR_CONSUMER_NAME`` of each of ``count`` mirror instances (the name of its
    positions in Redis): the default ``mirror`` for one."""
    return instance_names("mirror", count)


class ProcessExited(RuntimeError):
    """A process that should be running has exited."""


class ServiceProcess:
    """One program run as an OS process, its output in a log file: a service of the mesh (with
    ``http_port`` for readiness and metrics), the simulator, or any other tool a test runs.

    Stopped with SIGTERM (a service drains within its deadline), then SIGKILL; ``kill`` is
    the crash a no-loss test wants. ``start`` may be called again after a stop or a kill (the
    log is appended to).
    """

    def __init__(
        self,
        name: str,
        command: list[str],
        env: dict[str, str],
        log_path: Path,
        *,
        http_port: int | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.log_path = log_path
        self.http_port = http_port
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def service(
        cls,
        name: str,
        module: str,
        env: dict[str, str],
        log_path: Path,
        http_port: int,
        *,
        python: str = sys.executable,
        cwd: Path | None = None,
    ) -> ServiceProcess:
        """``python -m services.<module> run``."""
        return cls(
            name,
            [python, "-m", f"services.{module}", "run"],
            env,
            log_path,
            http_port=http_port,
            cwd=cwd,
        )

    def start(self) -> ServiceProcess:
        """Start the process."""
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.cwd,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        """True while the process runs."""
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        """True when ``/readyz`` answers 200; raises ``ProcessExited`` if it died."""
        if not self.alive():
            code = None if self.process is None else self.process.returncode
            raise ProcessExited(f"{self.name} exited with {code}:\n{self.log_tail()}")
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Wait until ready; returns the wall-clock time it became ready."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name} not ready after {timeout_s:g} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        return time.time()

    def terminate(self) -> None:
        """Send SIGTERM without waiting (stop many at once, then ``stop`` each)."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL."""
        if self.process is None:
            return
        self.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no drain, no flush, no last commit."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def events(self) -> list[dict[str, object]]:
        """The JSON lines of the log."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    pass
        return found

    def event_names(self) -> list[str]:
        """The ``event`` of every JSON log line."""
        return [str(event.get("event")) for event in self.events()]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Scrape ``/metrics`` into ``{(sample name, labels): value}``."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def metric_sum(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include ``labels``; 0 if unreachable."""
        try:
            samples = self.metrics()
        except OSError:
            return 0.0
        return sum(
            value
            for (sample, sample_labels), value in samples.items()
            if sample == name and all(dict(sample_labels).get(k) == v for k, v in labels.items())
        )


class Mesh:
    """Start, watch and stop the whole mesh."""

    def __init__(
        self, stack: LocalStack, options: MeshOptions, python: str = sys.executable
    ) -> None:
        self.stack = stack
        self.options = options
        self.python = python
        self.services: dict[str, ServiceProcess] = {}
        self.simulator: ServiceProcess | None = None
        self.simulator_port = 0
        options.workdir.mkdir(parents=True, exist_ok=True)

    def _kafka_bootstrap(self) -> str:
        kafka = self.stack.kafka
        assert kafka is not None, "the mesh needs a LocalStack with Kafka"
        return kafka.bootstrap

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "TICKMESH_REDIS_URL": self.stack.redis.url,
                "TICKMESH_KAFKA_BOOTSTRAP": self._kafka_bootstrap(),
                "TICKMESH_MODE": "sim",
                "TICKMESH_LOG_FORMAT": "json",
                "TICKMESH_RUN_ID": self.options.run_id,
                "TICKMESH_HEARTBEAT_INTERVAL_MS": "1000",
                "TICKMESH_HTTP_HOST": "127.0.0.1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.options.env)
        return env

    def settings(self, cls: type[SettingsT]) -> SettingsT:
        """``cls`` loaded from the environment the mesh's services get (this process's, the
        stack's addresses, the options' ``env``): what a tool that reads the mesh's Redis or
        Kafka must use, so that it sees the same layout (``TOPIC_MODE``) and security."""
        return load_settings(cls, self._base_env())

    def kafka_settings(self) -> CommonSettings:
        """The shared settings the services reach Kafka with (bootstrap and security)."""
        return self.settings(CommonSettings)

    def start_service(
        self, name: str, module: str, prefix: str, extra: dict[str, str] | None = None
    ) -> ServiceProcess:
        """Start ``python -m services.<module> run`` with its settings."""
        extra = extra or {}
        port = int(extra.get(f"{prefix}HTTP_PORT", 0)) or free_port()
        env = self._base_env()
        env[f"{prefix}HTTP_PORT"] = str(port)
        env.update(extra)
        service = ServiceProcess.service(
            name, module, env, self.options.workdir / f"{name}.log", port, python=self.python
        ).start()
        self.services[name] = service
        return service

    def start_simulator(self) -> None:
        """Start the Polygon-compatible simulator on a free port."""
        options = self.options
        self.simulator_port = free_port()
        args = [
            "-m",
            "services.ingest",
            "simulate",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.simulator_port),
            "--speed",
            str(options.speed),
        ]
        if options.data_dir is not None:
            args += ["--data", str(options.data_dir), "--symbols", ",".join(options.symbols)]
            if options.days:
                args += ["--days", ",".join(options.days)]
                args += ["--day-pause-s", str(options.day_pause_s)]
                if options.hold_between_days:
                    args.append("--hold-between-days")
            else:
                args += ["--date", str(options.day)]
        else:
            args += [
                "--synthetic-symbols",
                str(options.synthetic_symbols),
                "--rate",
                str(options.synthetic_rate),
                "--max-events",
                str(int(options.synthetic_rate * options.duration_s)),
                "--seed",
                "7",
            ]
        if options.simulator_history_trades is not None:
            args += ["--history-max-trades", str(options.simulator_history_trades)]
        env = self._base_env()
        env["SIM_API_KEY"] = SIM_KEY
        self.simulator = ServiceProcess(
            "simulator", [self.python, *args], env, self.options.workdir / "simulator.log"
        ).start()

    def start(self) -> None:
        """Start everything: consumers first, so nothing relies on catching up."""
        options = self.options
        grace = {"BARS_GRACE_MS": str(options.grace_ms)}
        mirrors = options.mirror_instances
        for index, (name, consumer) in enumerate(
            zip(instance_names("mirror", mirrors), mirror_consumer_names(mirrors), strict=True)
        ):
            split = {"MIRROR_ROLE": "forward"}
            if mirrors > 1:
                split |= {
                    "MIRROR_SHARD_INDEX": str(index),
                    "MIRROR_SHARD_COUNT": str(mirrors),
                    "MIRROR_CONSUMER_NAME": consumer,
                }
            self.start_service(name, "mirror", "MIRROR_", split)
        # the timed reconciler in a process of its own, as deployed: its reading and its day
        # of identities stay out of the forwarders'
        self.start_service(RECONCILER, "mirror", "MIRROR_", {"MIRROR_ROLE": "reconcile"})
        shards = options.bars_shards
        for index in range(shards):
            shard = (
                {"BARS_SHARD_INDEX": str(index), "BARS_SHARD_COUNT": str(shards)}
                if shards > 1
                else {}
            )
            self.start_service(
                instance_names("bars", shards)[index], "bars", "BARS_", {**grace, **shard}
            )
            if options.shadow:
                self.start_service(
                    instance_names("bars-shadow", shards)[index],
                    "bars",
                    "BARS_",
                    {
                        **grace,
                        **shard,
                        "BARS_SOURCE": "kafka",
                        "BARS_KAFKA_GROUP": f"{options.run_id}-shadow",
                    },
                )
        self.start_service(
            "engine_bridge", "engine_bridge", "BRIDGE_", {"BRIDGE_STRATEGY": options.strategy}
        )
        if options.dashboard:
            port = (
                {"DASHBOARD_HTTP_PORT": str(options.dashboard_port)}
                if options.dashboard_port
                else {}
            )
            self.start_service("dashboard", "dashboard", "DASHBOARD_", port)
        self.start_simulator()
        self.wait_ready(list(self.services), timeout_s=90)
        self.start_service(
            "ingest",
            "ingest",
            "INGEST_",
            {
                "INGEST_POLYGON_URL": f"ws://127.0.0.1:{self.simulator_port}/stocks",
                "INGEST_REST_URL": f"http://127.0.0.1:{self.simulator_port}",
                "POLYGON_API_KEY": SIM_KEY,
                "INGEST_SYMBOLS": "*" if options.data_dir is None else ",".join(options.symbols),
                "INGEST_EVENT_TYPES": "T,AM",
                "INGEST_IDLE_AFTER_MS": str(int(IDLE_AFTER_S * 1000)),
            },
        )
        self.wait_ready(["ingest"], timeout_s=60)

    @property
    def dashboard_url(self) -> str | None:
        """The dashboard's page, when the mesh runs one."""
        dashboard = self.services.get("dashboard")
        return f"http://127.0.0.1:{dashboard.http_port}/" if dashboard is not None else None

    def group(self, base: str) -> list[ServiceProcess]:
        """The processes of one service (``bars``, ``bars-shadow``, ``mirror``...): the
        service itself when it runs once, else its instances in shard order."""
        if base in self.services:
            return [self.services[base]]
        instance = re.compile(rf"{re.escape(base)}-\d+of\d+")
        return [service for name, service in self.services.items() if instance.fullmatch(name)]

    def metric_total(self, base: str, name: str, **labels: str) -> float:
        """A metric summed over every process of the service ``base`` (0 when none runs)."""
        return sum(service.metric_sum(name, **labels) for service in self.group(base))

    def kill(self, name: str) -> None:
        """SIGKILL one service (no drain, no flush, no last commit)."""
        self.services[name].kill()

    def restart(self, name: str, timeout_s: float = 60.0) -> float:
        """Start a stopped or killed service again (same settings, same port, log appended)
        and wait until it is ready; returns the seconds it took."""
        started = time.monotonic()
        service = self.services[name]
        if service.alive():
            service.stop()
        service.start()
        self.wait_ready([name], timeout_s=timeout_s)
        return time.monotonic() - started

    def down(self) -> list[str]:
        """The services that are not running."""
        return [name for name, service in self.services.items() if not service.alive()]

    def check_alive(self) -> None:
        """Raise ``ProcessExited`` with the log tail when a service has died."""
        for service in self.services.values():
            if not service.alive():
                raise ProcessExited(f"service {service.name} exited:\n{service.log_tail()}")

    def wait_ready(self, names: list[str], timeout_s: float) -> None:
        """Wait until each named service answers /readyz with 200."""
        deadline = time.monotonic() + timeout_s
        pending = set(names)
        while pending:
            self.check_alive()
            pending = {name for name in pending if not self.services[name].ready()}
            if pending and time.monotonic() > deadline:
                tails = "\n".join(f"--- {n}\n{self.services[n].log_tail()}" for n in pending)
                raise TimeoutError(f"not ready after {timeout_s:g} s: {sorted(pending)}\n{tails}")
            time.sleep(0.2)

    def simulator_status(self) -> dict[str, Any]:
        """The simulator's ``/control/status`` (its counters, ``feedDone``, the day it sends
        and the days done)."""
        return self.simulator_control("status")

    def simulator_control(self, path: str) -> dict[str, Any]:
        """``GET /control/<path>`` on the simulator (``inject?fault=drop``, ``burst?...``)."""
        return control_remote("127.0.0.1", self.simulator_port, path, SIM_KEY)

    def release_next_day(self) -> None:
        """Let the simulator start its next day (``hold_between_days``)."""
        self.simulator_control("release")

    def wait_feed_done(self, timeout_s: float) -> None:
        """Wait for the simulator to have sent its whole feed (it keeps serving, as Polygon's
        socket stays open after the close: no disconnect, no feed gap)."""
        assert self.simulator is not None
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            if not self.simulator.alive():
                raise ProcessExited(f"the simulator exited:\n{self.simulator.log_tail()}")
            try:
                if self.simulator_status().get("feedDone"):
                    return
            except (OSError, RuntimeError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"the simulator did not finish within {timeout_s:g} s")
            time.sleep(0.5)

    def wait_last_minute_closed(self) -> None:
        """Wait until every symbol's last minute has closed: ingest's progress marks say the
        feed is idle a moment after it ends, and the builders close what is left."""
        close_at = time.time() + IDLE_AFTER_S + self.options.grace_ms / 1000 + 2
        while time.time() < close_at:
            self.check_alive()
            time.sleep(min(1.0, max(0.0, close_at - time.time())))

    def progress(self) -> tuple[float, ...]:
        """Counters that move while data flows (for settling)."""
        figures = [
            self.metric_total("ingest", "tickmesh_ingest_frames_total"),
            self.metric_total("bars", "tickmesh_bars_published_total"),
            self.metric_total("mirror", "tickmesh_consumer_records_total", kind="ticks"),
            self.metric_total("mirror", "tickmesh_consumer_records_total", kind="bars"),
        ]
        if self.group("bars-shadow"):
            figures.append(self.metric_total("bars-shadow", "tickmesh_bars_published_total"))
        return tuple(figures)

    def wait_settled(self, quiet_s: float, timeout_s: float) -> None:
        """Wait until no counter moved for ``quiet_s`` (bars closed, mirror caught up)."""
        deadline = time.monotonic() + timeout_s
        last = self.progress()
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < quiet_s:
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the mesh did not settle within {timeout_s:g} s")
            time.sleep(0.5)
            now = self.progress()
            if now != last:
                last, quiet_since = now, time.monotonic()

    def kafka_counts(self) -> dict[str, tuple[int, int]]:
        """(records, distinct records) per Kafka topic, read from the beginning up to now."""
        return asyncio.run(
            count_topic_records(self._kafka_bootstrap(), None, self.kafka_settings())
        )

    def stop(self) -> None:
        """SIGTERM every process (each drains within its deadline), SIGKILL stragglers."""
        processes = list(self.services.values())
        if self.simulator is not None:
            processes.append(self.simulator)
        for process in processes:
            process.terminate()
        deadline = time.monotonic() + 15
        for process in processes:
            process.stop(max(0.1, deadline - time.monotonic()))


def _kafka_settings(bootstrap: str) -> CommonSettings:
    return CommonSettings(kafka_bootstrap=bootstrap)


async def count_topic_records(
    bootstrap: str, topics: list[str] | None = None, settings: CommonSettings | None = None
) -> dict[str, tuple[int, int]]:
    """(records, distinct records) per topic (every topic when ``topics`` is None), read from
    the beginning up to now (a topic still being written, such as heartbeats, is not followed
    forever). A record whose key, headers and value equal an earlier one's in the same topic
    is a copy (an at-least-once re-send), not a distinct record. ``settings`` carry the Kafka
    security settings, when any."""
    settings = settings or _kafka_settings(bootstrap)
    if topics is None:
        topics = sorted(await list_topics(settings))
    counts = dict.fromkeys(topics, 0)
    seen: dict[str, set[int]] = {topic: set() for topic in topics}
    async for chunk in read_from_beginning(settings, topics):
        for record in chunk:
            counts[record.topic] += 1
            seen[record.topic].add(hash((record.key, tuple(record.headers), record.value)))
    return {topic: (counts[topic], len(seen[topic])) for topic in topics}


async def read_topic(
    bootstrap: str, topic: str, settings: CommonSettings | None = None
) -> list[bytes]:
    """The record values of ``topic`` from the beginning up to now."""
    values: list[bytes] = []
    async for chunk in read_from_beginning(settings or _kafka_settings(bootstrap), [topic]):
        values.extend(record.value for record in chunk if record.value is not None)
    return values
