"""bench/bench_dashboard.py's feed and arguments (pure logic; the bench itself runs in
scripts/bench.sh)."""

from __future__ import annotations

import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_dashboard import DAY, SESSION_MINUTES, minute_bars

from libs.common.market.sessions import MINUTE_MS, ny_epoch_ms


def test_the_feed_runs_past_the_first_half_hour_to_the_last_minute_of_the_session() -> None:
    opening = ny_epoch_ms(date(*DAY), 9, 30)
    for minute, hour, minute_of_hour in ((0, 9, 30), (45, 10, 15), (SESSION_MINUTES - 1, 15, 59)):
        bars = minute_bars(["AAA", "BBB"], minute)
        assert {bar.startMs for bar in bars} == {ny_epoch_ms(date(*DAY), hour, minute_of_hour)}
        assert bars[0].startMs == opening + minute * MINUTE_MS
        assert bars[0].endMs == bars[0].startMs + MINUTE_MS


def test_minutes_outside_the_session_are_refused_with_the_range() -> None:
    for minutes in ("0", str(SESSION_MINUTES + 1)):
        done = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "bench_dashboard.py"), "--minutes", minutes],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert done.returncode == 2, done.stderr
        assert f"--minutes {minutes}: the regular session has 1 to 390" in done.stderr
