from __future__ import annotations

import asyncio

from provider.workqueue import WorkQueue
from tests.helpers import async_wait_until


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

    q = WorkQueue("t", handle, workers=4)
    q.start()
    q.add("a")
    await async_wait_until(lambda: _v(calls == ["a"]), 5)
    for _ in range(5):  # while "a" is being processed: queued once more, not run alongside
        q.add("a")
    q.add("b")
    await async_wait_until(lambda: _v(calls == ["a", "b"]), 5)
    gate.set()
    await async_wait_until(lambda: _v(calls.count("a") == 2), 5)
    await q.stop()
    assert overlaps == []
    assert calls.count("a") == 2 and calls.count("b") == 1


async def test_failures_back_off_and_retry() -> None:
    attempts: list[float] = []

    async def handle(key: str) -> float | None:
        attempts.append(asyncio.get_running_loop().time())
        if len(attempts) < 3:
            raise RuntimeError("not yet")
        return None

    q = WorkQueue("t2", handle, workers=1, base_delay=0.01)
    q.start()
    q.add("k")
    await async_wait_until(lambda: _v(len(attempts) == 3), 5)
    await q.stop()
    assert len(attempts) == 3  # two failures, then success; nothing after


async def _v(x: bool) -> bool:
    return x
