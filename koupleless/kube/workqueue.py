"""A client-go style work queue on asyncio: one writer per object.

Keys are deduplicated while waiting; a key is never processed by two workers at once (an add during
processing re-queues it once processing ends); a failing key backs off exponentially, per key, and a
handler may ask to see a key again after a delay by returning that many seconds.

An error that retrying cannot fix is not retried: an `ApiError` with a 4xx status other than 408,
409 and 429 (a 403 from RBAC, a 404 for an object that is gone, a 422 for a body the API server
refuses), or a `TerminalError` a handler raises on purpose. It is logged once, counted, and the key
is dropped until it is added again (the next event or resync for that object).

`stop()` drains: timers stop, nothing new is taken, and keys already being processed get up to
`drain_timeout` seconds to finish before the workers are cancelled. Keys still waiting are dropped;
the queue is level-triggered, so the next process to start sees their objects again.

A worker never ends on its own. If one does (the loop around the handler itself raised), it is
logged at ERROR, `failed` resolves to the exception, and `watch()` raises it, so a `Supervisor`
running `queue.watch()` surfaces it in readiness.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import NoReturn

from prometheus_client import Counter, Gauge, Histogram

from koupleless.kube.client import ApiError

__all__ = ["Handler", "TerminalError", "WorkQueue", "WorkerDied", "is_terminal"]

log = logging.getLogger(__name__)

QUEUE_DEPTH = Gauge("koupleless_workqueue_depth", "Keys waiting in a work queue", ["queue"])
QUEUE_ADDS = Counter(
    "koupleless_workqueue_adds_total", "Keys added to a work queue (an add of a key already waiting is not counted)",
    ["queue"],
)
QUEUE_RETRIES = Counter("koupleless_workqueue_retries_total", "Keys re-queued after a handler error", ["queue"])
QUEUE_TERMINAL_ERRORS = Counter(
    "koupleless_workqueue_terminal_errors_total",
    "Handler errors that retrying cannot fix (API 4xx other than 408/409/429, TerminalError): logged, not retried",
    ["queue"],
)
QUEUE_WORK_DURATION = Histogram(
    "koupleless_workqueue_work_duration_seconds", "How long the handler took for one key", ["queue"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
QUEUE_LONGEST_RUNNING = Gauge(
    "koupleless_workqueue_longest_running_seconds",
    "How long the key processed longest right now has been in the handler (0 when idle)", ["queue"],
)

#: Returns seconds after which to look at the key again, or None.
Handler = Callable[[str], Awaitable[float | None]]

#: 4xx answers that a retry can fix: Request Timeout, Conflict (re-read and write again), Too Many Requests.
_RETRYABLE_4XX = frozenset({408, 409, 429})
#: 2**_MAX_EXPONENT x base_delay is beyond any sane max_delay; a larger power would overflow a float.
_MAX_EXPONENT = 60


class TerminalError(Exception):
    """Raised by a handler for a failure that retrying cannot fix: the key is not retried."""


class WorkerDied(RuntimeError):
    """A work-queue worker ended on its own (never expected); the cause is chained."""


def is_terminal(exc: BaseException) -> bool:
    """Whether retrying the key cannot help: a `TerminalError`, or an `ApiError` with a 4xx status
    other than 408, 409 and 429 (status 0, no answer, and 5xx are retried)."""
    if isinstance(exc, TerminalError):
        return True
    return isinstance(exc, ApiError) and 400 <= exc.status < 500 and exc.status not in _RETRYABLE_4XX


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
        #: Key -> monotonic time its handler started.
        self._processing: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._drained = asyncio.Event()
        self._failed: asyncio.Future[BaseException] | None = None
        self._depth = QUEUE_DEPTH.labels(name)
        self._adds = QUEUE_ADDS.labels(name)
        self._retries = QUEUE_RETRIES.labels(name)
        self._terminal = QUEUE_TERMINAL_ERRORS.labels(name)
        self._duration = QUEUE_WORK_DURATION.labels(name)
        ref = weakref.ref(self)  # the gauge must not keep a stopped queue alive

        def longest_running() -> float:
            queue = ref()
            return queue.longest_running() if queue is not None else 0.0

        QUEUE_LONGEST_RUNNING.labels(name).set_function(longest_running)

    def __len__(self) -> int:
        return len(self._dirty)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def failed(self) -> asyncio.Future[BaseException] | None:
        """Resolves to the exception that ended a worker (None before `start()`). Never expected."""
        return self._failed

    def longest_running(self) -> float:
        """Seconds the key processed longest right now has been in the handler; 0 when idle."""
        try:
            oldest = min(list(self._processing.values()), default=None)
        except RuntimeError:  # read from a scrape thread while the loop changed it
            return 0.0
        return 0.0 if oldest is None else max(0.0, time.monotonic() - oldest)

    def add(self, key: str) -> None:
        if self._stopping or key in self._dirty:
            return
        self._dirty.add(key)
        self._adds.inc()
        if key not in self._processing:
            self._queue.put_nowait(key)
        self._depth.set(len(self._dirty))

    def add_after(self, key: str, delay: float) -> None:
        """Add `key` in `delay` seconds; of several pending delays for one key the earliest wins."""
        if self._stopping:
            return
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
        if self._stopping:
            raise RuntimeError(f"work queue {self.name} was stopped; make a new one")
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._failed = loop.create_future()
        self._tasks = [loop.create_task(self._worker(), name=f"workqueue-{self.name}-{i}") for i in range(self._workers)]
        for task in self._tasks:
            task.add_done_callback(self._worker_done)

    async def watch(self) -> NoReturn:
        """Wait until a worker dies and raise `WorkerDied` (from the cause); otherwise wait forever.
        Meant for `supervisor.spawn(queue.watch(), name=...)` after `start()`."""
        if self._failed is None:
            raise RuntimeError(f"work queue {self.name}: watch() before start()")
        exc = await asyncio.shield(self._failed)
        raise WorkerDied(f"work queue {self.name}: a worker died: {exc!r}") from exc

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Take no new work, let the keys being processed finish (up to `drain_timeout` seconds),
        then cancel the workers. Keys still waiting are dropped. Adds from now on are ignored."""
        first = not self._stopping
        self._stopping = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if first and self._dirty:
            log.info("%s: stopping; %d waiting keys dropped", self.name, len(self._dirty))
        self._dirty.clear()
        self._depth.set(0)
        if self._processing:
            self._drained.clear()
            try:
                async with asyncio.timeout(drain_timeout):
                    await self._drained.wait()
            except TimeoutError:
                log.warning("%s: %d keys still being processed after %.1fs, cancelling them: %s", self.name,
                            len(self._processing), drain_timeout, ", ".join(sorted(self._processing)))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            if self._stopping:
                return  # left after its last key, as stop() asked
            exc = WorkerDied(f"work queue {self.name}: worker {task.get_name()} returned")
        log.error("%s: worker %s died; its keys go to the other workers: %r", self.name, task.get_name(), exc,
                  exc_info=exc)
        if self._failed is not None and not self._failed.done():
            self._failed.set_result(exc)

    async def _worker(self) -> None:
        current = asyncio.current_task()
        while not self._stopping:
            key = await self._queue.get()
            if self._stopping or key not in self._dirty:
                continue  # dropped by stop() while it waited in the queue
            self._dirty.discard(key)
            self._processing[key] = time.monotonic()
            self._depth.set(len(self._dirty))
            again: float | None = None
            try:
                again = await self._handler(key)
                self._failures.pop(key, None)
            except asyncio.CancelledError as exc:
                if current is not None and current.cancelling():
                    log.warning("%s: %s cancelled while being processed (stopping)", self.name, key)
                    raise
                again = self._on_error(key, exc)  # the handler's own await was cancelled, not us
            except Exception as exc:
                again = self._on_error(key, exc)
            finally:
                self._duration.observe(time.monotonic() - self._processing.pop(key))
                if self._stopping:
                    if not self._processing:
                        self._drained.set()
                elif key in self._dirty:
                    self._queue.put_nowait(key)
            if again is not None:
                self.add_after(key, again)

    def _on_error(self, key: str, exc: BaseException) -> float | None:
        """Seconds until the key is tried again, or None when retrying cannot help."""
        if is_terminal(exc):
            self._failures.pop(key, None)
            self._terminal.inc()
            log.warning("%s: %s failed and retrying cannot fix it; not retried until it changes again: %s",
                        self.name, key, exc)
            return None
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        delay = min(self._max_delay, self._base_delay * (2 ** min(n, _MAX_EXPONENT)))
        self._retries.inc()
        log.warning("%s: %s failed (attempt %d), retrying in %.2fs: %s", self.name, key, n + 1, delay, exc,
                    exc_info=n == 0)
        return delay
