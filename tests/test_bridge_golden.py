"""Golden files: a real day (SPY, 2013-10-07) through each built-in strategy.

The bars are built at test time by the bar service's backfill (the bar core, ``algoseek``
policy) from the day's real ticks (``tick/spy/20131007_trade.zip`` in ``../shared/data``):
the bars the bridge gets live. No vendor data is committed; the golden file holds only the
bridge's own derived outputs. The golden file
``tests/golden/bridge_spy_20131007.json`` holds, per strategy, the figures (signals, trades,
positions, portfolio snapshots, end-of-day PnL), every trade, the first and last portfolio
snapshot and the SHA-256 of every output byte (all records, in order, ``seq`` 0).

To regenerate after an intended change: ``TICKMESH_REGEN_GOLDEN=1 pytest
tests/test_bridge_golden.py`` and review the diff of the golden file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from libs.common.schemas import ExecutedTrade, Portfolio, Position, Signal
from services.engine_bridge.backtest import backtest_bars, encode_outputs
from services.engine_bridge.config import BridgeSettings
from tests.test_bridge_support import spy_day_bars

GOLDEN = Path(__file__).parent / "golden" / "bridge_spy_20131007.json"
REGENERATE = os.environ.get("TICKMESH_REGEN_GOLDEN") == "1"
SOURCE = (
    "services.bars.backfill (algoseek policy, grace 0) of "
    "lean-equity-2013-10/tick/spy/20131007_trade.zip"
)


def golden_entry(settings: BridgeSettings, shared_data: Path) -> dict[str, Any]:
    bars = spy_day_bars(shared_data)
    outputs, summary, _ = backtest_bars(settings, bars)
    records = [record for _, record in outputs]
    portfolios = [r for r in records if isinstance(r, Portfolio)]
    return {
        "summary": msgspec.to_builtins(summary),
        "counts": {
            "signals": sum(isinstance(r, Signal) for r in records),
            "trades": sum(isinstance(r, ExecutedTrade) for r in records),
            "positions": sum(isinstance(r, Position) for r in records),
            "portfolio": len(portfolios),
        },
        "endOfDayPnl": round(portfolios[-1].equity - settings.broker.initial_cash, 2),
        "trades": [msgspec.to_builtins(r) for r in records if isinstance(r, ExecutedTrade)],
        "signals": [msgspec.to_builtins(r) for r in records if isinstance(r, Signal)][:5],
        "firstPortfolio": msgspec.to_builtins(portfolios[0]),
        "lastPortfolio": msgspec.to_builtins(portfolios[-1]),
        "outputBytes": len(encode_outputs(outputs)),
    }


@pytest.mark.parametrize("strategy", ["golden_cross", "zscore"])
def test_a_real_day_through_the_builtin_strategy_matches_the_golden_file(
    strategy: str, shared_data: Path
) -> None:
    settings = msgspec.convert({"strategy": strategy, "symbols": ["SPY"]}, BridgeSettings)
    entry = golden_entry(settings, shared_data)
    golden = msgspec.json.decode(GOLDEN.read_bytes()) if GOLDEN.exists() else {}
    if REGENERATE:
        golden["source"] = SOURCE
        golden["settings"] = "BridgeSettings defaults, BRIDGE_SYMBOLS=SPY"
        golden[strategy] = entry
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_bytes(msgspec.json.format(msgspec.json.encode(golden), indent=1) + b"\n")
    expected = golden.get(strategy)
    assert expected is not None, (
        f"no {strategy} entry in {GOLDEN}; run with TICKMESH_REGEN_GOLDEN=1"
    )
    assert entry["counts"] == expected["counts"]
    assert entry["endOfDayPnl"] == expected["endOfDayPnl"]
    assert entry["trades"] == expected["trades"]
    assert entry["signals"] == expected["signals"]
    assert entry["firstPortfolio"] == expected["firstPortfolio"]
    assert entry["lastPortfolio"] == expected["lastPortfolio"]
    assert entry["summary"] == expected["summary"]  # includes the SHA-256 of every output byte


def test_the_golden_day_trades_and_ends_flat(shared_data: Path) -> None:
    golden = msgspec.json.decode(GOLDEN.read_bytes())
    for strategy in ("golden_cross", "zscore"):
        entry = golden[strategy]
        assert entry["counts"]["portfolio"] == 390  # one snapshot per regular-session minute
        assert entry["counts"]["trades"] > 0 and entry["counts"]["signals"] > 0
        assert entry["lastPortfolio"]["openPositions"] == 0  # flattened at the close
        assert entry["trades"][-1]["barId"] <= 390
