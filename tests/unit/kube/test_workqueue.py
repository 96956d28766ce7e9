"""The work queue: dedup, one worker per key, backoff, delays, terminal errors, drain, worker death."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from itertools import count
from typing import Any

import pytest
from prometheus_client import REGISTRY

from koupleless.kube.client import ApiError
from koupleless.kube.workqueue import TerminalError, WorkQueue, is_terminal
from koupleless.supervise import Supervisor

_names = count()


def qname() -> str:
    """Each test its own queue name, so its metrics start at zero."""
    return f"test-{next(_names)}"


def metric(name: str, queue: str) -> float:
    return REGISTRY.get_sample_value(name, {"queue": queue}) or 0.0


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll every millisecond: these tests wait for millisecond delays."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {check}")
        await asyncio.sleep(0.001)


async def settle() -> None:
    """Long enough for anything the queue would still do with millisecond delays."""
    await asyncio.sleep(0.03)


async def test_one_worker_per_key_and_dedupe() -> None:
    running: set[str] = set()
    overlaps: list[str] = []
    calls: list[str] = []
    gate = asyncio.Event()

    async def handle(key: str) -> None:
        if key in running:
            overlaps.append(key)
        running.add(key)
        calls.append(key)
        await gate.wait()
        running.discard(key)

    name = qname()
    q = WorkQueue(name, handle, workers=4)
    q.start()
    q.add("a")
    await until(lambda: calls == ["a"])
    for _ in range(5):  # while "a" is being processed: queued once more, not run alongside
        q.add("a")
    q.add("b")
    await until(lambda: calls == ["a", "b"])
    assert len(q) == 1  # the second "a", waiting for the first to finish
    gate.set()
    await until(lambda: calls.count("a") == 2)
    await settle()
    await q.stop()
    assert overlaps == []
    assert calls.count("a") == 2 and calls.count("b") == 1
    assert metric("koupleless_workqueue_adds_total", name) == 3  # a, b, and a again: dedup'd adds do not count
    assert metric("koupleless_workqueue_work_duration_seconds_count", name) == 3


async def test_keys_waiting_are_deduplicated() -> None:
    calls: list[str] = []

    async def handle(key: str) -> None:
        calls.append(key)

    q = WorkQueue(qname(), handle, workers=2)
    for key in ["a", "b", "a", "a", "b"]:  # before start: all wait
        q.add(key)
    assert len(q) == 2
    q.start()
    await until(lambda: len(calls) == 2)
    await settle()
    await q.stop()
    assert sorted(calls) == ["a", "b"]


class DelayRecordingQueue(WorkQueue):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delays: list[tuple[str, float]] = []

    def add_after(self, key: str, delay: float) -> None:
        self.delays.append((key, delay))
        super().add_after(key, delay)


async def test_failures_back_off_exponentially_per_key_and_success_resets() -> None:
    outcomes = {"k": [RuntimeError("1"), RuntimeError("2"), RuntimeError("3"), RuntimeError("4"), None, RuntimeError("5")]}
    calls: list[str] = []

    async def handle(key: str) -> None:
        calls.append(key)
        if key == "other":
            return
        outcome = outcomes[key].pop(0)
        if outcome is not None:
            raise outcome

    name = qname()
    q = DelayRecordingQueue(name, handle, workers=1, base_delay=0.001, max_delay=0.004)
    q.start()
    q.add("k")
    q.add("other")
    await until(lambda: calls.count("k") == 5)
    q.add("k")  # fails again: back to the first delay, the success in between forgot the streak
    await until(lambda: calls.count("k") == 6)
    await until(lambda: len(q.delays) == 5)
    await q.stop()
    assert [d for k, d in q.delays] == [0.001, 0.002, 0.004, 0.004, 0.001]  # doubling, capped at max_delay
    assert calls.count("other") == 1
    assert metric("koupleless_workqueue_retries_total", name) == 5


def test_backoff_after_very_many_failures_stays_at_the_cap() -> None:
    async def handle(key: str) -> None:
        return None

    q = WorkQueue(qname(), handle, base_delay=0.05, max_delay=30.0)
    q._failures["k"] = 5000  # hours of failures: 2**5000 would overflow a float
    assert q._on_error("k", RuntimeError("still down")) == 30.0


async def test_a_handler_asks_to_see_the_key_again() -> None:
    calls: list[str] = []

    async def handle(key: str) -> float | None:
        calls.append(key)
        return 0.001 if len(calls) < 3 else None

    q = WorkQueue(qname(), handle, workers=1)
    q.start()
    q.add("k")
    await until(lambda: len(calls) == 3)
    await settle()
    await q.stop()
    assert calls == ["k", "k", "k"]


async def test_add_after_earliest_wins() -> None:
    calls: list[str] = []

    async def handle(key: str) -> None:
        calls.append(key)

    q = WorkQueue(qname(), handle, workers=1)
    q.start()
    q.add_after("late-then-early", 60)
    q.add_after("late-then-early", 0.001)  # replaces the later timer
    q.add_after("early-then-late", 0.001)
    q.add_after("early-then-late", 60)  # ignored: an earlier one is pending
    await until(lambda: len(calls) == 2)
    assert sorted(calls) == ["early-then-late", "late-then-early"]
    assert q._timers == {}  # nothing left to fire in a minute
    q.add_after("now", 0)  # no delay: added at once
    assert len(q) == 1
    await until(lambda: len(calls) == 3)
    await q.stop()


@pytest.mark.parametrize("error", [ApiError(403, "Forbidden", "RBAC says no"), ApiError(404, "NotFound", "gone"),
                                   ApiError(422, "Invalid", "spec.x: bad"), ApiError(400, "BadRequest", "no"),
                                   TerminalError("cannot be done")], ids=str)
async def test_terminal_errors_are_not_retried(error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    fail = [ApiError(500, "InternalError", "etcd"), error]

    async def handle(key: str) -> None:
        calls.append(key)
        if fail:
            raise fail.pop(0)

    name = qname()
    q = WorkQueue(name, handle, workers=1, base_delay=0.001)
    q.start()
    with caplog.at_level(logging.WARNING, logger="koupleless.kube.workqueue"):
        q.add("ns/pod")
        await until(lambda: len(calls) == 2)  # the 500 is retried, then the terminal error
        await settle()
    assert calls == ["ns/pod", "ns/pod"]
    assert metric("koupleless_workqueue_terminal_errors_total", name) == 1
    assert metric("koupleless_workqueue_retries_total", name) == 1
    terminal = [r.getMessage() for r in caplog.records if "retrying cannot fix" in r.getMessage()]
    assert len(terminal) == 1 and "ns/pod" in terminal[0] and str(error) in terminal[0]
    assert q._failures == {}  # the 500's streak is forgotten: a later failure starts at base_delay
    q.add("ns/pod")  # a new event for the object: tried again
    await until(lambda: len(calls) == 3)
    await q.stop()


@pytest.mark.parametrize("status", [409, 429, 408, 500, 503, 0])
async def test_errors_a_retry_can_fix_are_retried(status: int) -> None:
    calls: list[str] = []

    async def handle(key: str) -> None:
        calls.append(key)
        if len(calls) < 3:
            raise ApiError(status, "Whatever", "try again")

    name = qname()
    q = WorkQueue(name, handle, workers=1, base_delay=0.001)
    q.start()
    q.add("k")
    await until(lambda: len(calls) == 3)
    await q.stop()
    assert metric("koupleless_workqueue_terminal_errors_total", name) == 0
    assert metric("koupleless_workqueue_retries_total", name) == 2


def test_which_errors_are_terminal() -> None:
    assert is_terminal(TerminalError("x"))
    assert is_terminal(ApiError(404, "NotFound", "x"))
    assert not is_terminal(ApiError(409, "Conflict", "x"))
    assert not is_terminal(ApiError(429, "TooManyRequests", "x"))
    assert not is_terminal(ApiError(500, "InternalError", "x"))
    assert not is_terminal(RuntimeError("x"))


async def test_stop_lets_the_keys_being_processed_finish_and_takes_nothing_new() -> None:
    gate = asyncio.Event()
    started: list[str] = []
    finished: list[str] = []

    async def handle(key: str) -> float | None:
        started.append(key)
        await gate.wait()
        finished.append(key)
        return 0.001  # asks to come back: ignored, the queue is stopping

    name = qname()
    q = WorkQueue(name, handle, workers=2)
    q.start()
    q.add("a")
    q.add("b")
    await until(lambda: len(started) == 2)
    q.add("waiting")  # both workers busy: waits, and is dropped by stop()
    q.add_after("timer", 0.001)  # its timer is cancelled by stop()
    stopping = asyncio.ensure_future(q.stop(drain_timeout=5))
    await asyncio.sleep(0.01)
    assert not stopping.done()  # waiting for a and b
    q.add("too-late")
    q.add_after("too-late-too", 0.001)
    gate.set()
    await asyncio.wait_for(stopping, 5)
    assert sorted(finished) == ["a", "b"]  # finished, not cancelled
    await settle()
    assert started == ["a", "b"]
    assert len(q) == 0 and metric("koupleless_workqueue_depth", name) == 0
    assert all(t.done() for t in q._tasks)


async def test_stop_cancels_what_does_not_finish_within_the_drain_timeout() -> None:
    cancelled: list[str] = []

    async def handle(key: str) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(key)
            raise

    q = WorkQueue(qname(), handle, workers=1)
    q.start()
    q.add("stuck")
    await until(lambda: q.longest_running() > 0)
    await asyncio.wait_for(q.stop(drain_timeout=0.01), 5)
    assert cancelled == ["stuck"]
    assert q.failed is not None and not q.failed.done()  # a cancelled worker did not "die"
    with pytest.raises(RuntimeError, match="stopped"):
        q.start()


async def test_a_handler_whose_own_await_is_cancelled_is_retried() -> None:
    calls: list[str] = []

    async def handle(key: str) -> None:
        calls.append(key)
        if len(calls) == 1:
            raise asyncio.CancelledError()  # e.g. a future someone else cancelled; not a shutdown

    q = WorkQueue(qname(), handle, workers=1, base_delay=0.001)
    q.start()
    q.add("k")
    await until(lambda: len(calls) == 2)
    await q.stop()
    assert q.failed is not None and not q.failed.done()


class Boom(BaseException):
    """Not an Exception: the handler wrapper does not catch it, and the worker dies."""


async def test_a_worker_that_dies_is_surfaced(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    async def handle(key: str) -> None:
        calls.append(key)
        if key == "boom":
            raise Boom("bug")

    name = qname()
    q = WorkQueue(name, handle, workers=2)
    supervisor = Supervisor("test")
    q.start()
    supervisor.spawn(q.watch(), name=f"workqueue-{name}")
    assert supervisor.healthy()
    with caplog.at_level(logging.ERROR):
        q.add("boom")
        assert q.failed is not None
        died = await asyncio.wait_for(q.failed, 5)
        assert isinstance(died, Boom)
        await until(lambda: not supervisor.healthy())
    assert any("died" in r.getMessage() and r.exc_info for r in caplog.records)
    assert "WorkerDied" in supervisor.problems()[0] and f"workqueue-{name}" in supervisor.problems()[0]
    q.add("fine")  # the other worker still works
    await until(lambda: "fine" in calls)
    await q.stop()
    await supervisor.stop()


async def test_watch_waits_quietly_while_the_workers_are_fine() -> None:
    async def handle(key: str) -> None:
        return None

    q = WorkQueue(qname(), handle, workers=1)
    with pytest.raises(RuntimeError, match="before start"):
        await q.watch()
    q.start()
    watching = asyncio.ensure_future(q.watch())
    await q.stop()
    await settle()
    assert not watching.done()
    watching.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watching
    assert q.failed is not None and not q.failed.cancelled()  # cancelling a watcher leaves the future alone
