"""The per-service HTTP endpoint: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 while the process is alive and its supervisor has not given up.
``/readyz`` answers 200 only when every registered readiness check passes (for example the
Redis and Kafka connections are up) and lists each check's state either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = structlog.get_logger("tickmesh.http")

ReadinessCheck = Callable[[], bool | Awaitable[bool]]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    """A small asyncio HTTP/1.1 server for probes and scrapes."""

    def __init__(self, registry: CollectorRegistry, host: str = "0.0.0.0", port: int = 0) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.healthy = True
        self._checks: dict[str, ReadinessCheck] = {}
        self._server: asyncio.Server | None = None

    def add_readiness(self, name: str, check: ReadinessCheck) -> None:
        """Register a readiness check (sync or async; False or an exception = not ready)."""
        self._checks[name] = check

    async def readiness(self) -> dict[str, bool]:
        """Run every readiness check."""
        states: dict[str, bool] = {}
        for name, check in self._checks.items():
            try:
                result = check()
                if isinstance(result, Awaitable):
                    result = await asyncio.wait_for(result, 2.0)
                states[name] = bool(result)
            except Exception:
                states[name] = False
        return states

    async def start(self) -> int:
        """Start listening; returns the bound port."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("http.listening", host=self.host, port=self.port)
        return self.port

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode("latin-1").split()
            method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            status, content_type, body = await self._route(method, path.split("?")[0])
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            status = 200 if self.healthy else 503
            return status, "application/json", msgspec.json.encode({"healthy": self.healthy})
        if path == "/readyz":
            states = await self.readiness()
            ready = self.healthy and all(states.values())
            body = msgspec.json.encode({"ready": ready, "checks": states})
            return (200 if ready else 503), "application/json", body
        return 404, "text/plain", b"not found\n"
