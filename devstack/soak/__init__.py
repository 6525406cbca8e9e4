"""A week in one command: five trading days through the whole mesh, with faults on a schedule,
each day reconciled against the source (``bash scripts/soak.sh``, ``python -m devstack.soak``).

Modules: ``plan`` (options and the seeded fault schedule), ``faults`` (firing a fault and
recording what it did), ``observe`` (the Redis side as it happens, the source's trades, the
trades lost and where), ``report`` (a day's row, the verdict, Markdown), ``run`` (the soak).
"""

from devstack.soak.plan import DEFAULT_WEEK, FaultKind, SoakOptions, parse_faults, plan_faults
from devstack.soak.run import Soak, SoakResult, result_json

__all__ = [
    "DEFAULT_WEEK",
    "FaultKind",
    "Soak",
    "SoakOptions",
    "SoakResult",
    "parse_faults",
    "plan_faults",
    "result_json",
]
