"""Tick-file readers: Lean trade and minute zips, Polygon flat files, and the mappings."""

from __future__ import annotations

import gzip
import zipfile
from datetime import date
from pathlib import Path

import pytest

from libs.common.market.conditions_table import condition_names
from libs.common.market.sessions import ny_epoch_ms, ny_midnight_ms
from libs.common.market.tickfiles import (
    LEAN_EXCHANGE_TO_POLYGON,
    LEAN_FLAG_TO_POLYGON,
    MinuteBar,
    conditions_from_flags,
    day_from_flatfile_path,
    read_lean_minute_bars,
    read_lean_trades,
    read_polygon_flatfile_trades,
    read_trades,
    symbol_and_day_from_path,
)


def write_lean_zip(path: Path, inner: str, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(inner, "\r\n".join(lines) + "\r\n")
    return path


def test_the_conditions_of_the_flag_words_in_the_data_map_to_polygon_ids() -> None:
    assert conditions_from_flags(0x1) == (0,)
    assert conditions_from_flags(0x20000020) == (14, 41)
    assert conditions_from_flags(0x20002020) == (14, 12, 41)
    assert conditions_from_flags(0x20100200) == (10, 2, 41)
    assert conditions_from_flags(0x20200040) == (25, 9, 41)
    assert conditions_from_flags(0x4000000) == (16,)
    assert conditions_from_flags(0x1000001) == (0, 15)
    assert conditions_from_flags(0x80) == (8,)
    assert conditions_from_flags(0x0) == ()


def test_out_of_sequence_combines_with_sold_and_extended_hours_into_one_condition() -> None:
    assert conditions_from_flags(0x4800) == (32,)  # Sold + OutOfSequence
    assert conditions_from_flags(0x6004) == (20, 13)  # NextDay + ExtendedHours + OutOfSequence
    assert conditions_from_flags(0x104800) == (32, 2)
    assert conditions_from_flags(0x4000) == (32,)  # OutOfSequence alone


def test_formt_and_extended_hours_share_polygons_form_t_and_the_undocumented_bit_is_dropped():
    assert conditions_from_flags(1 << 10) == (12,)
    assert conditions_from_flags(1 << 13) == (12,)
    assert conditions_from_flags((1 << 10) | (1 << 13)) == (12,)
    assert conditions_from_flags(1 << 30) == ()
    assert conditions_from_flags(1 << 31) == (37,)


def test_every_mapped_condition_is_a_polygon_trade_condition() -> None:
    names = condition_names()
    for bit, condition in LEAN_FLAG_TO_POLYGON.items():
        if condition is not None and condition != 0:
            assert condition in names, (bit, condition)
    assert names[14] == "Intermarket Sweep"
    assert names[41] == "Trade Thru Exempt"
    assert names[37] == "Odd Lot Trade"


def test_exchange_letters_map_to_polygon_exchange_ids() -> None:
    assert LEAN_EXCHANGE_TO_POLYGON["N"] == 10
    assert LEAN_EXCHANGE_TO_POLYGON["P"] == 11
    assert LEAN_EXCHANGE_TO_POLYGON["Q"] == 12
    assert LEAN_EXCHANGE_TO_POLYGON["D"] == 4
    assert LEAN_EXCHANGE_TO_POLYGON["Z"] == 19
    assert LEAN_EXCHANGE_TO_POLYGON["X"] == 17
    assert len(set(LEAN_EXCHANGE_TO_POLYGON.values())) == len(LEAN_EXCHANGE_TO_POLYGON) - 1


def test_symbol_and_day_come_from_the_path() -> None:
    assert symbol_and_day_from_path("data/tick/spy/20131007_trade.zip") == (
        "SPY",
        date(2013, 10, 7),
    )
    assert symbol_and_day_from_path(Path("minute/bac/20131009_trade.zip"))[0] == "BAC"
    assert symbol_and_day_from_path("20131008_ibm_Trade_Tick.csv") == ("IBM", date(2013, 10, 8))
    with pytest.raises(ValueError):
        symbol_and_day_from_path("tick/spy/trades.zip")
    assert day_from_flatfile_path("2024-01-03.csv.gz") == date(2024, 1, 3)
    assert day_from_flatfile_path("trades.csv") is None


def test_a_lean_tick_zip_reads_as_polygon_shaped_trades(tmp_path: Path) -> None:
    path = write_lean_zip(
        tmp_path / "tick" / "ibm" / "20131007_trade.zip",
        "20131007_ibm_Trade_Tick.csv",
        [
            "34200500,1820000,138862,N,40,0",
            "34201000,1818500,111,Q,1,0",
            "34202000,1818700,100,Q,20000020,1",
        ],
    )
    trades = read_lean_trades(path)
    assert len(trades) == 3
    first, second, third = trades
    assert first.sym == "IBM"
    assert first.t == ny_epoch_ms(date(2013, 10, 7), 9, 30, 500)
    assert first.p == 182.0 and first.s == 138862
    assert first.x == 10 and first.c == (25,) and first.z == 1
    assert (first.q, first.i) == (1, "1")
    assert second.x == 12 and second.c == (0,) and second.p == 181.85
    assert third.c == (14, 41) and third.suspicious is True and third.q == 3
    assert read_trades(path) == trades


def test_lean_times_are_new_york_wall_times_across_daylight_saving(tmp_path: Path) -> None:
    winter = write_lean_zip(
        tmp_path / "tick" / "spy" / "20131104_trade.zip", "x.csv", ["34200000,1760000,100,P,1,0"]
    )
    summer = write_lean_zip(
        tmp_path / "tick" / "spy" / "20131007_trade.zip", "x.csv", ["34200000,1670000,100,P,1,0"]
    )
    (winter_trade,) = read_lean_trades(winter)
    (summer_trade,) = read_lean_trades(summer)
    assert winter_trade.t == ny_midnight_ms(date(2013, 11, 4)) + 34_200_000
    assert winter_trade.t == 1_383_575_400_000  # 14:30 UTC = 09:30 EST
    assert summer_trade.t == 1_381_152_600_000  # 13:30 UTC = 09:30 EDT


def test_a_lean_minute_zip_reads_as_vendor_bars(tmp_path: Path) -> None:
    path = write_lean_zip(
        tmp_path / "minute" / "spy" / "20131007_trade.zip",
        "20131007_spy_Trade_Minute.csv",
        [
            "14400000,1674100,1674100,1672500,1672700,3197",
            "14460000,1672500,1672500,1672500,1672500,1150",
        ],
    )
    bars = read_lean_minute_bars(path)
    assert bars[0] == MinuteBar(
        ny_epoch_ms(date(2013, 10, 7), 4), 167.41, 167.41, 167.25, 167.27, 3197
    )
    assert bars[1].start_ms - bars[0].start_ms == 60_000


FLATFILE = (
    "ticker,conditions,correction,exchange,id,participant_timestamp,price,sequence_number,"
    "sip_timestamp,size,tape,trf_id,trf_timestamp\n"
    'AAPL,"14,41",0,12,52983525029314,1704292200001234567,184.25,1001,1704292200002345678,100,3,'
    "0,0\n"
    "AAPL,,0,4,7,1704292201001234567,184.26,1002,1704292201005000000,35,3,201,1704292201004\n"
    "MSFT,37,0,11,8,1704292202000000000,370.5,1003,1704292202000999999,12,3,0,0\n"
)


@pytest.mark.parametrize("compressed", [True, False])
def test_a_polygon_flat_file_reads_as_trades(tmp_path: Path, compressed: bool) -> None:
    path = tmp_path / ("2024-01-03.csv.gz" if compressed else "2024-01-03.csv")
    if compressed:
        path.write_bytes(gzip.compress(FLATFILE.encode()))
    else:
        path.write_text(FLATFILE)
    trades = read_polygon_flatfile_trades(path)
    assert [trade.sym for trade in trades] == ["AAPL", "AAPL", "MSFT"]
    first = trades[0]
    assert first.c == (14, 41) and first.x == 12 and first.z == 3
    assert first.t == 1_704_292_200_002 and first.p == 184.25 and first.s == 100
    assert first.i == "52983525029314" and first.q == 1001
    assert trades[1].c == () and trades[2].c == (37,)
    assert read_polygon_flatfile_trades(path, symbols=["msft"]) == [trades[2]]
    assert read_trades(path) == trades


def test_a_file_that_is_not_a_trade_flat_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="missing"):
        read_polygon_flatfile_trades(path)


def test_the_backfill_writes_one_contract_bar_per_line_from_a_flat_file(tmp_path: Path) -> None:
    import json

    from services.bars.backfill import run_backfill

    path = tmp_path / "2024-01-03.csv.gz"
    path.write_bytes(gzip.compress(FLATFILE.encode()))
    out = tmp_path / "bars.jsonl"
    summary = run_backfill([path], "none", out, 0)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert (summary.files, summary.symbols, summary.trades, summary.bars) == (1, 2, 3, 2)
    assert [line["symbol"] for line in lines] == ["AAPL", "MSFT"]
    aapl = lines[0]
    assert list(aapl) == [
        "symbol",
        "tsET",
        "barId",
        "open",
        "high",
        "low",
        "close",
        "volume",
        "vwap",
        "trades",
        "startMs",
        "endMs",
        "revision",
    ]
    assert aapl["tsET"] == "2024-01-03T09:30:00-05:00" and aapl["barId"] == 1
    assert (aapl["open"], aapl["close"], aapl["volume"]) == (184.25, 184.26, 135)
    assert "MSFT" not in out.read_text().split("\n")[0]
    algoseek = run_backfill([path], "algoseek", tmp_path / "a.jsonl", 0, symbols=["AAPL"])
    (line,) = (tmp_path / "a.jsonl").read_text().splitlines()
    assert json.loads(line)["open"] == 184.26 and algoseek.symbols == 1  # the ISO print: volume


def test_a_bad_line_is_handed_over_and_the_rest_of_the_file_is_read(tmp_path: Path) -> None:
    path = write_lean_zip(
        tmp_path / "tick" / "spy" / "20131007_trade.zip",
        "20131007_spy_Trade_Tick.csv",
        [
            "34200000,1680500,100,P,00000001,0",
            "34200001,16805x0,100,P,00000001,0",  # price not a number
            "34200002,1680600",  # too few fields
            "99999999999999999999,1680600,100,P,00000001,0",  # past 2100
            "34200003,1680700,200,Q,00000001,0",
        ],
    )
    bad: list[tuple[str, bytes]] = []
    trades = read_trades(path, on_bad=lambda error, raw: bad.append((error, raw)))
    assert [trade.p for trade in trades] == [168.05, 168.07]
    assert [trade.q for trade in trades] == [1, 5]  # a bad line keeps its line number
    assert [raw for _, raw in bad] == [
        b"34200001,16805x0,100,P,00000001,0",
        b"34200002,1680600",
        b"99999999999999999999,1680600,100,P,00000001,0",
    ]
    assert all(str(path) in error and "line" in error for error, _ in bad)
    with pytest.raises(ValueError, match="line 2"):
        read_trades(path)


def test_a_bad_flat_file_row_is_handed_over_and_the_rest_is_read(tmp_path: Path) -> None:
    path = tmp_path / "2024-01-03.csv"
    path.write_bytes(
        b"ticker,price,size,sip_timestamp,exchange,id\n"
        b"SPY,470.1,100,1704292200000000000,4,a\n"
        b"SPY,abc,100,1704292200000000001,4,b\n"
        b"SPY,470.2,\xff\xfe,1704292200000000002,4,c\n"
        b"SPY,470.3,100,1704292200000000003,4,d\n"
    )
    bad: list[tuple[str, bytes]] = []
    trades = read_trades(path, on_bad=lambda error, raw: bad.append((error, raw)))
    assert [trade.i for trade in trades] == ["a", "d"]
    assert len(bad) == 2 and "row 3" in bad[0][0] and "row 4" in bad[1][0]
    assert bad[1][1] == b"SPY,470.2,\xff\xfe,1704292200000000002,4,c"
