"""The dashboard service against a real redis-server: history from the bar store, live events,
resuming with Last-Event-ID, who may look, and a clear refusal to start without its bundle."""

from __future__ import annotations

import asyncio
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import date
from pathlib import Path

import msgspec
import pytest

from libs.common import names
from libs.common.io.barstore import BarStore
from libs.common.io.redis_io import Publisher
from libs.common.names import Keys
from services.dashboard import web
from tests.helpers import eventually
from tests.test_dashboard_browser import dashboard_process, history_bars

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DAY = date(2013, 10, 7)
TOKEN = "a-long-enough-dashboard-token"


def get(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


class Events:
    """A raw server-sent events client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, path: str, last_id: str | None = None) -> Events:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        extra = f"Last-Event-ID: {last_id}\r\n" if last_id else ""
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0], head
        assert b"text/event-stream" in head
        return cls(reader, writer)

    async def next(self, timeout: float = 10.0) -> tuple[str | None, str, object]:
        """The next event (id, name, data), skipping comments and the retry line."""
        while True:
            block = await asyncio.wait_for(self.reader.readuntil(b"\n\n"), timeout)
            fields: dict[str, str] = {}
            for line in block.decode().strip().split("\n"):
                if line.startswith(":") or ": " not in line:
                    continue
                key, value = line.split(": ", 1)
                fields[key] = value
            if "event" in fields:
                return fields.get("id"), fields["event"], msgspec.json.decode(fields["data"])

    async def until(self, name: str) -> tuple[str | None, object]:
        while True:
            event_id, event, data = await self.next()
            if event == name:
                return event_id, data

    def close(self) -> None:
        self.writer.close()


async def test_history_live_bars_and_a_resume_that_gets_exactly_what_was_missed(
    redis_url: str, redis_client: object, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    prefix = f"{unique_name('dash')}:"
    keys = Keys(prefix)
    bars = history_bars("SPY", DAY, 168.0, 5)
    await BarStore(redis_client, keys).put_many(bars[:3])  # type: ignore[arg-type]
    publisher = Publisher(redis_client, keys=keys)  # type: ignore[arg-type]
    dashboard = dashboard_process(redis_url, prefix, tmp_path)
    try:
        dashboard.wait_ready(30)
        port = dashboard.http_port
        assert port is not None
        status, _, body = get(port, "/api/snapshot?symbol=SPY")
        snapshot = msgspec.json.decode(body)
        assert status == 200 and snapshot["day"] == "2013-10-07"
        assert [bar["startMs"] for bar in snapshot["bars"]] == [bar.startMs for bar in bars[:3]]
        assert snapshot["symbols"][0]["symbol"] == "SPY" and snapshot["symbols"][0]["open"] == 168.0

        stream = await Events.open(port, "/events?symbol=SPY")
        _, first = await stream.until("snapshot")
        assert len(first["bars"]) == 3  # type: ignore[index]
        channel = names.channel(names.BARS, "SPY")
        await publisher.publish(channel, bars[3])
        event_id, bar = await stream.until("bar")
        assert bar["startMs"] == bars[3].startMs  # type: ignore[index]
        stream.close()

        await publisher.publish(channel, bars[4])
        await publisher.publish(
            names.channel(names.BARS, "IBM"), history_bars("IBM", DAY, 180, 1)[0]
        )
        revised = msgspec.structs.replace(bars[4], close=169.0, revision=1)
        await publisher.publish(channel, revised)

        async def bars_after(last_id: str) -> list[tuple[str, object]]:
            resumed = await Events.open(port, "/events?symbol=SPY", last_id)
            seen: list[tuple[str, object]] = []
            try:  # what arrives within 3 s (the health strip comes every 0.5 s meanwhile)
                async with asyncio.timeout(3):
                    while True:
                        _, name, data = await resumed.next()
                        if name != "health":
                            seen.append((name, data))
            except TimeoutError:
                return seen
            finally:
                resumed.close()

        async def both_bars_resumed() -> list[tuple[str, object]] | None:
            seen = await bars_after(str(event_id))
            return seen if sum(name == "bar" for name, _ in seen) >= 2 else None

        seen = await eventually(both_bars_resumed, timeout=30)
        kinds = [name for name, _ in seen]
        assert "snapshot" not in kinds, kinds
        got = [(data["startMs"], data["revision"]) for name, data in seen if name == "bar"]  # type: ignore[index]
        assert got == [(bars[4].startMs, 0), (bars[4].startMs, 1)]  # not IBM's, nothing twice
        again = await Events.open(port, "/events?symbol=SPY", "another-process-7")
        assert (await again.next())[1] == "snapshot"
        again.close()
    finally:
        dashboard.stop()


async def test_a_token_guards_the_page_and_never_reaches_it(
    redis_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    dashboard = dashboard_process(
        redis_url, f"{unique_name('dash')}:", tmp_path, {"DASHBOARD_TOKEN": TOKEN}
    )
    try:
        dashboard.wait_ready(30)
        port = dashboard.http_port
        assert port is not None
        assert get(port, "/")[0] == 401
        assert get(port, "/api/snapshot")[0] == 401
        assert get(port, "/events")[0] == 401
        assert get(port, "/?token=wrong-token-of-some-length")[0] == 401
        assert get(port, "/healthz")[0] == 200 and get(port, "/metrics")[0] == 200
        status, headers, _ = get(port, f"/?token={TOKEN}")
        assert status == 303 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"].split(";")[0]
        assert "HttpOnly" in headers["Set-Cookie"] and TOKEN not in cookie
        bodies = []
        for path in ("/", "/app.js", "/app.css", "/api/snapshot?symbol=SPY"):
            status, headers, body = get(port, path, {"Cookie": cookie})
            assert status == 200, path
            bodies.append(body)
        assert (
            "default-src 'self'" in get(port, "/", {"Cookie": cookie})[1]["Content-Security-Policy"]
        )
        status, _, body = get(port, "/api/snapshot", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200
        assert not any(TOKEN.encode() in body for body in [*bodies, body])
        assert get(port, "/", {"Cookie": cookie, "Host": "evil.example:80"})[0] == 400
    finally:
        dashboard.stop()


def test_without_its_bundle_the_service_stops_with_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.dashboard import __main__ as main

    monkeypatch.setattr(web, "WEB_DIST", tmp_path / "dist")
    monkeypatch.setattr(sys, "argv", ["dashboard", "run"])
    assert main.CLI.main() == 78
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dashboard: the front end is not built")
    assert "scripts/bootstrap.sh" in err[0]
