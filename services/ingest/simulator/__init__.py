"""A Polygon-compatible stocks WebSocket server: real tick files or synthetic ticks, plus faults.

It speaks the protocol of ``wss://socket.polygon.io/stocks`` (see ``docs/simulator.md``):
frames are JSON arrays sent as text frames; on connect a ``connected`` status; ``auth`` against
the configured key (``auth_success`` / ``auth_failed``, ``auth_timeout`` when none comes in
time); ``subscribe`` / ``unsubscribe`` with comma lists and ``EV.*`` wildcards answered per
topic; ``auth_required`` for a subscription before auth; a limit of authenticated connections
per key (``max_connections``); and, like Polygon, ``slow_consumer`` for a client whose send
buffer stays above a threshold.

Feeds: replay of one day of real trades (``libs.common.market.tickfiles.read_lean_trades``) for some
symbols, merged in time order at a speed factor, with the simulator's own ``AM`` minute
aggregates; several days one after the other on the same connections, each under its own
as-of date (``days``); or synthetic trades for N symbols at a target rate, deterministic for a
seed. The feed starts when the first client subscribes, so a test or a demo never misses the
beginning.

Faults on command: ``PolygonSimulator.inject(fault, count)`` or ``GET /control/inject`` on the
same port (header ``X-Sim-Key``: the simulator key), or ``python -m services.ingest.simulator
inject FAULT``; an overload burst of a file feed with ``GET /control/burst?factor=5&seconds=3``.

Modules: ``settings`` (settings, faults, wire wording), ``feeds`` (what it sends, and its
pace), ``days`` (a file feed's days in order), ``minutes`` (its ``AM`` aggregates),
``session`` (one client), ``server`` (the server and its control endpoint), ``cli`` (the
command line).
"""

from services.ingest.simulator.cli import (
    add_simulate_arguments,
    inject_remote,
    main,
    serve_from_args,
    settings_from_args,
)
from services.ingest.simulator.days import DayReplay
from services.ingest.simulator.feeds import (
    Pace,
    SyntheticMarket,
    file_frames,
    load_day_trades,
    load_vendor_minutes,
    malformed_frames,
    synthetic_frames,
)
from services.ingest.simulator.minutes import MinuteAggregator, VendorMinutes
from services.ingest.simulator.server import PolygonSimulator, run_simulator
from services.ingest.simulator.settings import (
    Fault,
    FileFeed,
    ReplayDay,
    SimulatorSettings,
    SyntheticFeed,
)

__all__ = [
    "DayReplay",
    "Fault",
    "FileFeed",
    "MinuteAggregator",
    "Pace",
    "PolygonSimulator",
    "ReplayDay",
    "SimulatorSettings",
    "SyntheticFeed",
    "SyntheticMarket",
    "VendorMinutes",
    "add_simulate_arguments",
    "file_frames",
    "inject_remote",
    "load_day_trades",
    "load_vendor_minutes",
    "main",
    "malformed_frames",
    "run_simulator",
    "serve_from_args",
    "settings_from_args",
    "synthetic_frames",
]
