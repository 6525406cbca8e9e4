"""How fast this machine was around a run of ``bench_mesh.py``: a fixed workload, timed.

Two runs of the same code on this kind of machine (a VM sharing its host) have differed by
as much as different code: this gauge, on an idle machine, took 39 to 65 ms a few minutes
apart. With the two cores saturated, a machine a tenth slower is a mesh whose queues grow,
so a run's p99 says as much about the machine as about the mesh. The gauge puts a
number on the machine's side: before and after each run (on a stopped stack), the same work
a bar builder does for each record — decode a tick record, drop trades seen before, aggregate
the rest — over the same 10,000 records, on one core, timed as CPU seconds (best of
``rounds``, the cyclic collector off). Lower is faster; a run whose gauge is slower than the
others' ran in a slower spell.

It does not see a spell that comes and goes within a run, and it is one process on one core:
it does not measure the memory bandwidth or the cache the mesh's processes share.
"""

from __future__ import annotations

import gc
import random
import time
from functools import cache
from typing import Any

from summary import row

from libs.common.market.aggregator import BarAggregator
from libs.common.market.identity import TradeIds
from libs.common.market.sessions import ny_epoch_ms, parse_day
from libs.common.runtime.clock import ManualClock
from libs.common.schemas import ENCODER, TickBatch, Trade
from services.bars.source import decode_batch

RECORDS = 10_000
SYMBOLS = 50
"""Records (one to three trades each) spread over this many symbols, as a builder sees them."""


@cache
def records() -> tuple[tuple[str, bytes], ...]:
    """The gauge's records, (symbol, encoded ``TickBatch``): fixed by a seed, built once."""
    rng = random.Random(11)
    start = ny_epoch_ms(parse_day("2013-10-08"), 9, 30)
    prices = {f"G{n:03d}": 20.0 + n for n in range(SYMBOLS)}
    symbols = sorted(prices)
    ids = dict.fromkeys(symbols, 0)
    out = []
    for index in range(RECORDS):
        symbol = symbols[rng.randrange(SYMBOLS)]
        t = start + index * 12  # a minute every 5,000 records: every symbol closes one
        trades = []
        for _ in range(1 + rng.randrange(3)):
            ids[symbol] += 1
            prices[symbol] = round(prices[symbol] * (1 + rng.gauss(0, 0.0005)), 2)
            conditions = (37,) if rng.random() < 0.05 else ()
            trades.append(Trade(symbol, prices[symbol], 100, t, 4, conditions, str(ids[symbol]), 1))
        out.append((symbol, ENCODER.encode(TickBatch(index + 1, symbol, trades))))
    return tuple(out)


def work(payloads: tuple[tuple[str, bytes], ...]) -> int:
    """Decode, de-duplicate and aggregate every record once; the bars closed (so the work is
    not optimised away and can be checked)."""
    clock = ManualClock(0)
    aggregators: dict[str, BarAggregator] = {}
    ids = TradeIds()
    closed = 0
    for symbol, payload in payloads:
        batch = decode_batch(payload)
        fresh = ids.fresh(symbol, batch.ticks)
        aggregator = aggregators.get(symbol)
        if aggregator is None:
            aggregator = aggregators[symbol] = BarAggregator(
                symbol, grace_ms=1_000, clock=clock, wall_clock=False
            )
        closed += len(aggregator.add(fresh, 0, symbol=symbol))
    return closed + sum(len(aggregator.flush()) for aggregator in aggregators.values())


def gauge_ms(rounds: int = 5) -> float:
    """CPU milliseconds of the fixed workload, the best of ``rounds``."""
    payloads = records()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        best = float("inf")
        for _ in range(rounds):
            started = time.process_time()
            work(payloads)
            best = min(best, time.process_time() - started)
    finally:
        if was_enabled:
            gc.enable()
    return round(best * 1000, 1)


def gauge_summary_rows(results: dict[str, Any], bench: str) -> list[dict[str, object]]:
    """A row for ``scripts/bench.sh``'s table: the slowest gauge of the bench's runs against
    the fastest (nothing when fewer than two were taken)."""
    gauges = all_gauges(results)
    if len(gauges) < 2:
        return []
    low, high = min(gauges), max(gauges)
    return [
        row(
            bench,
            "machine gauge, the slowest taken (before and after each run)",
            f"{high:,.1f} ms",
            f"fastest {low:,.1f} ms",
            high / low if low else None,
            "the same fixed workload; above 1: how much slower the machine was at its slowest",
        )
    ]


def gauge_cell(result: dict[str, Any]) -> str:
    """A run's gauge, before / after, for a table cell (``-`` when it has none)."""
    found = result.get("machineGaugeMs")
    return f"{found[0]:,.1f} / {found[1]:,.1f}" if found else "-"


def gauge_line(result: dict[str, Any]) -> list[str]:
    """A run's gauge as a Markdown list item (nothing when it has none)."""
    if not result.get("machineGaugeMs"):
        return []
    return [
        f"- machine gauge (`bench/mesh_gauge.py`: a fixed single-core workload, best of 5, "
        f"lower is faster), before / after this run: {gauge_cell(result)} ms"
    ]


def all_gauges(results: Any) -> list[float]:
    """Every gauge anywhere in ``results`` (each run's before and after; a run that stands
    for others, such as (b)'s shown run, is there twice)."""
    found: list[float] = []
    if isinstance(results, dict):
        for key, value in results.items():
            if key == "machineGaugeMs" and isinstance(value, list):
                found += [float(v) for v in value]
            else:
                found += all_gauges(value)
    elif isinstance(results, list):
        for value in results:
            found += all_gauges(value)
    return found
