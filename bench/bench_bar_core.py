"""Bar-core throughput in ticks/s on one core, against a plain-Python OHLCV loop, same run.

Input: one real SPY day (``tick/spy/20131008_trade.zip``, about 450,000 trades) when the
shared data is there (``TICKMESH_DATA`` or ``../shared/data/lean-equity-2013-10``), otherwise a
synthetic day of the same size and condition mix. Trades are loaded once; only aggregation is
timed (best of ``--repeat`` interleaved rounds, garbage collector off while timing).

Paths:

- ``baseline``: the smallest honest 1-minute OHLCV loop in Python over the same ``Trade``
  objects (dict of minute -> list; no policy, no ordering rules, no watermark);
- ``core <policy>, one batch``: ``BarAggregator.add`` (the aggregator of SPY) with the whole
  day as one batch, the symbol passed, then ``flush`` (``build_bars`` on one symbol's trades);
- ``core <policy>, 100-trade batches``: the day in batches of 100 trades, the shape of live
  tick batches, with the symbol passed (``TickBatch.sym``, compared once per batch);
- ``core <policy>, 100-trade batches, symbol checked``: the same without passing the symbol,
  so ``add`` checks every trade's symbol against the aggregator's.

Run: ``.venv/bin/python bench/bench_bar_core.py [--repeat 5] [--policy algoseek]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from summary import LIKE_FOR_LIKE, add_rows, row

from libs.common.market.aggregator import BarAggregator
from libs.common.market.sessions import ny_epoch_ms, parse_day
from libs.common.runtime.clock import ManualClock
from libs.common.schemas import Trade


def data_dir() -> Path:
    """The shared Lean data directory (may not exist)."""
    override = os.environ.get("TICKMESH_DATA")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lean-equity-2013-10"


def synthetic_day(count: int = 450_000, seed: int = 7) -> list[Trade]:
    """A deterministic day of SPY-like trades with a realistic condition mix."""
    rng = random.Random(seed)
    day = parse_day("2013-10-08")
    start = ny_epoch_ms(day, 4)
    span = ny_epoch_ms(day, 20) - start
    mix = [((0,), 48), ((14, 41), 44), ((14,), 5), ((14, 12, 41), 1), ((12,), 1), ((0, 41), 1)]
    kinds = [conditions for conditions, _ in mix]
    weights = [weight for _, weight in mix]
    price = 167.0
    times = sorted(start + rng.randrange(span) for _ in range(count))
    trades = []
    for sequence, t in enumerate(times, 1):
        price = round(max(1.0, price + rng.choice((-0.01, 0.0, 0.0, 0.01))), 2)
        conditions = rng.choices(kinds, weights)[0]
        trades.append(
            Trade(
                "SPY",
                price,
                rng.choice((100, 100, 200, 300, 500, 37)),
                t,
                rng.choice((4, 11, 12, 19)),
                conditions,
                str(sequence),
                2,
                sequence,
            )
        )
    return trades


def load_trades() -> tuple[str, list[Trade]]:
    """(description, trades) of the benchmark day."""
    path = data_dir() / "tick" / "spy" / "20131008_trade.zip"
    if path.is_file():
        from libs.common.market.tickfiles import read_lean_trades

        return f"real SPY 2013-10-08 ({path})", read_lean_trades(path)
    return "synthetic SPY-like day (shared data absent)", synthetic_day()


def baseline(trades: Sequence[Trade]) -> int:
    """Plain 1-minute OHLCV over every trade: the floor any aggregation loop pays."""
    bars: dict[int, list[float]] = {}
    for tr in trades:
        t = tr.t
        minute = t - t % 60_000
        p = tr.p
        bar = bars.get(minute)
        if bar is None:
            bars[minute] = [p, p, p, p, tr.s]
        else:
            if p > bar[1]:
                bar[1] = p
            if p < bar[2]:
                bar[2] = p
            bar[3] = p
            bar[4] += tr.s
    return len(bars)


def core_one_batch(policy: str) -> Callable[[Sequence[Trade]], int]:
    def run(trades: Sequence[Trade]) -> int:
        aggregator = BarAggregator("SPY", policy, grace_ms=2_000, clock=ManualClock(0))
        bars = aggregator.add(trades, 0, symbol="SPY")
        bars += aggregator.flush()
        return len(bars)

    return run


def core_batches(policy: str, size: int, pass_symbol: bool) -> Callable[[Sequence[Trade]], int]:
    def run(trades: Sequence[Trade]) -> int:
        aggregator = BarAggregator("SPY", policy, grace_ms=2_000, clock=ManualClock(0))
        symbol = "SPY" if pass_symbol else None
        add = aggregator.add
        produced = 0
        for index in range(0, len(trades), size):
            produced += len(add(trades[index : index + size], 0, symbol=symbol))
        produced += len(aggregator.flush())
        return produced

    return run


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print ticks/s and ratios to the baseline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--policy",
        action="append",
        default=None,
        help="policy to time (repeatable; default algoseek and none)",
    )
    parser.add_argument("--summary", help="append headline rows here (scripts/bench.sh)")
    args = parser.parse_args(argv)
    policies = args.policy or ["algoseek", "none"]
    description, trades = load_trades()
    batches = [trades[index : index + 100] for index in range(0, len(trades), 100)]
    assert batches
    paths: dict[str, Callable[[Sequence[Trade]], int]] = {"baseline": baseline}
    for policy in policies:
        paths[f"core {policy}, one batch"] = core_one_batch(policy)
        paths[f"core {policy}, 100-trade batches"] = core_batches(policy, 100, True)
        paths[f"core {policy}, 100-trade batches, symbol checked"] = core_batches(
            policy, 100, False
        )
    best = {name: float("inf") for name in paths}
    for _ in range(args.repeat):
        for name, run in paths.items():
            gc.collect()
            gc.disable()
            started = time.perf_counter()
            run(trades)
            elapsed = time.perf_counter() - started
            gc.enable()
            best[name] = min(best[name], elapsed)
    print(f"input: {description}: {len(trades):,} trades")
    print(
        f"python {platform.python_version()} on {platform.machine()}, one thread, "
        f"best of {args.repeat}"
    )
    base_rate = len(trades) / best["baseline"]
    print(f"{'path':52s} {'ticks/s':>14s} {'vs baseline':>12s}")
    for name, elapsed in best.items():
        rate = len(trades) / elapsed
        print(f"{name:52s} {rate:14,.0f} {rate / base_rate:11.2f}x")
    rows = []
    for name, elapsed in best.items():
        if name == "baseline" or name.endswith("symbol checked"):
            continue
        rate = len(trades) / elapsed
        rows.append(
            row(
                "bench_bar_core",
                f"{name}, ticks/s",
                f"{rate:,.0f}",
                f"plain OHLCV loop {base_rate:,.0f}",
                rate / base_rate,
                f"{LIKE_FOR_LIKE} (the day in one batch; the loop has no condition rules)"
                if name.endswith("one batch")
                else "100-trade batches vs the loop's one batch",
            )
        )
    add_rows(args.summary, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
