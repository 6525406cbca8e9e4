"""Offline runs of the bridge core over bar files: figures, golden files, replay exports.

The same ``BridgeCore`` and built-in engine as the live bridge, fed from files with no
Redis, so a day of bars gives exactly the records the bridge would publish (``seq`` aside).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec
from msgspec import Struct

from libs.common.market.sessions import ts_et_minute
from libs.common.schemas import Bar, ExecutedTrade, Portfolio, Signal
from services.engine_bridge.bridge import core_config_from
from services.engine_bridge.config import BridgeSettings
from services.engine_bridge.core import BridgeCore, Outputs, regular, run_bars
from services.engine_bridge.datasets import (
    merge_by_minute,
    read_bars_jsonl,
    read_vendor_minute_bars,
)
from services.engine_bridge.engines import make_builtin
from services.engine_bridge.replay import RunInfo, export_replay

_ENCODER = msgspec.json.Encoder()


class OutputLine(Struct, frozen=True):
    """One published record with its channel, as a line of an outputs file."""

    channel: str
    record: msgspec.Raw


class Summary(Struct, frozen=True):
    """The figures of one backtest."""

    strategy: str
    symbols: list[str]
    first: str
    last: str
    minutes: int
    signals: int
    trades: int
    roundTrips: int
    realizedPnl: float
    commissions: float
    endEquity: float
    pnl: float
    records: int
    sha256: str


def encode_outputs(outputs: Outputs) -> bytes:
    """The records as JSON lines ``{"channel": ..., "record": {...}}`` (deterministic)."""
    return b"".join(
        _ENCODER.encode(OutputLine(channel, msgspec.Raw(_ENCODER.encode(record)))) + b"\n"
        for channel, record in outputs
    )


def summarize(settings: BridgeSettings, bars: Sequence[Bar], outputs: Outputs) -> Summary:
    """Counts, PnL and the hash of every output byte."""
    signals = sum(isinstance(record, Signal) for _, record in outputs)
    trades = [record for _, record in outputs if isinstance(record, ExecutedTrade)]
    portfolios = [record for _, record in outputs if isinstance(record, Portfolio)]
    final = portfolios[-1] if portfolios else None
    end_equity = final.equity if final is not None else settings.broker.initial_cash
    return Summary(
        strategy=settings.strategy,
        symbols=sorted({bar.symbol for bar in bars}),
        first=portfolios[0].tsET if portfolios else "",
        last=final.tsET if final is not None else "",
        minutes=len(portfolios),
        signals=signals,
        trades=len(trades),
        roundTrips=sum(1 for trade in trades if trade.action == "SELL"),
        realizedPnl=final.realizedPnl if final is not None else 0.0,
        commissions=round(sum(trade.commission for trade in trades), 4),
        endEquity=end_equity,
        pnl=round(end_equity - settings.broker.initial_cash, 2),
        records=len(outputs),
        sha256=hashlib.sha256(encode_outputs(outputs)).hexdigest(),
    )


def backtest_bars(
    settings: BridgeSettings, bars: Iterable[Bar]
) -> tuple[Outputs, Summary, BridgeCore]:
    """Run ``bars`` (in publication order) through a fresh core and built-in engine."""
    bars = list(bars)
    core = BridgeCore(core_config_from(settings))
    outputs = run_bars(core, make_builtin(settings), bars)
    return outputs, summarize(settings, bars, outputs), core


def load_bars(
    bars_files: Sequence[Path] = (), vendor_minute_files: Sequence[Path] = ()
) -> list[Bar]:
    """Bars of JSON-lines files and vendor minute zips (the symbol is the zip's folder)."""
    series = [read_bars_jsonl(path) for path in bars_files]
    series += [read_vendor_minute_bars(path, path.parent.name) for path in vendor_minute_files]
    return merge_by_minute(*series)


def backtest_files(
    settings: BridgeSettings,
    *,
    bars_files: Sequence[Path] = (),
    vendor_minute_files: Sequence[Path] = (),
    export_dir: Path | None = None,
    outputs_path: Path | None = None,
    source: str = "",
) -> Summary:
    """Backtest bar files; optionally export a replay and the raw outputs."""
    bars = load_bars(bars_files, vendor_minute_files)
    outputs, summary, _core = backtest_bars(settings, bars)
    if outputs_path is not None:
        outputs_path.write_bytes(encode_outputs(outputs))
    if export_dir is not None:
        traded = traded_bars(settings, bars)
        export_replay(export_dir, run_info(settings, traded, source), traded, outputs)
    return summary


def traded_bars(settings: BridgeSettings, bars: Iterable[Bar]) -> list[Bar]:
    """The bars the core trades on (its symbols, its session), for a replay's price_data."""
    symbols = {symbol.upper() for symbol in settings.symbols}
    return [
        bar
        for bar in bars
        if (not symbols or bar.symbol in symbols)
        and (settings.extended_hours or regular(bar.startMs))
    ]


def run_info(
    settings: BridgeSettings,
    bars: Sequence[Bar],
    source: str = "",
    created_by: str = "python -m services.engine_bridge backtest",
) -> RunInfo:
    """The ``run`` block of results.json for a backtest of ``bars`` with ``settings``."""
    broker = settings.broker
    params: dict[str, object] = {
        "slippageBps": broker.slippage_bps,
        "commissionPerShare": broker.commission_per_share,
        "stopPct": broker.stop_pct,
        "targetPct": broker.target_pct,
        "sizing": broker.sizing,
        "sharesPerTrade": broker.shares_per_trade,
        "notionalPerTrade": broker.notional_per_trade,
    }
    if settings.strategy == "golden_cross":
        params.update(
            fastWindow=settings.golden.fast_window, slowWindow=settings.golden.slow_window
        )
    else:
        zscore = settings.zscore
        params.update(
            returnWindow=zscore.return_window,
            window=zscore.window,
            entry=zscore.entry,
            exit=zscore.exit,
        )
    symbols = sorted({bar.symbol for bar in bars})
    day = ts_et_minute(bars[0].startMs)[:10] if bars else ""
    return RunInfo(
        runId=f"{settings.strategy}-{'-'.join(symbols)}-{day}",
        engine="builtin",
        strategy=settings.strategy,
        portfolioId=settings.portfolio_id,
        symbols=symbols,
        initialCash=settings.broker.initial_cash,
        start=ts_et_minute(bars[0].startMs) if bars else "",
        end=ts_et_minute(bars[-1].startMs) if bars else "",
        params=params,
        source=source,
        createdBy=created_by,
    )
