"""What ``bench_mesh.py`` watches while the mesh runs: a probe on Redis and Kafka, a sampler
of every process's CPU and memory, and the pure arithmetic of the report (percentiles,
matching acknowledgements to records).

The probe runs its own asyncio loop in a thread of the bench process and records, with
``time.time()`` at arrival:

- tick records on Redis pub/sub (``tick_pattern``: ``ticks.*``, or a sample such as
  ``ticks.*0``, one synthetic symbol in ten): channel, ``seq``, the earliest
  trade time ``t`` in the record, the number of trades;
- ``bars.*.1m`` records on Redis pub/sub (the primary path's bars);
- the shadow builder's bars on Kafka (``kafka_bars``: its ``bars.<SYM>.1m`` topics, all or
  the timed symbols' only, since every partition a consumer reads costs the broker on each
  fetch; or the one ``sentio.bars.v1`` of ``TOPIC_MODE=single``, whose bars of other
  symbols than ``bar_symbols`` are skipped), read with a consumer that assigns itself every
  such topic (listed again every second) from its first offset;
- every ``poll_ms``, the mirror's committed positions of the timed channels (a Redis hash
  per mirror instance, one field per channel: the last sequence Kafka acknowledged; every
  channel's once a second), and the sequence counters of ``seq_channels``, in one round trip.

Nothing here changes what the services do; the probe is one more subscriber and one more
Kafka consumer, sharing the machine's cores with them (its CPU time is reported).
"""

from __future__ import annotations

import asyncio
import bisect
import fnmatch
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from libs.common.names import Keys

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# -- the records, decoded only as far as the bench needs --------------------------------------


class _TradeTime(msgspec.Struct):
    t: int


class _TickRecord(msgspec.Struct):
    seq: int
    ticks: list[_TradeTime]


class _BarRecord(msgspec.Struct):
    symbol: str
    startMs: int
    endMs: int
    revision: int = 0


_TICKS = msgspec.json.Decoder(_TickRecord)
_BAR = msgspec.json.Decoder(_BarRecord)


@dataclass(slots=True)
class TickSeen:
    """A tick record seen on Redis pub/sub."""

    channel: str
    seq: int
    t_ms: int
    trades: int
    at: float


@dataclass(slots=True)
class BarSeen:
    """A bar seen on one path."""

    symbol: str
    start_ms: int
    end_ms: int
    revision: int
    at: float


@dataclass
class Observations:
    """Everything the probe saw."""

    ticks: list[TickSeen] = field(default_factory=list)
    redis_bars: list[BarSeen] = field(default_factory=list)
    kafka_bars: list[BarSeen] = field(default_factory=list)
    acked: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    """Per channel: (poll time, committed position) each time the position moved."""
    seq_totals: list[tuple[float, int]] = field(default_factory=list)
    """(poll time, sum of the sequence counters of ``seq_channels``) each time it moved."""
    acked_totals: list[tuple[float, int]] = field(default_factory=list)
    """(poll time, sum of the mirror's positions over ``seq_channels``) each time it moved."""
    polls: int = 0
    undecodable: int = 0
    errors: list[str] = field(default_factory=list)


class Probe:
    """Watches Redis and Kafka from a thread of its own; ``start()``, later ``stop()``."""

    def __init__(
        self,
        redis_url: str,
        kafka_bootstrap: str,
        *,
        tick_pattern: str | None,
        kafka_bars: str = "bars.*.1m",
        bar_symbols: str = "*",
        seq_channels: Sequence[str] = (),
        poll_ms: int = 10,
        kafka_fetch_wait_ms: int = 20,
        key_prefix: str = "tm:",
        mirror_consumers: Sequence[str] = ("mirror",),
    ) -> None:
        self.redis_url = redis_url
        self.kafka_bootstrap = kafka_bootstrap
        self.tick_pattern = tick_pattern
        self.kafka_bars = re.compile(fnmatch.translate(kafka_bars))
        """The Kafka bar topics read (a glob: ``bars.<SYM>.1m`` topics, or the one topic of
        ``TOPIC_MODE=single``)."""
        self.bar_symbols = re.compile(fnmatch.translate(bar_symbols))
        """The symbols whose Kafka bars count (a glob: the timed ones when ticks are sampled)."""
        self.seq_channels = list(seq_channels)
        self.kafka_fetch_wait_ms = kafka_fetch_wait_ms
        """The Kafka consumer's fetch wait. The embedded broker answers a waiting fetch on a
        schedule of its own, not when a record lands: up to about half the wait later
        (measured: at most 24 ms with 50 ms, 32 ms with 100 ms, 11 ms with 20 ms). Real Kafka
        answers at once. So the wait is short, or the bars' arrival would be timed late."""
        self.poll_s = poll_ms / 1000
        self.full_poll_s = 1.0
        self._seq_set = set(self.seq_channels)
        self.keys = Keys(key_prefix)
        self.positions_keys = [
            self.keys.state(f"positions:{consumer}") for consumer in mirror_consumers
        ]
        """The mirror's committed positions, one hash per instance (each holds its channels)."""
        self.seen = Observations()
        self.top_seq: dict[str, int] = {}
        """Per tick channel, the highest sequence seen on pub/sub."""
        self.positions: dict[str, int] = {}
        """Per channel, the mirror's committed position at the last poll."""
        self.ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="bench-probe", daemon=True)

    # -- lifecycle (called from the bench's main thread)

    def start(self, timeout_s: float = 30.0) -> None:
        """Start watching; returns once subscribed (or raises after ``timeout_s``)."""
        self._thread.start()
        if not self.ready.wait(timeout_s):
            raise TimeoutError(f"the probe did not subscribe within {timeout_s:g} s")
        if self.seen.errors:
            raise RuntimeError(f"the probe failed: {self.seen.errors[0]}")

    def stop(self, timeout_s: float = 30.0) -> Observations:
        """Stop watching; returns what was seen (again, if already stopped)."""
        if not self._thread.is_alive() or self._stopping:
            return self.seen
        self._stopping = True
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():  # a daemon thread: it cannot hold the bench up
            self.seen.errors.append(f"the probe did not stop within {timeout_s:g} s")
        return self.seen

    def _stopped(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def backlog(self) -> int:
        """Tick records published on Redis and not yet acknowledged by Kafka, as far as the
        probe knows (from the sequence counters it polls, else from what pub/sub showed)."""
        if self.seq_channels:
            published = self.seen.seq_totals[-1][1] if self.seen.seq_totals else 0
            acked = self.seen.acked_totals[-1][1] if self.seen.acked_totals else 0
            return max(0, published - acked)
        positions = dict(self.positions)
        return sum(
            max(0, top - positions.get(channel, 0)) for channel, top in list(self.top_seq.items())
        )

    def bars_seen(self) -> tuple[int, int]:
        """Bars seen so far on Redis and on Kafka."""
        return len(self.seen.redis_bars), len(self.seen.kafka_bars)

    # -- the loop

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported in the results, never hidden
            self.seen.errors.append(f"{type(exc).__name__}: {exc}")
            self.ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        client = aioredis.Redis.from_url(self.redis_url)
        patterns = ["bars.*.1m", *([self.tick_pattern] if self.tick_pattern else [])]
        pubsub = await PatternSubscriber.open(self.redis_url, patterns)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka_bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.kafka_fetch_wait_ms,
            metadata_max_age_ms=1_000,
            client_id="bench-mesh-probe",
        )
        await consumer.start()
        tasks = [
            asyncio.create_task(self._read_pubsub(pubsub), name="probe-pubsub"),
            asyncio.create_task(self._poll(client), name="probe-poll"),
            asyncio.create_task(self._read_kafka_bars(consumer), name="probe-kafka"),
        ]
        self.ready.set()
        try:
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            # The loops also end on the stop flag: redis-py 8 may lose a cancellation that
            # lands during a command (the task then carries on), so cancelling is not enough.
            for task in tasks:
                task.cancel()
            _, stuck = await asyncio.wait(tasks, timeout=5)
            if stuck:
                self.seen.errors.append(f"{len(stuck)} probe task(s) did not end when cancelled")
            # Closing is best effort: what was seen is kept whatever the connections do now.
            for close in (consumer.stop, pubsub.close, client.aclose):
                try:
                    await asyncio.wait_for(close(), 3)
                except (Exception, asyncio.CancelledError) as exc:
                    self.seen.errors.append(f"closing: {type(exc).__name__}: {exc}")

    async def _read_pubsub(self, pubsub: PatternSubscriber) -> None:
        seen = self.seen
        top_seq = self.top_seq
        while True:
            messages = await pubsub.read()
            at = time.time()
            for raw_channel, data in messages:
                channel = raw_channel.decode()
                try:
                    if channel.startswith("ticks."):
                        record = _TICKS.decode(data)
                        if record.seq > top_seq.get(channel, 0):
                            top_seq[channel] = record.seq
                        if record.ticks:
                            t_ms = min(trade.t for trade in record.ticks)
                            seen.ticks.append(
                                TickSeen(channel, record.seq, t_ms, len(record.ticks), at)
                            )
                    else:
                        bar = _BAR.decode(data)
                        seen.redis_bars.append(
                            BarSeen(bar.symbol, bar.startMs, bar.endMs, bar.revision, at)
                        )
                except msgspec.DecodeError:
                    seen.undecodable += 1

    async def _poll(self, client: aioredis.Redis) -> None:
        """Every ``poll_s``, the mirror's positions of the timed channels (``seq_channels`` and
        the tick channels seen on pub/sub); every ``full_poll_s``, every position (when each
        channel first reached Kafka). Reading every field of a thousand-channel hash a hundred
        times a second cost the probe more than the services it watched."""
        seen = self.seen
        last = self.positions
        seq_keys = [self.keys.seq(channel) for channel in self.seq_channels]
        next_full = 0.0
        while not self._stopped():
            full = time.monotonic() >= next_full
            if full:
                next_full = time.monotonic() + self.full_poll_s
            fields = [*self.seq_channels, *(c for c in self.top_seq if c not in self._seq_set)]
            async with client.pipeline(transaction=False) as pipe:
                for key in self.positions_keys:
                    if full:
                        pipe.hgetall(key)
                    elif fields:
                        pipe.hmget(key, fields)
                if seq_keys:
                    pipe.mget(seq_keys)
                replies: list[Any] = await pipe.execute()
            at = time.time()
            seen.polls += 1
            seqs = replies[-1] if seq_keys else []
            positions: dict[str, int] = {}
            for reply in replies[: len(replies) - (1 if seq_keys else 0)]:
                if isinstance(reply, dict):
                    positions.update((k.decode(), int(v)) for k, v in reply.items())
                else:
                    positions.update(
                        (f, int(v)) for f, v in zip(fields, reply, strict=True) if v is not None
                    )
            for channel, position in positions.items():
                if last.get(channel, -1) < position:
                    last[channel] = position
                    seen.acked.setdefault(channel, []).append((at, position))
            if seq_keys:
                total = sum(int(value) for value in seqs if value is not None)
                if not seen.seq_totals or seen.seq_totals[-1][1] != total:
                    seen.seq_totals.append((at, total))
                acked = sum(last.get(channel, 0) for channel in self.seq_channels)
                if not seen.acked_totals or seen.acked_totals[-1][1] != acked:
                    seen.acked_totals.append((at, acked))
            await asyncio.sleep(self.poll_s)

    async def _read_kafka_bars(self, consumer: AIOKafkaConsumer) -> None:
        pattern = self.kafka_bars
        symbols = self.bar_symbols
        next_offset: dict[TopicPartition, int] = {}
        next_discovery = 0.0
        seen = self.seen
        listing: asyncio.Task[set[str]] | None = None
        try:
            while not self._stopped():
                # the listing runs beside the reads, which would wait for it (tens of ms a
                # listing with a thousand bar topics, once a second) and time the bars late
                if listing is None and time.monotonic() >= next_discovery:
                    next_discovery = time.monotonic() + 1.0
                    listing = asyncio.create_task(consumer.topics())
                if listing is not None and (listing.done() or not next_offset):
                    topics = await listing
                    listing = None
                    wanted = {
                        TopicPartition(topic, partition)
                        for topic in topics
                        if pattern.match(topic)
                        for partition in (consumer.partitions_for_topic(topic) or {0})
                    }
                    new = wanted - next_offset.keys()
                    if new:
                        # assign() starts over: every partition is sought to where it was.
                        next_offset.update(dict.fromkeys(new, 0))
                        consumer.assign(sorted(next_offset))
                        for tp, offset in next_offset.items():
                            consumer.seek(tp, offset)
                if not next_offset:
                    await asyncio.sleep(0.2)
                    continue
                batches = await consumer.getmany(timeout_ms=200, max_records=5_000)
                at = time.time()
                for tp, records in batches.items():
                    if records:
                        next_offset[tp] = records[-1].offset + 1
                    for record in records:
                        try:
                            bar = _BAR.decode(record.value)
                        except msgspec.DecodeError:
                            seen.undecodable += 1
                            continue
                        if not symbols.match(bar.symbol):
                            continue
                        seen.kafka_bars.append(
                            BarSeen(bar.symbol, bar.startMs, bar.endMs, bar.revision, at)
                        )
        finally:
            if listing is not None:
                listing.cancel()


class PatternSubscriber:
    """A bare ``PSUBSCRIBE`` over one socket, parsed by hand: the probe must cost the machine
    far less than the services it watches (redis-py's pure-Python parser costs tens of
    microseconds a message; this a few). Every message of one read shares its arrival time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = b""

    @classmethod
    async def open(cls, redis_url: str, patterns: Sequence[str]) -> PatternSubscriber:
        """Connect and subscribe; returns once Redis confirmed every pattern."""
        host, port = redis_url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        subscriber = cls(reader, writer)
        parts = [b"PSUBSCRIBE", *(pattern.encode() for pattern in patterns)]
        command = b"*%d\r\n" % len(parts) + b"".join(
            b"$%d\r\n%s\r\n" % (len(part), part) for part in parts
        )
        writer.write(command)
        await writer.drain()
        confirmed = 0
        while confirmed < len(patterns):
            data = await reader.read(1 << 16)
            if not data:
                raise ConnectionError("Redis closed the subscription")
            subscriber.buffer += data
            items, subscriber.buffer = parse_push(subscriber.buffer)
            confirmed += sum(1 for item in items if item[0] == b"psubscribe")
        return subscriber

    async def read(self) -> list[tuple[bytes, bytes]]:
        """The next (channel, payload) messages (at least one)."""
        while True:
            data = await self.reader.read(1 << 20)
            if not data:
                raise ConnectionError("Redis closed the subscription")
            self.buffer += data
            items, self.buffer = parse_push(self.buffer)
            messages = [(item[2], item[3]) for item in items if item[0] == b"pmessage"]
            if messages:
                return messages

    async def close(self) -> None:
        """Close the connection."""
        self.writer.close()
        await self.writer.wait_closed()


def parse_push(buffer: bytes) -> tuple[list[list[bytes]], bytes]:
    """Complete RESP2 arrays of bulk strings and integers at the start of ``buffer`` (what a
    subscribed connection receives), and the unparsed rest."""
    items: list[list[bytes]] = []
    position = 0
    size = len(buffer)
    while position < size:
        if buffer[position : position + 1] != b"*":
            raise ValueError(f"unexpected reply from Redis: {buffer[position : position + 80]!r}")
        end = buffer.find(b"\r\n", position)
        if end < 0:
            break
        count = int(buffer[position + 1 : end])
        cursor = end + 2
        parts: list[bytes] = []
        for _ in range(count):
            end = buffer.find(b"\r\n", cursor)
            if end < 0:
                break
            kind = buffer[cursor : cursor + 1]
            if kind == b":":
                parts.append(buffer[cursor + 1 : end])
                cursor = end + 2
                continue
            if kind != b"$":
                raise ValueError(f"unexpected reply from Redis: {buffer[cursor : cursor + 80]!r}")
            length = int(buffer[cursor + 1 : end])
            start = end + 2
            if start + length + 2 > size:
                break
            parts.append(buffer[start : start + length])
            cursor = start + length + 2
        if len(parts) < count:
            break
        items.append(parts)
        position = cursor
    return items, buffer[position:]


# -- processes: CPU seconds and memory from /proc ----------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of ``pid`` (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the command: state is field 3 of the man page, utime 14, stime 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` in MiB (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            resident = int(statm.read().split()[1])
    except OSError:
        return None
    return resident * PAGE_SIZE / 2**20


@dataclass(slots=True)
class Sample:
    """One reading of one process."""

    at: float
    cpu_s: float
    rss_mb: float


class ProcessSampler:
    """Reads CPU seconds and RSS of named processes every ``period_s`` in a thread."""

    def __init__(self, pids: dict[str, int], period_s: float = 0.5) -> None:
        self.pids = dict(pids)
        self.period_s = period_s
        self.samples: dict[str, list[Sample]] = {name: [] for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def add(self, name: str, pid: int) -> None:
        """Watch one more process (from the next reading on)."""
        self.samples.setdefault(name, [])
        self.pids[name] = pid

    def start(self) -> ProcessSampler:
        """Start reading."""
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take a last reading and stop."""
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def sample(self) -> None:
        """Read every process once."""
        at = time.time()
        for name, pid in list(self.pids.items()):
            cpu, rss = cpu_seconds(pid), rss_mb(pid)
            if cpu is not None and rss is not None:
                self.samples.setdefault(name, []).append(Sample(at, cpu, rss))

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def window(self, start: float, end: float) -> dict[str, dict[str, float]]:
        """Per process: CPU seconds spent in [start, end], CPU % over the whole and over each
        half, RSS at its start, middle, end and peak (growth in the second half tells a leak
        from a high-water mark reached early; a CPU % that grows at a steady offered rate, a
        cost that grows with what the process holds)."""
        out: dict[str, dict[str, float]] = {}
        for name, samples in self.samples.items():
            inside = [s for s in samples if start <= s.at <= end]
            before = [s for s in samples if s.at <= start]
            first = before[-1] if before else (inside[0] if inside else None)
            last = inside[-1] if inside else None
            if first is None or last is None or last.at <= first.at:
                continue
            mid = [s for s in samples if s.at <= (first.at + last.at) / 2][-1]
            entry = out[name] = {
                "cpuSeconds": round(last.cpu_s - first.cpu_s, 2),
                "cpuPct": round(100 * (last.cpu_s - first.cpu_s) / (last.at - first.at), 1),
                "rssStartMb": round(first.rss_mb, 1),
                "rssMidMb": round(mid.rss_mb, 1),
                "rssEndMb": round(last.rss_mb, 1),
                "rssPeakMb": round(max(s.rss_mb for s in [first, *inside]), 1),
            }
            for key, earlier, later in (
                ("cpuPctFirstHalf", first, mid),
                ("cpuPctSecondHalf", mid, last),
            ):
                if later.at > earlier.at:  # a half with two readings at least
                    entry[key] = round(
                        100 * (later.cpu_s - earlier.cpu_s) / (later.at - earlier.at), 1
                    )
        return out


# -- arithmetic ------------------------------------------------------------------------------


def weighted_percentiles(
    values: Iterable[tuple[float, int]], quantiles: Sequence[float] = (0.5, 0.99)
) -> dict[str, float] | None:
    """Percentiles of values each counted ``weight`` times (nearest rank), plus the max and
    the count; None when there are none."""
    ordered = sorted((value, weight) for value, weight in values if weight > 0)
    if not ordered:
        return None
    total = sum(weight for _, weight in ordered)
    out: dict[str, float] = {}
    for quantile in quantiles:
        rank = max(1, math.ceil(quantile * total))
        running = 0
        for value, weight in ordered:
            running += weight
            if running >= rank:
                out[f"p{round(quantile * 100):d}"] = value
                break
    out["max"] = ordered[-1][0]
    out["count"] = total
    return out


def ack_times(acked: Sequence[tuple[float, int]]) -> tuple[list[int], list[float]]:
    """A channel's position updates as (positions, times), positions non-decreasing."""
    positions: list[int] = []
    times: list[float] = []
    for at, position in acked:
        if positions and position <= positions[-1]:
            continue  # a rewind after a failure: the first acknowledgement counts
        positions.append(position)
        times.append(at)
    return positions, times


def acknowledged_at(positions: Sequence[int], times: Sequence[float], seq: int) -> float | None:
    """The first poll at which a channel's committed position reached ``seq``."""
    index = bisect.bisect_left(positions, seq)
    return times[index] if index < len(times) else None


def first_time_at(series: Sequence[tuple[float, int]], target: int) -> float | None:
    """The first time a (time, total) series reached ``target``."""
    for at, total in series:
        if total >= target:
            return at
    return None
