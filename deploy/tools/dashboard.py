"""Write deploy/grafana/dashboards/tickmesh.json (the provisioned Grafana dashboard).

    .venv/bin/python deploy/tools/dashboard.py

The panels are data here so the JSON stays consistent (ids, grid, datasource) and reviewable;
tests/test_deploy_compose.py checks every metric a query names is defined in the code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "deploy" / "grafana" / "dashboards" / "tickmesh.json"
DATASOURCE = {"type": "prometheus", "uid": "tickmesh-prometheus"}
SERVICE_JOBS = "ingest|bars|engine_bridge|mirror"

# (title, unit, [(expr, legend)], description, kind); rows are (title, panels).
Panel = tuple[str, str, list[tuple[str, str]], str, str]

ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Health",
        [
            (
                "Services up",
                "none",
                [
                    (
                        f'sum by (job, role) (tickmesh_up{{job=~"{SERVICE_JOBS}"}})',
                        "{{job}} {{role}}",
                    ),
                    (
                        f'sum by (job, role) (up{{job=~"{SERVICE_JOBS}"}})',
                        "scraped {{job}} {{role}}",
                    ),
                ],
                "1 per running service process; 'scraped' is Prometheus reaching /metrics.",
                "stat",
            ),
            (
                "Actor restarts (per 5 min)",
                "none",
                [
                    # "or ... * 0": a flat zero per service instead of "No data" before any restart
                    (
                        (
                            "sum by (job, role, actor) (increase(tickmesh_actor_restarts_total[5m]))"
                            " or sum by (job, role) (tickmesh_up * 0)"
                        ),
                        "{{job}} {{role}} {{actor}}",
                    ),
                ],
                (
                    "Supervisor restarts. Past the budget the process exits (70) and the container "
                    "restarts it; see the runbook."
                ),
                "timeseries",
            ),
            (
                "Actors not running",
                "none",
                [
                    ("count by (job, role) (tickmesh_actor_running == 0)", "{{job}} {{role}}"),
                ],
                "Actors whose state is not running (restarting, stopped or failed).",
                "timeseries",
            ),
            (
                "Mailbox fill",
                "percentunit",
                [
                    (
                        (
                            "max by (job, actor) (tickmesh_actor_mailbox_depth"
                            " / clamp_min(tickmesh_actor_mailbox_capacity, 1))"
                        ),
                        "{{job}} {{actor}}",
                    ),
                ],
                "Deepest mailbox relative to its bound; near 1 means backpressure.",
                "timeseries",
            ),
        ],
    ),
    (
        "Feed (ingest)",
        [
            (
                "Feed lag",
                "s",
                [
                    ("max by (instance) (tickmesh_ingest_feed_lag_seconds)", "{{instance}}"),
                ],
                "Now minus the newest event time of the last frame: the vendor's delay plus ours.",
                "timeseries",
            ),
            (
                "Ticks/s",
                "ops",
                [
                    ('sum(rate(tickmesh_ingest_events_total{type="T"}[1m]))', "trades in"),
                    (
                        'sum(rate(tickmesh_redis_records_published_total{job="ingest",kind="ticks"}[1m]))',
                        "tick records out",
                    ),
                ],
                "Trades decoded per second, and tick records (one per frame and symbol) published.",
                "timeseries",
            ),
            (
                "Feed connection",
                "none",
                [
                    ("max(tickmesh_ingest_connected)", "connected"),
                    (
                        "sum by (reason) (increase(tickmesh_ingest_reconnects_total[5m]))",
                        "reconnects {{reason}}",
                    ),
                ],
                "1 while authenticated and subscribed; reconnects by reason per 5 min.",
                "timeseries",
            ),
            (
                "Ingest queue depth",
                "none",
                [
                    ("max(tickmesh_ingest_queue_depth)", "frames waiting"),
                ],
                "Frames between the socket reader and the decoder.",
                "timeseries",
            ),
        ],
    ),
    (
        "Bars",
        [
            (
                "Bars per minute",
                "none",
                [
                    (
                        "sum by (role, source) (increase(tickmesh_bars_published_total[1m]))",
                        "{{role}} from {{source}}",
                    ),
                ],
                "Bars closed and published per minute (revision 0), primary and shadow.",
                "timeseries",
            ),
            (
                "Bar watermark lag",
                "ms",
                [
                    (
                        "max by (role, source) (tickmesh_bars_watermark_lag_ms)",
                        "{{role}} {{source}}",
                    ),
                ],
                "Wall time minus the event-time watermark.",
                "timeseries",
            ),
            (
                "Bar corrections per minute",
                "none",
                [
                    (
                        "sum by (role, source) (increase(tickmesh_bars_revisions_total[1m]))",
                        "{{role}} {{source}}",
                    ),
                ],
                "Bars revised by late trades.",
                "timeseries",
            ),
        ],
    ),
    (
        "Mirror and parity",
        [
            (
                "Mirror lag",
                "none",
                [
                    ("max(tickmesh_mirror_lag_records)", "records not yet in Kafka"),
                    ("max(tickmesh_mirror_in_flight_records)", "in flight"),
                ],
                "Records published on Redis and not yet acknowledged by Kafka.",
                "timeseries",
            ),
            (
                "Mirror oldest unacknowledged batch",
                "s",
                [
                    ("max(tickmesh_mirror_oldest_unacked_seconds)", "oldest unacked"),
                    ("min(tickmesh_mirror_kafka_up)", "kafka up"),
                ],
                "Age of the oldest batch Kafka has not acknowledged; Kafka up is 0 while failing.",
                "timeseries",
            ),
            (
                "Mirrored records/s",
                "ops",
                [
                    ("sum by (kind) (rate(tickmesh_mirror_records_total[1m]))", "{{kind}}"),
                ],
                "Records acknowledged by Kafka per second, by kind.",
                "timeseries",
            ),
            (
                "Dead letters (per 5 min)",
                "none",
                [
                    (
                        (
                            "sum by (job, service, source_kind) (increase(tickmesh_dead_letters_total[5m]))"
                            " or sum by (job) (tickmesh_up * 0)"
                        ),
                        "{{job}} {{service}} {{source_kind}}",
                    ),
                ],
                "Records that failed to decode or validate, sent to the dead-letter stream/topic.",
                "timeseries",
            ),
            (
                "Consumer gaps and losses (per 5 min)",
                "none",
                [
                    (
                        "sum by (job, consumer) (increase(tickmesh_consumer_gaps_total[5m]))",
                        "gaps {{job}} {{consumer}}",
                    ),
                    (
                        "sum by (job, consumer) (increase(tickmesh_consumer_lost_records_total[5m]))",
                        "LOST {{job}} {{consumer}}",
                    ),
                ],
                "Gaps are backfilled from the stream; lost records were trimmed before being read.",
                "timeseries",
            ),
        ],
    ),
    (
        "Parity (shadow mode: Redis bars vs Kafka bars)",
        [
            (
                "Parity by day",
                "percent",
                [
                    ("max by (day) (tickmesh_parity_day_percent)", "{{day}}"),
                ],
                (
                    "Share of symbol-minutes whose Redis and Kafka bars agree, per trading day. The "
                    "promotion gate wants MIRROR_PARITY_TARGET_PCT (99.9) on MIRROR_GATE_DAYS days in a "
                    "row; read the day's report when it dips (runbook)."
                ),
                "timeseries",
            ),
            (
                "Parity: symbol-minutes by outcome",
                "none",
                [
                    ("max by (day, outcome) (tickmesh_parity_minutes)", "{{day}} {{outcome}}"),
                ],
                "Matched, mismatched and missing-on-one-side minutes of each reconciled day.",
                "timeseries",
            ),
            (
                "Parity gate",
                "none",
                [
                    ("max(tickmesh_parity_gate_passing_days)", "days at target in a row"),
                    ("max(tickmesh_parity_promotion_ready)", "ready for Kafka cut-over"),
                ],
                "The cut-over to Kafka waits for ready = 1 (runbook: cut over to Kafka).",
                "stat",
            ),
            (
                "Parity worst symbols",
                "percent",
                [
                    ("bottomk(10, min by (symbol) (tickmesh_parity_percent))", "{{symbol}}"),
                ],
                "The ten symbols with the lowest parity on any reported day.",
                "timeseries",
            ),
            (
                "Parity report age",
                "s",
                [
                    (
                        "time() - max(tickmesh_parity_last_run_timestamp_seconds)",
                        "since last report",
                    ),
                ],
                (
                    "The reconciler reports every MIRROR_RECONCILE_INTERVAL_S; a growing age means it "
                    "stopped."
                ),
                "timeseries",
            ),
            (
                "Our bars vs the vendor's",
                "percent",
                [
                    ("bottomk(10, min by (symbol) (tickmesh_parity_vendor_percent))", "{{symbol}}"),
                ],
                "Agreement of our bars with Polygon's own minute aggregates (AM), worst ten.",
                "timeseries",
            ),
        ],
    ),
    (
        "Engine bridge",
        [
            (
                "Signals and trades per minute",
                "none",
                [
                    ("sum(increase(tickmesh_bridge_signals_total[1m]))", "signals"),
                    ("sum(increase(tickmesh_bridge_trades_total[1m]))", "trades"),
                    ("sum(increase(tickmesh_bridge_orders_rejected_total[1m]))", "rejected orders"),
                ],
                "What the engine decided each minute.",
                "timeseries",
            ),
            (
                "Bridge lag and pending minutes",
                "s",
                [
                    ("max(tickmesh_bridge_lag_seconds)", "lag"),
                    ("max(tickmesh_bridge_pending_minutes)", "pending minutes"),
                ],
                "Now minus the end of the newest bar processed; minutes waiting for other symbols.",
                "timeseries",
            ),
            (
                "Engine health (per 5 min)",
                "none",
                [
                    ("sum(increase(tickmesh_bridge_engine_timeouts_total[5m]))", "timeouts"),
                    ("sum(increase(tickmesh_bridge_engine_restarts_total[5m]))", "restarts"),
                    (
                        "sum(increase(tickmesh_bridge_gap_minutes_total[5m]))",
                        "minutes without decision",
                    ),
                ],
                "External engine timeouts, restarts and gaps.",
                "timeseries",
            ),
        ],
    ),
    (
        "Redis",
        [
            (
                "Records published/s",
                "ops",
                [
                    (
                        "sum by (job, kind) (rate(tickmesh_redis_records_published_total[1m]))",
                        "{{job}} {{kind}}",
                    ),
                ],
                "Records published (pub/sub + stream) per second.",
                "timeseries",
            ),
            (
                "Publish latency p99",
                "s",
                [
                    (
                        (
                            "histogram_quantile(0.99, sum by (job, le) "
                            "(rate(tickmesh_redis_publish_seconds_bucket[5m])))"
                        ),
                        "{{job}}",
                    ),
                ],
                "One pipelined publish round trip.",
                "timeseries",
            ),
        ],
    ),
]


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    title, unit, targets, description, kind = panel
    result: dict[str, Any] = {
        "id": panel_id,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {
                "refId": chr(ord("A") + index),
                "datasource": DATASOURCE,
                "expr": expr,
                "legendFormat": legend,
            }
            for index, (expr, legend) in enumerate(targets)
        ],
    }
    if kind == "timeseries":
        result["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom"},
            "tooltip": {"mode": "multi"},
        }
    else:
        result["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"]},
            "colorMode": "background",
            "graphMode": "none",
        }
        result["fieldConfig"]["defaults"]["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}],
        }
    return result


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    panel_id = 1
    y = 0
    for row_title, row_panels in ROWS:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        panel_id += 1
        y += 1
        for index, panel in enumerate(row_panels):
            panels.append(panel_json(panel, panel_id, 12 * (index % 2), y + 8 * (index // 2)))
            panel_id += 1
        y += 8 * ((len(row_panels) + 1) // 2)
    return {
        "uid": "tickmesh",
        "title": "tickmesh",
        "description": "Feed, bars, mirror, parity and actor health of the tickmesh mesh.",
        "tags": ["tickmesh"],
        "timezone": "America/New_York",
        "editable": False,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "panels": panels,
    }


def main() -> int:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"dashboard: wrote {OUT.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
