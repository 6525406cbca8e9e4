"""The whole mesh as separate processes on the local stack: throughput, latency, cost, ceilings.

Everything runs on this machine, each scenario on a fresh local stack (``redis-server`` and
the Tansu broker, ``devstack.localstack``) with the mesh of ``devstack.mesh``: the Polygon
simulator, ingest, bars (Redis, primary), bars (Kafka, shadow), engine_bridge and mirror,
each its own OS process with the settings the demo uses. A probe in the bench process
(``bench/mesh_probe.py``) watches Redis and Kafka; a sampler reads every process's CPU time
and resident memory from ``/proc`` every 0.5 s.

**(a) A real day, as fast as possible** (``--symbols``, default SPY, IBM, AIG, BAC on
2013-10-07, from the shared data): the simulator replays the day at speed 0 (its frames:
trades of one 1-ms window, at most 100). Measured from the first frame the simulator sent
(its ``simulator.feed_started`` log line) to:

- the last tick record on Redis (the sum of the ``ticks.<SYM>`` sequence counters reaches
  its final value; polled every 20 ms);
- the last tick record in Kafka (the mirror's committed positions, which move only after
  Kafka acknowledged, reach the same total; polled every 20 ms);
- the last bar on each path (arrival of the last ``bars.<SYM>.1m`` record on Redis pub/sub,
  and of the last shadow bar on Kafka ``bars.<SYM>.1m``). The day's last minute closes only
  when the feed has been idle for ingest's ``IDLE_AFTER`` (2 s) plus the grace, so the time to
  the last bar includes that fixed wait (shown as "after the last frame").

**(b) A synthetic market at a fixed offered rate** (``--synthetic-symbols`` 1000,
``--rate`` 20,000 trades/s, Zipf-like symbol weights, frames of up to 100 trades, for
``--warmup-s`` + ``--measure-s`` seconds), ticks on Kafka in one topic keyed by symbol, the
layout for thousands of symbols (``TOPIC_MODE=single``; ``--topic-mode per-symbol`` for
``ticks.<SYM>`` topics, whose per-partition costs a 1,000-symbol market pays on every
request). The simulator stamps every trade's ``t`` with the
wall clock (ms) when it makes the frame, just before sending it, and every process shares that
clock, so a trade's latency to a point is the wall time it was seen there minus its ``t``
(over by up to 1 ms from the truncation):

- **tick → Redis**: the probe's arrival time of the record on pub/sub (the probe is one more
  subscriber, like bars and the mirror), counted once per trade. The probe times the channels
  of ``--probe-ticks`` (default ``ticks.*0``: 100 of the 1,000 symbols, heavy and light ones
  alike, about a tenth of the trades), so that it does not take a quarter of the two cores it
  measures; tick → Kafka is timed on the same records, and the shadow's bars on Kafka are
  those of the same symbols (every bar topic the probe reads costs the broker on each fetch);
- **tick → Kafka**: the first poll (every ``--poll-ms``, 10 ms) at which the mirror's
  committed position for the channel had reached the record's ``seq``: the time Kafka had
  acknowledged it, over by up to one poll period;
- **tick → bar**: a bar's arrival (Redis pub/sub; Kafka, shadow) minus the end of its minute
  (``endMs``, which in this feed is wall time): a bar cannot close before ``endMs`` + grace,
  so the target is grace + 100 ms. Only first publications (revision 0) of minutes that ended
  inside the window and whose deadline (end + grace) came before the feed's last trade count:
  the others (the last, partial minute, and one that ended less than the grace before the
  feed stopped) close on ingest's idle mark, seconds later, not on the data.

Only trades stamped, and bars ending, after the warm-up count. Topics are created before the
mesh starts (``--cold`` skips that), as on any day but a mesh's first. CPU seconds and RSS
per process are over the same window. The offered rate actually achieved is reported: the
simulator slows down when ingest does not read (backpressure) and catches up by at most a
second's worth.

**(c) Ceilings, same run, same bytes**: after each scenario, the tick records it published
(read back from the Redis streams; up to ``--ceiling-records``, in the same mix of channels)
are sent again (1) with pipelined ``PUBLISH`` (1,000 commands a round trip, encoded before
the clock starts, over one plain connection, to channels nobody subscribes to: the server's
rate) into the same redis-server, and (2) with a raw aiokafka producer
(linger and batch size as the mirror's, the mirror's headers, key = symbol) to fresh topics
on the same broker. Each hop's rate is then given as a share of its ceiling: like for like,
the same records with the same trades per record on both sides.

**(e) Tick topics** (``bench/mesh_layout.py``; ``--no-layout`` and ``--quick`` skip it): the
synthetic market of (b) once more on a fresh stack with the other ``--topic-mode``, set
against (b): p50/p99 tick → Redis and → Kafka, p99 tick → shadow bar, records a mirror batch,
and the CPU seconds of the broker, the mirror and the shadow builder.

**(d) Ingest's linger** (``bench/mesh_linger.py``): the synthetic market of (b) twice more,
at ``--linger-rate`` (5,000 trades/s: a rate the mesh keeps up with, so that queueing does not
hide the milliseconds a linger adds), once with ``INGEST_LINGER_MS=0`` and once with
``--linger-ms`` (5; 0 skips (d)): p50/p99 tick → Redis and → Kafka of each, the trades per
record, and the CPU seconds of ingest and of the services over the window.

**Scale-out** (``--scale``, instead of (a), (b) and (d)): the real day once per setup of
``--scale-setups`` (default: 1 and 2 bars shards, 1 and 2 mirror instances, ingest's
``INGEST_RECORDS=frame`` and ``batch``; ``bench/mesh_scale.py``), each on a fresh stack, one
after another, without ceilings; one table of ticks/s to Kafka and to the last bar closed on
event time on each path, CPU seconds per service (and per instance, read every 0.1 s), the
cores all processes kept busy, and the load average at each run's start and end.
``--quick`` replays fewer symbols (IBM, AIG, BAC: about 90 s for the six default setups here).

``--profile DIR`` also records every service with py-spy (``pip install -e '.[bench]'``)
while data flows and writes a summary per service (``bench/profile_summary.py``); the
profiler takes CPU from the mesh, so figures of a profiled run are not comparable.

Bounded: every wait has a deadline (``--feed-timeout-s``, ``--settle-timeout-s``); a scenario
that does not drain in time is reported with its backlog. The default run takes about 6
minutes here, ``--quick`` about 3 (less when the mesh keeps up).
Run: ``.venv/bin/python bench/bench_mesh.py [--quick] [--scale] [--json out.json]
[--markdown out.md]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import msgspec
import redis.asyncio as aioredis
import structlog
from mesh_gauge import RunGauge, gauge_ms
from mesh_layout import layout_run
from mesh_linger import linger_run
from mesh_probe import (
    BarSeen,
    Observations,
    Probe,
    ProcessSampler,
    ack_times,
    acknowledged_at,
    first_time_at,
    weighted_percentiles,
)
from mesh_repeat import combine_runs
from mesh_report import SERVICES, render_markdown, summary_rows
from mesh_scale import (
    DEFAULT_SETUPS,
    Setup,
    parse_setups,
    render_scale,
    scale_summary_rows,
    service_of,
)
from profile_summary import markdown as profile_markdown
from profile_summary import parse_collapsed, summarise
from summary import add_rows

from devstack.localstack import LocalStack
from devstack.mesh import (
    IDLE_AFTER_S,
    Mesh,
    MeshOptions,
    ProcessExited,
    ServiceProcess,
    mirror_consumer_names,
)
from libs.common import names
from libs.common.io.kafka_io import (
    TopicSpec,
    ensure_topics,
    sequence_headers,
    start_producer,
)
from libs.common.market.sessions import MINUTE_MS
from libs.common.names import Keys
from libs.common.runtime.settings import CommonSettings, load_settings
from services.bars.sinks import bar_topic_spec
from services.mirror.config import MirrorSettings
from services.mirror.routing import RoutingTable

PROFILED = ("ingest", "mirror", "bars", "bars-shadow")
KEYS = Keys()
CLOSE_BURST_MS = 2_000
"""(b): ticks sent from a minute's end to its bars' deadline (the grace) and this long after
are timed apart: the minute's close, when every symbol's bar closes on both paths and the
feed's minute aggregates go out."""


SIMULATOR_HISTORY_S = 10
"""Seconds of the synthetic feed the simulator keeps for its REST API in (b) and (d)."""


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic cyclic garbage collection in the bench process meanwhile (reference
    counting still frees everything else), then one collection.

    The probe keeps an object per timed record; a full collection over them (every tick
    record the probe kept, growing through the window) stopped the probe's thread for
    117-184 ms, twice in a 60 s window at 20 k ticks/s, and every record that arrived
    meanwhile was timed late by as much."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        gc.collect()


def data_dir() -> Path | None:
    """The shared Lean data, when it is there."""
    base = Path(
        os.environ.get("TICKMESH_DATA") or ROOT.parent / "shared" / "data" / "lean-equity-2013-10"
    )
    return base if (base / "tick").is_dir() else None


# -- timing from the simulator's log -----------------------------------------------------------


def log_time(process: ServiceProcess, event: str) -> float | None:
    """Wall time (epoch s) of the first ``event`` line in a process's JSON log."""
    for line in process.events():
        if line.get("event") == event and isinstance(line.get("timestamp"), str):
            return dt.datetime.fromisoformat(str(line["timestamp"])).timestamp()
    return None


# -- profiling ---------------------------------------------------------------------------------


def py_spy() -> str | None:
    """The py-spy executable (the venv's first), if installed."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start_profilers(mesh: Mesh, folder: Path, label: str) -> dict[str, subprocess.Popen[bytes]]:
    """py-spy on each profiled service, sampling without pausing it, until told to stop."""
    executable = py_spy()
    if executable is None:
        print("bench_mesh: py-spy not installed (pip install -e '.[bench]'): no profile")
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    profilers = {}
    for name, service in mesh.services.items():
        if service_of(name) not in PROFILED or service.process is None:
            continue
        out = folder / f"{label}-{name}.txt"
        profilers[name] = subprocess.Popen(
            [
                *(executable, "record", "--pid", str(service.process.pid), "--rate", "100"),
                *("--nonblocking", "--format", "raw", "--output", str(out)),
            ],
            stdout=(folder / f"{label}-{name}.py-spy.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
    return profilers


def stop_profilers(
    profilers: dict[str, subprocess.Popen[bytes]], folder: Path, label: str
) -> dict[str, Any]:
    """Stop each py-spy (SIGINT: it writes its profile) and summarise the profiles."""
    for process in profilers.values():
        process.send_signal(signal.SIGINT)
    summaries: dict[str, Any] = {}
    for name, process in profilers.items():
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        path = folder / f"{label}-{name}.txt"
        if path.exists():
            summaries[name] = summarise(parse_collapsed(path.read_text().splitlines()))
    if summaries:
        text = "\n".join(profile_markdown(f"{label}: {n}", s) for n, s in summaries.items())
        (folder / f"{label}-summary.md").write_text(text)
    return summaries


# -- the ceilings -------------------------------------------------------------------------------


async def stream_records(
    redis_url: str, counts: dict[str, int], limit: int
) -> list[tuple[str, int, bytes]]:
    """Up to ``limit`` tick records as published, (channel, seq, payload), read from the
    streams: the first records of each channel in proportion to its share, interleaved by
    their relative position (roughly the order they were published in)."""
    total = sum(counts.values())
    share = min(1.0, limit / total) if total else 0.0
    client = aioredis.Redis.from_url(redis_url)
    picked: list[tuple[float, str, int, bytes]] = []
    try:
        for channel, count in counts.items():
            wanted = max(1, round(count * share))
            entries: Any = await client.xrange(KEYS.stream(channel), "-", "+", count=wanted)
            for index, (entry_id, fields) in enumerate(entries):
                seq = int(entry_id.decode().split("-")[1])
                picked.append((index / wanted, channel, seq, fields[b"d"]))
    finally:
        await client.aclose()
    picked.sort(key=lambda item: item[0])
    return [(channel, seq, payload) for _, channel, seq, payload in picked[:limit]]


def resp_publish(channel: str, payload: bytes) -> bytes:
    """One ``PUBLISH`` command in Redis's wire protocol."""
    name = channel.encode()
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(name),
        name,
        len(payload),
        payload,
    )


async def publish_ceiling(redis_url: str, records: list[tuple[str, int, bytes]]) -> float:
    """Seconds for redis-server to take a ``PUBLISH`` of every record (to channels nobody
    subscribes to), 1,000 commands a round trip over one plain connection: the commands are
    encoded before the clock starts, so this is the server's rate, not a client's."""
    host, port = redis_url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    chunks = [
        b"".join(
            resp_publish(f"bench-ceiling.{channel}", payload)
            for channel, _seq, payload in records[index : index + 1_000]
        )
        for index in range(0, len(records), 1_000)
    ]
    sizes = [min(1_000, len(records) - index) for index in range(0, len(records), 1_000)]
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        started = time.perf_counter()
        for chunk, size in zip(chunks, sizes, strict=True):
            writer.write(chunk)
            await writer.drain()
            replies = 0
            while replies < size:  # each reply is one line, ":<subscribers>\r\n"
                data = await reader.read(1 << 16)
                if not data or b"-" in data:
                    raise RuntimeError(f"PUBLISH answered {data[:80]!r}")
                replies += data.count(b"\n")
        return time.perf_counter() - started
    finally:
        writer.close()
        await writer.wait_closed()


async def create_ceiling_topics(bootstrap: str, channels: set[str]) -> dict[str, str]:
    """A fresh topic per channel for the produce ceiling (created a few hundred at a time:
    the embedded broker times out on a thousand in one request)."""
    settings = CommonSettings(kafka_bootstrap=bootstrap)
    suffix = f"{time.time_ns()}"
    topics = {channel: f"bench-ceiling-{suffix}.{channel}" for channel in sorted(channels)}
    specs = [TopicSpec(topic) for topic in topics.values()]
    for index in range(0, len(specs), 200):
        await ensure_topics(settings, specs[index : index + 200], max_wait_s=120)
    return topics


async def produce_ceiling(
    bootstrap: str, records: list[tuple[str, int, bytes]], topics: dict[str, str]
) -> float:
    """Seconds for a raw aiokafka producer (the mirror's linger, batch size and headers) to
    send every record to its channel's topic in ``topics`` and have all of them
    acknowledged."""
    settings = CommonSettings(kafka_bootstrap=bootstrap)
    mirror = load_settings(MirrorSettings, {})
    producer = await start_producer(
        settings, linger_ms=mirror.linger_ms, max_batch_size=mirror.max_batch_bytes
    )
    try:
        started = time.perf_counter()
        futures = []
        for channel, seq, payload in records:
            futures.append(
                await producer.send(
                    topics[channel],
                    payload,
                    key=channel.split(".")[1].encode(),
                    headers=sequence_headers(channel, seq),
                )
            )
        await asyncio.gather(*futures)
        return time.perf_counter() - started
    finally:
        await producer.stop()


def trades_in(records: list[tuple[str, int, bytes]]) -> int:
    """Trades in tick records."""
    decoder = msgspec.json.Decoder(dict[str, Any])
    return sum(len(decoder.decode(payload).get("ticks", ())) for _, _, payload in records)


def ceilings(stack: LocalStack, counts: dict[str, int], limit: int) -> dict[str, Any]:
    """Both ceilings on the same records, best of two passes each."""
    records = asyncio.run(stream_records(stack.redis.url, counts, limit))
    if not records:
        return {"error": "no tick records in the streams"}
    bootstrap = bootstrap_of(stack)
    publish_s = min(asyncio.run(publish_ceiling(stack.redis.url, records)) for _ in range(2))
    topics = asyncio.run(create_ceiling_topics(bootstrap, {channel for channel, _, _ in records}))
    produce_s = min(asyncio.run(produce_ceiling(bootstrap, records, topics)) for _ in range(2))
    trades = trades_in(records)
    return {
        "records": len(records),
        "trades": trades,
        "tradesPerRecord": round(trades / len(records), 2),
        "publishRecordsPerS": round(len(records) / publish_s),
        "publishTicksPerS": round(trades / publish_s),
        "produceRecordsPerS": round(len(records) / produce_s),
        "produceTicksPerS": round(trades / produce_s),
    }


# -- one scenario ------------------------------------------------------------------------------


class Scenario:
    """A mesh on a fresh stack, the probe, the sampler and (optionally) the profilers."""

    def __init__(
        self,
        label: str,
        options: MeshOptions,
        args: argparse.Namespace,
        *,
        with_ceilings: bool = True,
        sample_period_s: float = 0.5,
    ) -> None:
        self.label = label
        self.options = options
        self.args = args
        self.with_ceilings = with_ceilings
        self.sample_period_s = sample_period_s
        self.notes: list[str] = []

    def run(
        self,
        probe_factory: Callable[[LocalStack], Probe],
        prepare: Callable[[LocalStack], None],
        wait: Callable[[Mesh, Probe], None],
        analyse: Callable[[Mesh, LocalStack, Observations, ProcessSampler], dict[str, Any]],
    ) -> dict[str, Any]:
        """Start, wait for the data to flow through, stop, analyse (stack still up)."""
        profile_dir = self.args.profile
        # the services append to their logs (a restart keeps its history): a scenario run
        # again in the same --workdir starts from empty ones, or it would time the last run
        shutil.rmtree(self.options.workdir, ignore_errors=True)
        gauge_before = gauge_ms()
        with LocalStack() as stack, collector_paused():
            prepare(stack)
            probe = probe_factory(stack)
            probe.start()
            sampler = ProcessSampler(
                {"redis-server": stack.redis.pid, "bench": os.getpid()},
                period_s=self.sample_period_s,
            ).start()
            if stack.kafka is not None:
                sampler.add("tansu", stack.kafka.pid)
            gauge = RunGauge(self.options.workdir / "machine-gauge.txt").start()
            mesh = Mesh(stack, self.options)
            profilers: dict[str, subprocess.Popen[bytes]] = {}
            result: dict[str, Any] = {"scenario": self.label}
            during: dict[str, float] | None = None
            seen = Observations()
            try:
                mesh.start()
                for name, service in mesh.services.items():
                    assert service.process is not None
                    sampler.add(name, service.process.pid)
                if mesh.simulator is not None and mesh.simulator.process is not None:
                    sampler.add("simulator", mesh.simulator.process.pid)
                if profile_dir is not None:
                    profilers = start_profilers(mesh, profile_dir, self.label)
                try:
                    wait(mesh, probe)
                except (TimeoutError, ProcessExited) as exc:
                    self.notes.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
                result["consumers"] = consumer_reads(mesh)
                result["mirrorBatches"] = mirror_batches(mesh)
                if profilers:
                    result["profile"] = stop_profilers(profilers, profile_dir, self.label)
                sampler.stop()
                during = gauge.stop()
                seen = probe.stop()
                result["redisCalls"] = redis_calls(stack)
                result.update(analyse(mesh, stack, seen, sampler))
            finally:
                try:
                    for process in profilers.values():
                        if process.poll() is None:
                            process.kill()
                    probe.stop()
                    gauge.stop()
                finally:
                    mesh.stop()  # whatever else failed: no service outlives the bench
            if seen.errors:
                self.notes.extend(f"probe: {error}" for error in seen.errors)
            if seen.undecodable:
                self.notes.append(f"probe: {seen.undecodable} records it could not decode")
            result["notes"] = self.notes
            for name, server in (("redis-server", stack.redis), ("the broker", stack.kafka)):
                if server is not None and not server.running:
                    self.notes.append(f"{name} was not running at the end:\n{server.log_tail()}")
            wanted = self.with_ceilings and self.args.ceiling_records > 0
            if wanted and result.get("tickRecordsByChannel"):
                try:
                    result["ceilings"] = ceilings(
                        stack, result.pop("tickRecordsByChannel"), self.args.ceiling_records
                    )
                except Exception as exc:  # reported in the results: the scenario's figures stand
                    result["ceilings"] = {"error": f"{type(exc).__name__}: {exc}"}
            result.pop("tickRecordsByChannel", None)
        result["machineGauge"] = {
            "beforeMs": gauge_before,
            "during": during,
            "afterMs": gauge_ms(),
        }
        return result


def wait_drained(mesh: Mesh, probe: Probe, timeout_s: float, quiet_s: float = 2.0) -> None:
    """After the feed: wait until Kafka acknowledged every tick record the probe knows of and
    no bar arrived on either path for ``quiet_s``, no earlier than the last minute can close
    (ingest's idle mark plus the grace). ``TimeoutError`` with the backlog past the deadline."""
    deadline = time.monotonic() + timeout_s
    earliest = time.monotonic() + IDLE_AFTER_S + mesh.options.grace_ms / 1000 + 1
    bars = probe.bars_seen()
    quiet_since = time.monotonic()
    while True:
        mesh.check_alive()
        now = time.monotonic()
        backlog = probe.backlog()
        if backlog == 0 and now >= earliest and now - quiet_since >= quiet_s:
            return
        if now > deadline:
            raise TimeoutError(
                f"not drained within {timeout_s:g} s after the feed: {backlog:,} tick records "
                f"not acknowledged by Kafka; bars seen (Redis, Kafka): {probe.bars_seen()}"
            )
        time.sleep(0.25)
        if probe.bars_seen() != bars:
            bars, quiet_since = probe.bars_seen(), time.monotonic()


def bootstrap_of(stack: LocalStack) -> str:
    """The stack's Kafka bootstrap address (every scenario runs one)."""
    assert stack.kafka is not None
    return stack.kafka.bootstrap


def metric(mesh: Mesh, service: str, name: str, **labels: str) -> float:
    """A service's metric, summed over its instances (0 when none is running)."""
    return mesh.metric_total(service, name, **labels)


def run_real_day(
    args: argparse.Namespace, workdir: Path, setup: Setup | None = None
) -> dict[str, Any]:
    """Scenario (a); with a ``setup`` (the scale-out comparison), that many bars shards and
    mirror instances, ingest's record mode, and no ceilings."""
    label = "real day" if setup is None else f"real day, {setup.label}"
    data = data_dir()
    if data is None:
        return {"scenario": label, "skipped": "no shared data (TICKMESH_DATA)"}
    symbols = [s.strip().upper() for s in args.symbols.split(",") if s.strip()]
    channels = [f"ticks.{symbol}" for symbol in symbols]
    options = MeshOptions(
        workdir=workdir / ("real-day" if setup is None else f"real-day-{setup.slug}"),
        data_dir=data,
        day=args.day,
        symbols=symbols,
        speed=0.0,
        grace_ms=args.grace_ms,
        run_id="bench-day",
    )
    if setup is not None:
        options.bars_shards = setup.bars_shards
        options.mirror_instances = setup.mirror_instances
        options.env["INGEST_RECORDS"] = setup.records
    # a setup's run lasts seconds: CPU read every 0.1 s, so a window's edges are that close
    scenario = Scenario(
        label,
        options,
        args,
        with_ceilings=setup is None,
        sample_period_s=0.5 if setup is None else 0.1,
    )
    counters: dict[str, float] = {}
    load_at_start = os.getloadavg()[0]

    def wait(mesh: Mesh, probe: Probe) -> None:
        try:
            mesh.wait_feed_done(timeout_s=args.feed_timeout_s)
            wait_drained(mesh, probe, timeout_s=args.settle_timeout_s)
        finally:
            read_counters(mesh)

    def read_counters(mesh: Mesh) -> None:
        counters["ticks"] = metric(mesh, "ingest", "tickmesh_ingest_events_total", type="T")
        counters["deadLetters"] = sum(
            s.metric_sum("tickmesh_dead_letters_total") for s in mesh.services.values()
        )

    def analyse(
        mesh: Mesh, stack: LocalStack, seen: Observations, sampler: ProcessSampler
    ) -> dict[str, Any]:
        assert mesh.simulator is not None
        first = log_time(mesh.simulator, "simulator.feed_started")
        last_frame = log_time(mesh.simulator, "simulator.feed_done")
        records = seen.seq_totals[-1][1] if seen.seq_totals else 0
        ticks = int(counters.get("ticks", 0))
        out: dict[str, Any] = {
            "day": args.day,
            "symbols": symbols,
            "barsShards": options.bars_shards,
            "mirrorInstances": options.mirror_instances,
            "ingestRecords": options.env.get("INGEST_RECORDS", "frame"),
            "loadAverage": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],
            "ticks": ticks,
            "tickRecords": records,
            "tradesPerRecord": round(ticks / records, 2) if records else None,
            "barsRedis": len(seen.redis_bars),
            "barsKafka": len(seen.kafka_bars),
            "deadLetters": counters.get("deadLetters"),
            "feedSeconds": round(last_frame - first, 3) if first and last_frame else None,
        }
        ends = {
            "redis": first_time_at(seen.seq_totals, records) if records else None,
            "kafka": first_time_at(seen.acked_totals, records) if records else None,
            "barRedis": max((bar.at for bar in seen.redis_bars), default=None),
            "barKafka": max((bar.at for bar in seen.kafka_bars), default=None),
            "barRedisEventTime": last_closed_on_event_time(seen.redis_bars),
            "barKafkaEventTime": last_closed_on_event_time(seen.kafka_bars),
        }
        out["to"] = {
            name: None
            if end is None or first is None
            else {
                "seconds": round(end - first, 3),
                "ticksPerS": round(ticks / (end - first)),
                "recordsPerS": round(records / (end - first)),
                "afterLastFrameS": round(end - last_frame, 3) if last_frame else None,
            }
            for name, end in ends.items()
        }
        if first is not None:
            out["processes"] = sampler.window(
                first, max((e for e in ends.values() if e), default=first)
            )
        out["tickRecordsByChannel"] = {
            channel: int(value) for channel, value in _final_seqs(stack, channels).items()
        }
        return out

    return scenario.run(
        lambda stack: Probe(
            stack.redis.url,
            bootstrap_of(stack),
            tick_pattern=None,
            seq_channels=channels,
            poll_ms=20,
            mirror_consumers=mirror_consumer_names(options.mirror_instances),
        ),
        lambda _stack: None,
        wait,
        analyse,
    )


def run_scale(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The scale-out comparison: the real day once per setup (``--scale-setups``), one after
    another, each on a fresh stack; setups that would start past ``--scale-budget-s`` are
    reported as skipped."""
    symbols = [s.strip().upper() for s in args.symbols.split(",") if s.strip()]
    deadline = time.monotonic() + args.scale_budget_s
    runs: list[dict[str, Any]] = []
    for setup in parse_setups(args.scale_setups):
        if time.monotonic() > deadline:
            runs.append(
                {"setup": setup.label, "skipped": f"past --scale-budget-s {args.scale_budget_s:g}"}
            )
            continue
        print(f"bench_mesh: scale: {setup.label} ...", flush=True)
        result = run_real_day(args, workdir, setup)
        result["setup"] = setup.label
        runs.append(result)
    return {"day": args.day, "symbols": symbols, "runs": runs}


def last_closed_on_event_time(bars: list[BarSeen]) -> float | None:
    """Arrival of the last bar that closed on event time: every bar but each symbol's last
    minute (which closes when the feed goes idle)."""
    last_start: dict[str, int] = {}
    for bar in bars:
        last_start[bar.symbol] = max(last_start.get(bar.symbol, 0), bar.start_ms)
    return max((bar.at for bar in bars if bar.start_ms < last_start[bar.symbol]), default=None)


def _final_seqs(stack: LocalStack, channels: list[str]) -> dict[str, int]:
    async def read() -> dict[str, int]:
        client = aioredis.Redis.from_url(stack.redis.url)
        try:
            values = await client.mget([KEYS.seq(channel) for channel in channels])
        finally:
            await client.aclose()
        return {c: int(v) for c, v in zip(channels, values, strict=True) if v is not None}

    return asyncio.run(read())


CONSUMER_READS = {
    "delivered": "tickmesh_consumer_records_total",
    "fromStreams": "tickmesh_consumer_backfilled_records_total",
    "duplicates": "tickmesh_consumer_duplicates_total",
    "dropped": "tickmesh_consumer_doorbells_dropped_total",
}


def consumer_reads(mesh: Mesh) -> dict[str, dict[str, int]]:
    """Per Redis-fed service: records delivered, read from the streams, dropped as duplicates
    (read twice: from pub/sub and from a stream) and pub/sub messages dropped at a full queue
    (read, then thrown away: the stream has them)."""
    out: dict[str, dict[str, int]] = {}
    for name, service in mesh.services.items():
        row = {key: int(service.metric_sum(metric)) for key, metric in CONSUMER_READS.items()}
        if any(row.values()):
            out[name] = row
    return out


def mirror_batches(mesh: Mesh) -> dict[str, int]:
    """The mirror's batches acknowledged by Kafka and the records in them (every instance):
    each batch is at least one produce request, so records per batch is what a request
    carries."""
    out = {"batches": 0, "records": 0}
    for name, service in mesh.services.items():
        if name.startswith("mirror"):
            out["batches"] += int(service.metric_sum("tickmesh_mirror_batches_total"))
            out["records"] += int(service.metric_sum("tickmesh_mirror_records_total"))
    return out


def redis_calls(stack: LocalStack) -> dict[str, int]:
    """Redis's own count of each command it ran on this stack (the probe's included)."""

    async def read() -> dict[str, int]:
        client = aioredis.Redis.from_url(stack.redis.url)
        try:
            stats = await client.info("commandstats")
        finally:
            await client.aclose()
        return {
            name.removeprefix("cmdstat_"): int(value["calls"])
            for name, value in stats.items()
            if isinstance(value, dict) and "calls" in value
        }

    return asyncio.run(read())


def synthetic_symbols(count: int) -> list[str]:
    """The simulator's synthetic names (``S0001``...)."""
    width = max(4, len(str(count)))
    return [f"S{index:0{width}d}" for index in range(1, count + 1)]


def precreate_topics(bootstrap: str, symbols: list[str], topic_mode: str) -> tuple[int, float]:
    """Create the tick and bar topics of ``symbols`` as the mirror and the shadow builder
    would (their own specs, the topics of ``topic_mode``); returns how many and the seconds
    it took."""
    table = RoutingTable(load_settings(MirrorSettings, {"MIRROR_TOPIC_MODE": topic_mode}))
    specs: dict[str, TopicSpec] = {}
    for symbol in symbols:
        target = table.target(f"ticks.{symbol}")
        assert target is not None
        specs[target.spec.name] = target.spec
        bars = names.channel(names.shadow_bars_topic(topic_mode), symbol)
        specs[bars] = bar_topic_spec(bars)
    started = time.monotonic()
    settings = CommonSettings(kafka_bootstrap=bootstrap)
    listed = list(specs.values())
    for index in range(0, len(listed), 500):
        asyncio.run(ensure_topics(settings, listed[index : index + 500], max_wait_s=120))
    return len(listed), time.monotonic() - started


def run_synthetic(
    args: argparse.Namespace, workdir: Path, *, label: str = "synthetic", linger_ms: int = 0
) -> dict[str, Any]:
    """Scenario (b) (and each run of (d): ``label``, another rate, ingest's linger)."""
    symbols = synthetic_symbols(args.synthetic_symbols)
    options = MeshOptions(
        workdir=workdir / label.replace(" ", "-"),
        synthetic_symbols=args.synthetic_symbols,
        synthetic_rate=args.rate,
        duration_s=args.warmup_s + args.measure_s,
        grace_ms=args.grace_ms,
        # ten seconds of the feed for its REST API: reached in the warm-up, so the
        # simulator's memory is judged flat like the services'
        simulator_history_trades=max(1, int(args.rate * SIMULATOR_HISTORY_S)),
        run_id="bench-synthetic",
        env={"INGEST_LINGER_MS": str(linger_ms), "TICKMESH_TOPIC_MODE": args.topic_mode},
    )
    scenario = Scenario(label, options, args, with_ceilings=label == "synthetic")
    status: dict[str, Any] = {}

    def prepare(stack: LocalStack) -> None:
        if not args.cold:
            count, seconds = precreate_topics(bootstrap_of(stack), symbols, args.topic_mode)
            scenario.notes.append(f"{count} topics created first in {seconds:.1f} s")

    def wait(mesh: Mesh, probe: Probe) -> None:
        mesh.wait_feed_done(timeout_s=args.warmup_s + args.measure_s + args.feed_timeout_s)
        status.update(mesh.simulator_status())
        wait_drained(mesh, probe, timeout_s=args.settle_timeout_s)

    def analyse(
        mesh: Mesh, stack: LocalStack, seen: Observations, sampler: ProcessSampler
    ) -> dict[str, Any]:
        assert mesh.simulator is not None
        first = log_time(mesh.simulator, "simulator.feed_started")
        last_frame = log_time(mesh.simulator, "simulator.feed_done")
        if first is None or last_frame is None:
            return {"error": "the simulator's log has no feed_started / feed_done"}
        records = sum(_final_seqs(stack, [f"ticks.{symbol}" for symbol in symbols]).values())
        closes = {
            path: [e for e in mesh.services[name].events() if e.get("event") == "bars.published"]
            for path, name in (("redis", "bars"), ("kafka", "bars-shadow"))
            if name in mesh.services
        }
        return analyse_synthetic(
            args, seen, sampler, status, first, last_frame, records, close_logs=closes
        )

    sampled = args.probe_ticks.removeprefix("ticks.")  # a glob of the timed symbols
    return scenario.run(
        lambda stack: Probe(
            stack.redis.url,
            bootstrap_of(stack),
            tick_pattern=args.probe_ticks,
            # the sampled symbols' bar topics, or the one topic (its other bars skipped)
            kafka_bars=names.channel(names.shadow_bars_topic(args.topic_mode), sampled),
            bar_symbols=sampled,
            poll_ms=args.poll_ms,
        ),
        prepare,
        wait,
        analyse,
    )


def run_layout(args: argparse.Namespace, workdir: Path, first: dict[str, Any]) -> dict[str, Any]:
    """Scenario (e): (b) once more with the other tick-topic layout, set against ``first``
    ((b)'s own results)."""
    other = "per-symbol" if args.topic_mode == "single" else "single"
    print(f"bench_mesh: (e) ticks {other} ...", flush=True)
    again = argparse.Namespace(**{**vars(args), "topic_mode": other})
    second = run_synthetic(again, workdir, label=f"layout {other}")
    return {
        "symbols": args.synthetic_symbols,
        "offeredRate": args.rate,
        "measureSeconds": args.measure_s,
        "runs": [layout_run(args.topic_mode, first), layout_run(other, second)],
    }


def run_linger(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Scenario (d): (b) at ``--linger-rate`` with INGEST_LINGER_MS 0, then ``--linger-ms``."""
    at_rate = argparse.Namespace(**{**vars(args), "rate": args.linger_rate})
    runs = []
    for linger_ms in (0, args.linger_ms):
        print(f"bench_mesh: (d) linger {linger_ms} ms ...", flush=True)
        result = run_synthetic(at_rate, workdir, label=f"linger {linger_ms}", linger_ms=linger_ms)
        runs.append(linger_run(linger_ms, result, SERVICES))
    return {
        "symbols": args.synthetic_symbols,
        "offeredRate": args.linger_rate,
        "lingerMs": args.linger_ms,
        "warmupSeconds": args.warmup_s,
        "measureSeconds": args.measure_s,
        "runs": runs,
    }


def analyse_synthetic(
    args: argparse.Namespace,
    seen: Observations,
    sampler: ProcessSampler,
    status: dict[str, Any],
    first: float,
    last_frame: float,
    tick_records: int,
    close_logs: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Latencies, rates, CPU and memory of the measured window of scenario (b).

    Latencies are timed on the channels the probe watched (``--probe-ticks``); rates count
    the whole feed: the events the simulator sent and ``tick_records``, the records every tick
    channel got (their sequence counters). ``close_logs``: each path's ``bars.published`` log
    lines (``bar_closes``)."""
    start = first + args.warmup_s
    end = last_frame
    acks = {channel: ack_times(updates) for channel, updates in seen.acked.items()}
    to_redis: list[tuple[float, int]] = []
    to_kafka: list[tuple[float, int]] = []
    # ticks sent in the seconds after a minute's end, when every symbol's bar closes on both
    # paths and the feed's minute aggregates go out, against the rest of the minute
    close_ms = args.grace_ms + CLOSE_BURST_MS
    in_close: dict[bool, tuple[list[tuple[float, int]], list[tuple[float, int]]]] = {
        True: ([], []),
        False: ([], []),
    }
    unacked = trades = 0
    records_in_window = 0
    by_channel: dict[str, int] = {}
    top_seq: dict[str, int] = {}
    for tick in seen.ticks:
        by_channel[tick.channel] = by_channel.get(tick.channel, 0) + 1
        top_seq[tick.channel] = max(top_seq.get(tick.channel, 0), tick.seq)
        sent = tick.t_ms / 1000
        if not start <= sent <= end:
            continue
        records_in_window += 1
        trades += tick.trades
        part = in_close[tick.t_ms % MINUTE_MS < close_ms]
        redis_latency = (1000 * (tick.at - sent), tick.trades)
        to_redis.append(redis_latency)
        part[0].append(redis_latency)
        positions, times = acks.get(tick.channel, ([], []))
        acked = acknowledged_at(positions, times, tick.seq)
        if acked is None:
            unacked += tick.trades
        else:
            kafka_latency = (1000 * (acked - sent), tick.trades)
            to_kafka.append(kafka_latency)
            part[1].append(kafka_latency)
    last_trade_ms = max((tick.t_ms for tick in seen.ticks), default=0)
    whole_feed = [
        (1000 * (acked - tick.t_ms / 1000), tick.trades)
        for tick in seen.ticks
        if (acked := acknowledged_at(*acks.get(tick.channel, ([], [])), tick.seq)) is not None
    ]
    first_acks = [
        times[0] for channel, (_, times) in acks.items() if times and channel.startswith("ticks.")
    ]

    def bar_latencies(bars: list[Any]) -> list[tuple[float, int]]:
        first_seen: dict[tuple[str, int], float] = {}  # a re-delivered bar counts once
        for bar in bars:
            # a minute whose deadline (end + grace) came after the feed's last trade cannot
            # close on the data: it closes on ingest's idle mark, seconds later
            deadline = bar.end_ms + args.grace_ms
            if bar.revision == 0 and start * 1000 <= bar.end_ms and deadline <= last_trade_ms:
                key = (bar.symbol, bar.end_ms)
                first_seen[key] = min(first_seen.get(key, bar.at), bar.at)
        return [(1000 * at - end_ms, 1) for (_, end_ms), at in first_seen.items()]

    def stats(values: list[tuple[float, int]]) -> dict[str, float] | None:
        found = weighted_percentiles(values)
        if found is None:
            return None
        return {k: (round(v, 1) if k != "count" else int(v)) for k, v in found.items()}

    window_s = end - start
    feed_s = last_frame - first
    published = sum(top_seq.values())
    observed = sum(by_channel.values())
    events = int(status.get("eventsGenerated", 0))
    frames = int(status.get("framesGenerated", 0))
    return {
        "symbols": args.synthetic_symbols,
        "offeredRate": args.rate,
        "topicMode": args.topic_mode,
        "probeTicks": args.probe_ticks,
        "windowSeconds": round(window_s, 2),
        "warmupSeconds": args.warmup_s,
        "graceMs": args.grace_ms,
        "pollMs": args.poll_ms,
        "achievedTicksPerS": round(events / feed_s) if feed_s > 0 else None,
        "eventsPerFrame": round(events / frames, 1) if frames else None,
        "tradesPerRecord": round(trades / records_in_window, 2) if records_in_window else None,
        "recordsPerS": round(tick_records / feed_s) if feed_s > 0 else None,
        "tickRecords": tick_records,
        "sampledRecords": published,
        "probeMissedRecords": published - observed,
        "channels": len(by_channel),
        "channelsInKafka": len(first_acks),
        "allChannelsInKafkaAfterS": round(max(first_acks) - first, 1)
        if first_acks and len(first_acks) >= len(by_channel)
        else None,
        "tradesNotAcknowledged": unacked,
        "latencyMs": {
            "tickToRedis": stats(to_redis),
            "tickToKafka": stats(to_kafka),
            "tickToBarRedis": stats(bar_latencies(seen.redis_bars)),
            "tickToBarKafka": stats(bar_latencies(seen.kafka_bars)),
            "tickToKafkaWholeFeed": stats(whole_feed),
            "tickToRedisInClose": stats(in_close[True][0]),
            "tickToKafkaInClose": stats(in_close[True][1]),
            "tickToRedisOutsideClose": stats(in_close[False][0]),
            "tickToKafkaOutsideClose": stats(in_close[False][1]),
        },
        "closeBurstMs": close_ms,
        "barCloses": {
            path: bar_closes(
                events,
                [b for b in bars if b.revision == 0],
                grace_ms=args.grace_ms,
                window_ms=(start * 1000, last_trade_ms),
            )
            for path, bars in (("redis", seen.redis_bars), ("kafka", seen.kafka_bars))
            if (events := (close_logs or {}).get(path)) is not None
        },
        "processes": sampler.window(start, end),
        "tickRecordsByChannel": by_channel,
    }


def bar_closes(
    events: list[dict[str, Any]],
    seen: list[Any],
    *,
    grace_ms: int,
    window_ms: tuple[float, float],
) -> list[dict[str, Any]]:
    """Where each close's time went, for the minutes ending inside ``window_ms``: the builder's
    ``bars.published`` lines (logged when its sink returned: ``handle_ms`` from the start of
    handling the message that closed the minutes to the sink call, ``sink_ms`` the call) set
    against the minute's deadline (its end + ``grace_ms``) and the probe's arrival of that
    minute's bars (``seen``, first publications, timed symbols only).

    Per close: ``startMs`` after the deadline (the progress mark's travel and the messages
    queued before it), ``handleMs``, ``sinkMs``, ``toProbeMs`` (sink returned → the last of
    the minute's timed bars seen by the probe) and ``totalMs`` (the deadline → that bar)."""
    arrivals: dict[int, float] = {}
    for bar in seen:
        arrivals[bar.end_ms] = max(arrivals.get(bar.end_ms, 0.0), 1000 * bar.at)
    closes = []
    for event in events:
        end_ms = int(event.get("end_ms") or 0)
        if not window_ms[0] <= end_ms <= window_ms[1] or not isinstance(
            event.get("timestamp"), str
        ):
            continue
        sent_ms = 1000 * dt.datetime.fromisoformat(str(event["timestamp"])).timestamp()
        handle, sink = float(event.get("handle_ms", 0)), float(event.get("sink_ms", 0))
        deadline = end_ms + grace_ms
        arrived = arrivals.get(end_ms)
        closes.append(
            {
                "endMs": end_ms,
                "bars": int(event.get("bars") or 0),
                "startMs": round(sent_ms - sink - handle - deadline, 1),
                "handleMs": handle,
                "sinkMs": sink,
                "toProbeMs": None if arrived is None else round(arrived - sent_ms, 1),
                "totalMs": None if arrived is None else round(arrived - deadline, 1),
            }
        )
    return closes


def machine() -> str:
    """Where it ran."""
    return (
        f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at the end"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The bench's options; ``--quick`` changes the defaults, explicit options still win."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a short run (about 2 minutes)")
    parser.add_argument("--only", choices=["day", "synthetic", "linger"], help="one scenario")
    parser.add_argument(
        "--scale",
        action="store_true",
        help="instead of (a) and (b): the real day once per --scale-setups (bars shards, "
        "mirror instances, ingest's record mode), compared in one table",
    )
    parser.add_argument(
        "--scale-setups",
        default=DEFAULT_SETUPS,
        help=f"BARSxMIRROR:frame|batch, comma separated (default {DEFAULT_SETUPS})",
    )
    parser.add_argument(
        "--scale-budget-s",
        type=float,
        help="no setup starts after this many seconds (default 1800, quick 900)",
    )
    parser.add_argument("--day", default="2013-10-07")
    parser.add_argument("--symbols", help="real-day symbols (default SPY,IBM,AIG,BAC)")
    parser.add_argument("--synthetic-symbols", type=int, default=1_000)
    parser.add_argument("--rate", type=int, default=20_000, help="offered trades/s")
    parser.add_argument(
        "--linger-ms",
        type=int,
        default=5,
        help="(d): INGEST_LINGER_MS compared with 0 (0: skip (d))",
    )
    parser.add_argument(
        "--linger-rate", type=int, default=5_000, help="(d): offered trades/s (default 5,000)"
    )
    parser.add_argument("--warmup-s", type=float, help="not counted (default 20, quick 10)")
    parser.add_argument("--measure-s", type=float, help="measured (default 60, quick 10)")
    parser.add_argument("--grace-ms", type=int, default=1_000, help="the bars' grace")
    parser.add_argument("--poll-ms", type=int, default=10, help="Kafka acknowledgement polling")
    parser.add_argument(
        "--topic-mode",
        choices=("single", "per-symbol"),
        default="single",
        help="(b), (d): ticks on Kafka in one topic keyed by symbol (default, the layout for "
        "thousands of symbols) or in ticks.<SYM> topics",
    )
    parser.add_argument(
        "--layout",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="(e): after (b), (b) again with the other --topic-mode (default: on, off with "
        "--quick)",
    )
    parser.add_argument(
        "--probe-ticks",
        default="ticks.*0",
        help="(b), (d): the tick channels the probe times (a glob; default ticks.*0, one "
        "synthetic symbol in ten, so that the probe costs the measured cores less; ticks.* "
        "for all)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help="(b) this many times, each on a fresh stack; its targets judged on the median of "
        "the runs' p99s (default 3, quick 1)",
    )
    parser.add_argument("--cold", action="store_true", help="do not create the topics first")
    parser.add_argument(
        "--ceiling-records", type=int, help="records sent to each ceiling (default 200k, quick 50k)"
    )
    parser.add_argument("--feed-timeout-s", type=float, default=300.0)
    parser.add_argument(
        "--settle-timeout-s", type=float, help="after the feed (default 120, quick 60)"
    )
    parser.add_argument("--profile", type=Path, help="py-spy every service into this folder")
    parser.add_argument("--workdir", type=Path, help="keep the services' logs here")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", type=Path, help="write the report here")
    parser.add_argument("--summary", type=Path, help="append headline rows (scripts/bench.sh)")
    args = parser.parse_args(argv)
    quick = args.quick
    if args.symbols is None:
        args.symbols = "IBM,AIG,BAC" if quick else "SPY,IBM,AIG,BAC"
    if args.warmup_s is None:
        args.warmup_s = 10.0 if quick else 20.0
    if args.measure_s is None:
        args.measure_s = 10.0 if quick else 60.0
    if args.settle_timeout_s is None:
        args.settle_timeout_s = 60.0 if quick else 120.0
    if args.ceiling_records is None:
        args.ceiling_records = 50_000 if quick else 200_000
    if args.repeat is None:
        args.repeat = 1 if quick else 3
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, not {args.repeat}")
    if args.layout is None:
        args.layout = not quick
    if args.scale_budget_s is None:
        args.scale_budget_s = 900.0 if quick else 1_800.0
    try:
        parse_setups(args.scale_setups)
    except ValueError as exc:
        parser.error(f"--scale-setups: {exc}")
    if not args.probe_ticks.startswith("ticks.") or len(args.probe_ticks) <= len("ticks."):
        parser.error(f"--probe-ticks: a glob of tick channels (ticks.*0), not {args.probe_ticks!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios, print the report."""
    args = parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings+
    signal.signal(signal.SIGTERM, _stop_on_signal)  # stop the mesh on the way out
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-mesh-"))
    started = time.monotonic()
    results: dict[str, Any] = {"quick": args.quick}
    try:
        if args.scale:
            print("bench_mesh: scale-out comparison ...", flush=True)
            results["scale"] = run_scale(args, workdir)
        if args.only in (None, "day") and not args.scale:
            print("bench_mesh: (a) real day ...", flush=True)
            results["realDay"] = run_real_day(args, workdir)
        if args.only in (None, "synthetic") and not args.scale:
            runs = []
            for number in range(1, args.repeat + 1):
                of = f" (run {number} of {args.repeat})" if args.repeat > 1 else ""
                print(f"bench_mesh: (b) synthetic market{of} ...", flush=True)
                label = "synthetic" if number == 1 else f"synthetic run {number}"
                runs.append(run_synthetic(args, workdir, label=label))
            results["synthetic"] = combine_runs(runs)
            if args.layout and not results["synthetic"].get("error"):
                results["layout"] = run_layout(args, workdir, results["synthetic"])
        if args.only in (None, "linger") and not args.scale and args.linger_ms > 0:
            results["linger"] = run_linger(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - started, 1)
    results["machine"] = machine()
    report = render_scale(results) if args.scale else render_markdown(results)
    print(report)
    print(f"\nbench_mesh: {results['seconds']} s in all")
    if args.profile is not None:
        for label in ("real day", "synthetic"):
            path = args.profile / f"{label}-summary.md"
            if path.exists():
                print(f"profile summary: {path}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(report + "\n")
    add_rows(args.summary, scale_summary_rows(results) if args.scale else summary_rows(results))
    return 0


def _stop_on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
