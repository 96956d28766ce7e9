"""Supervised long-running tasks (kopf's guarded tasks): none of them dies unnoticed.

A background task that fails in plain asyncio says nothing until someone awaits it, usually at
shutdown, and the process looks healthy meanwhile. Here every task a `Supervisor` spawns is
watched: when it ends with an exception, or ends at all although it was meant to run until stopped
(`forever=True`, the default), that is logged at once at ERROR with the task's name and traceback
and counted in `koupleless_task_failures_total{task}`. Then:

- `restart=True`: it is started again (from its factory) after a capped exponential backoff; the
  backoff resets once a run has lasted `max_backoff` seconds.
- `critical=True` (the default): while it is down, `healthy()` is False and `problems()` names it,
  for /readyz (`add_health_routes(app, ready, problems=supervisor.problems)`). A critical task that
  is not restarted stays down, and `on_fatal(name, exc)` is called so the process can end.

Cancellation is not a failure: `stop()` cancels every task and waits for them to end.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

__all__ = ["Supervised", "Supervisor", "TaskEnded"]

log = logging.getLogger(__name__)

TASK_FAILURES = Counter(
    "koupleless_task_failures_total",
    "Supervised background tasks that failed, or ended although they should run until stopped",
    ["task"],
)

CoroFactory = Callable[[], Awaitable[Any]]
#: Called with the task's name and what ended it (None: it returned although meant to run forever).
FatalCallback = Callable[[str, BaseException | None], object]


class TaskEnded(RuntimeError):
    """A task meant to run until stopped returned."""


@dataclass(eq=False)
class Supervised:
    """One supervised task: `task` is the guard around its runs (cancel it, or await it)."""

    name: str
    critical: bool
    restart: bool
    forever: bool
    task: asyncio.Task[None] = field(init=False, repr=False)
    #: Runs that ended in a failure so far.
    failures: int = 0
    #: What ended the last failed run (None if none failed, or the last one returned when it should not have).
    last_error: BaseException | None = None
    #: False while it is down after a failure (waiting to restart, or for good).
    running: bool = True

    def cancel(self) -> None:
        self.task.cancel()

    def done(self) -> bool:
        return self.task.done()


class Supervisor:
    def __init__(self, name: str, *, on_fatal: FatalCallback | None = None, backoff: float = 0.5,
                 max_backoff: float = 30.0) -> None:
        self.name = name
        self.on_fatal = on_fatal
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._tasks: dict[str, Supervised] = {}
        #: Task name -> what is wrong with it, for critical tasks that are down.
        self._problems: dict[str, str] = {}
        self._stopping = False

    def __len__(self) -> int:
        return sum(1 for s in self._tasks.values() if not s.done())

    def __getitem__(self, name: str) -> Supervised:
        return self._tasks[name]

    def spawn(
        self,
        target: CoroFactory | Coroutine[Any, Any, Any],
        *,
        name: str,
        critical: bool = True,
        restart: bool = False,
        forever: bool = True,
    ) -> Supervised:
        """Run `target` (a coroutine, or a function making one; restarting needs the function) under
        supervision. `forever`: returning counts as a failure (it should run until stopped)."""
        if self._stopping:
            if inspect.iscoroutine(target):
                target.close()
            raise RuntimeError(f"supervisor {self.name} is stopped; cannot spawn {name}")
        old = self._tasks.get(name)
        if old is not None and not old.done():
            if inspect.iscoroutine(target):
                target.close()
            raise ValueError(f"supervisor {self.name}: a task named {name} is already running")
        unstarted: list[Coroutine[Any, Any, Any]] = []
        if inspect.iscoroutine(target):
            if restart:
                target.close()
                raise ValueError(f"{name}: restart=True needs a function that makes the coroutine, not a coroutine")
            unstarted.append(target)

            def factory() -> Awaitable[Any]:
                return unstarted.pop()
        elif callable(target):
            factory = target
        else:
            raise TypeError(f"{name}: expected a coroutine or a function making one, got {type(target).__name__}")
        sup = Supervised(name=name, critical=critical, restart=restart, forever=forever)
        sup.task = asyncio.get_running_loop().create_task(self._guard(sup, factory), name=name)
        # Cancelled before its first step, the guard never awaits the coroutine: close it quietly.
        sup.task.add_done_callback(lambda _: [coro.close() for coro in unstarted])
        self._tasks[name] = sup
        self._problems.pop(name, None)
        return sup

    def healthy(self) -> bool:
        """False while a critical task is down."""
        return not self._problems

    def problems(self) -> list[str]:
        """What is wrong, one line per critical task that is down (empty when healthy)."""
        return [f"task {name}: {problem}" for name, problem in sorted(self._problems.items())]

    async def stop(self) -> None:
        """Cancel every task and wait for them all to end."""
        self._stopping = True
        tasks = [s.task for s in self._tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _guard(self, sup: Supervised, factory: CoroFactory) -> None:
        streak = 0
        while True:
            started = time.monotonic()
            error: BaseException | None
            try:
                await factory()
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except (KeyboardInterrupt, SystemExit) as exc:  # asyncio ends the loop with these anyway
                self._failed(sup, exc, final=True)
                raise
            except BaseException as exc:
                error = exc
            else:
                if not sup.forever:
                    return
                error = None
            if self._stopping:
                if error is not None:
                    log.warning("%s: task %s failed while stopping: %r", self.name, sup.name, error, exc_info=error)
                return
            final = not sup.restart
            self._failed(sup, error, final=final)
            if final:
                return
            streak = 1 if time.monotonic() - started >= self.max_backoff else streak + 1
            delay = min(self.max_backoff, self.backoff * 2 ** min(streak - 1, 60))
            log.info("%s: restarting task %s in %.3gs (failure %d)", self.name, sup.name, delay, sup.failures)
            await asyncio.sleep(delay)
            sup.running = True
            self._problems.pop(sup.name, None)

    def _failed(self, sup: Supervised, error: BaseException | None, *, final: bool) -> None:
        sup.failures += 1
        sup.last_error = error
        sup.running = False
        TASK_FAILURES.labels(sup.name).inc()
        what = f"failed: {error!r}" if error is not None else "ended, but it should run until stopped"
        then = "restarting it" if sup.restart else "not restarting it"
        log.error("%s: task %s %s; %s", self.name, sup.name, what, then,
                  exc_info=error if error is not None else None)
        if not sup.critical:
            return
        self._problems[sup.name] = what + ("" if sup.restart else " (not restarted)")
        if final and self.on_fatal is not None:
            try:
                self.on_fatal(sup.name, error)
            except Exception:
                log.exception("%s: on_fatal for task %s failed", self.name, sup.name)
