"""The dashboard's pure core: the view (what the page shows) and the hub (numbered events,
resumes, per-browser outboxes that coalesce and stay bounded). No I/O."""

from __future__ import annotations

from datetime import date

import msgspec
from prometheus_client import CollectorRegistry

from libs.common.market.sessions import bar_id, ny_epoch_ms, ts_et_minute
from libs.common.schemas import Bar, DaySummary, ExecutedTrade, Heartbeat, Position, Progress
from services.dashboard.hub import Hub
from services.dashboard.view import Event, View, et_offset_s

DAY = date(2013, 10, 7)


def bar(symbol: str, minute: int, close: float, revision: int = 0, day: date = DAY) -> Bar:
    start = ny_epoch_ms(day, 9, 30 + minute)
    return Bar(
        seq=0,
        symbol=symbol,
        tsET=ts_et_minute(start),
        barId=bar_id(start),
        open=close - 0.1,
        high=close + 0.2,
        low=close - 0.2,
        close=close,
        volume=100,
        vwap=close,
        trades=3,
        startMs=start,
        endMs=start + 60_000,
        revision=revision,
    )


def trade(trade_id: str, ts: str = "2013-10-07T10:05:00-04:00") -> ExecutedTrade:
    return ExecutedTrade(0, "SPY", ts, 36, "BUY", 100, 168.1, 167.3, 169.8, "test", trade_id)


def decoded(frame_data: bytes) -> tuple[str, str, dict[str, object]]:
    lines = frame_data.decode().strip().split("\n")
    fields = dict(line.split(": ", 1) for line in lines)
    return fields["id"], fields["event"], msgspec.json.decode(fields["data"])


def test_a_bar_updates_the_chart_and_the_symbols_row_and_a_lower_revision_is_ignored() -> None:
    view = View()
    events = view.on_bar(bar("SPY", 0, 168.0))
    assert [event.name for event in events] == ["bar", "quote"]
    view.on_bar(bar("SPY", 1, 168.5))
    line = view.lines()[0]
    assert (line.symbol, line.open, line.last) == ("SPY", 167.9, 168.5)
    assert line.change == 0.6
    assert view.on_bar(bar("SPY", 1, 168.4, revision=1))[0].data.revision == 1
    assert view.on_bar(bar("SPY", 1, 170.0, revision=0)) == []
    assert view.lines()[0].last == 168.4


def test_a_later_day_starts_afresh_and_an_earlier_day_is_ignored() -> None:
    view = View()
    view.on_bar(bar("SPY", 0, 168.0))
    view.on_trade(trade("t1"))
    assert view.on_bar(bar("SPY", 0, 160.0, day=date(2013, 10, 4))) == []
    view.on_bar(bar("IBM", 0, 180.0, day=date(2013, 10, 8)))
    assert view.day == date(2013, 10, 8)
    assert [line.symbol for line in view.lines()] == ["IBM"]
    assert not view.trades


def test_trades_count_once_and_a_flat_position_leaves_the_table() -> None:
    view = View(trades_kept=2)
    assert view.on_trade(trade("t1"))
    assert view.on_trade(trade("t1")) == []
    view.on_trade(trade("t2"))
    view.on_trade(trade("t3"))
    assert [t.tradeId for t in view.trades] == ["t2", "t3"]
    assert view.on_trade(trade("t1"))  # fell out of the kept window: a new row again
    view.on_position(Position(seq=1, symbol="SPY", shares=100, entryPrice=168.0))
    assert "SPY" in view.positions
    gone = view.on_position(Position(seq=2, symbol="SPY", shares=0))
    assert gone[0].data.shares == 0 and "SPY" not in view.positions
    assert view.on_position(Position(seq=1, symbol="SPY", shares=100)) == []


def test_chart_bars_merge_the_bar_store_with_newer_revisions_kept_in_memory() -> None:
    view = View(recent_bars=4)
    for minute in range(10):
        view.on_bar(bar("SPY", minute, 168.0 + minute))
    assert len(view.bars["SPY"]) <= 5
    view.on_bar(bar("SPY", 9, 170.0, revision=2))
    stored = {b.startMs: b for b in (bar("SPY", minute, 168.0 + minute) for minute in range(10))}
    merged = view.chart_bars("SPY", stored)
    assert len(merged) == 10 and merged[-1].revision == 2 and merged[-1].close == 170.0
    assert [b.startMs for b in merged] == sorted(stored)


def test_health_reads_feed_lags_stale_services_parity_and_the_gate() -> None:
    view = View()
    now = ny_epoch_ms(DAY, 12)
    view.on_bar(bar("SPY", 0, 168.0))
    view.on_heartbeat(Heartbeat(0, "run", "ingest", "", "sim", "ok", 1_500, tsMs=now - 1_000))
    view.on_heartbeat(Heartbeat(0, "run", "mirror", "", "sim", "ok", 250, tsMs=now - 1_000))
    view.on_heartbeat(Heartbeat(0, "run", "bars", "", "sim", "ok", 0, tsMs=now - 60_000))
    view.on_progress(Progress(seq=1, source="ws", feedTimeMs=now - 2_000, ticks={}))
    view.on_summary(
        DaySummary(
            "2013-10-07", 100.0, 390, 390, now, completenessPct=99.5, gateReady=False,
            gatePassing=1, gateDays=5, gateTargetPct=99.9, gateReasons=["2013-10-04: no report"],
        )
    )  # fmt: skip
    health = view.health(now, stale_after_ms=15_000)
    assert health["feed"]["connected"] is True
    assert health["feed"]["feedTimeET"] == "2013-10-07T11:59:58-04:00"
    assert (health["lagMs"], health["mirrorLagMs"]) == (1_500, 250)
    assert {s["service"]: s["stale"] for s in health["services"]} == {
        "bars": True,
        "ingest": False,
        "mirror": False,
    }
    assert health["parity"]["completenessPct"] == 99.5
    assert health["gate"] == {
        "ready": False,
        "passing": 1,
        "days": 5,
        "targetPct": 99.9,
        "reasons": ["2013-10-04: no report"],
    }
    later = view.health(now + 30_000, stale_after_ms=15_000)
    assert later["feed"]["connected"] is False  # ingest's heartbeats stopped


def test_an_outbox_coalesces_by_key_in_increasing_ids_and_filters_other_symbols() -> None:
    hub = Hub(registry=CollectorRegistry(), epoch="e")
    outbox = hub.connect("SPY")
    hub.publish([Event("quote", {"last": 1}, ("quote", "SPY"))])
    hub.publish([Event("trade", {"id": "t1"})])
    hub.publish([Event("quote", {"last": 2}, ("quote", "SPY"))])
    hub.publish([Event("bar", {"close": 3}, ("bar", "IBM", 0), "IBM")])
    hub.publish([Event("bar", {"close": 4}, ("bar", "SPY", 0), "SPY")])
    frames = [decoded(frame.data) for frame in outbox.take()]
    assert frames == [
        ("e-2", "trade", {"id": "t1"}),
        ("e-3", "quote", {"last": 2}),
        ("e-5", "bar", {"close": 4}),
    ]
    assert hub.metrics.coalesced._value.get() == 1


def test_a_full_outbox_is_emptied_and_asks_for_a_snapshot() -> None:
    hub = Hub(client_limit=10, registry=CollectorRegistry(), epoch="e")
    slow = hub.connect(None)
    fast = hub.connect(None)
    for number in range(11):
        hub.publish([Event("trade", {"n": number})])
        fast.take()
    assert slow.resync and not slow.frames
    hub.publish([Event("trade", {"n": 99})])
    assert not slow.frames  # nothing queued until the snapshot is sent
    assert not fast.resync and len(fast.take()) == 1
    assert hub.metrics.resyncs._value.get() == 1


def test_a_resume_gets_the_missed_events_or_a_snapshot_when_it_cannot() -> None:
    hub = Hub(replay_events=3, registry=CollectorRegistry(), epoch="e")
    for number in range(5):
        symbol = "IBM" if number == 3 else None
        hub.publish([Event("bar" if symbol else "trade", {"n": number}, None, symbol)])
    missed = hub.missed("e-3", "SPY")
    assert missed is not None and [frame.number for frame in missed] == [5]  # IBM's 4 filtered
    assert [frame.number for frame in hub.missed("e-2", "IBM") or []] == [3, 4, 5]
    assert hub.missed("e-5", None) == []
    assert hub.missed("e-1", None) is None  # 2 fell out of the kept events
    assert hub.missed("other-4", None) is None  # another process
    assert hub.missed("e-9", None) is None  # from the future
    assert hub.missed("garbage", None) is None


def test_et_offsets() -> None:
    assert et_offset_s("2013-10-07T10:00:00-04:00") == -14_400
    assert et_offset_s("2013-12-02T10:00:00-05:00") == -18_000
