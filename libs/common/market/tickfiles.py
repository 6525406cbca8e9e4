"""Readers for trade files: Lean/AlgoSeek tick and minute zips, Polygon flat-file trade CSVs.

Every reader returns ``Trade`` records exactly as Polygon's feed would carry them (``t`` epoch
ms UTC, ``p`` dollars, ``x`` Polygon exchange id, ``c`` Polygon trade-condition ids, ``z`` tape,
``q`` sequence, ``i`` trade id), so that a trade read from a file and a trade received over the
Polygon wire protocol are the same value and build the same bar.

Lean trade zip (``tick/<sym>/<yyyymmdd>_trade.zip``, one headerless CSV): milliseconds since
New York midnight, price x 10000, size, exchange letter, AlgoSeek sale-condition flags as hex
(bit meanings: Lean's ``TradeConditionFlags``), suspicious flag (0/1). Lean minute zip
(``minute/<sym>/<yyyymmdd>_trade.zip``): bar start in ms since midnight, open, high, low, close
(x 10000), volume.

The mappings below are data, documented in ``docs/conditions.md``:

* ``LEAN_EXCHANGE_TO_POLYGON`` (kept in ``listings``): SIP participant letter -> Polygon
  exchange id;
* ``LEAN_FLAG_TO_POLYGON``: AlgoSeek flag bit -> Polygon trade-condition id, with the
  out-of-sequence combinations of ``OUT_OF_SEQUENCE_COMBINATIONS``.

A trade's tape (``z``) comes from its symbol's primary listing on the day
(``libs.common.market.listings``: the data set's map files); 0 when none is known.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import zipfile
from collections.abc import Callable, Iterable
from datetime import date
from pathlib import Path
from typing import NamedTuple

from libs.common.market import listings as listing_data
from libs.common.market.listings import LEAN_EXCHANGE_TO_POLYGON, Listings
from libs.common.market.sessions import ny_midnight_ms, parse_day
from libs.common.schemas import MAX_EPOCH_MS, Trade

# --- reference data ---------------------------------------------------------------------------

POLYGON_EXCHANGE_NYSE = 10
POLYGON_EXCHANGE_ARCA = 11
POLYGON_EXCHANGE_NASDAQ = 12

# AlgoSeek sale-condition flag bits (Lean ``TradeConditionFlags``).
FLAG_REGULAR = 0
FLAG_CASH = 1
FLAG_NEXT_DAY = 2
FLAG_SELLER = 3
FLAG_SOLD = 11
FLAG_EXTENDED_HOURS = 13
FLAG_OUT_OF_SEQUENCE = 14

LEAN_FLAG_TO_POLYGON: dict[int, int | None] = {
    0: 0,  # Regular -> Regular Sale
    1: 7,  # Cash -> Cash Sale
    2: 20,  # NextDay -> Next Day
    3: 29,  # Seller -> Seller
    4: 36,  # YellowFlag -> Yellow Flag Regular Trade
    5: 14,  # IntermarketSweep -> Intermarket Sweep
    6: 25,  # OpeningPrints -> Opening Prints
    7: 8,  # ClosingPrints -> Closing Prints
    8: 28,  # ReOpeningPrints -> Re-Opening Prints
    9: 10,  # DerivativelyPriced -> Derivatively Priced
    10: 12,  # FormT -> Form T/Extended Hours
    11: 30,  # Sold -> Sold Last
    12: 27,  # Stopped -> Stopped Stock (Regular Trade)
    13: 12,  # ExtendedHours -> Form T/Extended Hours
    14: 32,  # OutOfSequence -> Sold (Out Of Sequence)
    15: 34,  # Split -> Split Trade
    16: 1,  # Acquisition -> Acquisition
    17: 4,  # Bunched -> Bunched Trade
    18: 35,  # StockOption -> Stock Option
    19: 11,  # Distribution -> Distribution
    20: 2,  # AveragePrice -> Average Price Trade
    21: 9,  # Cross -> Cross Trade
    22: 21,  # PriceVariation -> Price Variation Trade
    23: 23,  # Rule155 -> Rule 155 Trade (AMEX)
    24: 15,  # OfficialClose -> Market Center Official Close
    25: 22,  # PriorReferencePrice -> Prior Reference Price
    26: 16,  # OfficialOpen -> Market Center Official Open
    27: 6,  # CapElection -> CAP Election
    28: 3,  # AutoExecution -> Automatic Execution
    29: 41,  # TradeThroughExempt -> Trade Thru Exempt
    30: None,  # UndocumentedFlag: no Polygon equivalent; dropped
    31: 37,  # OddLot -> Odd Lot Trade
}
"""AlgoSeek flag bit -> Polygon trade-condition id (``None``: not carried)."""

OUT_OF_SEQUENCE_COMBINATIONS: dict[int, int] = {
    FLAG_EXTENDED_HOURS: 13,  # + OutOfSequence -> Extended Hours (Sold Out Of Sequence)
    FLAG_SOLD: 32,  # + OutOfSequence -> Sold (Out Of Sequence)
}
"""OutOfSequence together with one of these bits is one Polygon condition, not two."""


def conditions_from_flags(flags: int) -> tuple[int, ...]:
    """Polygon condition ids of an AlgoSeek flag word, in flag-bit order, without repeats."""
    out: list[int] = []
    merged: set[int] = set()
    if flags >> FLAG_OUT_OF_SEQUENCE & 1:
        for bit in OUT_OF_SEQUENCE_COMBINATIONS:
            if flags >> bit & 1:
                merged.add(bit)
                merged.add(FLAG_OUT_OF_SEQUENCE)
    for bit in range(32):
        if not flags >> bit & 1:
            continue
        if bit in merged:
            if bit == FLAG_OUT_OF_SEQUENCE:
                continue
            condition: int | None = OUT_OF_SEQUENCE_COMBINATIONS[bit]
        else:
            condition = LEAN_FLAG_TO_POLYGON[bit]
        if condition is not None and condition not in out:
            out.append(condition)
    return tuple(out)


# --- paths ------------------------------------------------------------------------------------

_LEAN_NAME = re.compile(r"^(\d{8})_(?:([a-z0-9.]+)_)?trade", re.IGNORECASE)
_DAY_IN_NAME = re.compile(r"(\d{4}-\d{2}-\d{2}|\d{8})")


def symbol_and_day_from_path(path: str | Path) -> tuple[str, date]:
    """Symbol (upper case) and day of a Lean file: ``.../tick/spy/20131007_trade.zip``.

    The symbol is the parent directory's name (or the one inside a Lean csv name such as
    ``20131007_spy_Trade_Tick.csv``); the day is the leading ``yyyymmdd`` of the file name.
    """
    p = Path(path)
    match = _LEAN_NAME.match(p.name)
    if match is None:
        raise ValueError(f"not a Lean trade file name (want <yyyymmdd>_trade.zip): {p}")
    day = parse_day(match.group(1))
    symbol = match.group(2) or p.parent.name
    if not symbol:
        raise ValueError(f"no symbol in the path of {p}")
    return symbol.upper(), day


def day_from_flatfile_path(path: str | Path) -> date | None:
    """The day in a Polygon flat file's name (``2024-01-03.csv.gz``), if there is one."""
    match = _DAY_IN_NAME.search(Path(path).name)
    return parse_day(match.group(1)) if match else None


BadLine = Callable[[str, bytes], None]
"""Told about each line that does not parse: (the error, naming the file and line; its bytes).
Without one, a reader raises ``ValueError`` at the first such line."""


def _read_zip_text(path: str | Path) -> str:
    with zipfile.ZipFile(path) as archive:
        names = [name for name in archive.namelist() if not name.endswith("/")]
        if len(names) != 1:
            raise ValueError(f"{path}: expected one file in the zip, found {len(names)}")
        # a stray non-ASCII byte spoils its line (dead-lettered), not the whole file
        return archive.read(names[0]).decode("ascii", errors="surrogateescape")


def _check_time(t_ms: int) -> None:
    if not 0 <= t_ms <= MAX_EPOCH_MS:
        raise ValueError(f"time {t_ms} ms is outside 1970-2100")


def _bad(where: str, error: Exception, line: str, on_bad: BadLine | None) -> None:
    message = f"{where}: {type(error).__name__}: {error}"
    if on_bad is None:
        raise ValueError(message) from None
    on_bad(message, line.encode("utf-8", errors="surrogateescape"))


# --- Lean ticks -------------------------------------------------------------------------------


def read_lean_trades(
    path: str | Path,
    symbol: str | None = None,
    day: date | None = None,
    *,
    listings: Listings | None = None,
    on_bad: BadLine | None = None,
) -> list[Trade]:
    """All trades of a Lean trade zip, in file order, as Polygon-shaped ``Trade`` records.

    ``symbol`` and ``day`` default to what the path says. ``q`` is the 1-based line number in
    the file and ``i`` its text; ``suspicious`` is the vendor's flag; ``z`` the tape of the
    symbol's listing from ``listings`` (by default the data set's: ``listings.for_data``). A
    line that does not parse goes to ``on_bad`` (and still takes its sequence number).
    """
    if symbol is None or day is None:
        path_symbol, path_day = symbol_and_day_from_path(path)
        symbol = symbol or path_symbol
        day = day or path_day
    if listings is None:
        listings = listing_data.for_data(path)
    return lean_trades_from_text(
        _read_zip_text(path), symbol, day, listings=listings, on_bad=on_bad, where=str(path)
    )


def lean_trades_from_text(
    text: str,
    symbol: str,
    day: date,
    *,
    listings: Listings | None = None,
    on_bad: BadLine | None = None,
    where: str = "lean",
) -> list[Trade]:
    """The trades of a Lean trade file's text (see ``read_lean_trades``; ``listings`` by
    default the packaged map files')."""
    symbol = symbol.upper()
    midnight = ny_midnight_ms(day)
    if listings is None:
        listings = listing_data.for_data()
    tape = listings.tape(symbol, day)
    prices: dict[str, float] = {}
    conditions: dict[str, tuple[int, ...]] = {}
    exchanges: dict[str, int] = {}
    trades: list[Trade] = []
    append = trades.append
    sequence = 0
    for line in text.splitlines():
        if not line:
            continue
        fields = line.split(",")
        sequence += 1
        try:
            raw_price = fields[1]
            price = prices.get(raw_price)
            if price is None:
                price = prices[raw_price] = int(raw_price) / 10000
            raw_flags = fields[4]
            cond = conditions.get(raw_flags)
            if cond is None:
                cond = conditions[raw_flags] = conditions_from_flags(int(raw_flags, 16))
            size, offset_ms = int(fields[2]), int(fields[0])
            letter = fields[3]
            _check_time(midnight + offset_ms)
        except (ValueError, IndexError) as exc:
            _bad(f"{where}: line {sequence}", exc, line, on_bad)
            continue
        exchange = exchanges.get(letter)
        if exchange is None:
            exchange = exchanges[letter] = LEAN_EXCHANGE_TO_POLYGON.get(letter.upper(), 0)
        append(
            Trade(
                symbol,
                price,
                size,
                midnight + offset_ms,
                exchange,
                cond,
                str(sequence),
                tape,
                sequence,
                len(fields) > 5 and fields[5] == "1",
            )
        )
    return trades


class MinuteBar(NamedTuple):
    """One vendor minute bar of a Lean minute zip; prices in dollars, ``start_ms`` epoch ms."""

    start_ms: int
    open: float
    high: float
    low: float
    close: float
    volume: int


def read_lean_minute_bars(path: str | Path, day: date | None = None) -> list[MinuteBar]:
    """The vendor's minute bars of a Lean minute zip (``minute/<sym>/<yyyymmdd>_trade.zip``)."""
    if day is None:
        day = symbol_and_day_from_path(path)[1]
    midnight = ny_midnight_ms(day)
    bars: list[MinuteBar] = []
    for line in _read_zip_text(path).splitlines():
        if not line:
            continue
        ms, o, h, low, c, v = line.split(",")[:6]
        bars.append(
            MinuteBar(
                midnight + int(ms),
                int(o) / 10000,
                int(h) / 10000,
                int(low) / 10000,
                int(c) / 10000,
                int(v),
            )
        )
    return bars


# --- Polygon flat files -----------------------------------------------------------------------

FLATFILE_TRADE_COLUMNS = (
    "ticker",
    "conditions",
    "correction",
    "exchange",
    "id",
    "participant_timestamp",
    "price",
    "sequence_number",
    "sip_timestamp",
    "size",
    "tape",
    "trf_id",
    "trf_timestamp",
)
"""Header of Polygon's ``us_stocks_sip/trades_v1`` flat files (timestamps in ns)."""


def _open_text(path: str | Path) -> io.TextIOBase:
    p = Path(path)
    with p.open("rb") as probe:
        magic = probe.read(2)
    # a stray byte that is not UTF-8 spoils its row (dead-lettered), not the whole file
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(
            gzip.open(p, "rb"), encoding="utf-8", errors="surrogateescape", newline=""
        )
    return p.open("r", encoding="utf-8", errors="surrogateescape", newline="")


def read_polygon_flatfile_trades(
    path: str | Path, symbols: Iterable[str] | None = None, *, on_bad: BadLine | None = None
) -> list[Trade]:
    """Trades of a Polygon flat-file trade CSV (gzip or plain), in file order.

    ``t`` is the SIP timestamp in ms (what the WebSocket feed sends), ``q`` the sequence
    number, ``i`` the trade id. ``symbols`` keeps only those tickers (all when ``None``).
    Corrections are kept as they are: the file's ``correction`` column is not interpreted.
    A row that does not parse goes to ``on_bad``.
    """
    with _open_text(path) as handle:
        return polygon_trades_from_lines(handle, symbols, on_bad=on_bad, where=str(path))


def polygon_trades_from_lines(
    lines: Iterable[str],
    symbols: Iterable[str] | None = None,
    *,
    on_bad: BadLine | None = None,
    where: str = "flatfile",
) -> list[Trade]:
    """The trades of a Polygon flat file's lines, header first (see
    ``read_polygon_flatfile_trades``)."""
    wanted = {symbol.upper() for symbol in symbols} if symbols is not None else None
    trades: list[Trade] = []
    conditions_cache: dict[str, tuple[int, ...]] = {"": ()}
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise ValueError(f"{where}: not a CSV file: {exc}") from None
    if header is None:
        return trades
    column = {name.strip(): index for index, name in enumerate(header)}
    missing = [name for name in ("ticker", "price", "size", "sip_timestamp") if name not in column]
    if missing:
        raise ValueError(f"{where}: not a Polygon trade flat file (missing {missing})")
    c_ticker = column["ticker"]
    c_conditions = column.get("conditions")
    c_exchange = column.get("exchange")
    c_id = column.get("id")
    c_price = column["price"]
    c_sequence = column.get("sequence_number")
    c_sip = column["sip_timestamp"]
    c_size = column["size"]
    c_tape = column.get("tape")
    number = 1
    while True:
        number += 1
        try:
            row = next(reader, None)
        except csv.Error as exc:  # a NUL byte, an unterminated quote at the end
            _bad(f"{where}: row {number}", exc, "", on_bad)
            continue
        if row is None:
            break
        if not row:
            continue
        try:
            ticker = row[c_ticker]
            if wanted is not None and ticker.upper() not in wanted:
                continue
            raw_conditions = row[c_conditions] if c_conditions is not None else ""
            cond = conditions_cache.get(raw_conditions)
            if cond is None:
                cond = conditions_cache[raw_conditions] = tuple(
                    int(part) for part in raw_conditions.split(",") if part.strip()
                )
            raw_size = row[c_size]
            size = int(raw_size) if raw_size.isdigit() else int(float(raw_size))
            trade = Trade(
                ticker,
                float(row[c_price]),
                size,
                int(row[c_sip]) // 1_000_000,
                int(row[c_exchange] or 0) if c_exchange is not None else 0,
                cond,
                row[c_id] if c_id is not None else "",
                int(row[c_tape] or 0) if c_tape is not None else 0,
                int(row[c_sequence] or 0) if c_sequence is not None else 0,
            )
            _check_time(trade.t)
        except (ValueError, IndexError, OverflowError) as exc:
            _bad(f"{where}: row {number}", exc, ",".join(row), on_bad)
            continue
        trades.append(trade)
    return trades


def read_trades(
    path: str | Path, *, listings: Listings | None = None, on_bad: BadLine | None = None
) -> list[Trade]:
    """Trades of a Lean trade zip or a Polygon flat-file CSV, chosen by the file name; lines
    that do not parse go to ``on_bad`` (without it: ``ValueError``)."""
    name = Path(path).name.lower()
    if name.endswith(".zip"):
        return read_lean_trades(path, listings=listings, on_bad=on_bad)
    return read_polygon_flatfile_trades(path, on_bad=on_bad)
