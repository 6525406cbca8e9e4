"""Commands packed by hiredis alone: the same bytes as redis-py's packer, its errors kept."""

from __future__ import annotations

import random

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from libs.common.io.redis_io import Publisher, connect_redis
from libs.common.io.redis_packing import LeanPacking, lean_class, lean_packing
from libs.common.io.security import redis_client
from libs.common.names import Keys
from libs.common.runtime.settings import CommonSettings


def packed(connection: Connection, *args: object) -> bytes:
    return b"".join(connection.pack_command(*args))


def connections(**kwargs: object) -> tuple[Connection, Connection]:
    """A plain and a lean connection with the same options (neither connects)."""
    return Connection(**kwargs), lean_class(Connection)(**kwargs)  # type: ignore[arg-type,return-value]


def test_commands_are_packed_to_the_same_bytes_as_redis_py() -> None:
    plain, lean = connections()
    rng = random.Random(7)
    args: list[object] = ["EVALSHA", "f" * 40, 2, "tm:seq:{ticks.SPY}", "tm:stream:{ticks.SPY}"]
    args += [200_000, "", "ticks.SPY", 3, b',"sym":"SPY"}', "Zürich €", -(2**63), 10**30, 0]
    args += [0.1 + 0.2, -0.0, 1e300, 5e-324, float("inf"), 3.0]
    args += [rng.uniform(-1e6, 1e6) for _ in range(500)]
    args += [rng.random() * 10 ** rng.randint(-20, 20) for _ in range(500)]
    assert packed(lean, *args) == packed(plain, *args)
    commands = [("SET", "k", "v"), ("PUBLISH", "ticks.IBM", b"{}"), ("INCRBY", "n", 7)]
    assert b"".join(lean.pack_commands(commands)) == b"".join(plain.pack_commands(commands))


def test_what_hiredis_does_not_take_goes_through_redis_py() -> None:
    plain, lean = connections()
    with pytest.raises(DataError, match="bool"):
        lean.pack_command("SET", "k", True)
    for args in (
        ("SET", "k", bytearray(b"v")),
        ("SET", "k", memoryview(b"v")),
        ("SCRIPT LOAD", "return 1"),  # redis-py splits a command name with a space
        (b"CLIENT SETNAME", "x"),
    ):
        assert packed(lean, *args) == packed(plain, *args)
    for errors in ("replace", "surrogateescape"):
        plain, lean = connections(encoding_errors=errors)
        assert packed(lean, "SET", "k", "a\udcffb") == packed(plain, "SET", "k", "a\udcffb")
    plain, lean = connections()
    assert packed(lean, "SCRIPT\tLOAD", "x") == packed(plain, "SCRIPT\tLOAD", "x")
    plain, lean = connections(encoding="latin-1")
    assert (
        packed(lean, "SET", "k", "é")
        == packed(plain, "SET", "k", "é")
        == (b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n\xe9\r\n")
    )


def test_every_kind_of_url_gets_the_lean_variant_of_its_connection_class() -> None:
    for url, base in (
        ("redis://127.0.0.1:1/0", Connection),
        ("rediss://127.0.0.1:1/0", SSLConnection),
        ("unix:///tmp/redis.sock", UnixDomainSocketConnection),
    ):
        pool = lean_packing(aioredis.Redis.from_url(url)).connection_pool
        assert issubclass(pool.connection_class, LeanPacking)
        assert issubclass(pool.connection_class, base)
        assert lean_class(pool.connection_class) is pool.connection_class
    settings = CommonSettings(redis_url="redis://127.0.0.1:1/0")
    pool = redis_client(settings, name="t").connection_pool
    assert issubclass(pool.connection_class, LeanPacking)


@pytest.mark.integration
async def test_a_lean_client_talks_to_a_real_server(redis_url: str, unique_name) -> None:  # type: ignore[no-untyped-def]
    client = await connect_redis(redis_url)
    try:
        connection = await client.connection_pool.get_connection()
        assert isinstance(connection, LeanPacking)
        await client.connection_pool.release(connection)
        key = unique_name("k")
        await client.set(key, "Zürich €")
        assert (await client.get(key)).decode() == "Zürich €"
        assert await client.incrbyfloat(key + ":f", 0.1) == pytest.approx(0.1)
        async with client.pipeline(transaction=True) as pipe:
            pipe.incrby(key + ":n", 5).incrby(key + ":n", 2)
            assert await pipe.execute() == [5, 7]
        publisher = Publisher(client, keys=Keys(unique_name("p") + ":"))
        items = [(f"ticks.S{i % 300:03d}", b'{"seq":0,"sym":"S"}') for i in range(900)]
        seqs = await publisher.publish_many(items)
        assert seqs == [1 + i // 300 for i in range(900)]
    finally:
        await client.aclose()
