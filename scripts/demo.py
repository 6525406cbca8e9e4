"""Run the whole mesh on this machine, fed by the simulator, and print what it did.

    bash scripts/demo.sh                        # synthetic ticks (works anywhere)
    bash scripts/demo.sh --data ../shared/data/lean-equity-2013-10 --date 2013-10-07
    bash scripts/demo.sh --duration-s 5         # shorter synthetic run

Starts redis-server and the Kafka-protocol broker, the Polygon simulator, and ingest, bars,
bars (shadow, from Kafka), engine_bridge and mirror as separate processes; waits until the
feed is replayed and the pipeline has settled; prints ticks in, bars out and records per Kafka
topic, and the shadow-mode parity report of the day; then stops everything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devstack.localstack import LocalStack, free_port
from devstack.mesh import Mesh, MeshOptions

REPO = Path(__file__).resolve().parents[1]
DASHBOARD_PORT = 9105


def port_or_free(port: int) -> int:
    """``port`` when nothing listens on it on 127.0.0.1, else a free one."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's flags."""
    parser = argparse.ArgumentParser(
        prog="scripts/demo.sh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, help="Lean data folder (replays a real day)")
    parser.add_argument("--date", help="day to replay with --data, YYYY-MM-DD")
    parser.add_argument("--symbols", default="SPY,IBM,AIG,BAC", help="symbols of a real day")
    parser.add_argument(
        "--speed",
        type=float,
        default=0.0,
        help="replay speed: 1 = real time, 0 = as fast as possible",
    )
    parser.add_argument("--synthetic-symbols", type=int, default=20)
    parser.add_argument("--rate", type=int, default=5_000, help="synthetic ticks per second")
    parser.add_argument(
        "--duration-s",
        type=float,
        default=20.0,
        help="length of the synthetic feed (shortens the demo)",
    )
    parser.add_argument("--grace-ms", type=int, default=1_000)
    parser.add_argument("--workdir", type=Path, help="where logs go (a temp dir by default)")
    parser.add_argument(
        "--serve",
        action="store_true",
        help="after the replay, keep the mesh and the dashboard running until Ctrl-C",
    )
    parser.add_argument(
        "--dashboard-port",
        type=int,
        default=DASHBOARD_PORT,
        help=f"the dashboard's port on 127.0.0.1 (default {DASHBOARD_PORT}, a free one if taken)",
    )
    args = parser.parse_args(argv)
    if args.data is not None:
        if not args.data.is_dir():
            parser.error(f"--data {args.data}: no such folder")
        if not args.date:
            parser.error("--data needs --date YYYY-MM-DD")
    return args


def _stop_on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_signal)  # stop the mesh on the way out, not orphan it
    # Ctrl-C even when started in the background (which starts a program ignoring SIGINT)
    signal.signal(signal.SIGINT, _stop_on_signal)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tickmesh-demo-"))
    options = MeshOptions(
        workdir=workdir,
        data_dir=args.data,
        day=args.date,
        symbols=[s.strip().upper() for s in args.symbols.split(",") if s.strip()],
        speed=args.speed,
        synthetic_symbols=args.synthetic_symbols,
        synthetic_rate=args.rate,
        duration_s=args.duration_s,
        grace_ms=args.grace_ms,
        dashboard=True,
        dashboard_port=port_or_free(args.dashboard_port),
    )
    started = time.monotonic()
    print(f"tickmesh demo: logs in {workdir}", flush=True)
    with LocalStack() as stack:
        mesh = Mesh(stack, options)
        try:
            mesh.start()
            print(f"dashboard: {mesh.dashboard_url}", flush=True)
            print("mesh running; replaying the feed ...", flush=True)
            mesh.wait_feed_done(timeout_s=1_800)
            print("feed replayed; waiting for the last bars to close ...", flush=True)
            mesh.wait_last_minute_closed()
            mesh.wait_settled(quiet_s=3 + args.grace_ms / 1000, timeout_s=600)
            print_summary(mesh, time.monotonic() - started)
            day = args.date or dt.date.today().isoformat()
            print_reconcile(stack, day)
            if args.serve:
                serve(mesh)
        finally:
            mesh.stop()
    return 0


def serve(mesh: Mesh) -> None:
    """Keep the mesh and the dashboard running until Ctrl-C (or SIGTERM)."""
    print(f"\ndashboard: {mesh.dashboard_url}", flush=True)
    print("serving: the mesh and the dashboard keep running; Ctrl-C stops them", flush=True)
    try:
        while True:
            mesh.check_alive()
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)


def print_summary(mesh: Mesh, elapsed_s: float) -> None:
    """Ticks in, bars out, records per Kafka topic."""
    ticks = mesh.metric_total("ingest", "tickmesh_ingest_events_total", type="T")
    bars = mesh.metric_total("bars", "tickmesh_bars_published_total")
    shadow = mesh.metric_total("bars-shadow", "tickmesh_bars_published_total")
    dead = sum(s.metric_sum("tickmesh_dead_letters_total") for s in mesh.services.values())
    counts = mesh.kafka_counts()
    print("\n== tickmesh demo summary ==")
    print(f"elapsed                 {elapsed_s:10.1f} s")
    print(f"ticks in (ingest)       {ticks:10.0f}")
    print(f"bars out (Redis)        {bars:10.0f}")
    print(f"bars out (Kafka shadow) {shadow:10.0f}")
    print(f"dead letters            {dead:10.0f}")
    print("records per Kafka topic (distinct, when copies were re-sent):")
    groups: dict[str, list[int]] = {}
    for topic, (count, distinct) in counts.items():
        key = topic
        for prefix in ("ticks.", "bars."):
            if topic.startswith(prefix):
                key = f"{prefix}<SYM>" + (".1m" if topic.endswith(".1m") else "")
        group = groups.setdefault(key, [0, 0])
        group[0] += count
        group[1] += distinct
    for topic, (count, distinct) in sorted(groups.items()):
        copies = f"  ({distinct} distinct)" if distinct != count else ""
        print(f"  {topic:<30} {count:10d}{copies}")


def print_reconcile(stack: LocalStack, day: str) -> None:
    """The reconciler's report of the day, when the mirror has one."""
    assert stack.kafka is not None, "the demo's stack runs a broker"
    env = {
        **os.environ,
        "TICKMESH_REDIS_URL": stack.redis.url,
        "TICKMESH_KAFKA_BOOTSTRAP": stack.kafka.bootstrap,
        "MIRROR_RECONCILE_MIN_AGE_S": "0",
    }
    result = subprocess.run(
        [sys.executable, "-m", "services.mirror", "reconcile", "--date", day, "--format", "md"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    print("\n== shadow-mode parity (services.mirror reconcile) ==")
    print(result.stdout.strip() or result.stderr.strip()[-2000:])


if __name__ == "__main__":
    sys.exit(main())
