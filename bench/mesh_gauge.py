"""How fast this machine was while ``bench_mesh.py`` ran: a fixed workload, timed.

Two runs of the same code on this kind of machine (a VM sharing its host) have differed by
as much as different code. The host's share moves by half within a minute: a loop of fixed
work on both cores ran 227-296 units a second for 50 s, then 293-377, with nothing else
running, and a sample of this gauge on an idle machine read 8.6-9.4 ms in fast spells and
12-17.5 ms in slow ones. With the two cores saturated, a machine a tenth slower is a mesh whose
queues grow, so a run's p99 says as much about the machine as about the mesh.

The gauge puts a number on the machine's side. Its work is what a bar builder does for each
record (decode a tick record, drop the trades seen before, aggregate the rest) over the same
``RECORDS`` records, on one core, timed as CPU milliseconds (the cyclic collector
off). ``gauge_ms`` is the median of five in a row, taken on a stopped stack before and after
each run; ``python bench/mesh_gauge.py --every S`` is a process of its own that takes one
every ``S`` seconds while the run goes on (half a percent of a core, and no share of the
bench's own interpreter lock), whose median, fastest and slowest ``sample_figures`` gives. Lower
is faster. CPU time leaves out the time a process waits for a core, so the samples during a
run measure how fast the machine runs Python then: the host's share, and also what the
mesh's own processes take from the memory bus and the caches, which is the same in runs of
the same code.
"""

from __future__ import annotations

import argparse
import gc
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script (``RunGauge``): bench/ is on the path, not the root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from summary import row

from libs.common.market.aggregator import BarAggregator
from libs.common.market.identity import TradeIds
from libs.common.market.sessions import ny_epoch_ms, parse_day
from libs.common.runtime.clock import ManualClock
from libs.common.schemas import ENCODER, TickBatch, Trade
from services.bars.source import decode_batch

RECORDS = 2_000
"""The records of one sample (about 9 ms of CPU on this machine in a fast spell)."""
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
        t = start + index * 60  # two minutes in all: every symbol closes one on the way
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


def sample_ms() -> float:
    """CPU milliseconds of one sample: the gauge's work over its records."""
    payloads = records()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        started = time.process_time()
        work(payloads)
        return (time.process_time() - started) * 1000
    finally:
        if was_enabled:
            gc.enable()


def gauge_ms(samples: int = 5) -> float:
    """The median of ``samples`` samples in a row, in ms."""
    return round(statistics.median(sample_ms() for _ in range(samples)), 2)


class RunGauge:
    """``python bench/mesh_gauge.py --every S`` in a process of its own, for a run: its
    samples (epoch seconds, ms) go to ``path``, one a line, and anything it prints on stderr
    (why it has none, say) beside it in ``path`` + ``.err``."""

    def __init__(self, path: Path, every_s: float = 2.0) -> None:
        self.path = path
        self.every_s = every_s
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RunGauge:
        """Start sampling."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        errors = self.path.with_name(self.path.name + ".err")
        with self.path.open("wb") as out, errors.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__)), "--every", str(self.every_s)],
                stdout=out,
                stderr=err,
            )
        return self

    def stop(self) -> dict[str, float] | None:
        """Stop sampling; the samples' median, fastest and slowest (ms) and how many, or None
        when there were none."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return sample_figures(self.path.read_text() if self.path.exists() else "")


@contextmanager
def gauged(path: Path, every_s: float = 1.0) -> Iterator[dict[str, Any]]:
    """Sample the gauge (``RunGauge`` to ``path``) while the block runs; at its end the
    yielded dict holds ``during``: the samples' figures, or None when there were none."""
    found: dict[str, Any] = {"during": None}
    gauge = RunGauge(path, every_s).start()
    try:
        yield found
    finally:
        found["during"] = gauge.stop()


def during_cell(during: object) -> str:
    """A gauge's samples during a run (``RunGauge.stop``'s figures) as "median
    (fastest–slowest)" ms, ``-`` for none."""
    if not isinstance(during, dict):
        return "-"
    return f"{during['medianMs']:,.1f} ({during['fastestMs']:,.1f}–{during['slowestMs']:,.1f})"


def during_median(during: object) -> str:
    """The median of a gauge's samples during a run, in ms, ``-`` for none (a summary row's
    basis)."""
    return f"{during['medianMs']:,.1f}" if isinstance(during, dict) else "-"


def sample_figures(text: str) -> dict[str, float] | None:
    """The samples of ``text`` (lines of "epoch-seconds ms") as their median, fastest,
    slowest and count; None when there are none."""
    values = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            values.append(float(parts[1]))
    if not values:
        return None
    return {
        "medianMs": round(statistics.median(values), 2),
        "fastestMs": round(min(values), 2),
        "slowestMs": round(max(values), 2),
        "samples": len(values),
    }


def _sample_forever(every_s: float) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sample_ms()  # the first pays for the imports and the records: not a sample
    while True:
        print(f"{time.time():.3f} {sample_ms():.3f}", flush=True)
        time.sleep(every_s)


GAUGE_HEADER = "machine gauge ms: before · during, median (fastest–slowest) · after"
"""The table column of ``gauge_cell``."""


def gauge_cell(result: dict[str, Any]) -> str:
    """A run's gauge for a table cell: before · during, median (fastest–slowest) · after
    (``-`` for what it lacks)."""
    gauge = result.get("machineGauge")
    if not gauge:
        return "-"
    middle = during_cell(gauge.get("during"))
    before, after = gauge.get("beforeMs"), gauge.get("afterMs")
    return " · ".join(
        [f"{before:,.1f}" if before else "-", middle, f"{after:,.1f}" if after else "-"]
    )


def gauge_line(result: dict[str, Any]) -> list[str]:
    """A run's gauge as a Markdown list item (nothing when it has none)."""
    gauge = result.get("machineGauge")
    if not gauge:
        return []
    during = gauge.get("during")
    samples = f", {during['samples']} samples during it" if during else ""
    return [
        "- machine gauge (`bench/mesh_gauge.py`: CPU ms of a fixed single-core workload, "
        f"lower is faster{samples}), before · during, median (fastest–slowest) · after: "
        f"{gauge_cell(result)}"
    ]


def run_medians(results: Any) -> list[float]:
    """The median gauge during each run anywhere in ``results`` (a run that stands for others,
    such as (b)'s shown run, is there twice)."""
    found: list[float] = []
    if isinstance(results, dict):
        for key, value in results.items():
            if key == "machineGauge" and isinstance(value, dict):
                if value.get("during"):
                    found.append(float(value["during"]["medianMs"]))
            else:
                found += run_medians(value)
    elif isinstance(results, list):
        for value in results:
            found += run_medians(value)
    return found


def gauge_summary_rows(results: dict[str, Any], bench: str) -> list[dict[str, object]]:
    """A row for ``scripts/bench.sh``'s table: the slowest run's median gauge against the
    fastest run's (nothing when fewer than two runs have one)."""
    medians = run_medians(results)
    if len(medians) < 2:
        return []
    low, high = min(medians), max(medians)
    return [
        row(
            bench,
            "machine gauge during a run (its median), the slowest run",
            f"{high:,.1f} ms",
            f"fastest run {low:,.1f} ms",
            high / low if low else None,
            "the same fixed work; above 1: how much slower the machine ran in the slowest run",
        )
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the machine gauge, one sample every S s")
    parser.add_argument("--every", type=float, default=2.0, metavar="S")
    _sample_forever(parser.parse_args().every)
