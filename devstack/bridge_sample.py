"""Make the engine bridge's sample replay files from the synthetic feed (a developer tool).

The synthetic feed is the Polygon simulator's own generator (``SyntheticMarket``, seeded, so
the trades are always the same); its minute aggregator turns the trades into minute bars,
which go through the built-in golden-cross strategy and the paper broker with the bridge's
default settings (shorter moving averages, so a short sample trades). The outputs are
exported as ``results.json`` + ``trades.jsonl`` into ``services/engine_bridge/samples``:

    .venv/bin/python -m devstack.bridge_sample

It lives in the dev harness because it joins two services (the ingest simulator's feed, the
bridge's backtest); the services themselves never import each other.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import msgspec

from libs.common.market.sessions import MINUTE_MS, bar_id, ny_epoch_ms, ts_et_minute
from libs.common.schemas import Bar
from services.engine_bridge.backtest import backtest_bars, run_info, traded_bars
from services.engine_bridge.config import BridgeSettings
from services.engine_bridge.replay import export_replay

SAMPLES = Path(__file__).resolve().parent.parent / "services" / "engine_bridge" / "samples"
SAMPLE_DAY = date(2025, 10, 27)
SYMBOLS = 2
MINUTES = 90
TRADES_PER_SECOND = 0.5
SEED = 7


def synthetic_bars(
    day: date = SAMPLE_DAY,
    minutes: int = MINUTES,
    symbols: int = SYMBOLS,
    rate_per_s: float = TRADES_PER_SECOND,
    seed: int = SEED,
) -> list[Bar]:
    """Minute bars of the simulator's synthetic trades from 09:30 ET on ``day``."""
    from services.ingest.simulator import MinuteAggregator, SyntheticFeed, SyntheticMarket

    market = SyntheticMarket(SyntheticFeed(symbols=symbols, rate_per_s=rate_per_s, seed=seed))
    aggregator = MinuteAggregator()
    start = ny_epoch_ms(day, 9, 30)
    step_ms = int(1000 / rate_per_s)
    aggregates = []
    for t_ms in range(start, start + minutes * MINUTE_MS + step_ms, step_ms):
        aggregates.extend(aggregator.advance(t_ms))
        if t_ms < start + minutes * MINUTE_MS:
            aggregator.add(market.trades(1, t_ms))
    aggregates.extend(aggregator.flush())
    bars = [
        Bar(
            seq=0,
            symbol=agg.sym,
            tsET=ts_et_minute(agg.s),
            barId=bar_id(agg.s),
            open=agg.o,
            high=agg.h,
            low=agg.l,
            close=agg.c,
            volume=agg.v,
            vwap=agg.vw,
            trades=max(1, agg.v // agg.z) if agg.z else 0,
            startMs=agg.s,
            endMs=agg.e,
        )
        for agg in aggregates
    ]
    return sorted(bars, key=lambda bar: (bar.startMs, bar.symbol))


def sample_settings() -> BridgeSettings:
    """The bridge settings of the sample run."""
    return msgspec.convert(
        {
            "strategy": "golden_cross",
            "golden": {"fast_window": 5, "slow_window": 15},
            "portfolio_id": "sample",
            "symbols": ["S0001", "S0002"],
        },
        BridgeSettings,
    )


def main(out_dir: Path = SAMPLES) -> None:
    """Write the sample next to this file."""
    settings = sample_settings()
    bars = synthetic_bars()
    outputs, summary, _ = backtest_bars(settings, bars)
    traded = traded_bars(settings, bars)
    source = (
        f"synthetic feed (services.ingest.simulator.SyntheticMarket seed={SEED}, "
        f"{SYMBOLS} symbols, {TRADES_PER_SECOND} trades/s), {MINUTES} minutes"
    )
    run = run_info(settings, traded, source, created_by="python -m devstack.bridge_sample")
    export_replay(out_dir, run, traded, outputs)
    print(msgspec.json.encode(summary).decode())


if __name__ == "__main__":
    main()
