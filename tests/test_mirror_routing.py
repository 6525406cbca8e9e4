"""The routing table: CONTRACT.md's defaults, topic modes, keys, configs, bad records."""

from __future__ import annotations

import msgspec
import pytest

from libs.common.runtime.settings import SettingsError, load_settings
from libs.common.schemas import (
    Bar,
    Heartbeat,
    Portfolio,
    Position,
    TickBatch,
    Trade,
    encode,
)
from services.mirror.config import MirrorSettings
from services.mirror.routing import BadRecord, RoutingTable


def table(**env: str) -> RoutingTable:
    return RoutingTable(
        load_settings(MirrorSettings, {f"MIRROR_{k.upper()}": v for k, v in env.items()})
    )


def seqd(record: msgspec.Struct) -> bytes:
    """Encode as the publisher would have stored it (seq 7)."""
    return b'{"seq":7' + encode(record)[len(b'{"seq":0') :]


TICKS = TickBatch(seq=0, sym="SPY", ticks=[Trade(sym="SPY", p=1.0, s=1, t=1)] * 3)
BAR = Bar(
    seq=0,
    symbol="SPY",
    tsET="2013-10-07T09:30:00-04:00",
    barId=1,
    open=1,
    high=1,
    low=1,
    close=1,
    volume=1,
    vwap=1,
    trades=1,
    startMs=0,
    endMs=60_000,
)


def test_default_table_is_the_contract() -> None:
    routes = table()
    expected = {
        "ticks.SPY": ("ticks.SPY", b"SPY", "delete"),
        "bars.SPY.1m": ("sentio.prices.minute.v1", b"SPY", "delete"),
        "sentio.signals.minute.v1": ("sentio.signals.minute.v1", None, "delete"),
        "sentio.trades.executed.v1": ("sentio.trades.executed.v1", None, "delete"),
        "sentio.positions.state.v1": ("sentio.positions.state.v1", None, "compact"),
        "sentio.portfolio.minute.v1": ("sentio.portfolio.minute.v1", None, "compact"),
        "sentio.heartbeat.v1": ("sentio.heartbeat.v1", None, "compact"),
        "sentio.deadletter.v1": ("sentio.deadletter.v1", None, "delete"),
    }
    for channel, (topic, static_key, policy) in expected.items():
        target = routes.target(channel)
        assert target is not None, channel
        assert (target.topic, target.static_key, target.spec.configs["cleanup.policy"]) == (
            topic,
            static_key,
            policy,
        ), channel
    assert routes.target("quotes.SPY") is None  # not in the contract's Kafka topics
    assert routes.target("bars.SPY.1m").topic != "bars.SPY.1m"  # that one is the shadow's


def test_keys_come_from_the_record_where_the_contract_says() -> None:
    routes = table()
    portfolio = Portfolio(
        seq=0,
        portfolioId="main",
        tsET="",
        barId=1,
        equity=1,
        cash=1,
        realizedPnl=0,
        unrealizedPnl=0,
        exposure=0,
        openPositions=0,
    )
    heartbeat = Heartbeat(
        seq=0, runId="run-1", service="ingest", tsET="", mode="sim", status="ok", lagMs=0
    )
    position = Position(symbol="AAPL", shares=100)
    assert routes.target("sentio.portfolio.minute.v1").prepare(seqd(portfolio))[0] == b"main"
    assert routes.target("sentio.heartbeat.v1").prepare(seqd(heartbeat))[0] == b"run-1"
    assert routes.target("sentio.positions.state.v1").prepare(seqd(position))[0] == b"AAPL"
    assert routes.target("ticks.SPY").prepare(seqd(TICKS)) == (b"SPY", 3)
    assert routes.target("bars.SPY.1m").prepare(seqd(BAR)) == (b"SPY", 0)


def test_single_topic_mode_sends_every_symbol_to_one_topic_keyed_by_symbol() -> None:
    routes = table(topic_mode="single")
    spy, ibm = routes.target("ticks.SPY"), routes.target("ticks.IBM")
    assert spy.topic == ibm.topic == "sentio.ticks.v1"
    assert (spy.static_key, ibm.static_key) == (b"SPY", b"IBM")
    assert "sentio.ticks.v1" in {spec.name for spec in routes.static_specs()}


def test_topic_configs_compaction_switch_and_per_route_retention() -> None:
    routes = table(
        topic_compaction="false",
        topic_configs='{"retention.ms":"-1","retention.bytes":"-1"}',
        extra_routes='[{"pattern":"ticks.*","partitions":3,"configs":{"retention.ms":"86400000"}}]',
    )
    heartbeat = routes.target("sentio.heartbeat.v1").spec
    assert heartbeat.configs == {
        "retention.ms": "-1",
        "retention.bytes": "-1",
        "cleanup.policy": "delete",
    }
    ticks = routes.target("ticks.SPY").spec
    assert ticks.partitions == 3
    assert ticks.configs["retention.ms"] == "86400000"


def test_a_routes_variable_replaces_the_table() -> None:
    routes = table(routes='[{"pattern":"aggs.*.1m","topic":"vendor.{symbol}","key":"channel"}]')
    target = routes.target("aggs.SPY.1m")
    assert (target.topic, target.static_key) == ("vendor.SPY", b"aggs.SPY.1m")
    assert routes.target("ticks.SPY") is None


def test_bad_records_are_refused_with_the_reason() -> None:
    routes = table()
    with pytest.raises(BadRecord, match="TickBatch"):
        routes.target("ticks.SPY").prepare(b'{"seq":1,"sym":"SPY"}')
    with pytest.raises(BadRecord):
        routes.target("ticks.SPY").prepare(b'{"seq":1,not json')
    with pytest.raises(BadRecord, match="missing"):
        routes.target("sentio.positions.state.v1").prepare(b'{"seq":1,"shares":5}')


def test_without_validation_only_the_key_field_is_read() -> None:
    routes = table(validate="false")
    target = routes.target("sentio.portfolio.minute.v1")
    assert target.prepare(b'{"seq":1,"portfolioId":"p9","anything":[1,2]}')[0] == b"p9"
    assert routes.target("ticks.SPY").prepare(b'{"seq":1,"whatever":true}') == (b"SPY", 0)


def test_malformed_routing_settings_fail_fast_with_the_variable_name() -> None:
    with pytest.raises(SettingsError, match="MIRROR_ROUTES"):
        load_settings(MirrorSettings, {"MIRROR_ROUTES": '[{"topic":"x"}]'})
    with pytest.raises(SettingsError, match="MIRROR_TOPIC_MODE"):
        load_settings(MirrorSettings, {"MIRROR_TOPIC_MODE": "sharded"})
    with pytest.raises(ValueError, match="unknown schema"):
        table(routes='[{"pattern":"x.*","schema":"Nope"}]')
