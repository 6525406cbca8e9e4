"""Bars from files, for backtests, exports and tests: JSON lines of bars, vendor minute files.

- ``read_bars_jsonl``: one contract ``Bar`` per line (what ``services/bars`` backfill writes,
  without ``seq``, or bars as published, with it).
- ``read_vendor_minute_bars``: a LEAN/AlgoSeek minute zip (one CSV: ms since midnight New York,
  open, high, low, close × 10000, volume), as contract bars. The vendor file has no VWAP or
  trade count: ``vwap`` is the typical price (h+l+c)/3 and ``trades`` is 0.
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Iterable
from datetime import date
from pathlib import Path

import msgspec

from libs.common.market.sessions import MINUTE_MS, bar_id, ny_midnight_ms, parse_day, ts_et_minute
from libs.common.schemas import BAR_DECODER, SEQ_PREFIX, Bar

_ENCODER = msgspec.json.Encoder()


def read_bars_jsonl(path: str | Path) -> list[Bar]:
    """Bars from a JSON-lines file (blank lines skipped). Lines without ``seq`` (what the
    bar service's backfill writes) get ``seq`` 0."""
    bars = []
    for line in Path(path).read_bytes().splitlines():
        line = line.strip()
        if not line:
            continue
        if not line.startswith(SEQ_PREFIX):
            line = SEQ_PREFIX + b"0," + line[1:]
        bars.append(BAR_DECODER.decode(line))
    return bars


def write_bars_jsonl(path: str | Path, bars: Iterable[Bar]) -> Path:
    """Write bars as JSON lines."""
    target = Path(path)
    target.write_bytes(b"".join(_ENCODER.encode(bar) + b"\n" for bar in bars))
    return target


def day_of_vendor_file(path: str | Path) -> date:
    """The day in a vendor file name such as ``20131007_trade.zip``."""
    return parse_day(Path(path).name.split("_", 1)[0])


def read_vendor_minute_bars(path: str | Path, symbol: str, day: date | None = None) -> list[Bar]:
    """The vendor's minute bars of ``symbol`` from a LEAN minute zip, as contract bars."""
    path = Path(path)
    day = day or day_of_vendor_file(path)
    midnight = ny_midnight_ms(day)
    bars: list[Bar] = []
    with zipfile.ZipFile(path) as archive:
        name = archive.namelist()[0]
        with archive.open(name) as handle:
            for row in csv.reader(io.TextIOWrapper(handle, encoding="ascii")):
                if not row:
                    continue
                start = midnight + int(row[0])
                o, h, low, c = (int(value) / 10_000 for value in row[1:5])
                bars.append(
                    Bar(
                        seq=0,
                        symbol=symbol.upper(),
                        tsET=ts_et_minute(start),
                        barId=bar_id(start),
                        open=o,
                        high=h,
                        low=low,
                        close=c,
                        volume=int(row[5]),
                        vwap=round((h + low + c) / 3, 4),
                        trades=0,
                        startMs=start,
                        endMs=start + MINUTE_MS,
                        revision=0,
                    )
                )
    return bars


def merge_by_minute(*series: Iterable[Bar]) -> list[Bar]:
    """Bars of several symbols in the order the bar service publishes them: by minute, then
    symbol."""
    return sorted((bar for bars in series for bar in bars), key=lambda b: (b.startMs, b.symbol))
