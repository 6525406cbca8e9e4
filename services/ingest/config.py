"""Settings of the ingest service (variables ``INGEST_*``; the key is ``POLYGON_API_KEY``)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta

from libs.common.runtime.settings import CommonSettings, Secret

EventType = Literal["T", "Q", "A", "AM"]
"""Polygon's stock event types (``protocol.DATA_KINDS``)."""

BATCH_FRAMES = 512
"""Frames a Redis round trip of ingest carries at most (``INGEST_PUBLISH_BATCH_FRAMES``).

Only a backlog fills a round trip (a live feed that keeps up sends what is queued), and then
fewer, larger round trips drain it with less work a frame in ingest, Redis, the mirror and the
broker: the real day (``bench_mesh.py --only day``, runs alternating on one box) reached
35,367 and 36,139 ticks/s to Kafka at 512 against 29,636 and 31,876 at 64, the mesh's CPU
20.8 s against 22.8-24.9. A call of the publish script still holds at most
``TICKMESH_PUBLISH_CHANNELS_PER_CALL`` channels, so Redis serves other clients between calls."""


class IngestSettings(CommonSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How ingest reads the feed and where it publishes."""

    ENV_PREFIX: ClassVar[str] = "INGEST_"
    ENV_NAMES: ClassVar[dict[str, str]] = {"polygon_api_key": "POLYGON_API_KEY"}
    SERVICE: ClassVar[str] = "ingest"

    http_port: Annotated[int, Meta(ge=0, le=65535, description="port of the HTTP endpoint")] = 9101
    source: Annotated[
        Literal["polygon", "files"], Meta(description="polygon: the WebSocket (live or sim)")
    ] = "polygon"
    polygon_url: Annotated[str, Meta(description="WebSocket URL of the feed")] = (
        "wss://socket.polygon.io/stocks"
    )
    polygon_api_key: Annotated[
        Secret, Meta(description="Polygon API key (POLYGON_API_KEY only)")
    ] = Secret("")
    symbols: Annotated[list[str], Meta(description="symbols, comma separated; * for all")] = (
        msgspec.field(default_factory=lambda: ["*"])
    )
    event_types: Annotated[list[EventType], Meta(description="Polygon event types")] = (
        msgspec.field(default_factory=lambda: ["T"])
    )
    files: Annotated[list[str], Meta(description="tick files to replay when source=files")] = (
        msgspec.field(default_factory=list)
    )
    max_frame_bytes: Annotated[
        int,
        Meta(
            ge=65_536,
            description="largest WebSocket frame read; a bigger one is a dead letter and the "
            "connection is reopened (its memory is never allocated)",
        ),
    ] = 16 * 1_048_576
    queue_size: Annotated[
        int, Meta(gt=0, description="frames buffered between reader and decoder")
    ] = 10_000
    lag_warning_ms: Annotated[int, Meta(gt=0, description="feed lag that logs a warning")] = 5_000
    queue_warning_ratio: Annotated[
        float, Meta(gt=0, le=1, description="queue fill that logs a warning")
    ] = 0.5
    reconnect_initial_s: Annotated[float, Meta(gt=0, description="first reconnect delay")] = 0.5
    reconnect_max_s: Annotated[float, Meta(gt=0, description="longest reconnect delay")] = 30.0
    max_connections_backoff_s: Annotated[
        float, Meta(gt=0, description="delay after a max_connections refusal")
    ] = 60.0
    publish_batch_frames: Annotated[
        int, Meta(gt=0, description="frames per Redis pipeline (at most; a backlog fills it)")
    ] = BATCH_FRAMES
    records: Annotated[
        Literal["frame", "batch"],
        Meta(
            description="frame: one record per frame and symbol (the contract); batch: one per "
            "symbol per Redis round trip, several frames' trades (fewer, larger records)"
        ),
    ] = "frame"
    linger_ms: Annotated[
        int,
        Meta(
            ge=0,
            le=1_000,
            description="wait this long for more frames before a round trip that is not full "
            "(with records=batch: larger records at that latency cost)",
        ),
    ] = 0
    speed: Annotated[
        float, Meta(ge=0, description="file replay pace: 1 real time, 10 faster, 0 no pacing")
    ] = 1.0
    publish_retry_s: Annotated[
        float, Meta(gt=0, description="retry a failed Redis publish this long, then fail")
    ] = 30.0
    backfill: Annotated[
        bool, Meta(description="fill feed gaps from Polygon's REST API (needs the key)")
    ] = True
    rest_url: Annotated[str, Meta(description="base URL of Polygon's REST API")] = (
        "https://api.polygon.io"
    )
    rest_concurrency: Annotated[
        int, Meta(gt=0, description="symbols fetched from REST at once")
    ] = 4
    rest_max_wait_s: Annotated[
        float, Meta(gt=0, description="how long one REST request is retried (429, errors)")
    ] = 300.0
    progress_interval_ms: Annotated[
        int, Meta(gt=0, description="period of the progress marks (sentio.progress.v1)")
    ] = 500
    idle_after_ms: Annotated[
        int, Meta(gt=0, description="no feed data this long: the marks say idle (replays)")
    ] = 2_000
    fill_missing: Annotated[
        bool,
        Meta(description="files source: publish only trades the streams lack, mark gaps filled"),
    ] = False
    exit_when_done: Annotated[
        bool, Meta(description="file replay: exit (0) when done instead of idling")
    ] = False

    def check(self) -> None:
        if not self.event_types:
            raise self.invalid("event_types", "empty: list some of T,Q,A,AM")
        if not self.symbols:
            raise self.invalid("symbols", "empty: list symbols, or * for all")
        if self.source == "files" and not self.files:
            raise self.invalid("files", "INGEST_SOURCE=files needs tick files, comma separated")
