"""File replay (``INGEST_SOURCE=files``): tick files published as the socket path would."""

from __future__ import annotations

import asyncio
import gzip
import os
import random
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from libs.common import names
from libs.common.io.deadletter import DeadLetters
from libs.common.io.redis_io import Publisher, StreamReader
from libs.common.market.sessions import parse_day
from libs.common.market.tickfiles import FLATFILE_TRADE_COLUMNS, read_lean_trades
from libs.common.names import Keys
from libs.common.schemas import DeadLetter, TickBatch, Trade
from services.ingest import protocol
from services.ingest.client import IngestMetrics
from services.ingest.files import TickFileSource, load_trades
from services.ingest.framing import frames_of
from services.ingest.publishing import FeedPublisher
from services.ingest.simulator import FileFeed, PolygonSimulator
from tests.helpers import eventually
from tests.test_ingest_client import SIM, running_ingest

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
DAY = "20131007"
OPEN_MS = 34_200_000  # 09:30 New York, in ms since midnight
FLAGS = ("1", "1", "1", "21", "80000000", "2001")  # regular, sweep, odd lot, extended hours


def write_lean_zip(
    root: Path, symbol: str, rows: list[tuple[int, int, int, str, str, int]]
) -> Path:
    """A Lean trade zip: ``root/tick/<sym>/<day>_trade.zip`` holding one headerless CSV."""
    directory = root / "tick" / symbol.lower()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{DAY}_trade.zip"
    text = "".join(",".join(str(value) for value in row) + "\n" for row in rows)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{DAY}_{symbol.lower()}_Trade_Tick.csv", text)
    return path


def synthetic_rows(seed: int, count: int, span_ms: int = 150_000) -> list[tuple[Any, ...]]:
    """Time-ordered Lean rows over ``span_ms`` from the open, several per millisecond at
    times, across minute boundaries; prices in 1/10000 dollars."""
    rng = random.Random(seed)
    times = sorted(OPEN_MS + rng.randrange(span_ms // 5) * 5 for _ in range(count))
    price = 1_500_000
    rows = []
    for ms in times:
        price += rng.choice((-100, 0, 100))
        rows.append(
            (
                ms,
                price,
                rng.choice((100, 200, 37, 500)),
                rng.choice("NPQZD"),
                rng.choice(FLAGS),
                int(rng.random() < 0.02),
            )
        )
    return rows


def day_files(root: Path) -> list[Path]:
    return [
        write_lean_zip(root, "ZQA", synthetic_rows(1, 400)),
        write_lean_zip(root, "ZQB", synthetic_rows(2, 300)),
    ]


def make_replay(
    files: list[Path], redis_client: Any, prefix: str, **options: Any
) -> tuple[TickFileSource, CollectorRegistry, StreamReader, list[str]]:
    registry = CollectorRegistry()
    keys = Keys(f"{prefix}:")
    fatal: list[str] = []
    options.setdefault("speed", 0)
    replay = TickFileSource(
        files,
        FeedPublisher(Publisher(redis_client, keys=keys, registry=registry), registry=registry),
        IngestMetrics(registry),
        on_fatal=fatal.append,
        registry=registry,
        **options,
    )
    return replay, registry, StreamReader(redis_client, keys), fatal


async def published(streams: StreamReader, pattern: str = "ticks.*") -> dict[str, list[bytes]]:
    """Every record of the matching channels, in sequence order (checked gapless)."""
    out: dict[str, list[bytes]] = {}
    for channel in await streams.channels(pattern):
        stored = await streams.read(channel, count=1_000_000)
        assert [seq for seq, _ in stored] == list(range(1, len(stored) + 1)), channel
        out[channel] = [payload for _, payload in stored]
    return out


def ticks_part(payload: bytes) -> bytes:
    """The ``ticks`` array of an encoded TickBatch, as bytes (no seq, no tsInit)."""
    return payload.split(b'"ticks":', 1)[1].rsplit(b',"tsInit":', 1)[0]


async def test_a_replayed_day_publishes_one_record_per_frame_and_symbol_with_every_trade(
    tmp_path: Path, redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    files = day_files(tmp_path)
    replay, registry, streams, fatal = make_replay(files, redis_client, unique_name("tm"))
    await replay.start()
    try:
        await eventually(lambda: replay.done)
        assert not fatal and replay.loaded
        records = await published(streams)
        assert replay.state.value == "running"  # idles when done (no on_done)
    finally:
        await replay.stop()
    merged = load_trades(files)
    expected: dict[str, list[list[Trade]]] = {}
    for frame in frames_of(merged, 100, 1):
        for sym, group in protocol.split_frame(frame)[protocol.TRADES].items():
            expected.setdefault(f"ticks.{sym}", []).append(group)  # type: ignore[arg-type]
    assert set(records) == {"ticks.ZQA", "ticks.ZQB"}
    for channel, payloads in records.items():
        batches = [msgspec.json.decode(payload, type=TickBatch) for payload in payloads]
        assert [batch.ticks for batch in batches] == [
            [Trade(*(getattr(t, f) for f in Trade.__struct_fields__)) for t in group]
            for group in expected[channel]
        ]
    by_symbol = {
        sym: read_lean_trades(path) for sym, path in zip(("ZQA", "ZQB"), files, strict=True)
    }
    for sym, trades in by_symbol.items():
        replayed = [
            tick
            for payload in records[f"ticks.{sym}"]
            for tick in msgspec.json.decode(payload, type=TickBatch).ticks
        ]
        assert replayed == trades  # every trade, in file order, as the reader gives it
    assert replay.ticks_published == 700 == replay.trades_total
    assert registry.get_sample_value("tickmesh_ingest_events_total", {"type": "T"}) == 700
    assert registry.get_sample_value("tickmesh_ingest_frames_total") == len(
        list(frames_of(merged, 100, 1))
    )


async def test_one_record_per_round_trip_carries_the_same_trades_in_fewer_records(
    tmp_path: Path, redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    """``records=batch``: each symbol's trades of a round trip (up to ``batch_frames`` frames)
    go out as one record: the same trades in the same order, in fewer, larger records."""
    files = day_files(tmp_path)
    replay, _registry, streams, fatal = make_replay(
        files, redis_client, unique_name("tm"), batch_frames=16, one_record_per_batch=True
    )
    await replay.start()
    try:
        await eventually(lambda: replay.done)
        records = await published(streams)
    finally:
        await replay.stop()
    assert not fatal
    frames = list(frames_of(load_trades(files), 100, 1))
    for sym, path in zip(("ZQA", "ZQB"), files, strict=True):
        batches = [msgspec.json.decode(p, type=TickBatch) for p in records[f"ticks.{sym}"]]
        assert [tick for batch in batches for tick in batch.ticks] == read_lean_trades(path)
        per_frame = sum(1 for frame in frames if any(t.sym == sym for t in frame))
        assert len(batches) <= -(-len(frames) // 16) < per_frame


async def test_a_file_replay_and_a_simulator_replay_of_a_day_publish_the_same_ticks(
    tmp_path: Path, redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    files = day_files(tmp_path)
    replay, _, file_streams, _ = make_replay(files, redis_client, unique_name("files"))
    await replay.start()
    try:
        await eventually(lambda: replay.done)
        from_files = await published(file_streams)
    finally:
        await replay.stop()
    feed = FileFeed(tmp_path, parse_day(DAY), ("ZQA", "ZQB"), speed=0)
    async with (
        PolygonSimulator(replace(SIM, feed=feed)) as sim,
        running_ingest(
            sim.url, redis_client, unique_name("sim"), topics=("T.ZQA", "T.ZQB")
        ) as ingest,
    ):
        await eventually(lambda: ingest.ticks == 700)
        from_socket = await published(ingest.streams)
    assert set(from_files) == set(from_socket) == {"ticks.ZQA", "ticks.ZQB"}
    for channel in from_files:
        # Same records (frame and symbol boundaries), byte for byte but for seq and tsInit.
        assert [ticks_part(p) for p in from_files[channel]] == [
            ticks_part(p) for p in from_socket[channel]
        ]


async def test_the_replay_is_paced_by_event_time_at_the_given_speed(
    tmp_path: Path, redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    rows = [(OPEN_MS + offset, 1_500_000, 100, "N", "1", 0) for offset in (0, 400, 800)]
    path = write_lean_zip(tmp_path, "ZQP", rows)
    replay, registry, streams, _ = make_replay([path], redis_client, unique_name("tm"), speed=2)
    started = time.monotonic()
    await replay.start()
    try:
        await eventually(lambda: replay.frames_published >= 1)
        assert replay.frames_published == 1  # the next frame is due 0.2 s later
        await eventually(lambda: replay.done)
        elapsed = time.monotonic() - started
    finally:
        await replay.stop()
    assert elapsed >= 0.38, elapsed  # 800 ms of event time at speed 2
    assert len((await published(streams))["ticks.ZQP"]) == 3
    assert registry.get_sample_value("tickmesh_ingest_feed_lag_seconds") == 0


def test_files_merge_in_time_order_stable_by_file_then_line_and_keep_the_asked_symbols(
    tmp_path: Path,
) -> None:
    lean = write_lean_zip(
        tmp_path,
        "ZQA",
        [
            (OPEN_MS + 5, 1_000_000, 100, "N", "1", 0),
            (OPEN_MS + 5, 1_000_100, 100, "N", "1", 0),
            (OPEN_MS + 9, 1_000_200, 100, "N", "1", 0),
        ],
    )
    base_ns = (1_381_152_600_000) * 1_000_000  # 2013-10-07 09:30 New York, as SIP ns
    flat = tmp_path / "2013-10-07.csv.gz"
    rows = [  # a flat file is sorted by ticker, then time
        ("ZQC", "", "", 4, "c1", "", 50.0, 1, base_ns + 5_000_000, 100, 3, "", ""),
        ("ZQC", "37", "", 4, "c2", "", 50.1, 2, base_ns + 9_000_000, 10, 3, "", ""),
        ("ZQD", "", "", 11, "d1", "", 70.0, 3, base_ns + 1_000_000, 100, 1, "", ""),
        ("ZQD", "", "", 11, "d2", "", 70.0, 4, base_ns + 5_000_000, 100, 1, "", ""),
    ]
    with gzip.open(flat, "wt", newline="") as handle:
        handle.write(",".join(FLATFILE_TRADE_COLUMNS) + "\n")
        for row in rows:
            handle.write(",".join(str(value) for value in row) + "\n")
    merged = load_trades([lean, flat])
    assert [(t.sym, t.i) for t in merged] == [
        ("ZQD", "d1"),
        ("ZQA", "1"),
        ("ZQA", "2"),
        ("ZQC", "c1"),
        ("ZQD", "d2"),
        ("ZQA", "3"),
        ("ZQC", "c2"),
    ]
    assert all(type(t) is protocol.TradeEvent for t in merged)
    assert merged[-1].c == (37,) and merged[-1].q == 2
    assert [t.sym for t in load_trades([lean, flat], ["zqc", "ZQA"])] == [
        "ZQA",
        "ZQA",
        "ZQC",
        "ZQA",
        "ZQC",
    ]


async def test_an_unreadable_file_is_fatal_with_the_setting_named(
    tmp_path: Path, redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    replay, _, _, fatal = make_replay(
        [tmp_path / "missing_trade.zip"], redis_client, unique_name("tm")
    )
    await replay.start()
    try:
        await eventually(lambda: fatal)
    finally:
        await replay.stop()
    assert "INGEST_FILES" in fatal[0] and "missing_trade.zip" in fatal[0]
    assert not replay.loaded and not replay.done


async def test_bad_lines_of_a_tick_file_are_dead_letters_and_the_rest_is_replayed(
    tmp_path: Path, redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    rows: list[Any] = synthetic_rows(3, 50)
    rows[10] = ("not-a-time", 1_500_000, 100, "P", "1", 0)
    rows[20] = (OPEN_MS, "1.5e6", 100)
    path = write_lean_zip(tmp_path, "ZQC", rows)
    prefix = unique_name("tm")
    letters_registry = CollectorRegistry()
    dead_letters = DeadLetters(
        Publisher(redis_client, keys=Keys(f"{prefix}:"), registry=letters_registry),
        "ingest",
        registry=letters_registry,
    )
    replay, registry, streams, fatal = make_replay(
        [path], redis_client, prefix, dead_letters=dead_letters
    )
    await replay.start()
    try:
        await eventually(lambda: replay.done)
    finally:
        await replay.stop()
    assert not fatal
    assert replay.ticks_published == 48
    letters = [
        msgspec.json.decode(payload, type=DeadLetter)
        for _, payload in await streams.read(names.DEAD_LETTERS, count=100)
    ]
    assert [letter.raw for letter in letters] == [
        b"not-a-time,1500000,100,P,1,0",
        f"{OPEN_MS},1.5e6,100".encode(),
    ]
    assert all(letter.source == "files" and "line" in letter.error for letter in letters)
    assert registry.get_sample_value("tickmesh_ingest_decode_errors_total") == 2
    labels = {"service": "ingest", "source_kind": "files"}
    assert letters_registry.get_sample_value("tickmesh_dead_letters_total", labels) == 2


async def run_service(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.ingest",
        *args,
        cwd=REPO,
        env={**os.environ, "INGEST_HTTP_PORT": "0", "INGEST_HTTP_HOST": "127.0.0.1", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(40):
        out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_the_service_replays_files_from_its_settings_and_exits_when_done(
    tmp_path: Path, redis_url: str, redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    files = day_files(tmp_path)
    prefix = unique_name("tm")
    code, output = await run_service(
        ["run"],
        {
            "INGEST_REDIS_URL": redis_url,
            "INGEST_KEY_PREFIX": f"{prefix}:",
            "INGEST_SOURCE": "files",
            "INGEST_FILES": ",".join(str(path) for path in files),
            "INGEST_SPEED": "0",
            "INGEST_EXIT_WHEN_DONE": "true",
        },
    )
    assert code == 0, output[-3_000:]
    assert "ingest.files_done" in output
    records = await published(StreamReader(redis_client, Keys(f"{prefix}:")))
    assert (
        sum(
            len(msgspec.json.decode(p, type=TickBatch).ticks)
            for payloads in records.values()
            for p in payloads
        )
        == 700
    )


async def test_the_replay_command_takes_files_and_options(
    tmp_path: Path, redis_url: str, redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    files = day_files(tmp_path)
    prefix = unique_name("tm")
    code, output = await run_service(
        ["replay", *map(str, files), "--speed", "0", "--symbols", "ZQB", "--exit-when-done"],
        {"INGEST_REDIS_URL": redis_url, "INGEST_KEY_PREFIX": f"{prefix}:"},
    )
    assert code == 0, output[-3_000:]
    records = await published(StreamReader(redis_client, Keys(f"{prefix}:")))
    assert set(records) == {"ticks.ZQB"}
    code, output = await run_service(
        ["replay", str(tmp_path / "nope_trade.zip"), "--exit-when-done"],
        {"INGEST_REDIS_URL": redis_url},
    )
    assert code == 78 and "INGEST_FILES" in output, output[-3_000:]


async def test_the_real_spy_day_replays_every_tick(
    shared_data: Path, redis_client: Any, unique_name: Callable[[str], str]
) -> None:
    path = shared_data / "tick" / "spy" / f"{DAY}_trade.zip"
    replay, registry, streams, _ = make_replay(
        [path], redis_client, unique_name("tm"), batch_frames=256
    )
    await replay.start()
    try:
        await eventually(lambda: replay.done, timeout=50)
        last = await streams.last_seq("ticks.SPY")
    finally:
        await replay.stop()
    assert replay.ticks_published == replay.trades_total == 250_601
    assert last == replay.frames_published  # one record per frame: SPY alone
    assert registry.get_sample_value("tickmesh_ingest_events_total", {"type": "T"}) == 250_601
