"""The dashboard's HTTP side: the page, its snapshot API and its event stream, on the
service's one HTTP server (``libs.common.runtime.http``).

- ``/`` (``index.html``), ``/app.js``, ``/app.css``: the front end, built from
  ``services/dashboard/web`` by npm at install time and served from memory; nothing is
  fetched from another site (the Content-Security-Policy forbids it).
- ``/api/snapshot?symbol=SPY``: what the page draws at once, as JSON.
- ``/events?symbol=SPY``: server-sent events (``snapshot`` first, then ``bar``, ``quote``,
  ``trade``, ``position``, ``portfolio``, ``health``); ``Last-Event-ID`` resumes.

Who may look: bound to loopback, only loopback ``Host`` names are served (another site cannot
reach the page through DNS rebinding). With a token set, a request needs ``Authorization:
Bearer <token>`` or the session cookie, which ``/?token=<token>`` sets (HttpOnly, SameSite
Strict, holding a digest of the token, never the token) before redirecting to ``/``. The page
never receives a setting, a secret or a URL of the mesh.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from libs.common.runtime.http import (
    HealthServer,
    Request,
    Response,
    Stream,
    json_response,
    text,
)
from services.dashboard.config import DashboardSettings
from services.dashboard.feed import DashboardFeed
from services.dashboard.hub import Hub, Outbox

WEB_DIST = Path(__file__).resolve().parent / "web" / "dist"
"""Where ``npm run build`` puts the front end (inside the package, so it ships with it)."""
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}
COOKIE = "tickmesh_dashboard"
SYMBOL = re.compile(r"^[A-Z0-9][A-Z0-9.\-]{0,15}$")
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
SECURITY_HEADERS = (
    (
        "Content-Security-Policy",
        # inline styles: the charting library sizes its canvases with style attributes
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Cache-Control", "no-cache"),
)


class BundleMissing(RuntimeError):
    """The front end was not built."""


@dataclass(frozen=True)
class Assets:
    """The built front end, read once."""

    files: dict[str, tuple[bytes, str]]

    @classmethod
    def load(cls, folder: Path | None = None) -> Assets:
        """Read the bundle (from ``WEB_DIST`` by default); ``BundleMissing`` names what is
        missing and how to build it."""
        folder = WEB_DIST if folder is None else folder
        missing = [name for name, _ in ASSETS.values() if not (folder / name).is_file()]
        if missing:
            raise BundleMissing(
                f"the front end is not built ({', '.join(missing)} missing in {folder}); "
                "build it with `bash scripts/bootstrap.sh` (npm ci && npm run build in "
                "services/dashboard/web)"
            )
        return cls(
            {path: ((folder / name).read_bytes(), kind) for path, (name, kind) in ASSETS.items()}
        )


def session_value(token: str) -> str:
    """The cookie's value for ``token``: a digest, so the cookie is not the token."""
    return hmac.new(token.encode(), b"tickmesh-dashboard-session", hashlib.sha256).hexdigest()


def cookie_of(header: str) -> str | None:
    """Our cookie's value in a ``Cookie`` header."""
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None


class DashboardWeb:
    """The dashboard's routes."""

    def __init__(
        self, settings: DashboardSettings, feed: DashboardFeed, hub: Hub, assets: Assets
    ) -> None:
        self.settings = settings
        self.feed = feed
        self.hub = hub
        self.assets = assets
        self.token = settings.token.reveal()
        self.session = session_value(self.token) if self.token else ""
        self.keepalive_s = settings.keepalive_ms / 1000
        self.loopback_only = settings.loopback_only()

    def install(self, server: HealthServer) -> None:
        """Add the routes to the service's HTTP server."""
        for path in ASSETS:
            server.add_route(path, self.asset)
        server.add_route("/api/snapshot", self.snapshot)
        server.add_route("/events", self.events)

    # -- who may look ------------------------------------------------------------------------

    def refusal(self, request: Request) -> Response | None:
        """Why ``request`` is refused (None: it may look)."""
        if self.loopback_only:
            host = request.headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.lower() not in LOOPBACK_HOSTS:
                return text(400, "this dashboard answers loopback host names only")
        if not self.token:
            return None
        authorization = request.headers.get("authorization", "")
        if authorization.startswith("Bearer ") and hmac.compare_digest(
            authorization[7:].strip().encode(), self.token.encode()
        ):
            return None
        cookie = cookie_of(request.headers.get("cookie", ""))
        if cookie is not None and hmac.compare_digest(cookie.encode(), self.session.encode()):
            return None
        return Response(
            401,
            "text/plain; charset=utf-8",
            b"token needed: open /?token=<DASHBOARD_TOKEN> once, or send "
            b"Authorization: Bearer <token>\n",
            (("WWW-Authenticate", 'Bearer realm="tickmesh dashboard"'),),
        )

    def login(self, request: Request) -> Response | None:
        """``/?token=...``: the session cookie, then ``/`` without the token in the address."""
        offered = request.query.get("token")
        if offered is None or not self.token:
            return None
        if not hmac.compare_digest(offered.encode(), self.token.encode()):
            return text(401, "wrong token")
        cookie = f"{COOKIE}={self.session}; HttpOnly; SameSite=Strict; Path=/"
        return Response(
            303,
            "text/plain; charset=utf-8",
            b"signed in\n",
            (("Location", "/"), ("Set-Cookie", cookie), ("Cache-Control", "no-store")),
        )

    # -- routes ------------------------------------------------------------------------------

    async def asset(self, request: Request) -> Response:
        """The front end's files."""
        if request.path == "/":
            signed_in = self.login(request)
            if signed_in is not None:
                return signed_in
        refused = self.refusal(request)
        if refused is not None:
            return refused
        body, kind = self.assets.files[request.path]
        return Response(200, kind, body, SECURITY_HEADERS)

    def symbol_of(self, request: Request) -> str | None:
        """The ``symbol`` parameter, checked (None when absent or malformed)."""
        symbol = request.query.get("symbol", "").strip().upper()
        return symbol if SYMBOL.match(symbol) else None

    async def snapshot_payload(self, symbol: str | None) -> dict[str, object]:
        """Everything the page draws at once, for ``symbol``'s chart."""
        bars = await self.feed.chart_bars(symbol) if symbol else []
        return self.feed.view.snapshot(symbol, bars, self.feed.health())

    async def snapshot(self, request: Request) -> Response:
        """``/api/snapshot``."""
        refused = self.refusal(request)
        if refused is not None:
            return refused
        return json_response(await self.snapshot_payload(self.symbol_of(request)))

    async def events(self, request: Request) -> Response | Stream:
        """``/events``: the event stream."""
        refused = self.refusal(request)
        if refused is not None:
            return refused
        if not self.feed.ready:
            return text(503, "the dashboard is loading the day; retry in a moment")
        last_id = request.headers.get("last-event-id") or request.query.get("lastEventId")
        return Stream(
            "text/event-stream; charset=utf-8",
            partial(self.stream, self.symbol_of(request), last_id),
            (("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")),
        )

    async def send_snapshot(self, outbox: Outbox, writer: asyncio.StreamWriter) -> None:
        """A fresh snapshot; what the outbox held up to it is dropped (the snapshot has it)."""
        payload = await self.snapshot_payload(outbox.symbol)
        number, frame = self.hub.snapshot_frame(payload)
        outbox.drop_through(number)
        writer.write(frame)
        self.hub.metrics.bytes_sent.inc(len(frame))
        await writer.drain()

    async def stream(
        self, symbol: str | None, last_id: str | None, writer: asyncio.StreamWriter
    ) -> None:
        """One browser's stream, until it leaves or the server stops."""
        hub = self.hub
        outbox = hub.connect(symbol)
        try:
            writer.write(b"retry: 2000\n\n")
            missed = hub.missed(last_id, symbol) if last_id else None
            if missed is None:
                await self.send_snapshot(outbox, writer)
            elif missed:
                data = b"".join(frame.data for frame in missed)
                writer.write(data)
                hub.metrics.bytes_sent.inc(len(data))
                await writer.drain()
            while not outbox.closed:
                if not await outbox.wait(self.keepalive_s):
                    writer.write(b": keepalive\n\n")
                    await writer.drain()
                    continue
                if outbox.resync:
                    outbox.resync = False
                    await self.send_snapshot(outbox, writer)
                    continue
                frames = outbox.take()
                if frames:
                    data = b"".join(frame.data for frame in frames)
                    writer.write(data)
                    hub.metrics.bytes_sent.inc(len(data))
                    await writer.drain()
        finally:
            hub.disconnect(outbox)
