"""Polling with a deadline: the only way tests wait."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(check: Callable[[], T | None], timeout: float = 60, interval: float = 0.25, what: str = "") -> T:
    """Call `check` until it returns something truthy; return that. Exceptions count as "not yet"."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or check}{detail}")
        time.sleep(interval)


async def async_wait_until(
    check: Callable[[], Awaitable[T | None]], timeout: float = 60, interval: float = 0.25, what: str = ""
) -> T:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            result = await check()
            if result:
                return result
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or check}{detail}")
        await asyncio.sleep(interval)


_FORBIDDEN = re.compile(r"Forbidden|(?<![,.:\d])403(?!\d)")


def forbidden_lines(log: str) -> list[str]:
    """Lines of a component's log that show the API server refusing it (403 / Forbidden); a 403 that
    is only the milliseconds of a timestamp (`12:00:05,403`) is not one."""
    return [line for line in log.splitlines() if _FORBIDDEN.search(line)]
