"""Settings of the dashboard (variables ``DASHBOARD_*``).

Safe by default: the page, its API and its event stream listen on 127.0.0.1 unless
``DASHBOARD_HTTP_HOST`` says otherwise, and ``DASHBOARD_TOKEN`` (a secret) asks every browser
and API client for it. The probes and ``/metrics`` stay open, as on every service.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, ClassVar

from msgspec import Meta

from libs.common import names
from libs.common.runtime.settings import CommonSettings, Secret


class DashboardSettings(CommonSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What the dashboard reads, how it streams to browsers, and who may look."""

    ENV_PREFIX: ClassVar[str] = "DASHBOARD_"
    SERVICE: ClassVar[str] = "dashboard"

    http_host: Annotated[
        str, Meta(description="bind address of the page, its stream and the probes")
    ] = "127.0.0.1"
    http_port: Annotated[int, Meta(ge=0, le=65535, description="port of the page and probes")] = (
        9105
    )
    token: Annotated[
        Secret,
        Meta(description="bearer token asked of browsers and API clients (empty: none asked)"),
    ] = Secret("")
    bars_pattern: Annotated[str, Meta(description="channel pattern of the bars")] = (
        names.BARS_PATTERN
    )
    trades_channel: Annotated[str, Meta(description="executed trades")] = names.TRADES
    positions_channel: Annotated[str, Meta(description="positions")] = names.POSITIONS
    portfolio_channel: Annotated[str, Meta(description="portfolio")] = names.PORTFOLIO
    client_buffer_events: Annotated[
        int,
        Meta(
            ge=10,
            description="events waiting for one browser; past it the browser gets a fresh "
            "snapshot instead (updates of one key coalesce before that)",
        ),
    ] = 2_000
    replay_events: Annotated[
        int, Meta(ge=0, description="recent events kept to resume a browser (Last-Event-ID)")
    ] = 10_000
    recent_bars: Annotated[
        int, Meta(gt=0, description="newest bars kept per symbol in memory (the rest: bar store)")
    ] = 120
    trades_kept: Annotated[int, Meta(gt=0, description="executed trades of the day shown")] = 1_000
    history_records: Annotated[
        int, Meta(gt=0, description="records read back per channel at start (trades, ...)")
    ] = 5_000
    health_interval_ms: Annotated[
        int, Meta(gt=0, description="how often the health strip is refreshed")
    ] = 1_000
    stale_after_ms: Annotated[
        int, Meta(gt=0, description="a service whose last heartbeat is older is shown stale")
    ] = 15_000
    keepalive_ms: Annotated[int, Meta(gt=0, description="comment sent on an idle stream")] = 15_000

    def check(self) -> None:
        if self.token and len(self.token.reveal()) < 16:
            raise self.invalid("token", "use at least 16 characters")

    def loopback_only(self) -> bool:
        """True when bound to a loopback address (then only loopback Host names are served,
        so another site cannot reach the page through a DNS rebinding)."""
        if self.http_host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.http_host).is_loopback
        except ValueError:
            return False
