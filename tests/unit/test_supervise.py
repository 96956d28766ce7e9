"""Supervised tasks: a failure is logged at once and counted, critical ones show in readiness and
may end the process, restartable ones come back with capped backoff, and stop() ends them all."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import warnings
from collections.abc import Callable
from itertools import count
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY, CollectorRegistry

from koupleless.http import add_health_routes
from koupleless.supervise import Supervisor

_names = count()


def tname(what: str) -> str:
    """Each test its own task names, so its counters start at zero."""
    return f"{what}-{next(_names)}"


def failures(task: str) -> float:
    return REGISTRY.get_sample_value("koupleless_task_failures_total", {"task": task}) or 0.0


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll every millisecond: these tests wait for millisecond delays."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {check}")
        await asyncio.sleep(0.001)


async def forever() -> None:
    await asyncio.Event().wait()


async def test_a_critical_task_that_fails_is_logged_counted_and_makes_the_process_unready(
        caplog: pytest.LogCaptureFixture) -> None:
    fatal: list[tuple[str, BaseException | None]] = []
    sup = Supervisor("ctl", on_fatal=lambda name, exc: fatal.append((name, exc)))
    name = tname("informer")

    async def informer() -> None:
        await asyncio.sleep(0)
        raise ValueError("watch decoding broke")

    with caplog.at_level(logging.ERROR, logger="koupleless.supervise"):
        sup.spawn(informer(), name=name)
        sup.spawn(forever(), name=tname("fine"))
        await until(lambda: bool(fatal))
    [record] = caplog.records
    assert name in record.getMessage() and "watch decoding broke" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ValueError  # the traceback
    assert failures(name) == 1
    assert not sup.healthy()
    assert len(sup.problems()) == 1 and name in sup.problems()[0] and "not restarted" in sup.problems()[0]
    assert fatal[0][0] == name and isinstance(fatal[0][1], ValueError)
    assert not sup[name].running and sup[name].failures == 1
    assert len(sup) == 1  # the healthy one still runs
    await sup.stop()


async def test_a_task_meant_to_run_forever_that_returns_is_a_failure() -> None:
    fatal: list[tuple[str, BaseException | None]] = []
    sup = Supervisor("ctl", on_fatal=lambda name, exc: fatal.append((name, exc)))
    name = tname("loop")

    async def quits() -> None:
        return None

    sup.spawn(quits, name=name)
    await until(lambda: bool(fatal))
    assert fatal == [(name, None)]
    assert "should run until stopped" in sup.problems()[0]
    assert failures(name) == 1
    await sup.stop()


async def test_a_one_shot_task_may_return() -> None:
    sup = Supervisor("ctl")
    name = tname("bootstrap")

    async def once() -> int:
        return 1

    sup.spawn(once(), name=name, forever=False)
    await until(lambda: sup[name].done())
    assert sup.healthy() and failures(name) == 0
    await sup.stop()


async def test_a_restartable_task_comes_back_with_capped_backoff(caplog: pytest.LogCaptureFixture) -> None:
    fatal: list[str] = []
    sup = Supervisor("ctl", on_fatal=lambda name, exc: fatal.append(name), backoff=0.001, max_backoff=0.008)
    name = tname("renewer")
    runs: list[int] = []
    down_between_runs: list[bool] = []
    back = asyncio.Event()

    async def renewer() -> None:
        runs.append(len(runs))
        down_between_runs.append(sup.healthy())
        if len(runs) == 6:
            await asyncio.sleep(0.03)  # stays up longer than max_backoff: the backoff starts over
            raise RuntimeError("broke again after a good while")
        if len(runs) < 8:
            raise RuntimeError(f"broke {len(runs)}")
        back.set()
        await forever()

    with caplog.at_level(logging.INFO, logger="koupleless.supervise"):
        sup.spawn(renewer, name=name, restart=True)
        await asyncio.wait_for(back.wait(), 5)
    delays = [float(m) for m in re.findall(r"restarting task \S+ in ([0-9.]+)s", caplog.text)]
    assert delays == [0.001, 0.002, 0.004, 0.008, 0.008, 0.001, 0.002]  # doubling, capped, reset
    assert failures(name) == 7 and sup[name].failures == 7
    assert sup.healthy() and sup[name].running  # up again
    assert all(down_between_runs)  # cleared as each run starts
    assert fatal == []  # it is restarted, so the process need not end
    await sup.stop()


async def test_a_critical_restartable_task_is_a_problem_while_it_waits_to_restart() -> None:
    sup = Supervisor("ctl", backoff=60)
    name = tname("watch")

    async def fails() -> None:
        raise ConnectionError("API server gone")

    sup.spawn(fails, name=name, restart=True)
    await until(lambda: not sup.healthy())
    assert "API server gone" in sup.problems()[0]
    await sup.stop()


async def test_a_task_that_is_not_critical_leaves_readiness_alone() -> None:
    fatal: list[str] = []
    sup = Supervisor("ctl", on_fatal=lambda name, exc: fatal.append(name))
    name = tname("metrics-pusher")

    async def fails() -> None:
        raise RuntimeError("push gateway down")

    sup.spawn(fails(), name=name, critical=False)
    await until(lambda: failures(name) == 1)
    assert sup.healthy() and sup.problems() == [] and fatal == []
    await sup.stop()


async def test_stop_cancels_everything_and_waits_and_is_no_failure() -> None:
    sup = Supervisor("ctl")
    cleaned: list[str] = []
    names = [tname("a"), tname("b")]

    async def worker(n: str) -> None:
        try:
            await forever()
        finally:
            await asyncio.sleep(0.001)  # cleanup that takes a moment: stop() waits for it
            cleaned.append(n)

    for n in names:
        sup.spawn(lambda n=n: worker(n), name=n, restart=True)  # type: ignore[misc]
    await asyncio.sleep(0.001)
    await sup.stop()
    assert sorted(cleaned) == sorted(names)
    assert sup.healthy() and all(failures(n) == 0 for n in names) and len(sup) == 0
    with pytest.raises(RuntimeError, match="stopped"):
        sup.spawn(forever(), name=tname("late"))


async def test_spawn_refuses_what_it_cannot_do() -> None:
    sup = Supervisor("ctl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine was never awaited" for the refused ones
        with pytest.raises(ValueError, match="needs a function"):
            sup.spawn(forever(), name=tname("x"), restart=True)
        name = tname("y")
        sup.spawn(forever(), name=name)
        with pytest.raises(ValueError, match="already running"):
            sup.spawn(forever(), name=name)
        with pytest.raises(TypeError):
            sup.spawn(42, name=tname("z"))  # type: ignore[arg-type]
        gc.collect()
    await sup.stop()


async def test_a_failing_on_fatal_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def on_fatal(name: str, exc: BaseException | None) -> None:
        raise RuntimeError("exit hook broke")

    sup = Supervisor("ctl", on_fatal=on_fatal)

    async def fails() -> None:
        raise ValueError("x")

    with caplog.at_level(logging.ERROR, logger="koupleless.supervise"):
        sup.spawn(fails(), name=tname("t"))
        await until(lambda: "on_fatal" in caplog.text)
    assert not sup.healthy()
    await sup.stop()


async def test_readyz_reports_a_supervisors_problems() -> None:
    sup = Supervisor("ctl")
    app = web.Application()
    add_health_routes(app, ready=lambda: True, registry=CollectorRegistry(), problems=sup.problems)
    name = tname("pods-queue")
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/readyz")).status == 200

        async def fails() -> Any:
            raise RuntimeError("worker died")

        sup.spawn(fails(), name=name)
        await until(lambda: not sup.healthy())
        resp = await client.get("/readyz")
        assert resp.status == 503
        body = await resp.text()
        assert name in body and "worker died" in body
        assert (await client.get("/healthz")).status == 200
    await sup.stop()


async def test_readyz_without_problems_is_unchanged() -> None:
    app = web.Application()
    ready = [False]
    add_health_routes(app, lambda: ready[0], CollectorRegistry())
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/readyz")
        assert resp.status == 503 and await resp.text() == "not ready"
        ready[0] = True
        assert (await client.get("/readyz")).status == 200
