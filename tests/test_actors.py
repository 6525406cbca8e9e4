"""Unit tests of the runtime: lifecycle table, components, mailboxes, incarnations, supervision,
backoff and restart budget, stop, metrics."""

from __future__ import annotations

import asyncio
import random

import pytest
from prometheus_client import CollectorRegistry

from libs.common.runtime.actors import Actor, Overflow
from libs.common.runtime.backoff import Backoff, RestartBudget
from libs.common.runtime.clock import ManualClock
from libs.common.runtime.lifecycle import TRANSITIONS, Component, InvalidTransition
from libs.common.runtime.lifecycle import State as ActorState
from libs.common.runtime.supervisor import RestartBudgetExceeded, Supervisor


def sample(registry: CollectorRegistry, name: str, actor: str) -> float:
    value = registry.get_sample_value(name, {"actor": actor})
    return 0.0 if value is None else value


class Recorder(Actor[object]):
    """Records what it handles; raises on the message 'boom'; sleeps on ('slow', s)."""

    def __init__(self, name: str, registry: CollectorRegistry, **kwargs: object) -> None:
        super().__init__(name, registry=registry, **kwargs)  # type: ignore[arg-type]
        self.seen: list[object] = []
        self.starts = 0
        self.stops = 0

    async def on_start(self) -> None:
        self.starts += 1

    async def handle(self, message: object) -> None:
        if message == "boom":
            raise RuntimeError("boom")
        if isinstance(message, tuple) and message[0] == "slow":
            await asyncio.sleep(message[1])
        self.seen.append(message)

    async def on_stop(self) -> None:
        self.stops += 1


def test_transition_table_allows_only_the_lifecycle() -> None:
    assert TRANSITIONS[ActorState.NEW] == {ActorState.STARTING}
    assert ActorState.RUNNING not in TRANSITIONS[ActorState.STOPPED]
    assert ActorState.STARTING in TRANSITIONS[ActorState.FAILED]


async def test_invalid_transition_is_refused() -> None:
    actor = Recorder("a", CollectorRegistry())
    with pytest.raises(InvalidTransition):
        actor._transition(ActorState.RUNNING)


async def test_messages_are_handled_in_order_and_counted() -> None:
    registry = CollectorRegistry()
    actor = Recorder("ordered", registry)
    await actor.start()
    assert actor.state is ActorState.RUNNING
    for i in range(10):
        await actor.tell(i)
    await actor.stop()
    assert actor.seen == list(range(10))
    assert actor.state is ActorState.STOPPED
    assert sample(registry, "tickmesh_actor_messages_handled_total", "ordered") == 10
    assert actor.starts == actor.stops == 1


async def test_stop_drains_queued_messages_within_deadline() -> None:
    actor = Recorder("drain", CollectorRegistry(), mailbox_size=100)
    await actor.start()
    for i in range(50):
        actor.tell_nowait(("slow", 0.001) if i % 10 == 0 else i)
    await actor.stop(deadline_s=5)
    assert len(actor.seen) == 50


async def test_stop_gives_up_at_deadline_and_keeps_the_rest_queued() -> None:
    actor = Recorder("deadline", CollectorRegistry(), mailbox_size=100)
    await actor.start()
    actor.tell_nowait(("slow", 10))
    actor.tell_nowait("after")
    loop = asyncio.get_running_loop()
    began = loop.time()
    await actor.stop(deadline_s=0.2)
    assert loop.time() - began < 2
    assert actor.state is ActorState.STOPPED
    assert actor.seen == []
    assert len(actor.mailbox) == 1  # "after" waits for a restart; nothing silently lost
    await actor.start()
    await actor.stop()
    assert actor.seen == ["after"]


async def test_block_policy_pauses_the_sender() -> None:
    actor = Recorder("block", CollectorRegistry(), mailbox_size=2, overflow=Overflow.BLOCK)
    actor.tell_nowait(1)
    actor.tell_nowait(2)
    sender = asyncio.create_task(actor.tell(3))
    await asyncio.sleep(0.05)
    assert not sender.done()
    await actor.start()
    assert await asyncio.wait_for(sender, 2)
    await actor.stop()
    assert actor.seen == [1, 2, 3]


async def test_shed_policy_drops_and_counts() -> None:
    registry = CollectorRegistry()
    actor = Recorder("shed", registry, mailbox_size=2, overflow=Overflow.SHED)
    assert await actor.tell(1) and await actor.tell(2)
    assert not await actor.tell(3)
    assert not actor.tell_nowait(4)
    assert sample(registry, "tickmesh_actor_messages_shed_total", "shed") == 2
    assert sample(registry, "tickmesh_actor_mailbox_depth", "shed") == 2


async def test_spill_policy_hands_overflow_to_the_spill_callback() -> None:
    spilled: list[object] = []

    async def spill(message: object) -> None:
        spilled.append(message)

    registry = CollectorRegistry()
    actor = Recorder("spill", registry, mailbox_size=1, overflow=Overflow.SPILL, spill=spill)
    await actor.tell(1)
    await actor.tell(2)
    assert spilled == [2]
    assert sample(registry, "tickmesh_actor_messages_spilled_total", "spill") == 1


def test_spill_policy_without_callback_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="spill callback"):
        Recorder("nospill", CollectorRegistry(), overflow=Overflow.SPILL)


async def test_cancellation_of_the_loop_is_reraised_not_swallowed() -> None:
    actor = Recorder("cancel", CollectorRegistry())
    await actor.start()
    actor.tell_nowait(("slow", 10))
    await asyncio.sleep(0.01)
    assert actor._loop_task is not None
    actor._loop_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await actor._loop_task
    assert actor.state is ActorState.RUNNING  # a cancel is not a failure
    assert not actor.failure.done()


async def test_cancelling_a_sender_blocked_on_a_full_mailbox_propagates() -> None:
    actor = Recorder("blocked", CollectorRegistry(), mailbox_size=1)
    actor.tell_nowait(1)
    sender = asyncio.create_task(actor.tell(2))
    await asyncio.sleep(0.01)
    sender.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sender
    assert len(actor.mailbox) == 1


async def test_timers_and_tasks_run_while_running_and_stop_with_the_actor() -> None:
    actor = Recorder("timed", CollectorRegistry())
    ticks: list[int] = []
    task_stopped = asyncio.Event()

    async def tick() -> None:
        ticks.append(1)

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            task_stopped.set()

    actor.every(0.01, tick, name="tick")
    actor.spawn(forever, name="forever")
    await actor.start()
    await asyncio.sleep(0.1)
    await actor.stop()
    count = len(ticks)
    assert count >= 3
    assert task_stopped.is_set()
    await asyncio.sleep(0.05)
    assert len(ticks) == count


async def test_failure_in_handle_escalates_and_counts() -> None:
    registry = CollectorRegistry()
    actor = Recorder("fails", registry)
    await actor.start()
    await actor.tell("boom")
    error = await asyncio.wait_for(actor.failure, 2)
    assert isinstance(error, RuntimeError)
    assert actor.state is ActorState.FAILED
    assert sample(registry, "tickmesh_actor_failures_total", "fails") == 1


async def test_failure_in_a_timer_escalates() -> None:
    actor = Recorder("timerfail", CollectorRegistry())

    async def bad() -> None:
        raise ValueError("bad timer")

    actor.every(0.01, bad, name="bad")
    await actor.start()
    error = await asyncio.wait_for(actor.failure, 2)
    assert "bad timer" in str(error)


async def test_supervisor_restarts_a_failed_child_with_growing_backoff() -> None:
    registry = CollectorRegistry()
    supervisor = Supervisor(
        "sup",
        max_restarts=5,
        window_s=60,
        backoff_initial_s=0.01,
        backoff_max_s=1,
        jitter=0.0,
        registry=registry,
    )
    actor = supervisor.add(Recorder("child", registry))
    running = asyncio.create_task(supervisor.run())
    await asyncio.sleep(0.05)
    for _ in range(3):
        await actor.tell("boom")
        await asyncio.sleep(0.15)
    await actor.tell("ok")
    await asyncio.sleep(0.05)
    supervisor.stop()
    await asyncio.wait_for(running, 5)
    assert "ok" in actor.seen
    assert supervisor.delays == pytest.approx([0.01, 0.02, 0.04])
    assert sample(registry, "tickmesh_actor_restarts_total", "child") == 3
    assert actor.state is ActorState.STOPPED


def test_backoff_has_jitter_within_bounds_and_a_cap() -> None:
    backoff = Backoff(1, 8, jitter=0.2, rng=random.Random(1))
    delays = [backoff.delay_s(n) for n in range(6)]
    assert all(0.8 <= d / min(8, 2**n) <= 1.2 for n, d in enumerate(delays))
    assert len({round(d / min(8, 2**n), 6) for n, d in enumerate(delays)}) > 1
    assert max(delays) <= 8 * 1.2


def test_backoff_floor_counting_and_reset() -> None:
    backoff = Backoff(0.5, 30, jitter=0)
    assert [backoff.next_s() for _ in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff.attempts == 4
    assert backoff.delay_s(0, floor_s=60) == 60  # e.g. after a max_connections refusal
    backoff.reset()
    assert backoff.next_s() == 0.5
    assert Backoff(1, 5, jitter=0).delay_s(10_000) == 5  # no overflow far out


def test_restart_budget_counts_within_its_window_on_the_injected_clock() -> None:
    clock = ManualClock()
    budget = RestartBudget(2, 60, clock=clock)
    assert not budget.exhausted()
    budget.spend()
    clock.advance(10_000)
    budget.spend()
    assert budget.exhausted() and budget.recent() == 2
    clock.advance(55_000)  # the first restart is now 65 s old
    assert not budget.exhausted() and budget.recent() == 1


class Ticker(Component):
    """A component with a timer and a task, no mailbox."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__("ticker", registry=registry)
        self.ticks = 0
        self.loops = 0
        self.every(0.01, self.tick, name="ticker.timer")
        self.spawn(self.loop, name="ticker.loop")

    async def tick(self) -> None:
        self.ticks += 1

    async def loop(self) -> None:
        while True:
            self.loops += 1
            await asyncio.sleep(0.01)


async def test_a_component_runs_timers_and_tasks_without_a_mailbox() -> None:
    registry = CollectorRegistry()
    ticker = Ticker(registry)
    assert not hasattr(ticker, "mailbox")
    await ticker.start()
    await asyncio.sleep(0.1)
    await ticker.stop()
    assert ticker.ticks >= 3 and ticker.loops >= 3 and ticker.incarnation == 1
    before = (ticker.ticks, ticker.loops)
    await asyncio.sleep(0.05)
    assert (ticker.ticks, ticker.loops) == before  # nothing runs after stop
    await ticker.start()
    assert ticker.incarnation == 2
    await ticker.stop()


class Stubborn(Component):
    """A task that swallows cancellation ``swallow`` times (as some client libraries do)."""

    def __init__(self, registry: CollectorRegistry, swallow: int) -> None:
        super().__init__("stubborn", registry=registry)
        self.swallow = swallow
        self.cancels = 0
        self.spawn(self.loop, name="stubborn.loop")

    async def loop(self) -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancels += 1
                if self.cancels > self.swallow:
                    raise


async def test_stop_cancels_again_a_task_that_swallowed_its_cancellation() -> None:
    stubborn = Stubborn(CollectorRegistry(), swallow=2)
    await stubborn.start()
    await asyncio.sleep(0.01)
    await asyncio.wait_for(stubborn.stop(deadline_s=5.0), timeout=3.0)
    assert stubborn.state is ActorState.STOPPED and stubborn.cancels == 3


async def test_stop_leaves_behind_a_task_that_never_ends_at_the_deadline() -> None:
    stubborn = Stubborn(CollectorRegistry(), swallow=10**9)
    await stubborn.start()
    await asyncio.sleep(0.01)
    await asyncio.wait_for(stubborn.stop(deadline_s=1.0), timeout=3.0)
    assert stubborn.state is ActorState.STOPPED and stubborn.cancels >= 2
    stubborn.swallow = 0  # let the left-behind task end with the test
    for task in asyncio.all_tasks():
        if task.get_name() == "stubborn.loop":
            task.cancel()


async def test_a_restart_drops_what_the_old_incarnation_posted_and_keeps_what_was_told() -> None:
    registry = CollectorRegistry()
    actor = Recorder("incarnations", registry, mailbox_size=10)
    await actor.start()
    await actor.tell(("slow", 0.2))  # keeps the loop busy while more is queued
    await asyncio.sleep(0.01)
    await actor.post("posted-by-1")
    await actor.tell("told")
    actor._escalate(RuntimeError("boom"), where="test")  # the loop is cancelled mid-message
    await actor.stop()
    await actor.start()
    await actor.post("posted-by-2")
    await actor.stop()
    assert "posted-by-1" not in actor.seen
    assert actor.seen[-2:] == ["told", "posted-by-2"]
    assert sample(registry, "tickmesh_actor_messages_stale_total", "incarnations") == 1


async def test_supervisor_past_the_budget_raises_and_stops_everything() -> None:
    registry = CollectorRegistry()
    supervisor = Supervisor(
        "budget", max_restarts=2, window_s=60, backoff_initial_s=0.001, jitter=0, registry=registry
    )
    failing = supervisor.add(Recorder("flaky", registry))
    other = supervisor.add(Recorder("other", registry))
    running = asyncio.create_task(supervisor.run())
    with pytest.raises(RestartBudgetExceeded, match="flaky failed 3 times"):
        for _ in range(5):
            await asyncio.sleep(0.05)
            if running.done():
                break
            await failing.tell("boom")
        await asyncio.wait_for(running, 5)
    assert other.state is ActorState.STOPPED


async def test_restarts_outside_the_window_do_not_count() -> None:
    from libs.common.runtime.clock import ManualClock

    clock = ManualClock()
    registry = CollectorRegistry()
    supervisor = Supervisor(
        "window",
        max_restarts=1,
        window_s=10,
        backoff_initial_s=0.001,
        jitter=0,
        clock=clock,
        registry=registry,
    )
    actor = supervisor.add(Recorder("w", registry))
    running = asyncio.create_task(supervisor.run())
    for _ in range(3):
        await asyncio.sleep(0.02)
        await actor.tell("boom")
        await asyncio.sleep(0.05)
        clock.advance(11_000)
    assert not running.done()
    supervisor.stop()
    await asyncio.wait_for(running, 5)


async def test_take_nowait_takes_a_batch_and_leaves_the_stop_sentinel() -> None:
    actor = Recorder("batch", CollectorRegistry(), mailbox_size=10)
    for i in range(3):
        actor.tell_nowait(i)
    actor.mailbox.put_stop()
    actor.tell_nowait(99)
    assert actor.take_nowait(10) == [0, 1, 2]
    assert len(actor.mailbox) == 2


async def test_a_failure_while_stopping_is_counted_and_the_stop_completes() -> None:
    registry = CollectorRegistry()
    actor = Recorder("failstop", registry, mailbox_size=10)
    await actor.start()
    actor.tell_nowait("boom")  # handled while stop() drains the mailbox
    await actor.stop()
    assert actor.state is ActorState.STOPPED
    assert sample(registry, "tickmesh_actor_failures_total", "failstop") == 1


class Outage(RuntimeError):
    """Stands for a dependency's connection error in these unit tests."""


class Dependent(Recorder):
    """Fails on start while ``down`` (the dependency is unreachable)."""

    down = 0

    async def on_start(self) -> None:
        await super().on_start()
        if Dependent.down > 0:
            Dependent.down -= 1
            raise Outage("connection refused")


def outage_supervisor(name: str, registry: CollectorRegistry) -> Supervisor:
    """A supervisor with a budget of one restart that takes ``Outage`` for a Redis outage."""
    return Supervisor(
        name,
        max_restarts=1,
        window_s=60,
        backoff_initial_s=0.001,
        jitter=0,
        registry=registry,
        classify_outage=lambda exc: "redis" if isinstance(exc, Outage) else None,
        outage_max_s=0.01,
    )


async def test_a_dependency_outage_is_ridden_out_without_spending_the_budget() -> None:
    registry = CollectorRegistry()
    supervisor = outage_supervisor("outage", registry)
    child = Dependent("dependent", registry)
    supervisor.add(child)
    running = asyncio.ensure_future(supervisor.run())
    await asyncio.sleep(0.05)
    Dependent.down = 6  # far past the budget of one restart
    child._escalate(Outage("connection reset"), where="test")
    for _ in range(200):
        await asyncio.sleep(0.01)
        if child.state is ActorState.RUNNING and Dependent.down == 0:
            break
    assert child.state is ActorState.RUNNING and not running.done()
    labels = {"dependency": "redis"}
    assert registry.get_sample_value("tickmesh_dependency_up", labels) == 1
    assert registry.get_sample_value("tickmesh_dependency_outages_total", labels) == 1
    assert (registry.get_sample_value("tickmesh_dependency_down_seconds_total", labels) or 0) > 0
    child._escalate(RuntimeError("a bug"), where="test")  # real failures still count
    await asyncio.sleep(0.05)
    child._escalate(RuntimeError("a bug again"), where="test")
    with pytest.raises(RestartBudgetExceeded):
        await asyncio.wait_for(running, 5)


class FailsToStop(Dependent):
    """Its last words (a final commit) fail while the dependency is down."""

    async def on_stop(self) -> None:
        await super().on_stop()
        if Dependent.down > 0:
            raise Outage("connection refused (final commit)")


async def test_a_child_whose_stop_fails_during_an_outage_is_restarted_not_fatal() -> None:
    """A Redis restart: the child fails, and its final commit in ``on_stop`` fails too. The
    supervisor logs that and restarts it once the dependency is back; the service lives."""
    registry = CollectorRegistry()
    supervisor = outage_supervisor("stopfail", registry)
    child = FailsToStop("stopfail-child", registry)
    supervisor.add(child)
    running = asyncio.ensure_future(supervisor.run())
    await asyncio.sleep(0.05)
    Dependent.down = 3
    child._escalate(Outage("connection reset"), where="test")
    for _ in range(200):
        await asyncio.sleep(0.01)
        if child.state is ActorState.RUNNING and Dependent.down == 0:
            break
    assert child.state is ActorState.RUNNING and not running.done()
    supervisor.stop()
    await asyncio.wait_for(running, 5)
