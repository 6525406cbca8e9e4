"""How every process runs: on the event loop its setting names, with the collector tuned."""

from __future__ import annotations

import asyncio
import gc

import pytest

from libs.common.runtime.loop import event_loop_from_env, run_on_loop, tune_gc
from libs.common.runtime.settings import SettingsError, load_settings
from services.bars.config import BarsSettings


async def _loop_class() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_by_default_and_asyncio_on_request() -> None:
    assert run_on_loop(_loop_class()).startswith("uvloop")
    assert run_on_loop(_loop_class(), "asyncio").startswith("asyncio")


def test_environment_names_the_loop() -> None:
    assert event_loop_from_env({}) == "uvloop"
    assert event_loop_from_env({"TICKMESH_EVENT_LOOP": "asyncio"}) == "asyncio"
    with pytest.raises(ValueError, match="TICKMESH_EVENT_LOOP='tokio'"):
        event_loop_from_env({"TICKMESH_EVENT_LOOP": "tokio"})


def test_service_setting_is_checked() -> None:
    assert load_settings(BarsSettings, {}).event_loop == "uvloop"
    shared = {"TICKMESH_EVENT_LOOP": "asyncio"}
    assert load_settings(BarsSettings, shared).event_loop == "asyncio"
    with pytest.raises(SettingsError, match="BARS_EVENT_LOOP"):
        load_settings(BarsSettings, {"BARS_EVENT_LOOP": "tokio"})


def test_the_collector_runs_every_gen0_threshold_allocations() -> None:
    before = gc.get_threshold()
    try:
        tune_gc(50_000)
        assert gc.get_threshold() == (50_000, before[1], before[2])
        tune_gc(0)
        assert gc.get_threshold()[0] == 700
    finally:
        gc.set_threshold(*before)
    assert load_settings(BarsSettings, {}).gc_gen0_threshold == 50_000
    assert load_settings(BarsSettings, {"BARS_GC_GEN0_THRESHOLD": "0"}).gc_gen0_threshold == 0
    with pytest.raises(SettingsError, match="GC_GEN0_THRESHOLD"):
        load_settings(BarsSettings, {"TICKMESH_GC_GEN0_THRESHOLD": "-1"})
