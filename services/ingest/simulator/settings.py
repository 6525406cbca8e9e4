"""The simulator's settings, faults and wire constants (Polygon's wording)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Final

import structlog

from libs.common.market.sessions import ny_midnight_ms, parse_day
from libs.common.runtime.settings import Secret
from services.ingest import protocol

log = structlog.get_logger("ingest.simulator")

KEY_ENV: Final = "SIM_API_KEY"
DEFAULT_KEY: Final = "tickmesh-sim"
"""Key accepted when neither ``--key`` nor ``SIM_API_KEY`` is set (a local simulator only)."""
CONTROL_PREFIX: Final = "/control/"
CONTROL_KEY_HEADER: Final = "X-Sim-Key"

# Polygon's wording where it is documented (docs/simulator.md says which).
MSG_CONNECTED: Final = "Connected Successfully"
MSG_AUTHENTICATED: Final = "authenticated"
MSG_AUTH_FAILED: Final = "authentication failed"
MSG_AUTH_TIMEOUT: Final = "No authentication request received."
MSG_AUTH_REQUIRED: Final = "authentication required"
MSG_MAX_CONNECTIONS: Final = "Maximum number of connections exceeded."
MSG_FORCE_DISCONNECT: Final = "Forced disconnect."
MSG_SLOW_CONSUMER: Final = "Slow consumer: server-side buffer full, disconnecting."

# Close codes: 1008 (policy violation) for the server's protocol-level refusals.
CLOSE_POLICY: Final = 1008
CLOSE_GOING_AWAY: Final = 1001

ODD_LOT: Final = 37
"""Polygon trade condition id of an odd-lot trade (used by the synthetic feed)."""
INTERMARKET_SWEEP: Final = 14
SYNTHETIC_EXCHANGES: Final = (1, 2, 3, 4, 7, 8, 10, 11, 12, 15, 17, 19, 21)
DEFAULT_HISTORY_TRADES: Final = 1_000_000
"""Trades the simulator keeps for ``/v3/trades`` by default: about 300 MB; two and a half
replayed days of four busy symbols, or 50 s of a feed of 20,000 trades a second."""


class Fault(StrEnum):
    """Faults the simulator injects on command."""

    DROP = "drop"
    """Abort the TCP connection without a close frame."""
    SLOW_CONSUMER = "slow_consumer"
    """Send the ``slow_consumer`` status and close."""
    MAX_CONNECTIONS = "max_connections"
    """Send the ``max_connections`` status and close."""
    FORCE_DISCONNECT = "force_disconnect"
    """Send the ``force_disconnect`` status and close."""
    MALFORMED = "malformed"
    """Send bad JSON, a non-array, an unknown ``ev`` and a frame mixing good and bad trades."""
    REST_THROTTLE = "rest_throttle"
    """Answer the next ``count`` REST requests with 429 (rate limited)."""
    OVERSIZED_FRAME = "oversized_frame"
    """Send every authenticated session one frame of ``count`` MiB (a padded status event)."""


_DISCONNECT_STATUS: Final[dict[Fault, tuple[str, str]]] = {
    Fault.SLOW_CONSUMER: (protocol.SLOW_CONSUMER, MSG_SLOW_CONSUMER),
    Fault.MAX_CONNECTIONS: (protocol.MAX_CONNECTIONS, MSG_MAX_CONNECTIONS),
    Fault.FORCE_DISCONNECT: (protocol.FORCE_DISCONNECT, MSG_FORCE_DISCONNECT),
}


@dataclass(frozen=True, slots=True)
class SyntheticFeed:
    """Synthetic trades: ``symbols`` names S0001.., ``rate_per_s`` trades a second in total.

    Symbols are drawn with Zipf-like weights (the first ones are busiest); prices random-walk
    from a seeded start; about ``odd_lot_ratio`` of the trades are odd lots (condition 37) and
    ``sweep_ratio`` intermarket sweeps (14); the rest are regular (no conditions, as Polygon
    sends them). The sequence of trades is fixed by ``seed``; their timestamps are wall time.
    """

    symbols: int = 10
    rate_per_s: float = 1_000.0
    seed: int = 1
    odd_lot_ratio: float = 0.05
    sweep_ratio: float = 0.03
    day: date | None = None
    """A synthetic trading day instead of wall time: the trades are stamped through that New
    York day's session per the exchange calendar (``synthetic_day``), ``rate_per_s`` per
    second of event time, paced by ``speed``; a holiday sends nothing."""
    speed: float = 0.0
    """Pace of a synthetic day: 1 real time, 0 as fast as the clients take it."""

    def __post_init__(self) -> None:
        if self.symbols < 1:
            raise ValueError(f"synthetic symbols must be at least 1, not {self.symbols}")
        if not self.rate_per_s > 0:
            raise ValueError(f"synthetic rate must be positive, not {self.rate_per_s}")
        if self.speed < 0:
            raise ValueError(f"speed must be 0 (as fast as possible) or positive, not {self.speed}")


@dataclass(frozen=True, slots=True)
class ReplayDay:
    """One day of a file feed: the trades of ``source`` (the files' day) sent as ``as_of``.

    Each trade and vendor minute keeps its New York time of day: its time moves by
    ``shift_ms``, the distance between the two days' New York midnights. Trade ids stay as the
    files give them (unique per symbol and day, and the day is ``as_of``'s).
    """

    source: date
    as_of: date

    @property
    def shift_ms(self) -> int:
        """What to add to a time of ``source`` to get the same New York time on ``as_of``."""
        return ny_midnight_ms(self.as_of) - ny_midnight_ms(self.source)

    @classmethod
    def parse(cls, text: str) -> ReplayDay:
        """``SOURCE`` or ``SOURCE:AS_OF`` (``YYYY-MM-DD`` each)."""
        source, _, as_of = text.strip().partition(":")
        day = parse_day(source)
        return cls(day, parse_day(as_of) if as_of else day)

    def __str__(self) -> str:
        if self.as_of == self.source:
            return self.source.isoformat()
        return f"{self.source.isoformat()}:{self.as_of.isoformat()}"


@dataclass(frozen=True, slots=True)
class FileFeed:
    """Replay of real trades for ``symbols`` from the tick files under ``data_dir``: one
    ``day``, or the ``days`` one after the other over the same connections.

    ``speed`` 1 is real time, 10 ten times faster, 0 as fast as the clients take them.
    Between two days the feed pauses ``day_pause_s`` (a quiet socket, as overnight: ingest's
    idle mark closes the day), then, with ``hold_between_days``, waits for a release
    (``GET /control/release``) before the next day.
    """

    data_dir: Path
    day: date
    symbols: tuple[str, ...]
    speed: float = 1.0
    days: tuple[ReplayDay, ...] = ()
    day_pause_s: float = 3.0
    hold_between_days: bool = False

    def __post_init__(self) -> None:
        if not self.symbols:
            raise ValueError("a file feed needs at least one symbol")
        if self.speed < 0:
            raise ValueError(f"speed must be 0 (as fast as possible) or positive, not {self.speed}")
        if self.day_pause_s < 0:
            raise ValueError(f"day_pause_s must be 0 or more, not {self.day_pause_s}")
        as_of = [day.as_of for day in self.replay_days]
        if len(set(as_of)) != len(as_of):
            raise ValueError("each replayed day needs its own as-of day (trade ids repeat)")

    @property
    def replay_days(self) -> tuple[ReplayDay, ...]:
        """The days replayed, in order (``day`` as itself when ``days`` is empty)."""
        return self.days or (ReplayDay(self.day, self.day),)


@dataclass(frozen=True, slots=True)
class SimulatorSettings:
    """Everything the simulator needs; the key is a ``Secret`` and never shown."""

    api_key: Secret = field(default_factory=lambda: Secret(DEFAULT_KEY))
    host: str = "127.0.0.1"
    port: int = 8765
    feed: SyntheticFeed | FileFeed = field(default_factory=SyntheticFeed)
    max_connections: int = 1
    auth_timeout_s: float = 10.0
    frame_max_events: int = 100
    frame_window_ms: int = 1
    minute_aggregates: bool = True
    duration_s: float | None = None
    max_events: int | None = None
    start_feed_on_subscribe: bool = True
    slow_consumer_buffer_bytes: int = 4 * 1024 * 1024
    slow_consumer_after_s: float | None = 5.0
    close_timeout_s: float = 2.0
    ping_interval_s: float | None = 20.0
    control: bool = True
    exit_when_feed_done: bool = False
    history_max_trades: int = DEFAULT_HISTORY_TRADES
    """Trades kept for the REST API (``/v3/trades``), the newest; a query for older ones gets
    410 Gone."""

    def __post_init__(self) -> None:
        if self.frame_max_events < 1:
            raise ValueError(f"frame_max_events must be at least 1, not {self.frame_max_events}")
        if self.frame_window_ms < 1:
            raise ValueError(f"frame_window_ms must be at least 1, not {self.frame_window_ms}")
        if self.history_max_trades < 1:
            raise ValueError(
                f"history_max_trades must be at least 1, not {self.history_max_trades}"
            )
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {self.max_connections}")
