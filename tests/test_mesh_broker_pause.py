"""The whole mesh at real time through a 20 s broker pause: the shadow path stalls and catches
up, and the day's report still finds both paths complete and in agreement.

Slow (about three minutes): a synthetic feed at speed 1 for two minutes, the broker frozen with
SIGSTOP for 20 s in the middle (the mirror falls behind, the shadow builder starves), then
the reconciler over the day.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from devstack.localstack import LocalStack
from devstack.mesh import Mesh, MeshOptions
from libs.common.market.sessions import ny_date
from tests.helpers import reconcile_json

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


def test_a_20_s_broker_pause_at_real_time_keeps_parity_and_completeness(tmp_path: Path) -> None:
    options = MeshOptions(
        workdir=tmp_path,
        synthetic_symbols=40,
        synthetic_rate=1_000,
        duration_s=120.0,
        grace_ms=1_000,
        run_id="pause",
    )
    with LocalStack() as stack:
        mesh = Mesh(stack, options)
        try:
            mesh.start()
            first_day = ny_date(int(time.time() * 1000))
            time.sleep(40)  # the feed runs on wall time
            stack.kafka.pause()
            try:
                time.sleep(20)
            finally:
                stack.kafka.resume()
            mesh.wait_feed_done(timeout_s=300)
            mesh.wait_last_minute_closed()
            mesh.wait_settled(quiet_s=5, timeout_s=300)
            for name, service in mesh.services.items():
                assert service.alive(), f"{name} exited during the pause:\n{service.log_tail()}"
            report_path = tmp_path / "report.json"
            env = {
                "TICKMESH_REDIS_URL": stack.redis.url,
                "TICKMESH_KAFKA_BOOTSTRAP": stack.kafka.bootstrap,
            }
            # the feed's New York day(s): the run may straddle midnight there
            days = sorted({first_day, ny_date(int(time.time() * 1000))})
            reports = [reconcile_json(day.isoformat(), report_path, env) for day in days]
        finally:
            mesh.stop()
    report = max(reports, key=lambda r: r["parity"]["totals"]["compared"])
    totals = report["parity"]["totals"]
    completeness = report["completeness"]["totals"]
    print(
        f"broker pause at speed 1: parity {totals['parityPct']} % over {totals['compared']} "
        f"symbol-minutes; completeness ticks {completeness['ticksPct']} %, Redis "
        f"{completeness['redisPct']} %, Kafka {completeness['kafkaPct']} %"
    )
    assert totals["compared"] >= 40 * 2
    assert totals["parityPct"] >= 99.9
    assert min(completeness["ticksPct"], completeness["redisPct"], completeness["kafkaPct"]) >= 99.9
