"""Load on the dashboard: 50 browsers' event streams on a 1,000-symbol feed.

    .venv/bin/python bench/bench_dashboard.py [--symbols 1000] [--minutes 30] [--clients 50]

The feed: ``--minutes`` minutes of bars for ``--symbols`` symbols, published into a real
redis-server as fast as it goes, as the bars service publishes them (the bar store, then
``bars.<SYM>.1m`` with its stream and sequence, one pipelined round trip per minute), plus the
trades, positions and portfolio the engine bridge makes of them. The mesh downstream: the
engine bridge (built-in golden cross) as its own process, reading every bar through the
reliable consumer. Three runs, each on fresh keys, after a warm-up run that is not reported:

1. the mesh alone;
2. the mesh and the dashboard;
3. the mesh, the dashboard and ``--clients`` event streams (a separate process reading
   ``/events`` like browsers, each watching one of the symbols).

Reported per run: the feed's bars/s, the mesh's throughput (bars the bridge handled per
second, from the first publication to its last bar), the dashboard's CPU (user + system of its
process over the run, as a share of one core) and what the clients received. The three runs
share one machine, so the comparison says what the dashboard and its browsers cost the mesh.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from mesh_gauge import during_cell, during_median, gauged
from summary import LIKE_FOR_LIKE, add_rows, row

from devstack.localstack import LocalStack, free_port
from devstack.mesh import ServiceProcess
from libs.common import names
from libs.common.io.barstore import BarStore
from libs.common.io.redis_io import Publisher, connect_redis
from libs.common.market.sessions import MINUTE_MS, bar_id, ny_epoch_ms, ts_et_minute
from libs.common.names import Keys
from libs.common.schemas import Bar

DAY = (2013, 10, 7)
SESSION_MINUTES = 390
"""Minutes of the regular session (9:30 to 16:00 New York), where the feed's bars fall."""


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def minute_bars(symbols: list[str], minute: int) -> list[Bar]:
    """One minute's bars of every symbol (prices wander so the strategy trades)."""
    from datetime import date

    start = ny_epoch_ms(date(*DAY), 9, 30) + minute * MINUTE_MS
    out = []
    for index, symbol in enumerate(symbols):
        base = 20.0 + index % 400
        close = round(base * (1 + 0.002 * ((minute * 7 + index) % 11 - 5)), 2)
        out.append(
            Bar(
                seq=0,
                symbol=symbol,
                tsET=ts_et_minute(start),
                barId=bar_id(start),
                open=base,
                high=max(base, close) + 0.01,
                low=min(base, close) - 0.01,
                close=close,
                volume=1_000 + index,
                vwap=close,
                trades=10,
                startMs=start,
                endMs=start + 60_000,
            )
        )
    return out


async def publish_feed(redis_url: str, prefix: str, symbols: list[str], minutes: int) -> float:
    """Publish the feed; returns the seconds it took."""
    client = await connect_redis(redis_url)
    keys = Keys(prefix)
    publisher = Publisher(client, keys=keys)
    store = BarStore(client, keys)
    started = time.monotonic()
    for minute in range(minutes):
        bars = minute_bars(symbols, minute)
        await store.put_many(bars)
        await publisher.publish_many([(names.channel(names.BARS, bar.symbol), bar) for bar in bars])
    elapsed = time.monotonic() - started
    await client.aclose()
    return elapsed


def service(name: str, module: str, env: dict[str, str], workdir: Path) -> ServiceProcess:
    port = free_port()
    prefix = {"engine_bridge": "BRIDGE_", "dashboard": "DASHBOARD_"}[module]
    return ServiceProcess.service(
        name, module, {**env, f"{prefix}HTTP_PORT": str(port)}, workdir / f"{name}.log", port
    ).start()


def run(
    stack: LocalStack, workdir: Path, run_name: str, args: argparse.Namespace, *, dashboard: bool,
    clients: int,
) -> dict[str, object]:  # fmt: skip
    """One run; returns its figures."""
    prefix = f"bench-{run_name}:"
    symbols = [f"S{index:04d}" for index in range(args.symbols)]
    env = {
        **os.environ,
        "TICKMESH_REDIS_URL": stack.redis.url,
        "TICKMESH_KEY_PREFIX": prefix,
        "TICKMESH_LOG_FORMAT": "json",
        "TICKMESH_HTTP_HOST": "127.0.0.1",
        "BRIDGE_STRATEGY": "golden_cross",
        "BRIDGE_INPUT_START": "earliest",  # every bar of the run, whenever its channel appears
        "BRIDGE_GOLDEN_FAST_WINDOW": "3",
        "BRIDGE_GOLDEN_SLOW_WINDOW": "6",
        "PYTHONUNBUFFERED": "1",
    }
    bridge = service(f"bridge-{run_name}", "engine_bridge", env, workdir)
    board = service(f"dashboard-{run_name}", "dashboard", env, workdir) if dashboard else None
    readers = None
    try:
        bridge.wait_ready(60)
        if board is not None:
            board.wait_ready(60)
        if board is not None and clients:
            readers = subprocess.Popen(
                [sys.executable, __file__, "--read-streams", str(board.http_port), str(clients),
                 ",".join(symbols[:clients])],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert readers.stdout is not None
            assert readers.stdout.readline().startswith("CONNECTED")
        cpu_before = cpu_seconds(board.process.pid) if board and board.process else 0.0
        started = time.monotonic()
        feed_s = asyncio.run(publish_feed(stack.redis.url, prefix, symbols, args.minutes))
        total = len(symbols) * args.minutes
        while bridge.metric_sum("tickmesh_bridge_bars_total") < total:
            if time.monotonic() - started > 600:
                raise TimeoutError("the bridge did not handle every bar in 600 s")
            time.sleep(0.05)
        mesh_s = time.monotonic() - started
        dashboard_cpu = (
            cpu_seconds(board.process.pid) - cpu_before if board and board.process else None
        )
        figures: dict[str, object] = {
            "run": run_name,
            "bars": total,
            "feed_bars_per_s": round(total / feed_s),
            "mesh_bars_per_s": round(total / mesh_s),
            "mesh_s": round(mesh_s, 2),
            "dashboard_cpu_s": round(dashboard_cpu, 2) if dashboard_cpu is not None else None,
            "dashboard_cpu_pct_of_core": round(100 * dashboard_cpu / mesh_s, 1)
            if dashboard_cpu is not None
            else None,
        }
        if readers is not None:
            time.sleep(2)  # let the streams drain
            readers.terminate()
            out, _ = readers.communicate(timeout=30)
            figures["clients"] = json.loads(out.strip().splitlines()[-1])
            figures["dashboard_coalesced"] = board.metric_sum(
                "tickmesh_dashboard_events_coalesced_total"
            )
            figures["dashboard_resyncs"] = board.metric_sum("tickmesh_dashboard_resyncs_total")
        return figures
    finally:
        if readers is not None and readers.poll() is None:
            readers.kill()
        bridge.stop()
        if board is not None:
            board.stop()


async def read_streams(port: int, count: int, symbols: list[str]) -> None:
    """``count`` event streams (each watching a symbol) until SIGTERM; prints what they got."""
    events = [0] * count
    received = [0] * count

    async def one(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        symbol = symbols[index % len(symbols)]
        writer.write(f"GET /events?symbol={symbol} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        while chunk := await reader.read(65_536):
            received[index] += len(chunk)
            events[index] += chunk.count(b"\nevent: ") + chunk.startswith(b"event: ")

    tasks = [asyncio.create_task(one(index)) for index in range(count)]
    await asyncio.sleep(1)
    print("CONNECTED", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for task in tasks:
        task.cancel()
    print(
        json.dumps(
            {
                "streams": count,
                "events_per_stream": round(sum(events) / count),
                "mb_per_stream": round(sum(received) / count / 1e6, 2),
                "streams_ended_early": sum(task.done() and not task.cancelled() for task in tasks),
            }
        ),
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=1_000)
    parser.add_argument(
        "--minutes", type=int, default=30, help="of the regular session, 1 to 390 (default 30)"
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--read-streams", nargs=3, metavar=("PORT", "COUNT", "SYMBOLS"))
    parser.add_argument("--summary", help="append headline rows here (scripts/bench.sh)")
    args = parser.parse_args()
    if not 1 <= args.minutes <= SESSION_MINUTES:
        parser.error(f"--minutes {args.minutes}: the regular session has 1 to {SESSION_MINUTES}")
    if args.read_streams:
        port, count, symbols = args.read_streams
        asyncio.run(read_streams(int(port), int(count), symbols.split(",")))
        return 0
    # SIGTERM unwinds (the services and the streams' reader are stopped on the way out)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="tickmesh-bench-dashboard-"))
    print(f"bench_dashboard: {args.symbols} symbols × {args.minutes} minutes; logs in {workdir}")
    with LocalStack(kafka=False) as stack:
        # not reported: the first run on a fresh redis-server and a cold feed was up to twice
        # as slow as the same run after it (10,000 bars: 12 k bars/s, then 25 k with the
        # dashboard added), which made the baseline, always first, look slow
        run(stack, workdir, "warmup", args, dashboard=False, clients=0)
        results = []
        for label, dashboard, clients in (
            ("mesh", False, 0),
            ("dashboard", True, 0),
            ("clients", True, args.clients),
        ):
            with gauged(workdir / f"gauge-{label}.txt") as gauge:
                figures = run(stack, workdir, label, args, dashboard=dashboard, clients=clients)
            figures["machine_gauge_during"] = gauge["during"]
            results.append(figures)
    for figures in results:
        print(json.dumps(figures))
    base = results[0]["mesh_bars_per_s"]
    print(
        "\n| run | feed bars/s | mesh bars/s | vs mesh alone | dashboard CPU (% of a core) "
        "| machine gauge ms during it, median (range) |"
    )
    print("|---|---|---|---|---|---|")
    labels = {
        "mesh": "mesh alone",
        "dashboard": "+ dashboard",
        "clients": f"+ {args.clients} SSE clients",
    }
    for figures in results:
        ratio = figures["mesh_bars_per_s"] / base  # type: ignore[operator]
        cpu = figures["dashboard_cpu_pct_of_core"]
        print(
            f"| {labels[str(figures['run'])]} | {figures['feed_bars_per_s']:,} | "
            f"{figures['mesh_bars_per_s']:,} | {ratio:.2f}× | {cpu if cpu is not None else '–'} | "
            f"{during_cell(figures['machine_gauge_during'])} |"
        )
    add_rows(
        args.summary,
        [
            row(
                "bench_dashboard",
                f"engine bridge, {labels[str(figures['run'])]}, bars/s "
                f"(dashboard CPU {figures['dashboard_cpu_pct_of_core']} % of a core)",
                f"{figures['mesh_bars_per_s']:,}",
                f"mesh alone {base:,}",
                figures["mesh_bars_per_s"] / base,  # type: ignore[operator]
                f"{LIKE_FOR_LIKE} (the same {args.symbols} symbols × {args.minutes} minutes); "
                f"machine gauge during each, median ms: "
                f"{during_median(figures['machine_gauge_during'])} vs "
                f"{during_median(results[0]['machine_gauge_during'])}",
            )
            for figures in results[1:]
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
