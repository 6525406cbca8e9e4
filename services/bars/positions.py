"""The source positions a bar builder has read but may not commit yet (restart rule 1 in
``builder.py``): a position is safe once every tick of the records up to it sits in a closed
minute of its symbol."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from libs.common.market.sessions import MINUTE_MS


class Held:
    """Records of a channel waiting to be committed: the last one's position, the newest tick
    among them and the symbols whose minute of it must close first."""

    __slots__ = ("newest", "position", "symbols")

    def __init__(self, position: int, newest: int, symbols: set[str]) -> None:
        self.position = position
        self.newest = newest
        self.symbols = symbols


class PendingPositions:
    """Per channel, the records read and not yet safe to commit, oldest first."""

    __slots__ = ("_pending", "dirty", "waiting")

    def __init__(self) -> None:
        self._pending: dict[str, deque[Held]] = {}
        self.dirty: set[str] = set()
        """Channels whose oldest entry may have become safe: new records, or a minute of one of
        their symbols closed (scanning only these keeps a message O(its own channels))."""
        self.waiting: set[str] = set()
        """Channels with positions not yet safe to commit."""

    def clear(self) -> None:
        self._pending.clear()
        self.dirty.clear()
        self.waiting.clear()

    def hold(self, channel: str, position: int, newest: int, symbol: str | None) -> None:
        """Keep ``position`` uncommitted until ``symbol``'s minute of ``newest`` (its record's
        newest tick) has closed; a mark or an empty record waits for nothing of its own.

        Records in a row whose newest ticks share a minute become safe together, once that
        minute has closed for each of their symbols: they share one entry, holding the last
        position and those symbols. A minute's close then pops an entry or two per channel,
        and a channel that carries many symbols (a partition of the single tick topic) holds
        an entry per minute, not one per record."""
        queue = self._pending.get(channel)
        if queue is None:
            queue = self._pending[channel] = deque()
        last = queue[-1] if queue else None
        if last is not None and (symbol is None or last.newest // MINUTE_MS == newest // MINUTE_MS):
            last.position = position
            if symbol is not None:
                last.symbols.add(symbol)
                last.newest = max(last.newest, newest)
        else:
            queue.append(Held(position, newest, set() if symbol is None else {symbol}))
        self.dirty.add(channel)
        self.waiting.add(channel)

    def safe(self, open_since: Callable[[str], int | None]) -> dict[str, int]:
        """Per dirty channel, the last position whose records' ticks all sit in closed minutes
        (``open_since``: the start of a symbol's earliest open minute, None when none is)."""
        safe: dict[str, int] = {}
        for channel in self.dirty:
            pending = self._pending.get(channel)
            while pending:
                held = pending[0]
                newest, symbols = held.newest, held.symbols
                while symbols:  # a symbol found safe stays safe: its minute closed for good
                    symbol = symbols.pop()
                    earliest_open = open_since(symbol)
                    if earliest_open is not None and newest >= earliest_open:
                        symbols.add(symbol)
                        break
                if symbols:
                    break
                safe[channel] = pending.popleft().position
            if not pending:
                self.waiting.discard(channel)
        self.dirty.clear()
        return safe
