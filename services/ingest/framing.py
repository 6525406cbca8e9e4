"""Cutting time-ordered trades into feed frames, as Polygon's socket sends them.

The simulator sends these frames and ingest's tick-file source publishes the same ones, so a
day read from files and the same day through the simulator give the same records.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from libs.common.market.sessions import MINUTE_MS
from services.ingest.protocol import TradeEvent


def frames_of(
    trades: Iterable[TradeEvent], frame_max_events: int, window_ms: int
) -> Iterator[list[TradeEvent]]:
    """Cut time-ordered trades into frames: one ``window_ms`` window (and one minute) per frame,
    at most ``frame_max_events`` events each."""
    frame: list[TradeEvent] = []
    window = -1
    for trade in trades:
        trade_window = trade.t // window_ms
        if frame and (
            trade_window != window
            or len(frame) >= frame_max_events
            or trade.t // MINUTE_MS != frame[0].t // MINUTE_MS
        ):
            yield frame
            frame = []
        if not frame:
            window = trade_window
        frame.append(trade)
    if frame:
        yield frame
