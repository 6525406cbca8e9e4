"""Primary listings from reference data: Lean map files, Polygon's ticker reference, the tape."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from libs.common.market.aggregator import BarAggregator
from libs.common.market.build import build_bars
from libs.common.market.listings import (
    Listings,
    ListingSettings,
    MapFiles,
    TickerReference,
    for_data,
    packaged_map_files,
    read_map_file,
    row_in_force,
)
from libs.common.market.policies import get_policy
from libs.common.market.sessions import ny_epoch_ms
from libs.common.runtime.clock import ManualClock
from libs.common.runtime.settings import Secret, load_settings
from libs.common.schemas import Trade

DAY = date(2013, 10, 7)
NYSE, ARCA, NASDAQ, BZX = 10, 11, 12, 19


def write(folder: Path, name: str, *rows: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join(f"{row}\n" for row in rows))
    return path


def test_a_map_file_row_applies_until_its_date_and_names_the_listing(tmp_path: Path) -> None:
    path = write(tmp_path, "bac.csv", "19980102,nb,N", "19980930,nb,N", "20501231,bac,N")
    rows = read_map_file(path)
    assert [row.ticker for row in rows] == ["NB", "NB", "BAC"]
    assert row_in_force(rows, date(1998, 6, 1)).ticker == "NB"
    assert row_in_force(rows, date(1998, 10, 1)).ticker == "BAC"
    assert row_in_force(rows, date(2051, 1, 1)) is None  # after the last row: delisted
    files = MapFiles([tmp_path])
    assert files.lookup("BAC", DAY) == (
        "BAC",
        NYSE,
        1,
        str(path),
    )
    # the renamed security is found under its old ticker through the index of every file
    assert files.lookup("NB", date(1998, 6, 1)).exchange == NYSE
    assert files.lookup("NB", DAY) is None  # NB is BAC's old name, not a listing in 2013


def test_malformed_map_files_are_refused_with_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"x\.csv:2: not a map file row"):
        read_map_file(write(tmp_path, "x.csv", "19980102,x,N", "2013-10-07,x,N"))
    with pytest.raises(ValueError, match=r"y\.csv:2: dates go back"):
        read_map_file(write(tmp_path, "y.csv", "20130102,y,N", "20120102,y,N"))


def test_a_two_column_map_file_names_no_exchange(tmp_path: Path) -> None:
    write(tmp_path, "old.csv", "19980102,old", "20501231,old")
    with capture_logs() as logs:
        assert MapFiles([tmp_path]).lookup("OLD", DAY) is None
    assert any(entry["event"] == "listing.map_file_without_exchange" for entry in logs)


def test_the_shipped_map_files_hold_the_shared_data_symbols() -> None:
    listings = Listings()
    assert listings.primary("SPY", DAY) == ARCA and listings.tape("SPY", DAY) == 2
    assert listings.primary("ibm", DAY) == NYSE and listings.tape("IBM", DAY) == 1
    assert listings.primary("AIG", DAY) == NYSE and listings.primary("BAC", DAY) == NYSE
    assert {path.name for path in packaged_map_files().glob("*.csv")} == {
        "spy.csv",
        "ibm.csv",
        "aig.csv",
        "bac.csv",
    }
    assert listings.missing == 0


def test_a_folder_named_in_the_settings_comes_before_the_shipped_one(tmp_path: Path) -> None:
    write(tmp_path, "spy.csv", "19980102,spy,Z", "20501231,spy,Z")
    assert Listings([tmp_path]).primary("SPY", DAY) == BZX
    assert Listings().primary("SPY", DAY) == ARCA


def test_a_symbol_without_a_listing_is_warned_about_and_counted() -> None:
    registry = CollectorRegistry()
    listings = Listings(registry=registry, service="bars")
    with capture_logs() as logs:
        assert listings.primary("ZZZZ", DAY) == 0
        assert listings.primary("ZZZZ", date(2013, 10, 8)) == 0
        assert listings.primary("ZZZZ", date(2013, 10, 8)) == 0  # answered from memory
    warnings = [entry for entry in logs if entry["event"] == "listing.unknown"]
    assert len(warnings) == 1 and warnings[0]["symbol"] == "ZZZZ"
    assert warnings[0]["log_level"] == "warning"
    assert listings.missing == 2  # symbol-days
    value = registry.get_sample_value("tickmesh_listings_unknown_total", {"service": "bars"})
    assert value == 2


def test_the_tape_names_the_listing_only_for_tapes_a_and_c() -> None:
    listings = Listings(packaged=False)
    assert listings.lookup("NEWA", DAY, tape=1) == ("NEWA", NYSE, 1, "tape")
    assert listings.lookup("NEWC", DAY, tape=3) == ("NEWC", NASDAQ, 3, "tape")
    assert listings.lookup("NEWB", DAY, tape=2) is None  # Arca, American, Cboe, IEX, ...
    assert listings.missing == 1


def reference(handler: httpx.MockTransport) -> TickerReference:
    return TickerReference(
        "http://polygon.test", Secret("k"), client=httpx.Client(transport=handler)
    )


def test_the_ticker_reference_gives_the_listing_from_its_mic() -> None:
    asked: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        ticker = request.url.path.rsplit("/", 1)[-1]
        mics = {"SPY": "ARCX", "AAPL": "XNAS", "IBM": "XNYS", "ODD": "XXXX"}
        if ticker not in mics:
            return httpx.Response(404, json={"status": "NOT_FOUND"})
        return httpx.Response(
            200,
            json={"status": "OK", "results": {"ticker": ticker, "primary_exchange": mics[ticker]}},
        )

    ref = reference(httpx.MockTransport(answer))
    assert ref.lookup("spy", DAY) == ("SPY", ARCA, 2, "polygon reference")
    assert ref.lookup("AAPL", DAY).exchange == NASDAQ
    with capture_logs() as logs:
        assert ref.lookup("ODD", DAY) is None
    assert logs[0]["event"] == "listing.reference_unknown_mic"
    assert ref.lookup("NONE", DAY) is None
    assert asked[0].url.path == "/v3/reference/tickers/SPY"
    assert asked[0].url.params["date"] == "2013-10-07"
    assert asked[0].headers["Authorization"] == "Bearer k"
    # warmed in the background, then taken from there
    ref.warm("IBM", DAY)
    assert ref.lookup("IBM", DAY).exchange == NYSE
    assert ref.requests == 5
    ref.close()


def test_a_failing_reference_is_a_miss_not_an_error() -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("DOWN"):
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(503, text="unavailable")

    listings = Listings(reference=reference(httpx.MockTransport(fail)), packaged=False)
    with capture_logs() as logs:
        assert listings.primary("DOWN", DAY) == 0
        assert listings.primary("BUSY", DAY) == 0
    events = [entry["event"] for entry in logs]
    assert events.count("listing.reference_failed") == 2
    assert events.count("listing.unknown") == 2
    assert listings.missing == 2
    # a failure is not kept as an answer: the next ask goes to the reference again
    assert listings.primary("DOWN", DAY) == 0
    assert listings.reference is not None and listings.reference.requests == 3
    assert listings.missing == 3


def test_the_settings_name_the_folders_and_the_reference() -> None:
    from libs.common.runtime.settings import CommonSettings

    class Demo(CommonSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
        ENV_PREFIX = "DEMO_"
        listings: ListingSettings = ListingSettings()

    settings = load_settings(
        Demo,
        {
            "DEMO_MAP_FILES": "/a,/b",
            "DEMO_REFERENCE_URL": "http://sim:8765",
            "DEMO_REFERENCE_KEY": "secret",
        },
    )
    assert settings.listings.map_files == ["/a", "/b"]
    built = settings.listings.build()
    assert [str(folder) for folder in built.map_files.folders][:2] == ["/a", "/b"]
    assert built.reference is not None and built.reference.base_url == "http://sim:8765"
    assert "secret" not in repr(settings)
    built.close()


def trade(t: int, p: float, c: tuple[int, ...], x: int, sym: str = "XYZ", s: int = 100) -> Trade:
    return Trade(sym, p, s, t, x, c, "", 0, 0)


def opening_day(sym: str) -> list[Trade]:
    """A regular Nasdaq trade, then NYSE's opening print at 09:30:20."""
    return [
        trade(ny_epoch_ms(DAY, 9, 30, 1_000), 10.0, (0,), NASDAQ, sym),
        trade(ny_epoch_ms(DAY, 9, 30, 20_000), 10.5, (25, 41), NYSE, sym, s=5_000),
    ]


def test_a_symbol_given_a_map_file_gets_its_auction_prints(tmp_path: Path) -> None:
    write(tmp_path, "xyz.csv", "20100104,xyz,N", "20501231,xyz,N")
    policy = get_policy("algoseek", listings=Listings([tmp_path]))
    (bar,) = build_bars(opening_day("XYZ"), policy)
    assert (bar.open, bar.volume) == (10.5, 5_100)  # NYSE's print opens and counts


def test_a_symbol_without_one_is_warned_about_and_counted_in_the_bars() -> None:
    aggregator = BarAggregator("QQQX", get_policy("algoseek"), clock=ManualClock(0))
    with capture_logs() as logs:
        aggregator.add(opening_day("QQQX"), 0)
        (bar,) = aggregator.flush()
    assert (bar.open, bar.volume) == (10.0, 100)  # the print is not the auction's
    assert aggregator.counters.primary_listing_unknown == 1
    assert aggregator.counters.auction_prints_ignored == 0
    assert aggregator.counters.trades_ignored_by_policy == 1
    assert any(entry["event"] == "listing.unknown" for entry in logs)


def test_the_map_files_beside_a_lean_data_set_are_found(tmp_path: Path) -> None:
    write(tmp_path / "map_files", "xyz.csv", "20501231,xyz,P")
    tick = tmp_path / "tick" / "xyz" / "20131007_trade.zip"
    tick.parent.mkdir(parents=True)
    listings = for_data(tick)
    assert listings.primary("XYZ", DAY) == ARCA
    assert for_data(tmp_path) is listings  # the data root finds the same folder
    assert listings.primary("SPY", DAY) == ARCA  # the shipped files still answer


def test_the_reference_answer_format_is_polygons() -> None:
    """The shape the simulator serves and Polygon documents: results.primary_exchange."""
    body = {
        "status": "OK",
        "request_id": "r",
        "results": {"ticker": "A", "primary_exchange": "XNYS"},
    }
    ref = reference(httpx.MockTransport(lambda request: httpx.Response(200, text=json.dumps(body))))
    assert ref.lookup("A", DAY).exchange == NYSE
