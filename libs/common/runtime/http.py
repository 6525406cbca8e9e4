"""The per-service HTTP endpoint: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``, plus
whatever routes a service adds (the dashboard's page, its API and its event stream).

``/healthz`` answers 200 while the process is alive and its supervisor has not given up.
``/readyz`` answers 200 only when every registered readiness check passes (for example the
Redis and Kafka connections are up) and lists each check's state either way.

One small asyncio HTTP/1.1 server serves every service: one request per connection
(``Connection: close``), headers read and bounded, GET and HEAD. A route answers a
``Response``, or a ``Stream`` whose body it writes itself until the client leaves or the
server stops (server-sent events); ``stop`` ends open streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import NamedTuple
from urllib.parse import parse_qsl, urlsplit

import msgspec
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = structlog.get_logger("tickmesh.http")

ReadinessCheck = Callable[[], bool | Awaitable[bool]]

_REASONS = {
    200: "OK",
    303: "See Other",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
MAX_HEADERS = 100
"""Header lines read per request; a request with more is refused (413)."""
HEADER_TIMEOUT_S = 5.0


class Request(NamedTuple):
    """One request: method, path (without the query), query parameters, headers (names in
    lower case)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]


class Response(NamedTuple):
    """A whole response."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


StreamBody = Callable[[asyncio.StreamWriter], Awaitable[None]]


class Stream(NamedTuple):
    """A response whose body ``write`` sends itself, for as long as it likes (server-sent
    events): status 200, ``content_type`` and ``headers`` first, no length, the connection
    closes at the end."""

    content_type: str
    write: StreamBody
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response | Stream]]


def text(status: int, message: str) -> Response:
    """A plain-text response."""
    return Response(status, "text/plain; charset=utf-8", f"{message}\n".encode())


def json_response(value: object, status: int = 200) -> Response:
    """A JSON response (``value`` encoded with msgspec)."""
    return Response(status, "application/json", msgspec.json.encode(value))


def parse_request_head(request_line: bytes, header_lines: list[bytes]) -> Request:
    """The request of a request line and its header lines (``ValueError`` when malformed)."""
    parts = request_line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError(f"malformed request line {request_line[:100]!r}")
    method, target = parts[0], parts[1]
    url = urlsplit(target)
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name.strip():
            raise ValueError(f"malformed header {line[:100]!r}")
        headers[name.strip().lower()] = value.strip()
    return Request(method, url.path or "/", dict(parse_qsl(url.query)), headers)


class HealthServer:
    """A small asyncio HTTP/1.1 server for probes, scrapes and a service's own routes."""

    def __init__(self, registry: CollectorRegistry, host: str = "0.0.0.0", port: int = 0) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.healthy = True
        self._checks: dict[str, ReadinessCheck] = {}
        self._routes: dict[str, Handler] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[object]] = set()

    def add_readiness(self, name: str, check: ReadinessCheck) -> None:
        """Register a readiness check (sync or async; False or an exception = not ready)."""
        self._checks[name] = check

    def add_route(self, path: str, handler: Handler) -> None:
        """Serve ``path`` (exact, GET and HEAD) with ``handler``; the probes keep theirs."""
        if path in ("/metrics", "/healthz", "/readyz"):
            raise ValueError(f"{path} is the server's own")
        self._routes[path] = handler

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
        """Stop listening and end open connections (streams included)."""
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _read_head(self, reader: asyncio.StreamReader) -> Request | Response:
        request_line = await asyncio.wait_for(reader.readline(), HEADER_TIMEOUT_S)
        lines: list[bytes] = []
        while True:
            line = await asyncio.wait_for(reader.readline(), HEADER_TIMEOUT_S)
            if line in (b"\r\n", b"\n", b""):
                break
            if len(lines) >= MAX_HEADERS:
                return text(413, "too many headers")
            lines.append(line.rstrip(b"\r\n"))
        try:
            return parse_request_head(request_line, lines)
        except ValueError as exc:
            return text(400, str(exc))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            head = await self._read_head(reader)
            method = head.method if isinstance(head, Request) else "GET"
            answer = await self._route(head) if isinstance(head, Request) else head
            if isinstance(answer, Stream):
                writer.write(_head(200, answer.content_type, None, answer.headers))
                await writer.drain()
                if method != "HEAD":
                    await answer.write(writer)
                return
            writer.write(
                _head(answer.status, answer.content_type, len(answer.body), answer.headers)
            )
            if method != "HEAD":
                writer.write(answer.body)
            await writer.drain()
        except (
            TimeoutError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass
        except asyncio.CancelledError:
            pass  # the server is stopping; the connection closes below
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()

    async def _route(self, request: Request) -> Response | Stream:
        if request.method not in ("GET", "HEAD"):
            return text(405, "method not allowed")
        path = request.path
        if path == "/metrics":
            return Response(200, CONTENT_TYPE_LATEST, generate_latest(self.registry))
        if path == "/healthz":
            return json_response({"healthy": self.healthy}, 200 if self.healthy else 503)
        if path == "/readyz":
            states = await self.readiness()
            ready = self.healthy and all(states.values())
            return json_response({"ready": ready, "checks": states}, 200 if ready else 503)
        handler = self._routes.get(path)
        if handler is None:
            return text(404, "not found")
        try:
            return await handler(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("http.handler_failed", path=path, error=repr(exc), exc_info=exc)
            return text(500, "internal error")


def _head(
    status: int, content_type: str, length: int | None, headers: tuple[tuple[str, str], ...]
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        f"Content-Type: {content_type}",
    ]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines.extend(f"{name}: {value}" for name, value in headers)
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
