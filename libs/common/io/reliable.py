"""Consuming Redis channels without loss: pub/sub as the doorbell, the stream as the truth.

``SequencedConsumer`` subscribes to channel patterns for latency, and checks every record's
per-channel sequence number against the last one it delivered:

- the next number is delivered at once;
- a number at or below the last is a duplicate and is dropped (and counted);
- a jump is a gap: the missing range is read from the channel's stream first (and counted).

The pub/sub reader never blocks: it only appends to a bounded local queue, and when that is
full it drops the doorbell and marks the channel for a sweep. By default it then also
unsubscribes until the sweeps have caught up (``pause_pubsub_when_behind``): parsing messages
that would be dropped anyway only slows the catch-up, and a subscriber that does not read is
one Redis would cut at its output-buffer limit. A periodic sweep compares every matching
channel's newest sequence (its publish counter, all channels in one ``MGET``) with the
position and reads what is missing (every channel behind in one round trip, most of them in
one multi-stream ``XREAD``), which also covers messages lost while the connection was down
(the read fails and the consumer subscribes again, or a command's retry in redis-py
reconnects and re-subscribes; either way the consumer notices, counts and logs it) and
whatever was published while the consumer was not running. A new channel's first record
arrives by pub/sub too; a ``SCAN`` of the stream keys (``_discovery_interval_s``) guards
against a channel whose records all came while its doorbells could be missed.
Positions are kept durably per consumer name once the caller ``commit``s them, after its own
downstream write, so a crash re-delivers (at least once) and never skips. A caller whose
downstream write failed calls ``rewind``: delivery restarts from the committed positions,
read from the streams.

A shard (``subscribe_own``) subscribes to its own channels by name instead of the patterns,
so Redis sends it only the records it keeps instead of every record for it to drop: its
channels are the streams the discovery finds (every ``discover_interval_s``), and a new
channel's first records are read from its stream once it is found.
"""

from __future__ import annotations

import asyncio
import fnmatch
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import NamedTuple

import redis.asyncio as aioredis
import structlog
from prometheus_client import CollectorRegistry

from libs.common.io.consumer_metrics import ConsumerMetrics
from libs.common.io.positions import PositionStore
from libs.common.io.redis_io import RETRIABLE, StreamReader, next_message
from libs.common.names import Keys, channel_kind
from libs.common.runtime.lifecycle import raise_if_cancelled
from libs.common.schemas import seq_of

log = structlog.get_logger("tickmesh.reliable")


class Record(NamedTuple):
    """One sequenced record of a channel."""

    channel: str
    seq: int
    payload: bytes


class SequencedConsumer:
    """At-least-once, in-order (per channel), gap-free consumption of Redis channels."""

    def __init__(
        self,
        client: aioredis.Redis,
        name: str,
        patterns: Iterable[str],
        *,
        keys: Keys | None = None,
        start: str = "earliest",
        accept: Callable[[str], bool] | None = None,
        batch_max: int = 2_000,
        queue_max: int = 20_000,
        sweep_interval_s: float = 1.0,
        discover_interval_s: float = 2.0,
        discover_healthy_interval_s: float = 30.0,
        read_count: int = 1_000,
        pause_pubsub_when_behind: bool = True,
        subscribe_own: bool = False,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if start not in ("earliest", "latest"):
            raise ValueError(f"start must be earliest or latest, not {start!r}")
        self.client = client
        self.name = name
        self.patterns = list(patterns)
        self.keys = keys or Keys()
        self.start = start
        self.accept = accept or (lambda _channel: True)
        self.batch_max = batch_max
        self.queue_max = queue_max
        self.sweep_interval_s = sweep_interval_s
        self.discover_interval_s = discover_interval_s
        self.discover_healthy_interval_s = max(discover_interval_s, discover_healthy_interval_s)
        self.read_count = read_count
        self.pause_pubsub_when_behind = pause_pubsub_when_behind
        self.subscribe_own = subscribe_own
        self._unsubscribed: set[str] = set()
        """Own channels found and not yet subscribed to (``subscribe_own``)."""
        self._found = asyncio.Event()
        self.reader = StreamReader(client, self.keys)
        self.store = PositionStore(client, self.keys, name)
        self.positions: dict[str, int] = {}
        """Last sequence delivered per channel."""
        self.committed: dict[str, int] = {}
        self._floors: dict[str, int] = {}
        self._match_cache: dict[str, bool] = {}
        self._sweep_start = 0
        self._queue: deque[tuple[str, bytes]] = deque()
        self._wakeup = asyncio.Event()
        self._dirty: set[str] = set()
        self._known: set[str] = set()
        self._last_sweep = 0.0
        self._sweep_all = True
        """The next sweep reads every channel up to its newest record (pub/sub may have lost
        some); otherwise only what was published before the last periodic sweep."""
        self._settled: dict[str, int] = {}
        """Each channel's newest sequence at the last periodic sweep: anything up to it is
        at least a sweep interval old, and pub/sub has had its chance to deliver it."""
        self._last_periodic = 0.0
        self._last_discover = 0.0
        self._subscriber_task: asyncio.Task[None] | None = None
        self._discovery: asyncio.Task[list[str]] | None = None
        self._discover_soon = True
        """Discover after the short interval even while healthy (see _discovery_interval_s)."""
        self.subscribed = asyncio.Event()
        metrics = ConsumerMetrics.for_registry(registry)
        self._m_delivered = metrics.delivered
        self._m_stream = metrics.from_stream.labels(name)
        self._m_gaps = metrics.gaps.labels(name)
        self._m_dups = metrics.duplicates.labels(name)
        self._m_lost = metrics.lost.labels(name)
        self._m_dropped = metrics.doorbells_dropped.labels(name)
        self._m_behind = metrics.behind.labels(name)
        self._m_disconnects = metrics.disconnects.labels(name)
        self._m_resubscribes = metrics.resubscribes.labels(name)
        self._m_paused = metrics.pubsub_paused.labels(name)
        self._m_falling_behind = metrics.falling_behind.labels(name)
        self._m_rewinds = metrics.rewinds.labels(name)
        self.log = log.bind(consumer=name)
        self.falling_behind = False
        """True from when the consumer could not keep up until it caught up again."""
        self.behind_records = 0
        """Records in the streams not yet delivered, at the last sweep."""
        self.resubscribes = 0
        self._behind_since = 0.0
        self._behind_max = 0
        self._behind_backfilled = 0
        self._pubsub_paused = False
        self._resume_pubsub = asyncio.Event()
        self._rewind_requested = False

    def matches(self, channel: str) -> bool:
        """True when ``channel`` is one of ours (pattern and shard filter)."""
        matched = self._match_cache.get(channel)
        if matched is None:
            matched = self.accept(channel) and any(
                fnmatch.fnmatchcase(channel, p) for p in self.patterns
            )
            if len(self._match_cache) > 100_000:
                self._match_cache.clear()
            self._match_cache[channel] = matched
        return matched

    def _start_falling_behind(self, reason: str) -> None:
        if self.falling_behind:
            return
        self.falling_behind = True
        self._m_falling_behind.set(1)
        self._behind_since = time.monotonic()
        self._behind_max = self.behind_records
        self._behind_backfilled = 0
        self.log.warning(
            "consumer.falling_behind",
            reason=reason,
            queued=len(self._queue),
            action="reading from the streams until caught up",
        )

    def _caught_up(self) -> None:
        self.falling_behind = False
        self._m_falling_behind.set(0)
        self.log.info(
            "consumer.caught_up",
            behind_s=round(time.monotonic() - self._behind_since, 3),
            max_behind_records=self._behind_max,
            backfilled_records=self._behind_backfilled,
        )
        if self._pubsub_paused:
            self._pubsub_paused = False
            self._m_paused.set(0)
            self._resume_pubsub.set()

    def _note_resubscribed(self, _connection: object) -> None:
        """redis-py reconnected and re-subscribed by itself: messages may have been lost."""
        self.resubscribes += 1
        self._m_resubscribes.inc()
        self.log.warning(
            "consumer.resubscribed",
            reason="the pub/sub connection was lost (Redis cuts a subscriber "
            "past its output-buffer limit) and re-established",
            action="reading what was sent meanwhile from the streams",
        )
        self._sweep_everything_now()

    def _sweep_everything_now(self) -> None:
        """Pub/sub may have lost messages (a cut, a resubscription, a rewind): sweep at once,
        every channel up to its newest record, and look for new channels soon."""
        self._discover_soon = True
        self._last_sweep = 0.0
        self._sweep_all = True
        self._wakeup.set()

    async def _wait_for_channels(self) -> None:
        while not self._known:
            self._found.clear()
            await self._found.wait()

    async def _read_pubsub(self) -> None:
        task = asyncio.current_task()
        delay = 0.1
        resumed = False
        # own channels found meanwhile are subscribed to between two reads; a pattern
        # subscriber blocks in its read (no timer set and cancelled for every message)
        poll_s = 0.2 if self.subscribe_own else None
        while True:
            if resumed and self._pubsub_paused:
                self._resume_pubsub.clear()
                await self._resume_pubsub.wait()
            if self.subscribe_own:
                await self._wait_for_channels()
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            connection = None
            try:
                if self.subscribe_own:
                    self._unsubscribed.clear()
                    await pubsub.subscribe(*sorted(self._known))
                else:
                    await pubsub.psubscribe(*self.patterns)
                connection = pubsub.connection
                if connection is not None:
                    connection.register_connect_callback(self._note_resubscribed)
                self.subscribed.set()
                self._discover_soon = True  # a channel made before the subscription began
                if resumed:
                    resumed = False
                    self.log.info("consumer.pubsub_resumed")
                    self._sweep_everything_now()  # what was published before the subscription
                delay = 0.1
                queue = self._queue
                while True:
                    raise_if_cancelled(task)
                    if self._unsubscribed:
                        fresh = sorted(self._unsubscribed)
                        self._unsubscribed.clear()
                        await pubsub.subscribe(*fresh)
                    message = await next_message(pubsub, poll_s)
                    if message is None:
                        continue
                    channel = message[0].decode(errors="replace")
                    if len(queue) < self.queue_max:
                        queue.append((channel, message[1]))
                        self._wakeup.set()
                        continue
                    self._m_dropped.inc()
                    self._dirty.add(channel)
                    self._start_falling_behind("the local queue is full")
                    self._wakeup.set()
                    if self.pause_pubsub_when_behind:
                        self._pubsub_paused = True
                        self._m_paused.set(1)
                        self.log.info(
                            "consumer.pubsub_paused",
                            reason="fell behind; reading the streams until caught up",
                        )
                        resumed = True  # (once the sweeps have caught up)
                        break
            except asyncio.CancelledError:
                raise
            except RETRIABLE as exc:
                self._m_disconnects.inc()
                self.log.warning("consumer.subscriber_error", error=repr(exc), retry_s=delay)
                self._sweep_everything_now()
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
            finally:
                if connection is not None:
                    connection.deregister_connect_callback(self._note_resubscribed)
                try:
                    await pubsub.aclose()
                except Exception:  # the connection is already broken
                    pass

    async def open(self) -> None:
        """Load committed positions and start the pub/sub reader."""
        self.committed = await self.store.load()
        self.positions = dict(self.committed)
        if self.subscribe_own:
            # what is published before the subscription is read from the streams
            await self._discover_at_open()
        self._subscriber_task = asyncio.create_task(self._read_pubsub(), name=f"{self.name}.pubsub")
        if self._known or not self.subscribe_own:
            async with asyncio.timeout(30):
                await self.subscribed.wait()
        if not self.subscribe_own:
            await self._discover_at_open()
        self.log.info(
            "consumer.opened",
            channels=len(self.positions),
            start=self.start,
            subscribed="own channels" if self.subscribe_own else "patterns",
        )

    async def close(self) -> None:
        """Stop the pub/sub reader and a discovery under way."""
        for task in (self._subscriber_task, self._discovery):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._subscriber_task = self._discovery = None

    async def _discover_at_open(self) -> None:
        """Find the matching channels' streams, inline. ``start="latest"`` skips what a stream
        holds only here: a channel found later (``_discover_in_background``) appeared after
        the consumer started, and all of it is new (its doorbell may arrive after the
        discovery finds its stream)."""
        self._last_discover = time.monotonic()
        found = await self.reader.channels(self.patterns)
        new = []
        if self.start == "latest":
            new = [c for c in found if c not in self.positions and self.matches(c)]
        self._add_found(found, {channel: await self.reader.last_seq(channel) for channel in new})

    def _add_found(self, channels: Iterable[str], starts: dict[str, int]) -> None:
        """Take in the channels a discovery found; a new one starts at ``starts`` (or 0)."""
        for channel in channels:
            if channel not in self._known and self.matches(channel):
                self._known.add(channel)
                if self.subscribe_own:
                    self._unsubscribed.add(channel)
                    self._found.set()
                if channel not in self.positions:
                    self.positions[channel] = starts.get(channel, 0)
                    self._floors[channel] = self.positions[channel]
                self._dirty.add(channel)

    def _discover_in_background(self) -> None:
        """Start the periodic discovery unless one runs. Delivery does not wait for its
        ``SCAN`` (it stalled 150-400 ms a discovery with a thousand channels at 20 k ticks/s);
        what it finds is taken in by ``_take_discovered``, between two batches."""
        if self._discovery is None:
            self._last_discover = time.monotonic()
            self._discover_soon = False
            task = asyncio.create_task(
                self.reader.channels(self.patterns), name=f"{self.name}.scan"
            )
            task.add_done_callback(lambda _task: self._wakeup.set())
            self._discovery = task

    def _take_discovered(self) -> None:
        """Take in what a finished discovery found; its error is raised here, as an inline
        discovery's was (a retriable one: the caller opens the consumer again)."""
        if self._discovery is not None and self._discovery.done():
            task, self._discovery = self._discovery, None
            self._add_found(task.result(), {})

    def _note_lost(self, channel: str, after: int, missing: int) -> None:
        self._m_lost.inc(missing)
        self.log.error(
            "consumer.records_lost",
            channel=channel,
            after=after,
            missing=missing,
            reason="trimmed from the stream before they were read",
        )

    async def _read_range(
        self, channel: str, after: int, upto: int | None, limit: int
    ) -> list[Record]:
        """At most ``limit`` records after ``after`` (up to ``upto``) from the stream."""
        out: list[Record] = []
        cursor = after
        while len(out) < limit:
            count = min(self.read_count, limit - len(out))
            entries = await self.reader.read(channel, cursor, count, upto)
            if not entries:
                break
            if entries[0][0] != cursor + 1:
                self._note_lost(channel, cursor, entries[0][0] - cursor - 1)
            out.extend(Record(channel, seq, payload) for seq, payload in entries)
            cursor = entries[-1][0]
            if upto is not None and cursor >= upto:
                break
        self._m_stream.inc(len(out))
        return out

    def _discovery_interval_s(self) -> float:
        """How long after the last discovery the next one starts: a healthy pattern
        subscription sees a new channel's first record as it is published, so its ``SCAN``
        (the whole keyspace: 16 ms of Redis's single thread a call at 20 k ticks/s) only
        guards against a missed doorbell, every ``discover_healthy_interval_s``. A shard
        subscribed by name finds channels only this way; a consumer that fell behind, paused
        or lost its connection (or just subscribed) may have missed one: those use
        ``discover_interval_s``."""
        if (
            self.subscribe_own
            or self._discover_soon
            or self.falling_behind
            or self._pubsub_paused
            or not self.subscribed.is_set()
        ):
            return self.discover_interval_s
        return self.discover_healthy_interval_s

    async def _sweep(self) -> list[Record]:
        self._last_sweep = time.monotonic()
        if self._last_sweep - self._last_discover > self._discovery_interval_s():
            self._discover_in_background()
        channels = sorted(self._known | self._dirty)
        if not channels:
            return []
        # start at a different channel each sweep, so one far-behind channel cannot starve
        # the others of the batch's room
        self._sweep_start = (self._sweep_start + 1) % len(channels)
        channels = channels[self._sweep_start :] + channels[: self._sweep_start]
        # A record newer than the last periodic sweep may still be on its way through pub/sub
        # (or in the local queue): reading it from the stream too would read it twice. Such
        # records are left to pub/sub unless the channel is dirty (a gap, a new channel) or
        # pub/sub may have lost some (paused, cut, resubscribed, rewound): then the channel
        # is read up to its newest record. (The flag is taken before the round trip: one set
        # meanwhile applies to the next sweep.)
        to_newest = self._sweep_all or self._pubsub_paused
        self._sweep_all = False
        # each channel's newest sequence is its publish counter (the script moves it and the
        # stream together): one MGET instead of a stream read per channel
        tops = await self.client.mget([self.keys.seq(channel) for channel in channels])
        now = self._last_sweep
        periodic = now - self._last_periodic >= self.sweep_interval_s
        settled = self._settled
        dirty = self._dirty
        out: list[Record] = []
        behind = 0
        still_behind: set[str] = set()
        # what each channel behind gets of the batch's room, read in one round trip
        requests: list[tuple[str, int, int, int]] = []
        room = self.batch_max
        newest_of: dict[str, int] = {}
        for channel, top in zip(channels, tops, strict=True):
            newest = newest_of[channel] = int(top) if top else 0
            position = self.positions.get(channel, 0)
            if newest > position:
                behind += newest - position
            if to_newest or channel in dirty:
                target = newest
            else:
                target = min(newest, settled.get(channel, 0))
            if target > position:
                count = min(target - position, room)
                if count > 0:
                    requests.append((channel, position, target, count))
                    room -= count
                still_behind.add(channel)
        if periodic:
            self._last_periodic = now
            self._settled = newest_of
        replies = await self.reader.read_many(requests)
        for (channel, position, target, count), entries in zip(requests, replies, strict=True):
            reached = entries[-1][0] if entries else position
            if entries and entries[0][0] != position + 1:
                self._note_lost(channel, position, entries[0][0] - position - 1)
            if len(entries) < count and reached < target:
                # the counter is ahead of what the stream holds: those records are gone
                self._note_lost(channel, reached, target - reached)
                reached = target
            out.extend(Record(channel, seq, payload) for seq, payload in entries)
            self.positions[channel] = reached
            if reached >= target:
                still_behind.discard(channel)
        self._m_stream.inc(len(out))
        self._dirty = still_behind
        self.behind_records = max(0, behind - len(out))
        self._m_behind.set(self.behind_records)
        if self.falling_behind:
            self._behind_max = max(self._behind_max, behind)
            self._behind_backfilled += len(out)
            if behind <= len(out) and not self._queue:
                self._caught_up()
        return out

    async def _take_pubsub(self) -> list[Record]:
        out: list[Record] = []
        queue = self._queue
        positions = self.positions
        while queue and len(out) < self.batch_max:
            channel, payload = queue.popleft()
            if not self.matches(channel):
                continue
            try:
                seq = seq_of(payload)
            except ValueError:
                out.append(Record(channel, -1, payload))  # the caller dead-letters it
                continue
            if channel not in self._known:
                self._known.add(channel)
                if channel not in positions:
                    # a channel the opening did not find is new: all of it is after the start
                    positions[channel] = 0
                    self._floors[channel] = 0
            last = positions[channel]
            if seq <= last:
                self._m_dups.inc()
                continue
            if seq > last + 1:
                self._m_gaps.inc()
                filled = await self._read_range(channel, last, seq - 1, self.batch_max)
                out.extend(filled)
                reached = filled[-1].seq if filled else last
                if reached < seq - 1 and len(filled) >= self.batch_max:
                    # a long gap: deliver what fits, the sweep reads the rest in order
                    positions[channel] = reached
                    self._dirty.add(channel)
                    continue
                if reached < seq - 1:
                    self._note_lost(channel, reached, seq - 1 - reached)
            out.append(Record(channel, seq, payload))
            positions[channel] = seq
        return out

    async def batches(self) -> AsyncGenerator[list[Record], None]:
        """Yield batches of records in per-channel sequence order, forever."""
        if self._subscriber_task is None:
            await self.open()
        while True:
            raise_if_cancelled()
            if self._rewind_requested:
                self._apply_rewind()
            if not self._queue and not self._dirty:
                self._wakeup.clear()
                wait = self.sweep_interval_s - (time.monotonic() - self._last_sweep)
                if wait > 0:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                    # cancellation that races the wakeup (see raise_if_cancelled)
                    try:
                        async with asyncio.timeout(wait):
                            await self._wakeup.wait()
                    except TimeoutError:
                        pass
            batch = await self._take_pubsub()
            self._take_discovered()
            if self._dirty or time.monotonic() - self._last_sweep >= self.sweep_interval_s:
                batch.extend(await self._sweep())
            if self._rewind_requested:
                continue  # read before the rewind: dropped, read again after it
            if batch:
                counts: dict[str, int] = {}
                for record in batch:
                    kind = channel_kind(record.channel)
                    counts[kind] = counts.get(kind, 0) + 1
                for kind, count in counts.items():
                    self._m_delivered.labels(self.name, kind).inc(count)
                yield batch

    def rewind(self) -> None:
        """Forget what was delivered but not committed; deliver it again from the streams.

        For a caller whose downstream write failed: positions go back to the committed ones
        (or where each channel started), queued pub/sub messages are dropped, and every
        channel is swept. Nothing is lost; what the downstream did take arrives twice. Takes
        effect at the next step of ``batches()``; a batch being read meanwhile is dropped
        (never yielded), so no record from before the rewind follows it.
        """
        self._rewind_requested = True
        self._wakeup.set()

    def _apply_rewind(self) -> None:
        self._rewind_requested = False
        self._m_rewinds.inc()
        self.positions = {
            channel: self.committed.get(channel, self._floors.get(channel, 0))
            for channel in self.positions
        }
        self._queue.clear()
        self._dirty |= set(self.positions)
        self._sweep_everything_now()
        self.log.info("consumer.rewound", channels=len(self.positions))

    async def commit(self, records: Iterable[Record]) -> None:
        """Durably note these records as done; a restart resumes after them."""
        changed: dict[str, int] = {}
        for record in records:
            if record.seq > self.committed.get(record.channel, 0):
                self.committed[record.channel] = record.seq
                changed[record.channel] = record.seq
        await self.store.save(changed)
