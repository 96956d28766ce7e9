"""A client-go style work queue on asyncio: one writer per object.

Keys are deduplicated while waiting; a key is never processed by two workers at once (an add during
processing re-queues it once processing ends); a failing key backs off exponentially, per key, and a
handler may ask to see a key again after a delay.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

QUEUE_DEPTH = Gauge("koupleless_workqueue_depth", "Keys waiting in a work queue", ["queue"])
QUEUE_RETRIES = Counter("koupleless_workqueue_retries_total", "Keys re-queued after a handler error", ["queue"])

#: Returns seconds after which to look at the key again, or None.
Handler = Callable[[str], Awaitable[float | None]]


class WorkQueue:
    def __init__(
        self,
        name: str,
        handler: Handler,
        *,
        workers: int = 8,
        base_delay: float = 0.05,
        max_delay: float = 30.0,
    ) -> None:
        self.name = name
        self._handler = handler
        self._workers = workers
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._dirty: set[str] = set()
        self._processing: set[str] = set()
        self._failures: dict[str, int] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def __len__(self) -> int:
        return len(self._dirty)

    def add(self, key: str) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.put_nowait(key)
        QUEUE_DEPTH.labels(self.name).set(len(self._dirty))

    def add_after(self, key: str, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        existing = self._timers.get(key)
        when = loop.time() + delay
        if existing is not None and existing.when() <= when:
            return
        if existing is not None:
            existing.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._worker(), name=f"{self.name}-{i}") for i in range(self._workers)]

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _worker(self) -> None:
        while True:
            key = await self._queue.get()
            self._dirty.discard(key)
            self._processing.add(key)
            QUEUE_DEPTH.labels(self.name).set(len(self._dirty))
            again: float | None = None
            try:
                again = await self._handler(key)
                self._failures.pop(key, None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                n = self._failures.get(key, 0)
                self._failures[key] = n + 1
                again = min(self._max_delay, self._base_delay * (2**n))
                QUEUE_RETRIES.labels(self.name).inc()
                log.warning("%s: %s failed (attempt %d), retrying in %.2fs: %s", self.name, key, n + 1, again, exc,
                            exc_info=n == 0)
            finally:
                self._processing.discard(key)
                if key in self._dirty:
                    self._queue.put_nowait(key)
            if again is not None:
                self.add_after(key, again)
