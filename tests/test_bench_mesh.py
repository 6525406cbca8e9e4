"""The whole-mesh benchmark's arithmetic, its probe's Redis reader, and its report.

The figures themselves are never asserted (speed targets live in bench/); these tests prove
that the bench computes what its docstring says from what it observed. One slow test runs a
short real day (IBM) through the whole mesh and the bench's report (20-45 s here).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import mesh_gauge
from bench_mesh import (
    analyse_synthetic,
    bar_closes,
    collector_paused,
    last_closed_on_event_time,
    resp_publish,
)
from mesh_layout import layout_run, layout_summary_rows, render_layout
from mesh_linger import linger_run, linger_summary_rows, render_linger
from mesh_probe import (
    BarSeen,
    Observations,
    PatternSubscriber,
    Probe,
    ProcessSampler,
    Sample,
    TickSeen,
    ack_times,
    acknowledged_at,
    first_time_at,
    parse_push,
    weighted_percentiles,
)
from mesh_repeat import combine_runs
from mesh_report import SERVICES, render_markdown, summary_rows, targets
from mesh_scale import Setup, parse_setups, render_scale, scale_summary_rows, service_of
from profile_summary import parse_collapsed, summarise
from summary import load, render, row

from libs.common.names import Keys


def test_weighted_percentiles_count_each_trade_of_a_record() -> None:
    # 98 trades at 20 ms in one record outweigh single trades at 10 and 30 ms.
    found = weighted_percentiles([(10.0, 1), (20.0, 98), (30.0, 1)])
    assert found == {"p50": 20.0, "p99": 20.0, "max": 30.0, "count": 100}


def test_weighted_percentiles_p99_reaches_a_tail_of_two_percent() -> None:
    found = weighted_percentiles([(1.0, 98), (500.0, 2)])
    assert found is not None
    assert found["p50"] == 1.0
    assert found["p99"] == 500.0


def test_weighted_percentiles_of_nothing_is_none() -> None:
    assert weighted_percentiles([]) is None
    assert weighted_percentiles([(5.0, 0)]) is None


def test_a_record_is_acknowledged_at_the_first_poll_whose_position_reached_it() -> None:
    # Position 3 at t=1.0, 7 at t=2.0, a rewind to 5 at t=2.5 (ignored), 9 at t=3.0.
    positions, times = ack_times([(1.0, 3), (2.0, 7), (2.5, 5), (3.0, 9)])
    assert positions == [3, 7, 9]
    assert acknowledged_at(positions, times, 1) == 1.0
    assert acknowledged_at(positions, times, 3) == 1.0
    assert acknowledged_at(positions, times, 4) == 2.0
    assert acknowledged_at(positions, times, 9) == 3.0
    assert acknowledged_at(positions, times, 10) is None


def test_first_time_at_finds_when_a_total_was_reached() -> None:
    series = [(1.0, 10), (2.0, 50), (3.0, 100)]
    assert first_time_at(series, 50) == 2.0
    assert first_time_at(series, 51) == 3.0
    assert first_time_at(series, 101) is None


def test_the_last_minute_of_each_symbol_is_not_closed_on_event_time() -> None:
    bars = [
        BarSeen("SPY", 0, 60_000, 0, at=10.0),
        BarSeen("SPY", 60_000, 120_000, 0, at=30.0),  # SPY's last minute: closed when idle
        BarSeen("IBM", 0, 60_000, 0, at=12.0),
        BarSeen("IBM", 60_000, 120_000, 0, at=20.0),  # IBM's last minute
    ]
    assert last_closed_on_event_time(bars) == 12.0


def test_a_close_is_split_from_its_deadline_to_the_probes_last_bar() -> None:
    """A minute ending at 60 s (deadline 61 s with a 1 s grace): handling began at 61.05 s,
    took 30 ms to the sink call, the sink 70 ms (its line logged at 61.15 s), the probe saw
    the last timed bar at 61.2 s. A close outside the window and a revision's arrival do not
    count; a close whose bars the probe did not see has no arrival."""
    logged = "2026-01-01T00:01:01.150000+00:00"
    base = 1_767_225_600_000  # 2026-01-01 00:00 UTC, ms
    end = base + 60_000
    events = [
        {"event": "bars.published", "timestamp": logged, "end_ms": end, "bars": 2,
         "handle_ms": 30.0, "sink_ms": 70.0},
        {"event": "bars.published", "timestamp": logged, "end_ms": base, "bars": 2,
         "handle_ms": 1.0, "sink_ms": 1.0},  # before the window
        {"event": "bars.published", "timestamp": "2026-01-01T00:02:01.100000+00:00",
         "end_ms": end + 60_000, "bars": 1, "handle_ms": 5.0, "sink_ms": 5.0},
    ]  # fmt: skip
    seen = [
        BarSeen("A", end - 60_000, end, 0, at=(end + 1_180) / 1000),
        BarSeen("B", end - 60_000, end, 0, at=(end + 1_200) / 1000),
    ]
    closes = bar_closes(events, seen, grace_ms=1_000, window_ms=(end - 1, end + 60_000))
    assert closes == [
        {"endMs": end, "bars": 2, "startMs": 50.0, "handleMs": 30.0, "sinkMs": 70.0,
         "toProbeMs": 50.0, "totalMs": 200.0},
        {"endMs": end + 60_000, "bars": 1, "startMs": 90.0, "handleMs": 5.0, "sinkMs": 5.0,
         "toProbeMs": None, "totalMs": None},
    ]  # fmt: skip
    report = render_markdown(
        {**RESULTS, "synthetic": {**RESULTS["synthetic"], "barCloses": {"redis": closes}}}
    )
    assert "| redis | 2 | 50.0 | 30.0 | 70.0 | 50.0 | 200.0 |" in report
    assert "| redis | 1 | 90.0 | 5.0 | 5.0 | - | - |" in report


def synthetic_args(symbols: int) -> argparse.Namespace:
    """Scenario (b)'s options: a 20 s warm-up, a 1 s grace."""
    return argparse.Namespace(
        warmup_s=20.0, synthetic_symbols=symbols, rate=10, grace_ms=1000, poll_ms=10,
        topic_mode="single", probe_ticks="ticks.*",
    )  # fmt: skip


def test_latencies_count_only_the_measured_window_and_first_bar_deliveries() -> None:
    # Feed from t=1000 s to 1100 s, warm-up 20 s: the window is [1020, 1100].
    args = synthetic_args(2)
    seen = Observations(
        ticks=[
            TickSeen("ticks.A", 1, 1_010_000, 5, at=1010.002),  # warm-up: not counted
            TickSeen("ticks.A", 2, 1_030_000, 3, at=1030.004),
            TickSeen("ticks.B", 1, 1_050_000, 1, at=1050.100),
            TickSeen("ticks.B", 2, 1_099_000, 2, at=1099.001),  # never acknowledged
        ],
        acked={
            "ticks.A": [(1010.05, 1), (1030.02, 2)],
            "ticks.B": [(1050.30, 1)],
            "bars.A.1m": [(1061.2, 1)],
        },
        redis_bars=[
            BarSeen("A", 1_000_000, 1_020_000, 0, at=1021.05),  # minute ends in the window
            BarSeen("A", 1_000_000, 1_020_000, 1, at=1040.0),  # a revision: not counted
            BarSeen("A", 1_060_000, 1_120_000, 0, at=1102.0),  # ends after the last trade
            # ended before the last trade (1,099,000), but its deadline (end + the 1 s grace)
            # came after it: no trade could close it, ingest's idle mark did, 3 s later
            BarSeen("B", 1_038_500, 1_098_500, 0, at=1101.5),
        ],
        kafka_bars=[
            BarSeen("A", 1_000_000, 1_020_000, 0, at=1021.2),
            BarSeen("A", 1_000_000, 1_020_000, 0, at=1025.0),  # re-delivered: first counts
        ],
    )
    result = analyse_synthetic(
        args, seen, ProcessSampler({}), {"eventsGenerated": 11, "framesGenerated": 4},
        first=1000.0, last_frame=1100.0, tick_records=9,
    )  # fmt: skip
    latency = result["latencyMs"]
    assert latency["tickToRedis"] == {"p50": 4.0, "p99": 100.0, "max": 100.0, "count": 6}
    assert latency["tickToKafka"] == {"p50": 20.0, "p99": 300.0, "max": 300.0, "count": 4}
    assert result["tradesNotAcknowledged"] == 2
    assert latency["tickToBarRedis"] == {"p50": 1050.0, "p99": 1050.0, "max": 1050.0, "count": 1}
    assert latency["tickToBarKafka"]["max"] == 1200.0
    assert latency["tickToBarKafka"]["count"] == 1
    # rates count the whole feed: the events sent and every channel's records (a probe that
    # times a sample of the channels does not change them); trades/record: the timed window
    assert result["achievedTicksPerS"] == round(11 / 100)
    assert result["recordsPerS"] == round(9 / 100)
    assert (result["tickRecords"], result["sampledRecords"]) == (9, 4)
    assert result["tradesPerRecord"] == 2.0
    assert result["eventsPerFrame"] == 2.8
    assert result["allChannelsInKafkaAfterS"] == 50.3
    assert result["channelsInKafka"] == 2
    assert result["probeMissedRecords"] == 0


def test_ticks_sent_in_a_minutes_close_are_timed_apart() -> None:
    """A tick sent from a minute's end to the grace plus 2 s after it is in the minute's close
    (every bar closes then); the rest of the minute is timed apart."""
    args = synthetic_args(1)
    seen = Observations(
        ticks=[
            TickSeen("ticks.A", 1, 1_020_500, 1, at=1020.600),  # 0.5 s into a minute
            TickSeen("ticks.A", 2, 1_022_900, 1, at=1022.950),  # 2.9 s
            TickSeen("ticks.A", 3, 1_023_000, 1, at=1023.005),  # 3 s: past the close
            TickSeen("ticks.A", 4, 1_050_000, 1, at=1050.010),
        ],
        acked={"ticks.A": [(1020.700, 1), (1023.100, 3), (1050.020, 4)]},
    )
    result = analyse_synthetic(
        args, seen, ProcessSampler({}), {"eventsGenerated": 4, "framesGenerated": 4},
        first=1000.0, last_frame=1100.0, tick_records=4,
    )  # fmt: skip
    latency = result["latencyMs"]
    assert result["closeBurstMs"] == 3_000
    assert latency["tickToRedisInClose"] == {"p50": 50.0, "p99": 100.0, "max": 100.0, "count": 2}
    assert latency["tickToRedisOutsideClose"] == {"p50": 5.0, "p99": 10.0, "max": 10.0, "count": 2}
    assert latency["tickToKafkaInClose"] == {"p50": 200.0, "p99": 200.0, "max": 200.0, "count": 2}
    assert latency["tickToKafkaOutsideClose"]["max"] == 100.0
    assert latency["tickToKafka"]["count"] == 4
    results = {**RESULTS, "synthetic": {**RESULTS["synthetic"], **result}}
    text = render_markdown(results)
    assert "| tick → Kafka, sent in a minute's close (its first 3 s) | 200.0 | 200.0 |" in text
    assert "| tick → Redis, sent in the rest of the minute | 5.0 | 10.0 | 10.0 | 2 |" in text
    assert any(
        "close (its first 3 s) 200.0 ms, in the rest of the minute 100.0 ms" in line
        for line in targets(results)
    )


def test_the_bench_runs_no_automatic_collection_while_the_probe_watches() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("a scenario that failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()


def test_parse_push_reads_messages_split_anywhere() -> None:
    confirm = b"*3\r\n$10\r\npsubscribe\r\n$7\r\nticks.*\r\n:1\r\n"
    message = b"*4\r\n$8\r\npmessage\r\n$7\r\nticks.*\r\n$9\r\nticks.SPY\r\n$5\r\nab\r\nc\r\n"
    stream = confirm + message + message
    for cut in range(len(stream)):
        items, rest = parse_push(stream[:cut])
        more, rest = parse_push(rest + stream[cut:])
        assert items + more == [
            [b"psubscribe", b"ticks.*", b"1"],
            [b"pmessage", b"ticks.*", b"ticks.SPY", b"ab\r\nc"],
            [b"pmessage", b"ticks.*", b"ticks.SPY", b"ab\r\nc"],
        ]
        assert rest == b""


def test_parse_push_refuses_what_is_not_an_array() -> None:
    with pytest.raises(ValueError, match="unexpected reply"):
        parse_push(b"-ERR wrong\r\n")


@pytest.mark.integration
@pytest.mark.timeout(30)
async def test_the_probe_subscriber_reads_what_redis_publishes(
    redis_url: str, redis_client: object, unique_name: object
) -> None:
    prefix = unique_name("probe")  # type: ignore[operator]
    subscriber = await PatternSubscriber.open(redis_url, [f"{prefix}.*"])
    try:
        payloads = [b'{"seq":%d}' % n for n in range(1, 201)] + [b"x" * 100_000]
        for payload in payloads:
            await redis_client.publish(f"{prefix}.a", payload)  # type: ignore[attr-defined]
        got: list[tuple[bytes, bytes]] = []
        while len(got) < len(payloads):
            got += await asyncio.wait_for(subscriber.read(), 10)
        assert [payload for _, payload in got] == payloads
        assert {channel for channel, _ in got} == {f"{prefix}.a".encode()}
    finally:
        await subscriber.close()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_the_probe_adds_up_the_positions_of_every_mirror_instance(
    redis_url: str, kafka_bootstrap: str, unique_name: object
) -> None:
    """Two mirror instances keep their positions in two hashes, one channel each: Kafka has
    acknowledged everything only when both have reached their channel's sequence."""
    import redis as sync_redis

    prefix = f"{unique_name('probe')}:"  # type: ignore[operator]
    keys = Keys(prefix)
    client = sync_redis.Redis.from_url(redis_url)
    client.mset({keys.seq("ticks.A"): 5, keys.seq("ticks.B"): 7})
    client.hset(keys.state("positions:mirror-1of2"), mapping={"ticks.A": 5})
    probe = Probe(
        redis_url,
        kafka_bootstrap,
        tick_pattern=None,
        seq_channels=["ticks.A", "ticks.B"],
        poll_ms=10,
        key_prefix=prefix,
        mirror_consumers=["mirror-1of2", "mirror-2of2"],
    )
    probe.start()
    try:
        wait_until(lambda: probe.seen.seq_totals and probe.seen.acked_totals)
        wait_until(lambda: probe.backlog() == 7)  # ticks.B: nothing acknowledged yet
        client.hset(keys.state("positions:mirror-2of2"), mapping={"ticks.B": 7})
        wait_until(lambda: probe.backlog() == 0)
    finally:
        seen = probe.stop()
        client.close()
    assert seen.seq_totals[-1][1] == 12
    assert seen.acked_totals[-1][1] == 12
    assert [position for _, position in seen.acked["ticks.B"]] == [7]


def wait_until(condition: object, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_resp_publish_is_one_publish_command() -> None:
    assert resp_publish("ticks.A", b"x\r\ny") == (
        b"*3\r\n$7\r\nPUBLISH\r\n$7\r\nticks.A\r\n$4\r\nx\r\ny\r\n"
    )


def test_profile_summary_shares_self_and_inclusive_samples() -> None:
    lines = [
        "<module> (services/x/__main__.py:1);run (libs/common/runtime/service.py:9);"
        "handle (services/x/core.py:20);encode (msgspec/json.py:3) 60",
        "<module> (services/x/__main__.py:1);run (libs/common/runtime/service.py:9);"
        "handle (services/x/core.py:21) 30",
        "<module> (services/x/__main__.py:1);select (selectors.py:468) 10",
        "a line that is not a stack",
    ]
    summary = summarise(parse_collapsed(lines))
    assert summary["samples"] == 100
    assert summary["self"] == [
        ("encode (msgspec/json.py)", 60.0),
        ("handle (services/x/core.py)", 30.0),
        ("select (selectors.py)", 10.0),
    ]
    inclusive = dict(summary["inclusive"])  # type: ignore[arg-type]
    assert inclusive["handle (services/x/core.py)"] == 90.0
    assert "encode (msgspec/json.py)" not in inclusive  # only the project's own code
    assert "<module> (services/x/__main__.py)" not in inclusive  # on every stack: no news


def test_summary_table_keeps_basis_and_failures(tmp_path: Path) -> None:
    path = tmp_path / "summary.jsonl"
    path.write_text(
        json.dumps(row("b", "records/s", "10,000", "naive 1,000", 10.0, "like for like"))
        + "\n"
        + '{"bench": "c", "figure": "FAILED (exit 1)", "result": "see c.txt"}\n'
        + "not json\n"
    )
    table = render(load(path))
    assert "| b | records/s | 10,000 | naive 1,000 | 10.00x | like for like |" in table
    assert "| c | FAILED (exit 1) | see c.txt |" in table
    assert "line 3 unreadable" in table


RESULTS = {
    "machine": "test",
    "realDay": {
        "day": "2013-10-07",
        "symbols": ["IBM"],
        "ticks": 24_000,
        "tickRecords": 20_000,
        "tradesPerRecord": 1.2,
        "barsRedis": 450,
        "barsKafka": 450,
        "feedSeconds": 1.0,
        "to": {
            "redis": {"seconds": 2.0, "ticksPerS": 12_000, "recordsPerS": 10_000,
                      "afterLastFrameS": 1.0},
            "kafka": {"seconds": 2.5, "ticksPerS": 9_600, "recordsPerS": 8_000,
                      "afterLastFrameS": 1.5},
            "barRedis": None,
            "barKafka": None,
            "barRedisEventTime": {"seconds": 3.0, "ticksPerS": 8_000, "recordsPerS": 6_667,
                                  "afterLastFrameS": 2.0},
            "barKafkaEventTime": None,
        },
        "ceilings": {"records": 20_000, "trades": 24_000, "tradesPerRecord": 1.2,
                     "publishRecordsPerS": 400_000, "publishTicksPerS": 480_000,
                     "produceRecordsPerS": 80_000, "produceTicksPerS": 96_000},
        "processes": {"ingest": {"cpuSeconds": 1.0, "cpuPct": 40.0, "rssStartMb": 50.0,
                                 "rssEndMb": 52.0, "rssPeakMb": 53.0}},
        "notes": [],
    },
    "synthetic": {
        "symbols": 1000, "offeredRate": 20_000, "windowSeconds": 60.0, "warmupSeconds": 20.0,
        "graceMs": 1000, "pollMs": 10, "achievedTicksPerS": 19_900,
        "latencyMs": {
            "tickToRedis": {"p50": 2.0, "p99": 9.0, "max": 30.0, "count": 10},
            "tickToKafka": {"p50": 20.0, "p99": 150.0, "max": 300.0, "count": 10},
            "tickToBarRedis": {"p50": 1010.0, "p99": 1050.0, "max": 1090.0, "count": 5},
            "tickToBarKafka": None,
        },
        "processes": {
            "mirror": {"cpuSeconds": 30.0, "cpuPct": 50.0, "rssStartMb": 60.0,
                       "rssMidMb": 60.5, "rssEndMb": 61.0, "rssPeakMb": 62.0},
            "bars": {"cpuSeconds": 20.0, "cpuPct": 33.0, "rssStartMb": 100.0,
                     "rssMidMb": 100.8, "rssEndMb": 100.9, "rssPeakMb": 101.0},
            "simulator": {"cpuSeconds": 9.0, "cpuPct": 15.0, "rssStartMb": 60.0,
                          "rssMidMb": 110.0, "rssEndMb": 160.0, "rssPeakMb": 160.0},
        },
        "notes": ["a note"],
    },
}  # fmt: skip


def test_the_report_states_hops_against_ceilings_and_targets() -> None:
    text = render_markdown(RESULTS)
    assert "| ingest → Redis vs pipelined PUBLISH | 10,000 | 400,000 | 2.5 % |" in text
    assert "| → Kafka (mirror) vs raw aiokafka produce | 8,000 | 80,000 | 10.0 % |" in text
    assert "| tick → Kafka (acknowledged) | 20.0 | 150.0 | 300.0 | 10 |" in text
    assert "| tick → bar on Kafka, shadow (from minute end) | - | - | - | 0 |" in text
    assert "- a note" in text
    found = targets(RESULTS)
    # The slowest end counted: the Redis bars closed on event time (8,000 ticks/s).
    assert any("8,000 ticks/s" in line and "not met" in line for line in found)
    assert any("150.0 ms (not met)" in line for line in found)
    assert any("1,050.0 ms (met)" in line for line in found)
    # The simulator keeps a bounded number of trades: its growth is judged with the services'
    # (here, it keeps growing: a leak).
    assert any(
        "+100.0 MiB (simulator); in its second half +50.0 MiB (simulator)" in line for line in found
    )
    # Growth over the window and in its second half (a leak keeps growing; a high-water mark
    # reached early does not): bars grew less in all, the mirror more late.
    flat = {**RESULTS["synthetic"], "processes": dict(RESULTS["synthetic"]["processes"])}
    del flat["processes"]["simulator"]
    found = targets({**RESULTS, "synthetic": flat})
    assert any("+1.0 MiB (mirror); in its second half +0.5 MiB (mirror)" in line for line in found)
    assert "| bars | 20.0 | 33 | - / - | 100 | 101 | 101 | 101 |" in text
    # The reconciler's tally grows by design: said, and the others' largest growth beside it
    tally = {"cpuSeconds": 1.0, "cpuPct": 2.0, "rssStartMb": 100.0, "rssMidMb": 120.0,
             "rssEndMb": 140.0, "rssPeakMb": 140.0}  # fmt: skip
    flat["processes"]["mirror-reconciler"] = tally
    found = targets({**RESULTS, "synthetic": flat})
    assert any(
        "+40.0 MiB (mirror-reconciler)" in line
        and "the reconciler keeps the day's tally (docs/parity.md), of the others +1.0 MiB (mirror)"
        in line
        for line in found
    )
    # Only a server sampled (no service judged): said, not a crash
    found = targets(_with_processes({"tansu": RESULTS["synthetic"]["processes"]["simulator"]}))
    assert any("no service's RSS was sampled (not judged)" in line for line in found)


def test_the_sampler_gives_each_halfs_cpu_so_that_a_growing_cost_shows() -> None:
    sampler = ProcessSampler({})
    # a broker whose cost grows with what it holds: 20 % of a core, then 60 %
    sampler.samples["tansu"] = [
        Sample(9.0, 0.0, 40.0),
        Sample(10.0, 0.0, 40.0),
        Sample(15.0, 1.0, 50.0),
        Sample(20.0, 4.0, 60.0),
        Sample(21.0, 4.5, 60.0),
    ]
    found = sampler.window(10.0, 20.0)["tansu"]
    assert found["cpuSeconds"] == 4.0
    assert found["cpuPct"] == 40.0
    assert (found["cpuPctFirstHalf"], found["cpuPctSecondHalf"]) == (20.0, 60.0)
    assert (found["rssStartMb"], found["rssMidMb"], found["rssEndMb"]) == (40.0, 50.0, 60.0)
    row = next(
        line
        for line in render_markdown(
            _with_processes({**RESULTS["synthetic"]["processes"], "tansu": found})
        ).splitlines()
        if line.startswith("| tansu |")
    )
    assert row == "| tansu | 4.0 | 40 | 20 / 60 | 40 | 50 | 60 | 60 |"


def _with_processes(processes: dict[str, object]) -> dict[str, object]:
    """RESULTS with these processes in scenario (b)."""
    return {**RESULTS, "synthetic": {**RESULTS["synthetic"], "processes": processes}}


def _run(kafka: float, bar: float, cpu: float) -> dict[str, object]:
    """A synthetic run of RESULTS's shape with these p99s and CPU seconds (no ceilings)."""
    syn = RESULTS["synthetic"]
    latency = {
        **syn["latencyMs"],
        "tickToKafka": {"p50": 20.0, "p99": kafka, "max": 300.0, "count": 10},
        "tickToBarRedis": {"p50": 1010.0, "p99": bar, "max": 1500.0, "count": 5},
    }
    bars = {**syn["processes"]["bars"], "cpuSeconds": cpu}
    return {**syn, "latencyMs": latency, "processes": {**syn["processes"], "bars": bars}}


def _gauge(before: float, median: float, after: float) -> dict[str, object]:
    """A run's machine gauge (ms) with 30 samples during it, 8.2 to 15.0 ms."""
    during = {"medianMs": median, "fastestMs": 8.2, "slowestMs": 15.0, "samples": 30}
    return {"beforeMs": before, "during": during, "afterMs": after}


def test_repeated_runs_are_judged_on_the_median_of_their_p99s() -> None:
    """Three runs: the tables are the median run's by p99 tick → Kafka (with the first run's
    ceilings), each target is judged on the median of the three p99s of its own latency, and
    every run's figure is shown. A run that failed is listed and left out of the medians."""
    first = {
        **_run(150.0, 1050.0, 110.0),
        "ceilings": RESULTS["realDay"]["ceilings"],
        "machineGauge": _gauge(8.0, 9.1, 8.2),
    }
    slow = {**_run(300.0, 1120.0, 120.0), "machineGauge": _gauge(8.4, 13.65, 9.0)}
    runs = [first, _run(90.0, 1150.0, 100.0), slow, {"error": "no feed"}]
    syn = combine_runs(runs)
    assert syn["repeatShown"] == 1  # p99 tick → Kafka 90, 150, 300: the median is run 1's
    assert syn["ceilings"] == RESULTS["realDay"]["ceilings"]
    results = {**RESULTS, "synthetic": syn}
    found = targets(results)
    assert any("median of 3 runs (150.0, 90.0, 300.0 ms) 150.0 ms (not met)" in x for x in found)
    # bars: 1,050, 1,150, 1,120: the median 1,120 misses grace + 100, though run 1 met it
    assert any("median of 3 runs (1,050.0, 1,150.0, 1,120.0 ms) 1,120.0 ms (not met)" in x
               for x in found)  # fmt: skip
    text = render_markdown(results)
    assert "Scenario (b) ran 4 times, each on a fresh stack; the tables above are run 1's" in text
    assert "| 2 | 9.0 | 90.0 | 1,150.0 | - | 139.0 | - |" in text  # 30 + 100 + 9 CPU s
    assert "| 3 | 9.0 | 300.0 | 1,120.0 | - | 159.0 | 8.4 · 13.7 (8.2–15.0) · 9.0 |" in text
    assert "| 4 | no feed |" in text
    assert "| median | 9.0 | 150.0 | 1,120.0 | - | | |" in text
    # the run shown is run 1: its gauge under its process table, and the bench's spread
    assert "30 samples during it), before · during, median (fastest–slowest) · after: " in text
    assert "after: 8.0 · 9.1 (8.2–15.0) · 8.2" in text
    rows = {item["figure"]: item for item in summary_rows(results)}
    bar_row = "1000 symbols at 19,900 ticks/s: p99 tick → bar, Redis, median of 3 runs"
    assert rows[f"{bar_row} (1,050.0, 1,150.0, 1,120.0 ms)"]["result"] == "1,120.0 ms"
    # the slowest run's median gauge during it (run 3's) against the fastest run's (run 1's)
    gauge = rows["machine gauge during a run (its median), the slowest run"]
    assert (gauge["result"], gauge["against"]) == ("13.7 ms", "fastest run 9.1 ms")
    assert gauge["ratio"] == 1.5
    # the median run shown when the first is not it: the ceilings still come from the first
    syn = combine_runs([first, _run(20.0, 1000.0, 90.0), _run(50.0, 1000.0, 95.0)])
    assert syn["repeatShown"] == 3 and syn["ceilings"] == first["ceilings"]
    assert combine_runs([first]) is first  # one run: as it was


def test_summary_rows_compare_the_same_records_with_their_ceilings() -> None:
    rows = {item["figure"]: item for item in summary_rows(RESULTS)}
    kafka = rows["real day to Kafka, records/s (1.2 trades/record)"]
    assert kafka["ratio"] == 0.1
    assert str(kafka["basis"]).startswith("like for like")
    assert rows["1000 symbols at 19,900 ticks/s: p99 tick → Kafka"]["result"] == "150.0 ms"


def test_scale_setups_parse_as_bars_by_mirror_and_records_mode() -> None:
    assert parse_setups("1x1:frame, 2x1:batch,") == [
        Setup(1, 1, "frame"),
        Setup(2, 1, "batch"),
    ]
    assert Setup(2, 2, "batch").label == "bars x2, mirror x2, batch"
    for wrong in ("2:frame", "0x1:frame", "1x1:lines", ""):
        with pytest.raises(ValueError):
            parse_setups(wrong)


def test_a_process_belongs_to_its_service_whatever_its_instance() -> None:
    assert service_of("bars-shadow-2of2") == "bars-shadow"
    assert service_of("bars-1of2") == "bars"
    assert service_of("bars-shadow") == "bars-shadow"
    assert service_of("engine_bridge") == "engine_bridge"


def _scale_run(setup: str, records: str, per_record: float, kafka: int, cpu: dict[str, float]):  # type: ignore[no-untyped-def]
    to = {"seconds": 1.0, "ticksPerS": kafka, "recordsPerS": 1, "afterLastFrameS": 0.1}
    found = re.match(r"bars x(\d+), mirror x(\d+)", setup)
    assert found is not None
    bars, mirrors = int(found[1]), int(found[2])
    return {
        "setup": setup,
        "barsShards": bars,
        "mirrorInstances": mirrors,
        "ingestRecords": records,
        "tradesPerRecord": per_record,
        "barsRedis": 453,
        "barsKafka": 453,
        "loadAverage": [2.5, 3.0],
        "to": {"kafka": to, "barRedisEventTime": to, "barKafkaEventTime": None},
        "processes": {
            name: {"cpuSeconds": value, "cpuPct": 10 * value, "rssStartMb": 0, "rssEndMb": 0,
                   "rssPeakMb": 0}
            for name, value in cpu.items()
        },
        "notes": [],
    }  # fmt: skip


SCALE = {
    "machine": "test",
    "scale": {
        "day": "2013-10-07",
        "symbols": ["IBM"],
        "runs": [
            _scale_run("bars x2, mirror x1, frame", "frame", 1.2, 6_000, {"ingest": 4.0}),
            {**_scale_run("bars x1, mirror x1, frame", "frame", 1.2, 8_000,
                          {"ingest": 4.0, "bars": 3.0, "bars-shadow": 2.0, "mirror": 5.0,
                           "mirror-reconciler": 0.5, "tansu": 9.0}),
             "machineGauge": _gauge(8.0, 9.0, 8.5)},
            _scale_run("bars x2, mirror x2, frame", "frame", 1.2, 10_000,
                       {"ingest": 4.0, "bars-1of2": 1.5, "bars-2of2": 2.0,
                        "bars-shadow-1of2": 1.0, "bars-shadow-2of2": 1.5,
                        "mirror-1of2": 3.0, "mirror-2of2": 3.5}),
            _scale_run("bars x1, mirror x1, batch", "batch", 12.0, 40_000, {"ingest": 1.0}),
            {"setup": "bars x1, mirror x2, frame", "skipped": "past --scale-budget-s 10"},
        ],
    },
}  # fmt: skip


def test_the_scale_table_sums_each_service_over_its_instances() -> None:
    text = render_scale(SCALE)
    rows = [line for line in text.splitlines() if line.startswith("| bars x")]
    assert "| 0.75x |" in rows[0]  # against the baseline, which ran second
    assert rows[1] == (
        "| bars x1, mirror x1, frame | 1.2 | 453 / 453 | 8,000 | 8,000 | - | 1.00x | 4.0 | 3.0 "
        "| 2.0 | 5.0 | 0.5 | - | 14.5 | 2.35 | 2.5, 3.0 | 8.0 · 9.0 (8.2–15.0) · 8.5 |"
    )
    assert rows[0].endswith("| 2.5, 3.0 | - |")  # no gauge taken: said so
    assert "| 3.5 (1.5 + 2.0) | 2.5 (1.0 + 1.5) | 6.5 (3.0 + 3.5) |" in rows[2]
    assert "| 1.25x |" in rows[2] and "| 16.5 |" in rows[2]
    assert rows[4] == "| bars x1, mirror x2, frame | skipped: past --scale-budget-s 10 |"


def test_scale_rows_compare_with_the_first_setup_and_label_other_record_modes() -> None:
    rows = {item["figure"]: item for item in scale_summary_rows(SCALE)}
    split = rows["real day, ticks/s to Kafka, bars x2, mirror x2, frame"]
    assert split["ratio"] == 1.25
    assert str(split["basis"]).startswith("like for like")
    batch = rows["real day, ticks/s to Kafka, bars x1, mirror x1, batch"]
    assert batch["ratio"] == 5.0
    assert batch["basis"] == "same trades; 12.0 vs 1.2 trades/record"
    assert rows["real day, ticks/s to Kafka, bars x2, mirror x1, frame"]["ratio"] == 0.75
    assert len(rows) == 3  # every run but the baseline: one run had a gauge, no spread to show


def test_a_batch_setup_is_judged_against_the_real_day_target_on_its_slowest_path() -> None:
    def rate(value: int) -> dict[str, float]:
        return {"seconds": 1.0, "ticksPerS": value, "recordsPerS": 1, "afterLastFrameS": 0.1}

    fast = _scale_run("bars x1, mirror x1, batch", "batch", 240.0, 120_000, {"ingest": 1.0})
    fast["to"] = {"kafka": rate(120_000), "barRedisEventTime": rate(101_000),
                  "barKafkaEventTime": rate(110_000)}  # fmt: skip
    slow = {**fast, "setup": "bars x2, mirror x2, batch",
            "to": {**fast["to"], "barKafkaEventTime": rate(99_000)}}  # fmt: skip
    runs = [SCALE["scale"]["runs"][1], fast, slow]  # type: ignore[index]
    rows = scale_summary_rows({"scale": {"runs": runs}})
    targets = [item for item in rows if item["against"] == "target 100,000"]
    assert [(item["figure"], item["result"]) for item in targets] == [
        (
            "real day, ticks/s to the slowest of Kafka and the bars closed on event time, "
            "bars x1, mirror x1, batch (met)",
            "101,000",
        ),
        (
            "real day, ticks/s to the slowest of Kafka and the bars closed on event time, "
            "bars x2, mirror x2, batch (not met)",
            "99,000",
        ),
    ]


def _synthetic_result(p99_redis: float, p99_kafka: float, ingest_cpu: float, per: float):  # type: ignore[no-untyped-def]
    def stats(p99: float) -> dict[str, float]:
        return {"p50": p99 / 2, "p99": p99, "max": p99 * 2, "count": 1000}

    return {
        "achievedTicksPerS": 5000,
        "recordsPerS": round(5000 / per),
        "tradesPerRecord": per,
        "windowSeconds": 10.0,
        "latencyMs": {"tickToRedis": stats(p99_redis), "tickToKafka": stats(p99_kafka)},
        "processes": {
            "ingest": {"cpuSeconds": ingest_cpu},
            "mirror": {"cpuSeconds": 1.0},
            "simulator": {"cpuSeconds": 9.0},  # not a service: not in the services' sum
        },
        "tradesNotAcknowledged": 0,
        "notes": [],
    }


def test_the_linger_comparison_sets_each_p99_against_no_linger() -> None:
    linger = {
        "symbols": 1000,
        "offeredRate": 5000,
        "lingerMs": 5,
        "warmupSeconds": 10.0,
        "measureSeconds": 10.0,
        "runs": [
            linger_run(0, _synthetic_result(4.0, 20.0, 2.0, 1.1), SERVICES),
            linger_run(5, _synthetic_result(10.0, 25.0, 1.0, 3.3), SERVICES),
        ],
    }
    assert linger["runs"][0]["servicesCpuSeconds"] == 3.0
    rows = {item["figure"]: item for item in linger_summary_rows(linger)}
    redis = rows["INGEST_LINGER_MS=5 at 5,000 ticks/s: p99 tick → Redis"]
    assert (redis["result"], redis["against"], redis["ratio"]) == (
        "10.0 ms",
        "linger 0: 4.0 ms",
        2.5,
    )
    assert rows["INGEST_LINGER_MS=5 at 5,000 ticks/s: p99 tick → Kafka"]["ratio"] == 1.25
    cpu = rows["INGEST_LINGER_MS=5: ingest CPU s (trades/record 3.3 vs 1.1)"]
    assert cpu["ratio"] == 0.5
    table = "\n".join(render_linger(linger))
    assert "| 5 | 5,000 | 1,515 | 3.3 | 5.0 / 10.0 | 12.5 / 25.0 | 1.0 | 2.0 |" in table
    failed = {**linger, "runs": [linger["runs"][0], linger_run(5, {"error": "no feed"}, SERVICES)]}
    assert linger_summary_rows(failed) == []
    assert "| 5 | no feed |" in "\n".join(render_linger(failed))


def test_the_layout_comparison_sets_one_topic_against_a_topic_per_symbol() -> None:
    def result(p99_kafka: float, broker: float, batches: int):  # type: ignore[no-untyped-def]
        out = _synthetic_result(10.0, p99_kafka, 2.0, 1.1)
        out["processes"]["tansu"] = {"cpuSeconds": broker}
        out["mirrorBatches"] = {"batches": batches, "records": 12_000}
        return out

    layout = {
        "symbols": 1000,
        "offeredRate": 20_000,
        "measureSeconds": 60.0,
        "runs": [
            layout_run("single", result(400.0, 6.0, 100)),
            layout_run("per-symbol", result(20_000.0, 24.0, 400)),
        ],
    }
    rows = {item["figure"]: item for item in layout_summary_rows(layout)}
    kafka = rows["1000 symbols at 20,000 ticks/s, ticks in one topic: p99 tick → Kafka"]
    assert (kafka["result"], kafka["against"], kafka["ratio"]) == (
        "400.0 ms",
        "a topic per symbol: 20,000.0 ms",
        0.02,
    )
    assert rows["ticks in one topic: broker CPU s"]["ratio"] == 0.25
    table = "\n".join(render_layout(layout))
    one = "| one topic | 5,000 | 5.0 / 10.0 | 200.0 / 400.0 | - | 120.0 | 6.0 | 1.0 | 0.0 |"
    assert one in table
    assert "| a topic per symbol | 5,000 |" in table
    failed = {**layout, "runs": [layout["runs"][0], layout_run("per-symbol", {"error": "x"})]}
    assert layout_summary_rows(failed) == []
    assert "| a topic per symbol | x |" in "\n".join(render_layout(failed))


@pytest.mark.slow  # 20-45 s here, with the machine's load: over the default suite's budget
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_short_real_day_runs_through_the_whole_mesh(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "mesh.json"
    summary = tmp_path / "summary.jsonl"
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_mesh.py"),
            "--only",
            "day",
            "--symbols",
            "IBM",
            "--ceiling-records",
            "5000",
            "--json",
            str(out),
            "--summary",
            str(summary),
        ],
        env={**os.environ, "TICKMESH_DATA": str(shared_data)},
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    day = json.loads(out.read_text())["realDay"]
    assert day["ticks"] == 24_293  # IBM's trades on 2013-10-07, every one through ingest
    assert day["tickRecords"] > 0
    assert day["barsRedis"] == day["barsKafka"] > 0
    for end in ("redis", "kafka", "barRedis", "barKafka"):
        assert day["to"][end]["seconds"] > 0
    assert day["ceilings"]["records"] == 5000
    assert "| ingest → Redis vs pipelined PUBLISH |" in completed.stdout
    assert "bench_mesh" in summary.read_text()


def test_the_machine_gauge_times_the_same_work_every_time() -> None:
    """The gauge's workload is fixed: the same records, decoded, de-duplicated and aggregated
    into the same bars (50 symbols, two minutes each) whenever it runs; a sample is its CPU
    time over the first records, and a run without a gauge has nothing to report."""
    records = mesh_gauge.records()
    assert len(records) == mesh_gauge.RECORDS
    assert mesh_gauge.work(records) == mesh_gauge.work(records) == 2 * mesh_gauge.SYMBOLS
    assert mesh_gauge.gauge_ms(samples=1) > 0
    assert mesh_gauge.gauge_line({}) == [] and mesh_gauge.gauge_cell({}) == "-"
    one = {"machineGauge": _gauge(8.0, 9.0, 8.5)}
    assert mesh_gauge.gauge_summary_rows(one, "bench_mesh") == []  # one run: no spread
    no_samples = {"machineGauge": {"beforeMs": 8.0, "during": None, "afterMs": None}}
    assert mesh_gauge.gauge_cell(no_samples) == "8.0 · - · -"
    found = mesh_gauge.sample_figures("1.0 9.5\n2.0 8.0\n\n3.0 12.25\n")
    assert found == {"medianMs": 9.5, "fastestMs": 8.0, "slowestMs": 12.25, "samples": 3}
    assert mesh_gauge.sample_figures("") is None
    assert (mesh_gauge.during_median(found), mesh_gauge.during_median(None)) == ("9.5", "-")


@pytest.mark.timeout(60)
def test_the_run_gauge_samples_in_a_process_of_its_own(tmp_path: Path) -> None:
    """The gauge during a run is a process of its own that writes a sample a period until
    stopped; stopping it twice is harmless."""
    gauge = mesh_gauge.RunGauge(tmp_path / "gauge.txt", every_s=0.05).start()
    assert gauge.process is not None
    wait_until(lambda: len((tmp_path / "gauge.txt").read_text().splitlines()) >= 3)
    found = gauge.stop()
    assert gauge.process.poll() is not None
    assert found is not None and found["samples"] >= 3
    assert 0 < found["fastestMs"] <= found["medianMs"] <= found["slowestMs"]
    assert gauge.stop() is not None
    assert (tmp_path / "gauge.txt.err").read_text() == ""  # it said nothing wrong
    # the same around a block (bench_mirror's and bench_dashboard's runs)
    with mesh_gauge.gauged(tmp_path / "block.txt", every_s=0.05) as block:
        wait_until(lambda: len((tmp_path / "block.txt").read_text().splitlines()) >= 2)
        assert block["during"] is None  # known at the block's end
    assert block["during"] is not None and block["during"]["samples"] >= 2
    assert mesh_gauge.during_cell(block["during"]).count("–") == 1
    assert mesh_gauge.during_cell(None) == "-"
