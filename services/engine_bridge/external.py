"""The external engine: a subprocess speaking JSON lines on stdin/stdout.

The protocol (``docs/engine_protocol.md``): the bridge sends ``hello`` and waits for
``ready``; then, per minute bucket, one ``bars`` message with an ``id``, to which the engine
answers with one ``decision`` carrying the same ``id`` within ``timeout_ms``. A late answer
(an ``id`` already given up on) is dropped. ``stop`` asks the engine to exit. Anything the
engine writes to stderr goes to the bridge's log.

Supervision: a minute without an answer (timeout, crash, a dead process) returns no decision
and a reason, and the bridge reports the gap. A dead engine is restarted on the next minute
after an exponential backoff; ``max_timeouts`` timeouts in a row count as a hung engine and
restart it too. More than ``max_restarts`` restarts within ``restart_window_s`` raise
``EngineFailed``: the bridge actor fails and its supervisor takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
import structlog
from msgspec import Struct

from libs.common.runtime.backoff import Backoff, RestartBudget
from libs.common.runtime.clock import SYSTEM_CLOCK, Clock
from libs.common.schemas import Bar
from services.engine_bridge.model import (
    EngineInput,
    EngineOutput,
    EngineSignal,
    Order,
    PositionView,
)

log = structlog.get_logger("tickmesh.engine_bridge.external")

PROTOCOL_VERSION = 1
LINE_LIMIT = 16 * 1024 * 1024
ANSWERS_QUEUED = 1_024
"""Engine messages read and not yet taken; past it the reader waits (the engine's stdout pipe
fills and the engine blocks writing): an engine that floods cannot grow our memory."""


class Hello(Struct, tag="hello", tag_field="type"):
    """Bridge → engine, first message after a start or restart."""

    protocol: int
    portfolioId: str
    symbols: list[str]
    positions: list[PositionView]
    restarts: int


class BarsMessage(Struct, tag="bars", tag_field="type"):
    """Bridge → engine: one minute bucket; answer with a ``decision`` of the same ``id``."""

    id: int
    minuteMs: int
    tsET: str
    barId: int
    bars: list[Bar]
    corrections: list[Bar]
    positions: list[PositionView]


class StopMessage(Struct, tag="stop", tag_field="type"):
    """Bridge → engine: exit now."""


class Ready(Struct, tag="ready", tag_field="type"):
    """Engine → bridge: answer to ``hello``."""

    name: str = ""
    protocol: int = PROTOCOL_VERSION


class Decision(Struct, tag="decision", tag_field="type"):
    """Engine → bridge: signals and orders for the bucket ``id``."""

    id: int
    signals: list[EngineSignal] = []
    orders: list[Order] = []


class LogLine(Struct, tag="log", tag_field="type"):
    """Engine → bridge: a line for the bridge's log."""

    message: str
    level: Literal["debug", "info", "warning", "error"] = "info"


EngineMessage = Ready | Decision | LogLine
_ENCODER = msgspec.json.Encoder()
_DECODER: msgspec.json.Decoder[EngineMessage] = msgspec.json.Decoder(EngineMessage)


class EngineFailed(RuntimeError):
    """The external engine failed more often than its restart budget allows."""


class EngineStartError(RuntimeError):
    """The external engine did not start or did not answer ``hello`` in time."""


class _Eof:
    """End of the engine's stdout."""


_EOF = _Eof()


class ExternalEngine:
    """One external engine process and its supervision."""

    def __init__(
        self,
        command: str | Sequence[str],
        *,
        portfolio_id: str = "paper",
        symbols: Sequence[str] = (),
        timeout_ms: int = 2_000,
        start_timeout_ms: int = 10_000,
        max_timeouts: int = 3,
        max_restarts: int = 5,
        restart_window_s: float = 300.0,
        backoff_initial_ms: int = 200,
        backoff_max_ms: int = 10_000,
        env: dict[str, str] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        on_restart: Any = None,
        on_timeout: Any = None,
        on_protocol_error: Any = None,
    ) -> None:
        self.command = shlex.split(command) if isinstance(command, str) else list(command)
        if not self.command:
            raise ValueError("the external engine needs a command")
        self.portfolio_id = portfolio_id
        self.symbols = list(symbols)
        self.timeout_s = timeout_ms / 1000.0
        self.start_timeout_s = start_timeout_ms / 1000.0
        self.max_timeouts = max_timeouts
        self.budget = RestartBudget(max_restarts, restart_window_s, clock=clock)
        self.backoff = Backoff(backoff_initial_ms / 1000.0, backoff_max_ms / 1000.0, jitter=0.0)
        self.env = env
        self.clock = clock
        self.name = "external"
        self.restarts = 0
        """Restarts since this object was built (crashes and hangs)."""
        self.timeouts = 0
        self.protocol_errors = 0
        self.stale_answers = 0
        self._on_restart = on_restart
        self._on_timeout = on_timeout
        self._on_protocol_error = on_protocol_error
        self._process: asyncio.subprocess.Process | None = None
        self._lines: asyncio.Queue[EngineMessage | _Eof] = asyncio.Queue(ANSWERS_QUEUED)
        self._tasks: list[asyncio.Task[None]] = []
        self._next_id = 0
        self._consecutive_timeouts = 0
        self._down_since: float | None = None
        self._positions: list[PositionView] = []
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """True while the process runs and its stdout is open."""
        process = self._process
        return process is not None and process.returncode is None and self._down_since is None

    @property
    def pid(self) -> int | None:
        """The engine's process id (None when not running)."""
        return self._process.pid if self._process is not None else None

    async def start(self, positions: Sequence[PositionView] = ()) -> None:
        """Start the process and complete the ``hello``/``ready`` handshake."""
        self._positions = list(positions)
        await self._spawn()
        self._started = True

    async def _spawn(self) -> None:
        await self._kill()
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                limit=LINE_LIMIT,
            )
        except OSError as exc:
            raise EngineStartError(f"cannot start {self.command[0]!r}: {exc}") from exc
        self._process = process
        self._down_since = None
        self._lines = asyncio.Queue(ANSWERS_QUEUED)
        assert process.stdout is not None and process.stderr is not None
        self._tasks = [
            asyncio.create_task(self._read_stdout(process.stdout), name="engine.stdout"),
            asyncio.create_task(self._read_stderr(process.stderr), name="engine.stderr"),
        ]
        hello = Hello(
            PROTOCOL_VERSION, self.portfolio_id, self.symbols, self._positions, self.restarts
        )
        if not await self._send(hello):
            raise EngineStartError(f"engine {self.command[0]!r} closed its stdin at start")
        deadline = self.clock.monotonic() + self.start_timeout_s
        while True:
            left = deadline - self.clock.monotonic()
            try:
                message = await asyncio.wait_for(self._lines.get(), max(0.0, left))
            except TimeoutError:
                await self._kill()
                raise EngineStartError(
                    f"engine {self.command[0]!r} did not answer hello within "
                    f"{self.start_timeout_s:g} s"
                ) from None
            if isinstance(message, _Eof):
                code = await self._reap()
                raise EngineStartError(
                    f"engine {self.command[0]!r} exited during the handshake (code {code})"
                )
            if isinstance(message, Ready):
                if message.name:
                    self.name = message.name
                log.info("engine.ready", engine=self.name, pid=process.pid, restarts=self.restarts)
                return

    async def stop(self) -> None:
        """Ask the engine to stop, then make sure it has."""
        process = self._process
        if process is not None and process.returncode is None:
            await self._send(StopMessage())
            with contextlib.suppress(Exception):
                assert process.stdin is not None
                process.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 2.0)
        await self._kill()

    async def _kill(self) -> None:
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(process.wait(), 5.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _reap(self) -> int | None:
        process = self._process
        if process is None:
            return None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 2.0)
        return process.returncode

    # -- I/O ---------------------------------------------------------------------------------

    async def _send(self, message: Struct) -> bool:
        process = self._process
        if process is None or process.stdin is None or process.stdin.is_closing():
            return False
        try:
            process.stdin.write(_ENCODER.encode(message) + b"\n")
            await process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    async def _read_stdout(self, stream: asyncio.StreamReader) -> None:
        try:
            while True:
                try:
                    line = await stream.readline()
                except ValueError:  # a line beyond the limit
                    self._protocol_error("line too long")
                    continue
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    message = _DECODER.decode(line)
                except msgspec.DecodeError as exc:
                    self._protocol_error(f"{exc}: {line[:200]!r}")
                    continue
                if isinstance(message, LogLine):
                    log.log(
                        _LEVELS[message.level],
                        "engine.log",
                        engine=self.name,
                        message=message.message[:2_000],
                    )
                    continue
                await self._lines.put(message)
        finally:
            if self._lines.full():  # the engine is gone: its oldest unread answer is moot
                self._lines.get_nowait()
            self._lines.put_nowait(_EOF)

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:
                continue
            if not line:
                return
            log.info(
                "engine.stderr",
                engine=self.name,
                line=line.decode(errors="replace").rstrip()[:2_000],
            )

    def _protocol_error(self, detail: str) -> None:
        self.protocol_errors += 1
        if self._on_protocol_error is not None:
            self._on_protocol_error()
        log.warning("engine.protocol_error", engine=self.name, detail=detail)

    # -- decisions ---------------------------------------------------------------------------

    async def decide(self, engine_input: EngineInput) -> tuple[EngineOutput | None, str]:
        """The engine's decision for one bucket, or None and why there is none."""
        self._positions = engine_input.positions
        if not self.alive:
            reason = await self._restart()
            if reason:
                return None, reason
        self._next_id += 1
        request_id = self._next_id
        message = BarsMessage(
            request_id,
            engine_input.minuteMs,
            engine_input.tsET,
            engine_input.barId,
            engine_input.bars,
            engine_input.corrections,
            engine_input.positions,
        )
        if not await self._send(message):
            self._went_down("stdin closed")
            return None, "crash"
        deadline = self.clock.monotonic() + self.timeout_s
        while True:
            left = deadline - self.clock.monotonic()
            try:
                answer = await asyncio.wait_for(self._lines.get(), max(0.0, left))
            except TimeoutError:
                return None, await self._timed_out(request_id)
            if isinstance(answer, _Eof):
                code = await self._reap()
                self._went_down(f"exited with code {code}")
                return None, "crash"
            if isinstance(answer, Decision):
                if answer.id == request_id:
                    self._consecutive_timeouts = 0
                    return EngineOutput(answer.signals, answer.orders), ""
                self.stale_answers += 1
                log.info(
                    "engine.stale_answer",
                    engine=self.name,
                    answer_id=answer.id,
                    waiting_for=request_id,
                )
            # a repeated ``ready`` is harmless; keep waiting

    async def _timed_out(self, request_id: int) -> str:
        self.timeouts += 1
        self._consecutive_timeouts += 1
        if self._on_timeout is not None:
            self._on_timeout()
        log.warning(
            "engine.timeout",
            engine=self.name,
            request_id=request_id,
            timeout_s=self.timeout_s,
            in_a_row=self._consecutive_timeouts,
        )
        if self._consecutive_timeouts >= self.max_timeouts:
            self._went_down(f"{self._consecutive_timeouts} timeouts in a row")
            await self._kill()
        return "timeout"

    def _went_down(self, why: str) -> None:
        if self._down_since is None:
            self._down_since = self.clock.monotonic()
            log.error("engine.down", engine=self.name, reason=why)

    async def _restart(self) -> str:
        """Restart after the backoff; '' when running again, else the reason of the gap."""
        now = self.clock.monotonic()
        budget = self.budget
        recent = budget.recent()
        if budget.exhausted():
            raise EngineFailed(
                f"external engine {self.command[0]!r} restarted {recent} times within "
                f"{budget.window_s:g} s (budget {budget.max_restarts})"
            )
        delay = self.backoff.delay_s(recent)
        down_since = self._down_since if self._down_since is not None else now
        wait = down_since + delay - now
        if wait > 0:
            await asyncio.sleep(wait)
        budget.spend()
        self.restarts += 1
        self._consecutive_timeouts = 0
        if self._on_restart is not None:
            self._on_restart()
        log.warning(
            "engine.restarting", engine=self.name, restarts=self.restarts, delay_s=round(delay, 3)
        )
        try:
            await self._spawn()
        except EngineStartError as exc:
            log.error("engine.restart_failed", engine=self.name, error=str(exc))
            self._down_since = self.clock.monotonic()
            return "crash"
        return ""

    # -- state (an external engine keeps its own) --------------------------------------------

    def snapshot(self) -> Any:
        """External engines keep their own state; nothing to persist here."""
        return None

    def restore(self, data: Any) -> None:
        """Nothing to restore (see ``snapshot``)."""


_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
