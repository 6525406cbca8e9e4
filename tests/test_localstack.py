"""The local stack really starts redis-server and Tansu, and they behave as the code needs."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from devstack.localstack import (
    LocalStack,
    LocalStackError,
    RedisServer,
    TansuBroker,
    free_port,
    process_state,
    unpacked_redis_server,
)
from tests.helpers import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# Consumer-group settings that make joins fast on Tansu (about 1 s instead of 5 s).
FAST_GROUP: dict[str, Any] = {
    "session_timeout_ms": 1000,
    "heartbeat_interval_ms": 200,
    "rebalance_timeout_ms": 1000,
    "fetch_max_wait_ms": 50,
}


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_free_port_can_be_bound_again() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def test_redis_answers_ping_without_persistence(redis_client: Any, unique_name) -> None:
    assert await redis_client.ping() is True
    assert (await redis_client.config_get("save"))["save"] == ""
    assert (await redis_client.config_get("appendonly"))["appendonly"] == "no"
    key = unique_name("key")
    await redis_client.set(key, b"v", ex=30)
    assert await redis_client.get(key) == b"v"


def test_redis_server_passes_extra_args_and_stops_its_process() -> None:
    server = RedisServer(extra_args=["--client-output-buffer-limit", "pubsub", "1mb", "1mb", "0"])
    with server:
        pid = server.pid
        import redis

        client = redis.Redis.from_url(server.url)
        try:
            limits = client.config_get("client-output-buffer-limit")["client-output-buffer-limit"]
        finally:
            client.close()
        assert "pubsub 1048576 1048576 0" in limits
    assert _process_gone(pid) and not server.running


@pytest.mark.skipif(
    unpacked_redis_server() is None or bool(os.environ.get("TICKMESH_REDIS_SERVER")),
    reason="Debian's redis-server is not unpacked in .venv/redis-tls (bootstrap.sh needs root "
    "and apt-get), or TICKMESH_REDIS_SERVER picks another",
)
def test_the_stack_runs_the_unpacked_debian_redis_with_jemalloc() -> None:
    import redis

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        try:
            info = client.info("server")
            allocator = client.info("memory")["mem_allocator"]
        finally:
            client.close()
    on_path = shutil.which("redis-server")
    if on_path is not None:  # a redis-server on PATH comes first
        assert str(server.executable) == on_path
        return
    assert int(str(info["redis_version"]).split(".")[0]) >= 7
    assert str(allocator).startswith("jemalloc")


def test_redis_server_with_bad_config_fails_with_its_log() -> None:
    with pytest.raises(LocalStackError, match=r"(?s)exited with code.*Bad directive"):
        RedisServer(extra_args=["--no-such-directive", "1"]).start()


def test_server_refuses_a_port_another_server_holds(redis_server: RedisServer) -> None:
    with pytest.raises(LocalStackError, match=r"(?i)address already in use"):
        RedisServer(port=redis_server.port, startup_timeout_s=5).start()


def test_local_stack_starts_and_stops_both_servers() -> None:
    with LocalStack() as stack:
        assert stack.kafka is not None
        pids = [stack.redis.pid, stack.kafka.pid]
        assert stack.environment() == {
            "REDIS_URL": f"redis://127.0.0.1:{stack.redis.port}/0",
            "KAFKA_BOOTSTRAP": f"127.0.0.1:{stack.kafka.port}",
        }
    assert all(_process_gone(pid) for pid in pids)


async def test_broker_creates_topic_with_partitions_and_configs(
    kafka_bootstrap: str, unique_name
) -> None:
    topic = unique_name("topic")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics(
            [
                NewTopic(
                    topic,
                    num_partitions=3,
                    replication_factor=1,
                    topic_configs={
                        "retention.ms": "-1",
                        "retention.bytes": "-1",
                        "cleanup.policy": "delete",
                    },
                )
            ]
        )
        assert [error[1] for error in response.topic_errors] == [0]
        assert topic in await admin.list_topics()
        (description,) = await admin.describe_topics([topic])
        assert len(description["partitions"]) == 3
        again = await admin.create_topics([NewTopic(topic, 3, 1)])
        assert again.topic_errors[0][1] == 36  # TOPIC_ALREADY_EXISTS, answered, not raised
    finally:
        await admin.close()


async def test_record_round_trips_with_key_and_headers_through_a_consumer_group(
    kafka_bootstrap: str, unique_name
) -> None:
    topic, group = unique_name("topic"), unique_name("group")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()

    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=False
    )
    await producer.start()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **FAST_GROUP,
    )
    try:
        headers = [("seq", b"7"), ("source", b"ticks.AAPL")]
        sent = await producer.send_and_wait(topic, b'{"p":1.5}', key=b"AAPL", headers=headers)
        await consumer.start()
        received: list[Any] = []

        async def got_record() -> bool:
            batches = await consumer.getmany(timeout_ms=100)
            received.extend(record for records in batches.values() for record in records)
            return bool(received)

        await eventually(got_record, timeout=15, interval=0, message="record not consumed")
        (record,) = received
        assert (record.key, record.value, record.headers) == (
            b"AAPL",
            b'{"p":1.5}',
            tuple(headers),
        )
        assert (record.partition, record.offset) == (sent.partition, sent.offset)
        await consumer.commit()
        partition = next(tp for tp in consumer.assignment() if tp.partition == sent.partition)
        assert await consumer.committed(partition) == sent.offset + 1
    finally:
        await consumer.stop()
        await producer.stop()


async def test_paused_broker_refuses_produce_until_resumed(
    kafka_broker: TansuBroker, kafka_bootstrap: str, unique_name
) -> None:
    topic = unique_name("topic")
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap,
        acks="all",
        enable_idempotence=False,
        request_timeout_ms=500,
        retry_backoff_ms=50,
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"before", key=b"k")
        kafka_broker.pause()
        try:
            assert process_state(kafka_broker.pid) == "T"
            with pytest.raises((TimeoutError, KafkaError)):
                await asyncio.wait_for(producer.send_and_wait(topic, b"during", key=b"k"), 1.5)
        finally:
            kafka_broker.resume()
        assert not kafka_broker.paused and process_state(kafka_broker.pid) != "T"

        async def produce_succeeds() -> bool:
            await asyncio.wait_for(producer.send_and_wait(topic, b"after", key=b"k"), 2)
            return True

        await eventually(produce_succeeds, timeout=15, message="produce after resume failed")
    finally:
        await producer.stop()
