"""The report of ``bench_mesh.py``: its results (a JSON-ready dict) as Markdown, the issue's
targets and where a run stands, and the headline rows for ``scripts/bench.sh``'s table."""

from __future__ import annotations

from typing import Any

from mesh_gauge import gauge_line, gauge_summary_rows
from mesh_layout import layout_summary_rows, render_layout
from mesh_linger import linger_summary_rows, render_linger
from mesh_repeat import LABELS, median_p99, render_repeats
from summary import LIKE_FOR_LIKE, row

RECONCILER = "mirror-reconciler"
"""The mirror's timed reconciler, a process of its own (``MIRROR_ROLE=reconcile``)."""
SERVICES = ("ingest", "mirror", RECONCILER, "bars", "bars-shadow", "engine_bridge")
"""The mesh's services."""
MEMORY_JUDGED = (*SERVICES, "simulator")
"""The processes whose memory growth is judged: the services, and the simulator, which keeps
a bounded number of trades for its REST API (redis-server and the broker hold the data)."""


def _rate(value: Any) -> str:
    return f"{value:,.0f}" if isinstance(value, (int, float)) else "-"


def _ms(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "- | - | - | 0"
    return f"{stats['p50']:,.1f} | {stats['p99']:,.1f} | {stats['max']:,.1f} | {stats['count']:,}"


def _process_rows(processes: dict[str, dict[str, float]]) -> list[str]:
    lines = [
        "| process | CPU s | CPU % | CPU %, 1st / 2nd half | RSS start MiB | RSS mid MiB "
        "| RSS end MiB | RSS peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in sorted(processes.items(), key=lambda item: -item[1]["cpuSeconds"]):
        halves = " / ".join(
            "-" if (pct := p.get(key)) is None else f"{pct:.0f}"
            for key in ("cpuPctFirstHalf", "cpuPctSecondHalf")
        )
        lines.append(
            f"| {name} | {p['cpuSeconds']:.1f} | {p['cpuPct']:.0f} | {halves} "
            f"| {p['rssStartMb']:.0f} "
            f"| {p.get('rssMidMb', float('nan')):.0f} | {p['rssEndMb']:.0f} "
            f"| {p['rssPeakMb']:.0f} |"
        )
    return lines


def _close_lines(syn: dict[str, Any]) -> list[str]:
    """Where each close of a minute inside the window spent its time, per path."""
    rows = [
        f"| {path} | {close['bars']:,} | {close['startMs']:,.1f} | {close['handleMs']:,.1f} | "
        f"{close['sinkMs']:,.1f} | {_opt_ms(close['toProbeMs'])} | {_opt_ms(close['totalMs'])} |"
        for path, closes in (syn.get("barCloses") or {}).items()
        for close in closes
    ]
    if not rows:
        return []
    return [
        "Bar closes of the minutes that ended in the window, from the deadline (minute end + "
        "grace), ms: when handling the message that closed them began (the progress mark's "
        "travel and what was queued before it), the handling up to the sink call, the sink "
        "(Redis: store and publish; Kafka: produce until acknowledged), and the sink's return to "
        "the probe's arrival of the last timed bar:",
        "",
        "| path | bars | handling began | handling | sink | → probe | deadline → bar |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def _opt_ms(value: Any) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _redis_call_line(scenario: dict[str, Any], records: Any) -> list[str]:
    """The commands Redis ran most, per tick record (how many round trips a record costs)."""
    calls = scenario.get("redisCalls") or {}
    if not calls or not records:
        return []
    top = sorted(calls.items(), key=lambda item: -item[1])[:8]
    shown = ", ".join(f"{name} {count:,} ({count / records:.2f})" for name, count in top)
    return [f"Redis commands in the run (per tick record): {shown}.", ""]


def _consumer_lines(scenario: dict[str, Any]) -> list[str]:
    """What each Redis-fed consumer read: delivered, from the streams, duplicates dropped."""
    consumers = scenario.get("consumers") or {}
    if not consumers:
        return []
    lines = [
        "| consumer | delivered | read from the streams | duplicates dropped | "
        "pub/sub dropped (queue full) |"
    ]
    lines.append("|---|---:|---:|---:|---:|")
    for name, reads in sorted(consumers.items()):
        lines.append(
            f"| {name} | {reads['delivered']:,} | {reads['fromStreams']:,} | "
            f"{reads['duplicates']:,} | {reads.get('dropped', 0):,} |"
        )
    lines.append("")
    batches = scenario.get("mirrorBatches") or {}
    if batches.get("batches"):
        lines += [
            f"The mirror's Kafka batches: {batches['batches']:,} acknowledged, "
            f"{batches['records'] / batches['batches']:,.1f} records each.",
            "",
        ]
    return lines


def _ratio(numerator: Any, denominator: Any) -> float | None:
    if isinstance(numerator, (int, float)) and isinstance(denominator, (int, float)):
        return numerator / denominator if denominator else None
    return None


def render_markdown(results: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    lines = [f"### bench_mesh ({results['machine']})", ""]
    day = results.get("realDay") or {}
    if day.get("skipped"):
        lines += [f"(a) real day: skipped ({day['skipped']})", ""]
    elif day:
        lines += [
            f"**(a) Real day** {day.get('day')} {','.join(day.get('symbols', []))} at speed 0: "
            f"{day.get('ticks', 0):,} ticks in {day.get('tickRecords', 0):,} records "
            f"({day.get('tradesPerRecord')} trades/record); bars {day.get('barsRedis')} on "
            f"Redis, {day.get('barsKafka')} on Kafka; the simulator sent the day in "
            f"{day.get('feedSeconds')} s.",
            "",
            "| from the first frame to | s | ticks/s | records/s | after the last frame, s |",
            "|---|---:|---:|---:|---:|",
        ]
        names = {
            "redis": "last tick record on Redis",
            "kafka": "last tick record in Kafka (acknowledged)",
            "barRedis": "last bar on Redis",
            "barKafka": "last bar on Kafka (shadow)",
            "barRedisEventTime": "last bar closed on event time, Redis",
            "barKafkaEventTime": "last bar closed on event time, Kafka",
        }
        for key, label in names.items():
            to = (day.get("to") or {}).get(key)
            if to is None:
                lines.append(f"| {label} | - | - | - | - |")
                continue
            lines.append(
                f"| {label} | {to['seconds']:.2f} | {_rate(to['ticksPerS'])} | "
                f"{_rate(to['recordsPerS'])} | {to['afterLastFrameS']} |"
            )
        lines.append("")
        lines += _redis_call_line(day, day.get("tickRecords"))
        lines += _consumer_lines(day)
        lines += _ceiling_lines(day, "redis", "kafka")
        if day.get("processes"):
            lines += ["", *_process_rows(day["processes"])]
        lines += gauge_line(day)
        lines += [f"- {note}" for note in day.get("notes", [])]
        lines.append("")
    syn = results.get("synthetic") or {}
    if syn and not syn.get("error"):
        latency = syn.get("latencyMs", {})
        close_s = f"{syn.get('closeBurstMs', 0) / 1000:g}"
        lines += [
            f"**(b) Synthetic market**: {syn.get('symbols')} symbols offered "
            f"{syn.get('offeredRate'):,} trades/s; measured {syn.get('windowSeconds')} s after "
            f"a {syn.get('warmupSeconds')} s warm-up: achieved "
            f"{_rate(syn.get('achievedTicksPerS'))} ticks/s over the whole feed (the events the "
            f"simulator sent, {syn.get('eventsPerFrame')} a frame; "
            f"{_rate(syn.get('recordsPerS'))} tick records/s on Redis, "
            f"{syn.get('tradesPerRecord')} trades/record on the timed channels); "
            f"ticks on Kafka: {_topic_mode(syn.get('topicMode'))}; "
            f"grace {syn.get('graceMs')} ms; Kafka acks polled every "
            f"{syn.get('pollMs')} ms; the probe timed {syn.get('channels')} tick channels "
            f"({syn.get('probeTicks')}) and missed {syn.get('probeMissedRecords')} of their "
            "records; "
            f"{syn.get('tradesNotAcknowledged')} trades not acknowledged by Kafka at the end.",
            "",
            "| latency, ms | p50 | p99 | max | counted |",
            "|---|---:|---:|---:|---:|",
            f"| tick → Redis (pub/sub) | {_ms(latency.get('tickToRedis'))} |",
            f"| tick → Kafka (acknowledged) | {_ms(latency.get('tickToKafka'))} |",
            f"| tick → bar on Redis (from minute end) | {_ms(latency.get('tickToBarRedis'))} |",
            f"| tick → bar on Kafka, shadow (from minute end) | "
            f"{_ms(latency.get('tickToBarKafka'))} |",
            f"| tick → Kafka, whole feed (warm-up included) | "
            f"{_ms(latency.get('tickToKafkaWholeFeed'))} |",
            f"| tick → Redis, sent in a minute's close (its first {close_s} s) | "
            f"{_ms(latency.get('tickToRedisInClose'))} |",
            f"| tick → Redis, sent in the rest of the minute | "
            f"{_ms(latency.get('tickToRedisOutsideClose'))} |",
            f"| tick → Kafka, sent in a minute's close (its first {close_s} s) | "
            f"{_ms(latency.get('tickToKafkaInClose'))} |",
            f"| tick → Kafka, sent in the rest of the minute | "
            f"{_ms(latency.get('tickToKafkaOutsideClose'))} |",
            "",
            f"{syn.get('channelsInKafka')} of the {syn.get('symbols')} tick channels had a record "
            "acknowledged by Kafka by the end; all of them "
            f"{syn.get('allChannelsInKafkaAfterS') or '-'} s after the first frame ('-': never).",
            "",
        ]
        lines += _close_lines(syn)
        lines += _redis_call_line(syn, syn.get("tickRecords"))
        lines += _consumer_lines(syn)
        lines += _ceiling_lines(syn, None, None)
        if syn.get("processes"):
            lines += ["", *_process_rows(syn["processes"])]
        lines += gauge_line(syn)
        lines += [f"- {note}" for note in syn.get("notes", [])]
        lines.append("")
        lines += render_repeats(syn)
    elif syn:
        lines += [f"(b) synthetic: {syn.get('error')}", ""]
    if results.get("layout"):
        lines += render_layout(results["layout"])
    if results.get("linger"):
        lines += render_linger(results["linger"])
    lines += ["**Targets** (reported, never asserted)", ""]
    lines += [f"- {target}" for target in targets(results)]
    return "\n".join(lines)


def _ceiling_lines(
    result: dict[str, Any], redis_key: str | None, kafka_key: str | None
) -> list[str]:
    ceiling = result.get("ceilings")
    if not ceiling or ceiling.get("error"):
        return [f"(c) ceilings: {ceiling.get('error') if ceiling else 'not measured'}"]
    lines = [
        f"(c) Ceilings on {ceiling['records']:,} of the same records "
        f"({ceiling['tradesPerRecord']} trades/record):",
        "",
        "| hop | mesh records/s | ceiling records/s | share of ceiling |",
        "|---|---:|---:|---:|",
    ]
    to = result.get("to") or {}
    for hop, key, ceiling_key, label in (
        ("ingest → Redis", redis_key, "publishRecordsPerS", "pipelined PUBLISH"),
        ("→ Kafka (mirror)", kafka_key, "produceRecordsPerS", "raw aiokafka produce"),
    ):
        mesh_rate = (to.get(key) or {}).get("recordsPerS") if key else result.get("recordsPerS")
        share = _ratio(mesh_rate, ceiling[ceiling_key])
        shown = f"{100 * share:.1f} %" if share is not None else "-"
        lines.append(
            f"| {hop} vs {label} | {_rate(mesh_rate)} | {_rate(ceiling[ceiling_key])} | {shown} |"
        )
    return lines


def targets(results: dict[str, Any]) -> list[str]:
    """The issue's targets and where this run stands."""
    out = []
    day = results.get("realDay") or {}
    to_kafka = (day.get("to") or {}).get("kafka")
    bars = [(day.get("to") or {}).get(key) for key in ("barRedisEventTime", "barKafkaEventTime")]
    if to_kafka:
        slowest = min([to_kafka["ticksPerS"], *(b["ticksPerS"] for b in bars if b)])
        out.append(
            f"real day >= 100,000 ticks/s end to end on 2 cores: {slowest:,} ticks/s to the "
            "slowest of Kafka and the bars closed on event time "
            f"({'met' if slowest >= 100_000 else 'not met'})"
        )
    syn = results.get("synthetic") or {}
    latency = syn.get("latencyMs") or {}
    kafka = latency.get("tickToKafka")
    if kafka:
        judged, runs = _judged(syn, "tickToKafka", kafka["p99"])
        out.append(
            f"1,000 symbols at 20 k ticks/s, p99 tick → Kafka < 100 ms: {runs}{judged:,.1f} ms "
            f"({'met' if judged < 100 else 'not met'})"
        )
        inside, outside = latency.get("tickToKafkaInClose"), latency.get("tickToKafkaOutsideClose")
        if inside and outside:
            out.append(
                "the same p99 by when the tick was sent: in a minute's close (its first "
                f"{syn.get('closeBurstMs', 0) / 1000:g} s) {inside['p99']:,.1f} ms, in the rest "
                f"of the minute {outside['p99']:,.1f} ms"
            )
    grace = syn.get("graceMs", 0)
    for key, path in (("tickToBarRedis", "Redis"), ("tickToBarKafka", "Kafka")):
        found = latency.get(key)
        if found:
            judged, runs = _judged(syn, key, found["p99"])
            met = judged < grace + 100
            out.append(
                f"p99 tick → bar ({path}) < grace + 100 ms = {grace + 100} ms: "
                f"{runs}{judged:,.1f} ms ({'met' if met else 'not met'})"
            )
    processes = syn.get("processes") or {}
    services = {name: p for name, p in processes.items() if name in MEMORY_JUDGED}
    if processes and not services:
        out.append("memory flat over the window: no service's RSS was sampled (not judged)")
    if services:
        whole = max(services.items(), key=lambda item: item[1]["rssEndMb"] - item[1]["rssStartMb"])
        line = (
            "memory flat over the window: largest RSS growth of a service or the simulator "
            f"{whole[1]['rssEndMb'] - whole[1]['rssStartMb']:+.1f} MiB ({whole[0]})"
        )
        if all("rssMidMb" in p for p in services.values()):
            late = max(services.items(), key=lambda item: item[1]["rssEndMb"] - item[1]["rssMidMb"])
            line += (
                f"; in its second half {late[1]['rssEndMb'] - late[1]['rssMidMb']:+.1f} MiB "
                f"({late[0]})"
            )
        if whole[0] == RECONCILER:
            others = [item for item in services.items() if item[0] != RECONCILER]
            if others:
                rest = max(others, key=lambda item: item[1]["rssEndMb"] - item[1]["rssStartMb"])
                line += (
                    f"; the reconciler keeps the day's tally (docs/parity.md), of the others "
                    f"{rest[1]['rssEndMb'] - rest[1]['rssStartMb']:+.1f} MiB ({rest[0]})"
                )
        out.append(line)
    out.append("mirror at one trade per record >= 60 k records/s: see bench_mirror.py")
    return out


def _judged(syn: dict[str, Any], key: str, single: float) -> tuple[float, str]:
    """The p99 a target is judged on: the median of the runs' (with the runs' figures, said
    first), or the single run's."""
    found = median_p99(syn, key)
    if found is None:
        return single, ""
    median, values = found
    each = ", ".join(f"{value:,.1f}" for value in values)
    return median, f"median of {len(values)} runs ({each} ms) "


def summary_rows(results: dict[str, Any]) -> list[dict[str, object]]:
    """The headline figures for ``scripts/bench.sh``'s table."""
    rows = []
    day = results.get("realDay") or {}
    to = day.get("to") or {}
    ceiling = day.get("ceilings") or {}
    per = day.get("tradesPerRecord")
    if to.get("kafka"):
        rows.append(
            row(
                "bench_mesh",
                f"real day to Kafka, records/s ({per} trades/record)",
                _rate(to["kafka"]["recordsPerS"]),
                f"raw produce {_rate(ceiling.get('produceRecordsPerS'))}",
                _ratio(to["kafka"]["recordsPerS"], ceiling.get("produceRecordsPerS")),
                LIKE_FOR_LIKE + " (same records)",
            )
        )
    if to.get("redis"):
        rows.append(
            row(
                "bench_mesh",
                f"real day to Redis, records/s ({per} trades/record)",
                _rate(to["redis"]["recordsPerS"]),
                f"pipelined PUBLISH {_rate(ceiling.get('publishRecordsPerS'))}",
                _ratio(to["redis"]["recordsPerS"], ceiling.get("publishRecordsPerS")),
                LIKE_FOR_LIKE + " (same records; PUBLISH alone, no XADD or subscribers)",
            )
        )
    for key, label in (
        ("kafka", "Kafka"),
        ("barRedisEventTime", "bars (event time), Redis"),
        ("barKafkaEventTime", "bars (event time), Kafka"),
    ):
        if to.get(key):
            rows.append(
                row(
                    "bench_mesh",
                    f"real day, ticks/s to {label}",
                    _rate(to[key]["ticksPerS"]),
                    "target 100,000",
                    basis="target, not a ratio",
                )
            )
    syn = results.get("synthetic") or {}
    latency = syn.get("latencyMs") or {}
    for key, label in LABELS.items():
        found = latency.get(key)
        if found:
            target = "100 ms" if key == "tickToKafka" else ""
            if key.startswith("tickToBar"):
                target = f"grace + 100 = {syn.get('graceMs', 0) + 100} ms"
            judged, runs = _judged(syn, key, found["p99"])
            rows.append(
                row(
                    "bench_mesh",
                    f"{syn.get('symbols')} symbols at {_rate(syn.get('achievedTicksPerS'))} "
                    f"ticks/s: p99 {label}" + (f", {runs.strip()}" if runs else ""),
                    f"{judged:,.1f} ms",
                    f"target {target}" if target else "",
                    basis="latency (p50 " + f"{found['p50']:,.1f} ms)",
                )
            )
    if results.get("layout"):
        rows += layout_summary_rows(results["layout"])
    if results.get("linger"):
        rows += linger_summary_rows(results["linger"])
    return rows + gauge_summary_rows(results, "bench_mesh")


def _topic_mode(mode: object) -> str:
    if mode == "single":
        return "one topic keyed by symbol (TOPIC_MODE=single)"
    if mode == "per-symbol":
        return "a ticks.<SYM> topic per symbol"
    return "?"
