"""Primary listings: the exchange a symbol is listed on, on a given day, from reference data.

The ``algoseek`` bar policy needs it to tell the listing exchange's opening and closing
auction prints from every other venue's (``docs/bars.md``), and the tick-file readers give a
trade its tape from it. ``Listings`` answers from, in order:

1. **Lean map files** (``map_files/<ticker>.csv`` of Lean's ``Data/equity/usa``, as the data
   vendor ships them): headerless rows ``yyyymmdd,ticker[,exchange letter[,mode]]``. The row
   in force on day D is the first whose date is on or after D (Lean's ``MapFile``); its ticker
   must be the symbol (a file is named after the security's permanent ticker, so a renamed
   security is found through an index of every file's rows); its letter is the SIP
   participant letter of the listing exchange. A file without the letter (Lean's older
   two-column files) gives no listing. The folders are the settings' (``map_files``), the
   ``map_files`` folder beside a Lean data set (``for_data``), then the small folder shipped in
   ``libs/common/market/data/map_files`` (the symbols of the shared data; its README says
   where the rows come from).
2. **Polygon's ticker reference** (``GET /v3/reference/tickers/{ticker}?date=D``: the
   ``primary_exchange`` MIC), for a live feed, when a base URL is configured. The simulator
   serves the same endpoint.
3. **The tape** a live trade carries: tape A is NYSE's listings and tape C Nasdaq's (that is
   how the SIP plans split them); tape B (NYSE American, NYSE Arca, Cboe, IEX, ...) names no
   exchange.

A symbol-day none of them answers gets a warning (once per symbol) and a count
(``missing``, and ``tickmesh_listings_unknown_total`` when a registry is given): its opening
and closing prints are then not recognised as the auction's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import date, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import httpx
import msgspec
import structlog
from msgspec import Meta
from prometheus_client import CollectorRegistry, Counter

from libs.common.runtime.metrics import metrics_for
from libs.common.runtime.settings import Secret, SettingsGroup

log = structlog.get_logger("tickmesh.listings")

LEAN_EXCHANGE_TO_POLYGON: dict[str, int] = {
    "A": 1,  # NYSE American (NYSE MKT / AMEX)
    "B": 2,  # Nasdaq OMX BX
    "C": 3,  # NYSE National (National Stock Exchange)
    "D": 4,  # FINRA ADF / trade reporting facilities
    "E": 5,  # Market independent (SIP generated)
    "I": 6,  # International Securities Exchange
    "J": 7,  # Cboe EDGA
    "K": 8,  # Cboe EDGX
    "M": 9,  # NYSE Chicago (Chicago Stock Exchange)
    "N": 10,  # New York Stock Exchange
    "P": 11,  # NYSE Arca
    "Q": 12,  # Nasdaq
    "T": 12,  # Nasdaq (older letter)
    "S": 13,  # Consolidated tape system
    "L": 14,  # Long-Term Stock Exchange
    "V": 15,  # Investors Exchange
    "W": 16,  # Cboe Stock Exchange (CBSX)
    "X": 17,  # Nasdaq PSX (Philadelphia)
    "Y": 18,  # Cboe BYX
    "Z": 19,  # Cboe BZX
    "H": 20,  # MIAX Pearl
    "U": 21,  # Members Exchange
}
"""SIP participant letter (as in Lean tick and map files) -> Polygon exchange id (``x``)."""

MIC_TO_POLYGON: dict[str, int] = {
    "XASE": 1,  # NYSE American
    "XBOS": 2,  # Nasdaq BX
    "XCIS": 3,  # NYSE National
    "XCHI": 9,  # NYSE Chicago
    "XNYS": 10,  # New York Stock Exchange
    "ARCX": 11,  # NYSE Arca
    "XNAS": 12,  # Nasdaq (and its market tiers:)
    "XNGS": 12,
    "XNMS": 12,
    "XNCM": 12,
    "LTSE": 14,  # Long-Term Stock Exchange
    "IEXG": 15,  # Investors Exchange
    "XPHL": 17,  # Nasdaq PSX / Philadelphia
    "BATY": 18,  # Cboe BYX
    "BATS": 19,  # Cboe BZX
    "EDGA": 7,  # Cboe EDGA
    "EDGX": 8,  # Cboe EDGX
    "EPRL": 20,  # MIAX Pearl
    "MEMX": 21,  # Members Exchange
}
"""ISO 10383 MIC (Polygon's ``primary_exchange``) -> Polygon exchange id, as Polygon's
``/v3/reference/exchanges`` pairs them (``mic`` with ``id``)."""

POLYGON_TO_MIC: dict[int, str] = {}
for _mic, _id in MIC_TO_POLYGON.items():
    POLYGON_TO_MIC.setdefault(_id, _mic)

NYSE, ARCA, NASDAQ = 10, 11, 12
EXCHANGE_OF_TAPE: dict[int, int] = {1: NYSE, 3: NASDAQ}
"""The listing exchange a tape implies: tape A is NYSE-listed, tape C Nasdaq-listed (tape B
holds every other exchange's listings, so it implies none)."""

PACKAGED_MAP_FILES = "map_files"
"""The folder of map files shipped in ``libs/common/market/data``."""


def tape_of_exchange(exchange: int) -> int:
    """The tape (1 A, 2 B, 3 C) of a security listed on Polygon exchange ``exchange``."""
    if exchange == NYSE:
        return 1
    if exchange == NASDAQ:
        return 3
    return 2 if exchange > 0 else 0


class Listing(NamedTuple):
    """A symbol's primary listing on a day."""

    symbol: str
    exchange: int
    """Polygon exchange id of the listing exchange."""
    tape: int
    source: str
    """Where it came from: a map file's path, ``polygon reference``, or ``tape``."""


class MapRow(NamedTuple):
    """One row of a Lean map file."""

    until: date
    """The last day (inclusive) the row's ticker and exchange apply."""
    ticker: str
    letter: str
    """SIP participant letter of the listing exchange ('' in two-column files)."""


def read_map_file(path: str | Path) -> list[MapRow]:
    """The rows of a Lean map file; ``ValueError`` naming the file and line when malformed."""
    rows: list[MapRow] = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            text = line.strip()
            if not text:
                continue
            fields = [field.strip() for field in text.split(",")]
            try:
                if len(fields) < 2 or not fields[1]:
                    raise ValueError("want yyyymmdd,ticker[,exchange[,mode]]")
                until = datetime.strptime(fields[0], "%Y%m%d").date()
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not a map file row ({exc}): {text!r}") from None
            letter = fields[2].upper() if len(fields) > 2 else ""
            if rows and until < rows[-1].until:
                raise ValueError(f"{path}:{number}: dates go back ({text!r})")
            rows.append(MapRow(until, fields[1].upper(), letter))
    return rows


def row_in_force(rows: Sequence[MapRow], day: date) -> MapRow | None:
    """The row that applies on ``day``: the first dated on or after it (None past the last,
    i.e. after the security was delisted)."""
    for row in rows:
        if row.until >= day:
            return row
    return None


class MapFiles:
    """The Lean map files of some folders, read on demand and kept."""

    def __init__(self, folders: Iterable[str | Path]) -> None:
        self.folders = [Path(folder) for folder in folders]
        self._files: dict[Path, list[MapRow]] = {}
        self._index: dict[str, list[tuple[date, date, Path]]] | None = None
        self._lock = threading.Lock()

    def _rows(self, path: Path) -> list[MapRow]:
        rows = self._files.get(path)
        if rows is None:
            rows = self._files[path] = read_map_file(path)
        return rows

    def lookup(self, symbol: str, day: date) -> Listing | None:
        """``symbol``'s listing on ``day`` from the first folder that has it."""
        symbol = symbol.upper()
        with self._lock:
            for folder in self.folders:
                path = folder / f"{symbol.lower()}.csv"
                if path.is_file():
                    row = row_in_force(self._rows(path), day)
                    if row is not None and row.ticker == symbol:
                        return self._listing(symbol, row, path)
            for start, end, path in self._indexed().get(symbol, []):
                if start <= day <= end:
                    row = row_in_force(self._rows(path), day)
                    if row is not None:
                        return self._listing(symbol, row, path)
        return None

    def _listing(self, symbol: str, row: MapRow, path: Path) -> Listing | None:
        exchange = LEAN_EXCHANGE_TO_POLYGON.get(row.letter, 0)
        if not exchange:
            log.warning(
                "listing.map_file_without_exchange",
                symbol=symbol,
                path=str(path),
                letter=row.letter,
            )
            return None
        return Listing(symbol, exchange, tape_of_exchange(exchange), str(path))

    def _indexed(self) -> dict[str, list[tuple[date, date, Path]]]:
        """Every file's ticker intervals, for a symbol whose file has another name (a
        renamed security): ticker -> [(first day, last day, file)]."""
        if self._index is None:
            index: dict[str, list[tuple[date, date, Path]]] = {}
            for folder in self.folders:
                for path in sorted(folder.glob("*.csv")):
                    try:
                        rows = self._rows(path)
                    except (OSError, ValueError) as exc:
                        log.warning("listing.map_file_unreadable", path=str(path), error=str(exc))
                        continue
                    start = date.min
                    for row in rows:
                        index.setdefault(row.ticker, []).append((start, row.until, path))
                        start = date.fromordinal(row.until.toordinal() + 1)
            self._index = index
        return self._index


class ReferenceUnavailable(Exception):
    """The ticker reference could not answer now (network, an error status, a bad body)."""


class TickerReference:
    """Polygon's ticker reference (``GET /v3/reference/tickers/{ticker}?date=``): the
    ``primary_exchange`` of a ticker on a day.

    ``warm`` starts a lookup in a worker thread so that it is ready when ``lookup`` needs it;
    ``lookup`` waits for it (or asks itself) at most ``timeout_s``. A ticker it does not know
    (404) or a MIC without an exchange id gives None; a request that fails is logged and
    raises ``ReferenceUnavailable`` (``Listings`` then asks again next time).
    """

    def __init__(
        self,
        base_url: str,
        api_key: Secret | str = "",
        *,
        timeout_s: float = 5.0,
        client: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = api_key if isinstance(api_key, Secret) else Secret(api_key)
        self.timeout_s = timeout_s
        self._client = client or httpx.Client(timeout=timeout_s)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[tuple[str, date], Future[Listing | None]] = {}
        self._lock = threading.Lock()
        self.requests = 0

    def warm(self, symbol: str, day: date) -> None:
        """Start looking ``symbol`` up for ``day`` in the background."""
        key = (symbol.upper(), day)
        with self._lock:
            if key in self._pending:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(2, thread_name_prefix="listings")
            self._pending[key] = self._pool.submit(self._fetch, *key)

    def lookup(self, symbol: str, day: date) -> Listing | None:
        """``symbol``'s listing on ``day`` (None when the reference does not give one)."""
        key = (symbol.upper(), day)
        with self._lock:
            future = self._pending.pop(key, None)
        if future is not None:
            try:
                return future.result(timeout=self.timeout_s)
            except Exception as exc:  # the worker's failure (logged there): ask once more
                if not isinstance(exc, ReferenceUnavailable):
                    log.warning("listing.reference_failed", symbol=key[0], error=repr(exc))
        return self._fetch(*key)

    def _fetch(self, symbol: str, day: date) -> Listing | None:
        self.requests += 1
        url = f"{self.base_url}/v3/reference/tickers/{symbol}"
        headers = {"Authorization": f"Bearer {self._key.reveal()}"} if self._key else {}
        try:
            response = self._client.get(url, params={"date": day.isoformat()}, headers=headers)
        except httpx.HTTPError as exc:
            log.warning("listing.reference_failed", symbol=symbol, error=repr(exc))
            raise ReferenceUnavailable(repr(exc)) from None
        if response.status_code == httpx.codes.NOT_FOUND:
            return None
        if response.status_code != httpx.codes.OK:
            log.warning("listing.reference_failed", symbol=symbol, status=response.status_code)
            raise ReferenceUnavailable(f"status {response.status_code}")
        try:
            results: Any = response.json().get("results") or {}
            mic = str(results.get("primary_exchange") or "").upper()
        except (ValueError, AttributeError) as exc:
            log.warning("listing.reference_failed", symbol=symbol, error=repr(exc))
            raise ReferenceUnavailable(repr(exc)) from None
        exchange = MIC_TO_POLYGON.get(mic, 0)
        if not exchange:
            log.warning("listing.reference_unknown_mic", symbol=symbol, mic=mic)
            return None
        return Listing(symbol, exchange, tape_of_exchange(exchange), "polygon reference")

    def close(self) -> None:
        """Stop the worker threads and the HTTP client."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


class ListingMetrics:
    """The counter of symbol-days without a listing, once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.unknown = Counter(
            "tickmesh_listings_unknown",
            "Symbol-days whose primary listing no reference data gave (auction prints not "
            "recognised)",
            ["service"],
            registry=registry,
        )


class Listings:
    """The primary listing of each symbol and day, from map files, the ticker reference and
    the tape, in that order (module docstring). Answers are kept per symbol and day."""

    def __init__(
        self,
        map_files: Iterable[str | Path] = (),
        reference: TickerReference | None = None,
        *,
        packaged: bool = True,
        registry: CollectorRegistry | None = None,
        service: str = "",
    ) -> None:
        folders = [Path(folder) for folder in map_files]
        if packaged:
            folders.append(packaged_map_files())
        self.map_files = MapFiles(folders)
        self.reference = reference
        self.service = service
        self._metrics = metrics_for(ListingMetrics, registry) if registry is not None else None
        self._known: dict[tuple[str, date], Listing | None] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self.missing = 0
        """Symbol-days without a listing so far."""

    def warm(self, symbol: str, day: date) -> None:
        """Start the slow part of a lookup (the reference's request) in the background."""
        if self.reference is not None and (symbol.upper(), day) not in self._known:
            if self.map_files.lookup(symbol, day) is None:
                self.reference.warm(symbol, day)

    def lookup(self, symbol: str, day: date, tape: int = 0) -> Listing | None:
        """``symbol``'s primary listing on ``day`` (``tape``: the tape its trades carry, if
        known); None, with a warning and a count, when nothing gives one."""
        key = (symbol.upper(), day)
        with self._lock:
            if key in self._known:
                return self._known[key]
        found = self.map_files.lookup(symbol, day)
        settled = True
        if found is None and self.reference is not None:
            try:
                found = self.reference.lookup(symbol, day)
            except ReferenceUnavailable:
                settled = False  # not kept: asked again next time
        if found is None and tape in EXCHANGE_OF_TAPE:
            exchange = EXCHANGE_OF_TAPE[tape]
            found = Listing(key[0], exchange, tape, "tape")
        with self._lock:
            if key in self._known:
                return self._known[key]
            if settled or found is not None:
                self._known[key] = found
            if found is None:
                self.missing += 1
                if self._metrics is not None:
                    self._metrics.unknown.labels(self.service or "unknown").inc()
                if key[0] not in self._warned:
                    self._warned.add(key[0])
                    log.warning(
                        "listing.unknown",
                        symbol=key[0],
                        day=day.isoformat(),
                        tape=tape,
                        map_files=[str(folder) for folder in self.map_files.folders],
                        reference=self.reference.base_url if self.reference else None,
                        effect="its opening and closing prints are not the auction's",
                    )
        return found

    def primary(self, symbol: str, day: date, tape: int = 0) -> int:
        """Polygon id of ``symbol``'s listing exchange on ``day`` (0 when unknown)."""
        found = self.lookup(symbol, day, tape)
        return found.exchange if found is not None else 0

    def tape(self, symbol: str, day: date) -> int:
        """The tape of ``symbol`` on ``day`` from its listing (0 when unknown)."""
        found = self.lookup(symbol, day)
        return found.tape if found is not None else 0

    def close(self) -> None:
        """Release the reference's threads and connections."""
        if self.reference is not None:
            self.reference.close()


def packaged_map_files() -> Path:
    """The folder of map files shipped with tickmesh."""
    return Path(str(resources.files("libs.common.market").joinpath("data", PACKAGED_MAP_FILES)))


def map_files_of_data(path: str | Path) -> Path | None:
    """The ``map_files`` folder of the Lean data set a tick or minute file belongs to
    (``<root>/tick/<sym>/<day>_trade.zip`` -> ``<root>/map_files``), or of a data root."""
    p = Path(path)
    candidates = [p / "map_files"]
    if len(p.parents) >= 3:
        candidates.append(p.parents[2] / "map_files")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


_SHARED: dict[tuple[Path, ...], Listings] = {}
_SHARED_LOCK = threading.Lock()


def for_data(path: str | Path | None = None, extra: Iterable[str | Path] = ()) -> Listings:
    """The listings a Lean data set knows: ``extra`` folders, the ``map_files`` folder beside
    ``path`` (a tick file or a data root), the packaged folder. Shared per folder list."""
    folders = [Path(folder) for folder in extra]
    beside = map_files_of_data(path) if path is not None else None
    if beside is not None and beside not in folders:
        folders.append(beside)
    key = tuple(folders)
    with _SHARED_LOCK:
        listings = _SHARED.get(key)
        if listings is None:
            listings = _SHARED[key] = Listings(folders)
    return listings


class ListingSettings(SettingsGroup, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where a service finds primary listings (``<PREFIX>MAP_FILES``, ``<PREFIX>REFERENCE_*``).
    The reference's key is a setting of its own, not ``POLYGON_API_KEY``: the deployment gives
    the feed's key to ingest only."""

    map_files: Annotated[
        list[str],
        Meta(description="folders of Lean map files (<ticker>.csv), comma separated, first wins"),
    ] = msgspec.field(default_factory=list)
    reference_url: Annotated[
        str,
        Meta(description="Polygon REST base URL for /v3/reference/tickers (empty: not asked)"),
    ] = ""
    reference_key: Annotated[
        Secret, Meta(description="Polygon API key for the ticker reference (a Bearer token)")
    ] = Secret("")
    reference_timeout_s: Annotated[
        float, Meta(gt=0, description="wait for one ticker reference answer")
    ] = 5.0

    def build(self, *, registry: CollectorRegistry | None = None, service: str = "") -> Listings:
        """The ``Listings`` these settings describe."""
        reference = (
            TickerReference(
                self.reference_url, self.reference_key, timeout_s=self.reference_timeout_s
            )
            if self.reference_url
            else None
        )
        return Listings(self.map_files, reference, registry=registry, service=service)


__all__ = [
    "LEAN_EXCHANGE_TO_POLYGON",
    "MIC_TO_POLYGON",
    "POLYGON_TO_MIC",
    "Listing",
    "ListingSettings",
    "Listings",
    "MapFiles",
    "MapRow",
    "ReferenceUnavailable",
    "TickerReference",
    "for_data",
    "map_files_of_data",
    "packaged_map_files",
    "read_map_file",
    "row_in_force",
    "tape_of_exchange",
]
