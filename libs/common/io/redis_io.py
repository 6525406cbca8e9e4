"""Redis I/O: connect with retry, sequenced publish (pub/sub + stream), stream reads, subscribe.

Every record on a channel gets the next per-channel sequence number and goes both to pub/sub
(for latency) and to a per-channel Redis stream (for durability), atomically, by one Lua
script: ``INCR`` the channel's sequence, ``XADD`` to the stream with the entry id ``0-<seq>``
and ``PUBLISH`` the same bytes. The stream id therefore *is* the sequence, so a consumer that
saw a gap reads exactly the missing range with ``XRANGE``, and a consumer that restarts reads
from its last sequence on. Records are encoded with ``seq`` as their first field set to 0;
the script splices the real number in. Keys (``libs.common.names.Keys``) use a hash
tag of the channel, so a channel's sequence and stream live in one cluster slot.
"""

from __future__ import annotations

import asyncio
import fnmatch
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

import hiredis
import msgspec
import redis.asyncio as aioredis
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from redis.asyncio.client import Pipeline, PubSub
from redis.exceptions import BusyLoadingError, InvalidResponse, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from libs.common.io.redis_packing import lean_packing
from libs.common.io.security import ConnectionSettingError, redis_client, redis_setting_error
from libs.common.names import Keys, channel_kind
from libs.common.runtime.metrics import metrics_for
from libs.common.runtime.retry import retry_async
from libs.common.runtime.settings import CommonSettings
from libs.common.schemas import ENCODER, SEQ_PREFIX

log = structlog.get_logger("tickmesh.redis")

RETRIABLE = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError)
"""Errors worth a retry; anything else is a bug or a configuration error."""

_PLACEHOLDER = SEQ_PREFIX + b"0"
_SCAN_COUNT = 10_000
"""Keys a ``SCAN`` step visits: a round trip per ten thousand keys, about a millisecond of the
server's time each."""

# KEYS[1] the call's token key (its first channel's), then for each channel c (1-based) of the
# call: KEYS[2c] its sequence key, KEYS[2c+1] its stream. ARGV[1] stream max length, ARGV[2] the
# batch token ('' for none), then per channel: its name, its record count n, and n records,
# each after its '{"seq":0'. Each channel's records get consecutive sequences (one INCRBY), go
# to its stream and to pub/sub. A call whose token the token key already holds (a retry after
# a lost reply: the same call, with the same channels) applies nothing: the sequences it gave
# are returned as they were. One token per call, not per channel: a GET and a SET a call
# instead of one each per channel (a thousand symbols' frames touch a channel or so a record).
# Returns every sequence, in argument order.
_PUBLISH_LUA = """
local maxlen = ARGV[1]
local token = ARGV[2]
local seqs = {}
if token ~= '' then
  local previous = redis.call('GET', KEYS[1])
  if previous then
    local previous_token, firsts = string.match(previous, '^(.*)@([%d,]+)$')
    if previous_token == token then
      local a = 3
      for first in string.gmatch(firsts, '%d+') do
        local count = tonumber(ARGV[a + 1])
        for i = 1, count do
          seqs[#seqs + 1] = tonumber(first) + i - 1
        end
        a = a + 2 + count
      end
      return seqs
    end
  end
end
local firsts = {}
local a = 3
for c = 1, (#KEYS - 1) / 2 do
  local seq_key, stream = KEYS[2 * c], KEYS[2 * c + 1]
  local channel, count = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  local seq = redis.call('INCRBY', seq_key, count) - count + 1
  local first = seq
  for i = 1, count do
    local tail = ARGV[a]
    a = a + 1
    local payload = '{"seq":' .. seq .. tail
    local ok = redis.pcall('XADD', stream, 'MAXLEN', '~', maxlen, '0-' .. seq, 'd', payload)
    if type(ok) == 'table' and ok.err then
      -- the sequence key was lost but the stream survived: continue after the stream's top
      local info = redis.call('XINFO', 'STREAM', stream)
      for j = 1, #info, 2 do
        if info[j] == 'last-generated-id' then
          seq = tonumber(string.match(info[j + 1], '-(%d+)$')) + 1
        end
      end
      if i == 1 then first = seq end
      redis.call('SET', seq_key, seq + count - i)
      payload = '{"seq":' .. seq .. tail
      redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '0-' .. seq, 'd', payload)
    end
    redis.call('PUBLISH', channel, payload)
    seqs[#seqs + 1] = seq
    seq = seq + 1
  end
  firsts[#firsts + 1] = first
end
if token ~= '' then
  redis.call('SET', KEYS[1], token .. '@' .. table.concat(firsts, ','), 'EX', 3600)
end
return seqs
"""


async def connect_redis(
    target: str | CommonSettings,
    *,
    max_wait_s: float = 60.0,
    initial_delay_s: float = 0.1,
    max_delay_s: float = 5.0,
    name: str = "tickmesh",
) -> aioredis.Redis:
    """Connect and PING, retrying retriable errors with backoff and jitter until ``max_wait_s``.

    ``target`` is the service's settings (URL, ACL user, TLS files, timeouts: see
    ``security.redis_client``) or a bare URL. A refused login or an untrusted certificate is
    not retried: ``ConnectionSettingError`` names the variable to fix."""
    if isinstance(target, CommonSettings):
        settings, url = target, target.redis_url
        client = redis_client(settings, name=name, health_check_interval=30)
    else:  # a bare URL (tools, tests): its own credentials, the default timeouts
        settings, url = CommonSettings(), target
        client = lean_packing(
            aioredis.Redis.from_url(
                url, socket_connect_timeout=5, health_check_interval=30, client_name=name
            )
        )

    def retriable(exc: BaseException) -> bool:
        return isinstance(exc, RETRIABLE) and redis_setting_error(settings, exc) is None

    try:
        await retry_async(
            client.ping,
            retriable=retriable,
            max_wait_s=max_wait_s,
            what="redis connect",
            initial_s=initial_delay_s,
            max_s=max_delay_s,
            url=redact_url(url),
        )
    except Exception as exc:
        await client.aclose()
        message = redis_setting_error(settings, exc)
        if message is not None:
            raise ConnectionSettingError(f"{message} at {redact_url(url)}") from None
        if isinstance(exc, RETRIABLE):
            raise ConnectionError(f"Redis at {redact_url(url)} unreachable: {exc}") from exc
        raise
    return client


def redact_url(url: str) -> str:
    """``url`` with any password replaced, for logs and errors."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


class PublishMetrics:
    """Metrics of sequenced publishing; built once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = Counter(
            "tickmesh_redis_records_published",
            "Records published (pub/sub + stream)",
            ["kind"],
            registry=registry,
        )
        self.batches = Counter(
            "tickmesh_redis_publish_batches", "Pipelined publish round trips", registry=registry
        )
        self.latency = Histogram(
            "tickmesh_redis_publish_seconds",
            "Latency of one pipelined publish",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self.errors = Counter(
            "tickmesh_redis_publish_errors", "Failed publish round trips", registry=registry
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None) -> PublishMetrics:
        """The metrics of ``registry`` (the default registry when None), created once."""
        return metrics_for(cls, registry)


def record_tail(record: msgspec.Struct | bytes) -> bytes:
    """The encoded record after its ``{"seq":0`` placeholder, ready for the publish script."""
    payload = record if isinstance(record, bytes) else ENCODER.encode(record)
    if not payload.startswith(_PLACEHOLDER) or payload[len(_PLACEHOLDER)] not in b",}":
        raise ValueError("a published record must start with a seq field set to 0")
    return payload[len(_PLACEHOLDER) :]


T = TypeVar("T")


class CachedScript:
    """A Lua script run by ``EVALSHA`` in pipelines (``pipe.evalsha(script.sha, ...)``):
    loaded into the server's cache once, and again when the server lost it (a restart)."""

    def __init__(self, client: aioredis.Redis, text: str) -> None:
        self.client = client
        self.text = text
        self.script = client.register_script(text)
        self.sha = self.script.sha
        self._loaded = False
        """The script is in the server's cache as far as we know (unknown again after any
        error, since a restarted server has an empty cache)."""

    async def run(self, send: Callable[[], Awaitable[T]]) -> T:
        """``send()`` (a pipeline of ``EVALSHA`` calls), with the script loaded first; sent
        again once if the server had lost it (no call ran; its other commands run twice)."""
        try:
            if not self._loaded:
                await self.client.script_load(self.text)  # the same text: the same sha
                self._loaded = True
            try:
                return await send()
            except NoScriptError:
                await self.client.script_load(self.text)
                return await send()
        except Exception:
            self._loaded = False
            raise


class Publisher:
    """Sequenced, pipelined publishing of records to channels (pub/sub + stream)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        keys: Keys | None = None,
        stream_maxlen: int = 200_000,
        channels_per_call: int = 64,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.client = client
        self.keys = keys or Keys()
        self.stream_maxlen = stream_maxlen
        if channels_per_call < 1:
            raise ValueError(f"channels_per_call must be at least 1, not {channels_per_call}")
        self.channels_per_call = channels_per_call
        """Channels in one call of the publish script: more, fewer calls (each costs Redis a
        script run and a token check); 1 on a Redis Cluster, where a call's keys must share a
        slot (each channel's keys do, and a call's token key is its first channel's)."""
        self._script = CachedScript(client, _PUBLISH_LUA)
        self.metrics = PublishMetrics.for_registry(registry)
        self._channels: dict[str, tuple[str, str, str]] = {}
        """Each channel's sequence key, stream key and kind, formatted once (a channel per
        symbol and record kind: thousands, not more)."""

    async def publish(self, channel: str, record: msgspec.Struct | bytes) -> int:
        """Publish one record; returns its sequence number."""
        return (await self.publish_many([(channel, record)]))[0]

    async def publish_many(
        self,
        items: Sequence[tuple[str, msgspec.Struct | bytes]],
        *,
        transaction: bool = False,
        also: Callable[[Pipeline], object] | None = None,
        before: Callable[[Pipeline], object] | None = None,
        token: str = "",
    ) -> list[int]:
        """Publish records in one pipelined round trip; returns their sequence numbers.

        With a ``token`` (unique per batch), publishing the same batch again (a retry after a
        reply was lost) applies nothing twice and returns the same sequences.

        With ``transaction`` the records go in one MULTI/EXEC, together with whatever ``also``
        queues on the same pipeline (a state write that must happen with them or not at all).
        A transaction touches several channels' keys, so it needs a single Redis node.

        ``before`` queues commands ahead of the records' on the same pipeline: in the same
        round trip, and run by the server before them (a pipeline's commands run in order), so
        a crash between the two leaves the first done and not the second, as two round trips
        would. Not ``EVALSHA`` of another script (a server that lost its scripts would refuse
        it and publish the records after it); run again if the publish script is reloaded.
        """
        if not items and also is None and before is None:
            return []
        keys = self.keys
        maxlen = self.stream_maxlen
        script = self._script.script
        by_channel: dict[str, list[bytes]] = {}
        for channel, record in items:
            tails = by_channel.get(channel)
            if tails is None:
                by_channel[channel] = [record_tail(record)]
            else:
                tails.append(record_tail(record))
        known = self._channels
        for channel in by_channel:
            if channel not in known:
                known[channel] = (keys.seq(channel), keys.stream(channel), channel_kind(channel))
        started = time.perf_counter()
        first = 0  # where the publish calls' replies start (after before's)
        # a call per channels_per_call channels: one round trip either way, but each call
        # costs Redis a script run (bench_ingest_publish, 1,000 symbols, a frame a round trip:
        # 2,495 us a frame with a call per channel, 1,489 with one call)
        channels = list(by_channel)
        per_call = self.channels_per_call
        calls = [channels[i : i + per_call] for i in range(0, len(channels), per_call)]

        async def send() -> list[Any]:
            nonlocal first
            async with self.client.pipeline(transaction=transaction) as pipe:
                if before is not None:
                    before(pipe)
                    first = len(pipe)
                for channels in calls:
                    call_keys: list[str] = [keys.token(channels[0])]
                    args: list[bytes | str | int] = [maxlen, token]
                    for channel in channels:
                        tails = by_channel[channel]
                        seq_key, stream_key, _ = known[channel]
                        call_keys += (seq_key, stream_key)
                        args += (channel, len(tails), *tails)
                    if transaction:
                        # the pipeline checks the script is loaded before MULTI, so a
                        # transaction never runs with its records missing
                        await script(keys=call_keys, args=args, client=pipe)
                    else:
                        pipe.evalsha(script.sha, len(call_keys), *call_keys, *args)
                if also is not None:
                    also(pipe)
                return await pipe.execute()

        try:
            results = await self._script.run(send)
        except Exception:
            self.metrics.errors.inc()
            raise
        self.metrics.latency.observe(time.perf_counter() - started)
        self.metrics.batches.inc()
        # the sequences come channel by channel in by_channel's order; ``at`` walks each
        # channel's run of them in the items' order
        flat = [int(seq) for result in results[first : first + len(calls)] for seq in result]
        at: dict[str, int] = {}
        kinds: dict[str, int] = {}
        index = 0
        for channel, tails in by_channel.items():
            at[channel] = index
            index += len(tails)
            kind = known[channel][2]
            kinds[kind] = kinds.get(kind, 0) + len(tails)
        for kind, count in kinds.items():
            self.metrics.records.labels(kind).inc(count)
        out: list[int] = []
        for channel, _ in items:
            index = at[channel]
            out.append(flat[index])
            at[channel] = index + 1
        return out


# One stream entry as this module's clients (bytes replies) return it; redis-py types its replies
# for both decode modes at once, so they are cast to this at the call.
_Entries = list[tuple[bytes, dict[bytes, bytes]]]


def _records(entries: _Entries) -> list[tuple[int, bytes]]:
    """``(seq, payload)`` of stream entries (the entry id is ``0-<seq>``)."""
    return [(int(entry_id.split(b"-")[1]), fields[b"d"]) for entry_id, fields in entries]


class StreamReader:
    """Reads a channel's durable stream by sequence number."""

    def __init__(self, client: aioredis.Redis, keys: Keys | None = None) -> None:
        self.client = client
        self.keys = keys or Keys()

    async def read(
        self, channel: str, after_seq: int = 0, count: int = 1_000, upto_seq: int | None = None
    ) -> list[tuple[int, bytes]]:
        """Records with ``after_seq < seq <= upto_seq`` in order, at most ``count``."""
        end = "+" if upto_seq is None else f"0-{upto_seq}"
        entries = cast(
            _Entries,
            await self.client.xrange(
                self.keys.stream(channel), min=f"(0-{after_seq}", max=end, count=count
            ),
        )
        return _records(entries)

    async def read_many(
        self, requests: list[tuple[str, int, int, int]]
    ) -> list[list[tuple[int, bytes]]]:
        """``read`` of several channels in one round trip: for each ``(channel, after_seq,
        upto_seq, count)``, its records in order.

        The requests that ask for all a channel holds up to ``upto_seq`` (the common case:
        each channel a few records behind) go in one multi-stream ``XREAD`` instead of a
        command each (a sweep of a thousand channels was a thousand commands to pack and
        parse); one whose count is smaller than what it is behind gets its own ``XRANGE``,
        so no channel reads more than asked for beyond what was published meanwhile."""
        if not requests:
            return []
        whole: dict[str, str] = {}
        most = 0
        ranged: list[int] = []
        for index, (channel, after_seq, upto_seq, count) in enumerate(requests):
            key = self.keys.stream(channel)
            if count >= upto_seq - after_seq and key not in whole:
                whole[key] = f"0-{after_seq}"
                most = max(most, count)
            else:
                ranged.append(index)
        async with self.client.pipeline(transaction=False) as pipe:
            if whole:
                pipe.xread(whole, count=most)  # type: ignore[arg-type]
            for index in ranged:
                channel, after_seq, upto_seq, count = requests[index]
                pipe.xrange(
                    self.keys.stream(channel),
                    min=f"(0-{after_seq}",
                    max=f"0-{upto_seq}",
                    count=count,
                )
            replies = await pipe.execute()
        by_key: dict[str, _Entries] = {}
        if whole:
            for name, entries in cast(list[tuple[bytes, _Entries]], replies[0] or []):
                by_key[name.decode()] = entries
        out: list[list[tuple[int, bytes]]] = []
        ranged_replies = iter(cast(list[_Entries], replies[1:] if whole else replies))
        ranged_set = set(ranged)
        for index, (channel, _after, upto_seq, count) in enumerate(requests):
            if index in ranged_set:
                out.append(_records(next(ranged_replies)))
                continue
            records = _records(by_key.get(self.keys.stream(channel), []))
            # what was published after the caller's top stays for the next read, as XRANGE's
            # upper bound would have left it
            if records and records[-1][0] > upto_seq:
                records = [record for record in records if record[0] <= upto_seq]
            out.append(records[:count])
        return out

    async def tail(
        self, channel: str, count: int, upto_seq: int | None = None
    ) -> list[tuple[int, bytes]]:
        """The newest ``count`` records with ``seq <= upto_seq`` (all when None), oldest first."""
        top = "+" if upto_seq is None else f"0-{upto_seq}"
        entries = cast(
            _Entries,
            await self.client.xrevrange(self.keys.stream(channel), max=top, min="-", count=count),
        )
        return _records(entries[::-1])

    async def last_seq(self, channel: str) -> int:
        """The newest sequence in the stream (0 when empty)."""
        entries = cast(_Entries, await self.client.xrevrange(self.keys.stream(channel), count=1))
        return int(entries[0][0].split(b"-")[1]) if entries else 0

    async def first_seq(self, channel: str) -> int:
        """The oldest sequence still kept (0 when empty); older ones were trimmed."""
        entries = cast(_Entries, await self.client.xrange(self.keys.stream(channel), count=1))
        return int(entries[0][0].split(b"-")[1]) if entries else 0

    async def channels(self, pattern: str | Sequence[str] = "*") -> list[str]:
        """Channels matching a glob ``pattern`` (or any of several) that have a stream.

        One ``SCAN`` of the keyspace whatever the number of patterns (several match every
        stream and filter here: a pass each was 8 passes for the mirror's routes, 30-90 ms a
        pass over 11 k keys with the mesh at 20 k ticks/s)."""
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        match = self.keys.stream(patterns[0] if len(patterns) == 1 else "*")
        found: list[str] = []
        async for key in self.client.scan_iter(match=match, count=_SCAN_COUNT):
            channel = self.keys.channel_of_stream(key)
            if len(patterns) == 1 or any(fnmatch.fnmatchcase(channel, p) for p in patterns):
                found.append(channel)
        return sorted(found)


try:  # redis-py's hiredis parser, for replies already read from the socket (below)
    from redis._parsers import hiredis as _parsers_hiredis

    _NO_REPLY: object = _parsers_hiredis.NOT_ENOUGH_DATA
    _HIREDIS_PARSER: type | None = _parsers_hiredis._AsyncHiredisParser
except (ImportError, AttributeError):  # pragma: no cover - every read goes through redis-py
    _NO_REPLY, _HIREDIS_PARSER = object(), None
_PUSH: type = getattr(hiredis, "PushNotification", tuple)  # RESP3 pushes (a list subclass)
_UNREADABLE = (InvalidResponse, UnicodeDecodeError, RecursionError)
"""What leaves a connection's parser unusable (redis-py disconnects on them)."""
_MESSAGES = (b"message", b"pmessage")


def _buffered_reply(conn: Any) -> Any:
    """The next reply the connection's hiredis parser holds complete, read without a wait;
    ``_NO_REPLY`` when there is none (or the parser is not hiredis, or disconnected).

    A socket read takes up to 64 KiB: a busy subscriber's one read holds hundreds of
    messages, and ``read_response`` hands each over through a timeout context, the host's
    name formatted for its errors, the parser's own await and a debug log call: reading
    20,000 messages cost 3.6 us of CPU a message that way, 2.1 taken here. This reaches into
    redis-py's parser (``_parser``, ``_reader``, ``_connected``); without them every read
    goes through ``read_response`` as before, and ``test_redis_io`` fails to say so."""
    parser: Any = getattr(conn, "_parser", None)
    if _HIREDIS_PARSER is None or type(parser) is not _HIREDIS_PARSER:
        return _NO_REPLY
    hiredis_parser: Any = parser  # (typed as redis-py's, whose attributes are private)
    return hiredis_parser._reader.gets() if hiredis_parser._connected else _NO_REPLY


async def next_message(pubsub: PubSub, timeout_s: float | None) -> tuple[bytes, bytes] | None:
    """The next ``(channel, payload)`` a subscription receives; ``None`` when ``timeout_s``
    passed first (``None``: wait as long as it takes) or the reply was not a message (a
    subscription's confirmation, a health check's answer: given to redis-py's bookkeeping).

    redis-py's ``get_message`` wraps every read in its retry layer, a health check, a dict
    and an observability hook: half of a busy subscriber's read cost. This reads the
    connection itself (a reply the parser already holds first: ``_buffered_reply``) and
    keeps the health check (a PING at redis-py's interval). A broken
    connection raises (``RETRIABLE``) instead of being reconnected and re-subscribed behind
    the caller's back: the caller subscribes again and reads what it missed from the streams.
    """
    conn = pubsub.connection
    if conn is None:
        raise RuntimeError("read before subscribing")
    interval = conn.health_check_interval
    now = asyncio.get_running_loop().time() if interval else 0.0  # read once a message
    if interval and now > conn.next_health_check:
        await pubsub.check_health()
    try:
        response = _buffered_reply(conn)
    except _UNREADABLE:
        await conn.disconnect(nowait=True)  # the bytes that failed stay: as read_response does
        raise
    if response is _NO_REPLY:
        response = await conn.read_response(
            timeout=math.inf if timeout_s is None else timeout_s,
            disconnect_on_error=False,
            push_request=True,
        )
    else:  # what read_response does with a reply besides reading it
        if interval:
            conn.next_health_check = now + interval
        if isinstance(response, (RedisConnectionError, ResponseError)):
            raise response
        if isinstance(response, _PUSH) and response[0] not in _MESSAGES:
            # another push (an invalidation, a maintenance notice): the parser's handling
            response = await conn._parser.handle_push_response(response)
    if response is None:
        return None
    if isinstance(response, list):  # a list, or hiredis's PushNotification (a list)
        kind = response[0]
        if kind == b"message":
            return response[1], response[2]
        if kind == b"pmessage":
            return response[2], response[3]
    await pubsub.handle_message(response, ignore_subscribe_messages=True)
    return None


class Subscriber:
    """Pattern subscription yielding ``(channel, payload)`` pairs."""

    def __init__(self, client: aioredis.Redis, patterns: Iterable[str]) -> None:
        self.client = client
        self.patterns = list(patterns)
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)

    async def __aenter__(self) -> Subscriber:
        await self._pubsub.psubscribe(*self.patterns)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._pubsub.aclose()

    async def messages(self, timeout_s: float = 1.0) -> AsyncIterator[tuple[str, bytes] | None]:
        """Yield messages; ``None`` when ``timeout_s`` passes with none (lets callers tick) or
        a reply was not a message (a subscription's confirmation)."""
        while True:
            message = await next_message(self._pubsub, timeout_s)
            yield None if message is None else (message[0].decode(), message[1])
