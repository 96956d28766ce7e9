"""Kubernetes Events (what `kubectl describe` shows under "Events:"), recorded without blocking.

`event()` only queues; a few background writers write, each owning the objects that hash to it, so
one object's Events are written in the order they were recorded (kubectl sorts by a timestamp of
whole seconds) while a burst over many objects is not written one round trip at a time. Identical
events (same object, type, reason, message) within the aggregation window bump `count` and
`lastTimestamp` on the Event already written, like client-go's correlator, so a retry loop shows
"(x5 over 2m)" instead of five rows. A failed write is logged and counted; it never reaches the
caller. Beyond the queue limit new Events are dropped, as kubelet's broadcaster drops them, and
counted; the log says so once per DROP_LOG_SECONDS, not once per Event.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import Any

from koupleless.kube import metrics
from koupleless.kube.client import ApiError, KubeClient, backoff_delay, event_path

log = logging.getLogger(__name__)

NORMAL = "Normal"
WARNING = "Warning"
EVENT_TYPES = (NORMAL, WARNING)

#: Longer messages are cut (with " ...") like the scheduler's event notes.
MESSAGE_LIMIT_BYTES = 1024
#: Events waiting to be written; beyond this, new ones are dropped and counted.
QUEUE_LIMIT = 4096
#: Concurrent writers (each owns a shard of the objects): enough to keep up with a release of
#: thousands of modules without crowding out the status writes that matter more.
WRITERS = 4
#: A burst of drops is logged once per this many seconds, with the count.
DROP_LOG_SECONDS = 30.0
#: Correlation entries remembered (least recently used are forgotten first).
CACHE_LIMIT = 4096
#: Per-object budget of new Event objects: a burst of 25, then one per 5 minutes (client-go's
#: spam filter numbers). Count bumps on an existing Event are not limited.
SPAM_BURST = 25
SPAM_REFILL_SECONDS = 300.0
WRITE_ATTEMPTS = 4


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _timestamp(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def truncate_message(message: str, limit: int = MESSAGE_LIMIT_BYTES) -> str:
    raw = message.encode()
    if len(raw) <= limit:
        return message
    return raw[: limit - 4].decode(errors="ignore") + " ..."


def object_reference(obj: dict[str, Any], kind: str | None = None, api_version: str | None = None) -> dict[str, Any]:
    """The involvedObject for `obj`. Node events carry the node *name* as uid, because that is
    what `kubectl describe node` searches for (kubelet does the same)."""
    meta = obj.get("metadata") or {}
    kind = kind or obj.get("kind") or ""
    ref: dict[str, Any] = {
        "kind": kind,
        "apiVersion": api_version or obj.get("apiVersion") or "v1",
        "name": meta.get("name", ""),
    }
    if meta.get("namespace"):
        ref["namespace"] = meta["namespace"]
    uid = meta.get("name", "") if kind == "Node" else meta.get("uid")
    if uid:
        ref["uid"] = uid
    if meta.get("resourceVersion"):
        ref["resourceVersion"] = meta["resourceVersion"]
    return ref


@dataclass
class _Pending:
    ref: dict[str, Any]
    type_: str
    reason: str
    message: str
    at: dt.datetime


@dataclass
class _Written:
    namespace: str
    name: str
    count: int
    seen: float  # monotonic


class _Shard:
    def __init__(self) -> None:
        self.queue: collections.deque[_Pending] = collections.deque()
        self.wakeup = asyncio.Event()


class _ObjectBudget:
    def __init__(self) -> None:
        self.tokens = float(SPAM_BURST)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(SPAM_BURST, self.tokens + (now - self.stamp) / SPAM_REFILL_SECONDS)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class EventRecorder:
    def __init__(
        self,
        client: KubeClient,
        component: str,
        host: str | None = None,
        *,
        aggregate_window: float = 600.0,
        retry_backoff: float = 0.5,
        writers: int = WRITERS,
    ) -> None:
        self.client = client
        self.component = component
        self.host = host if host is not None else os.environ.get("NODE_NAME") or socket.gethostname()
        self.aggregate_window = aggregate_window
        self.retry_backoff = retry_backoff
        self._shards = [_Shard() for _ in range(max(1, writers))]
        self._queued = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._dropped_unlogged = 0
        self._drop_logged_at: float | None = None
        self._written: collections.OrderedDict[tuple[str, ...], _Written] = collections.OrderedDict()
        self._budgets: collections.OrderedDict[tuple[str, ...], _ObjectBudget] = collections.OrderedDict()
        self._tasks: list[asyncio.Task[None]] = []

    # --- the caller's side: never blocks, never raises -------------------------------------------

    def event(
        self,
        obj: dict[str, Any],
        type_: str,
        reason: str,
        message: str,
        *,
        kind: str | None = None,
        api_version: str | None = None,
    ) -> None:
        """Queue an Event about `obj` (a Pod, Node, ... dict with kind, apiVersion and metadata)."""
        ref = object_reference(obj, kind, api_version)
        if not ref["kind"] or not ref["name"] or type_ not in EVENT_TYPES:
            metrics.EVENTS_RECORDED.labels(self.component, "invalid").inc()
            log.error(
                "event %s/%s not recorded: needs kind, metadata.name and type Normal|Warning "
                "(got kind=%r name=%r type=%r)", reason, message[:80], ref["kind"], ref["name"], type_,
            )
            return
        if self._queued >= QUEUE_LIMIT:
            self._dropped(type_, reason, ref["name"])
            return
        shard = self._shards[hash((ref["kind"], ref.get("namespace", ""), ref["name"])) % len(self._shards)]
        shard.queue.append(_Pending(ref, type_, reason, truncate_message(message), _now()))
        self._queued += 1
        self._idle.clear()
        shard.wakeup.set()

    def _dropped(self, type_: str, reason: str, name: str) -> None:
        metrics.EVENTS_RECORDED.labels(self.component, "dropped").inc()
        self._dropped_unlogged += 1
        now = time.monotonic()
        if self._drop_logged_at is None or now - self._drop_logged_at >= DROP_LOG_SECONDS:
            log.warning("event queue full (%d waiting): dropped %d Events since the last such line, the latest "
                        "%s %s on %s (koupleless_kube_events_total{outcome=\"dropped\"} counts them)",
                        QUEUE_LIMIT, self._dropped_unlogged, type_, reason, name)
            self._dropped_unlogged = 0
            self._drop_logged_at = now

    def normal(self, obj: dict[str, Any], reason: str, message: str) -> None:
        self.event(obj, NORMAL, reason, message)

    def warning(self, obj: dict[str, Any], reason: str, message: str) -> None:
        self.event(obj, WARNING, reason, message)

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._tasks and not any(t.done() for t in self._tasks):
            return
        await self._cancel()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(shard), name=f"events:{self.component}:{i}")
                       for i, shard in enumerate(self._shards)]

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        return list(self._tasks)

    async def flush(self) -> None:
        """Wait until everything queued so far is written (or given up on)."""
        await self._idle.wait()

    async def stop(self, flush_seconds: float = 5.0) -> None:
        """Write what is queued (for at most `flush_seconds`), then stop the writer."""
        if not self._tasks:
            return
        try:
            async with asyncio.timeout(flush_seconds):
                await self.flush()
        except TimeoutError:
            log.warning("stopping with %d events unwritten", self._queued)
        await self._cancel()

    async def _cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    # --- the writer -------------------------------------------------------------------------------

    async def _run(self, shard: _Shard) -> None:
        while True:
            if not shard.queue:
                shard.wakeup.clear()
                await shard.wakeup.wait()
                continue
            pending = shard.queue[0]
            try:
                await self._write(pending)
            except Exception:
                metrics.EVENTS_RECORDED.labels(self.component, "failed").inc()
                log.exception("event %s on %s not written", pending.reason, pending.ref.get("name"))
            finally:
                # Counted as waiting until written, so flush() means "everything written".
                shard.queue.popleft()
                self._queued -= 1
                if not self._queued:
                    self._idle.set()

    def _correlation_key(self, p: _Pending) -> tuple[str, ...]:
        r = p.ref
        return (
            r["kind"], r.get("namespace", ""), r["name"], r.get("uid", ""), r["apiVersion"],
            p.type_, p.reason, p.message,
        )

    def _remember(self, key: tuple[str, ...], written: _Written) -> None:
        self._written[key] = written
        self._written.move_to_end(key)
        while len(self._written) > CACHE_LIMIT:
            self._written.popitem(last=False)

    def _budget(self, p: _Pending) -> _ObjectBudget:
        key = (p.ref["kind"], p.ref.get("namespace", ""), p.ref["name"], p.ref.get("uid", ""))
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = _ObjectBudget()
            while len(self._budgets) > CACHE_LIMIT:
                self._budgets.popitem(last=False)
        self._budgets.move_to_end(key)
        return budget

    async def _write(self, p: _Pending) -> None:
        key = self._correlation_key(p)
        seen = self._written.get(key)
        now = time.monotonic()
        if seen is not None and now - seen.seen <= self.aggregate_window:
            body = {"count": seen.count + 1, "lastTimestamp": _timestamp(p.at)}
            try:
                await self._with_retries(
                    lambda: self.client.patch(event_path(seen.namespace, seen.name), body, "merge")
                )
            except ApiError as exc:
                if not exc.not_found:
                    self._failed(p, exc)
                    return
                # The Event expired (default TTL 1h) or was deleted: start a new one below.
            else:
                seen.count += 1
                seen.seen = now
                self._remember(key, seen)
                metrics.EVENTS_RECORDED.labels(self.component, "aggregated").inc()
                return
        if not self._budget(p).take():
            metrics.EVENTS_RECORDED.labels(self.component, "throttled").inc()
            log.debug("event %s on %s throttled (too many for one object)", p.reason, p.ref["name"])
            return
        namespace = p.ref.get("namespace") or "default"
        name = f"{p.ref['name']}.{time.time_ns():x}"
        event = self._event_body(p, namespace, name)
        try:
            await self._with_retries(lambda: self.client.create(event_path(namespace), event))
        except ApiError as exc:
            if not exc.already_exists:
                self._failed(p, exc)
                return
            event["metadata"]["name"] = name = f"{name}{random.getrandbits(16):x}"
            try:
                await self.client.create(event_path(namespace), event)
            except ApiError as exc2:
                self._failed(p, exc2)
                return
        self._remember(key, _Written(namespace, name, 1, now))
        metrics.EVENTS_RECORDED.labels(self.component, "created").inc()

    def _event_body(self, p: _Pending, namespace: str, name: str) -> dict[str, Any]:
        stamp = _timestamp(p.at)
        source = {"component": self.component}
        if self.host:
            source["host"] = self.host
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": p.ref,
            "type": p.type_,
            "reason": p.reason,
            "message": p.message,
            "source": source,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "reportingComponent": self.component,
            "reportingInstance": self.host or "",
        }

    async def _with_retries(self, call: Any) -> dict[str, Any]:
        """Retry what may succeed later (no answer, 429, 5xx); give up on the rest at once."""
        attempt = 0
        while True:
            try:
                result: dict[str, Any] = await call()
                return result
            except ApiError as exc:
                transient = exc.status == 0 or exc.status == 429 or exc.status >= 500
                attempt += 1
                if not transient or attempt >= WRITE_ATTEMPTS:
                    raise
                await asyncio.sleep(backoff_delay(attempt, base=self.retry_backoff, cap=10.0))

    def _failed(self, p: _Pending, exc: ApiError) -> None:
        metrics.EVENTS_RECORDED.labels(self.component, "failed").inc()
        # A namespace being deleted refuses new Events; that is routine, not an alarm.
        level = logging.DEBUG if exc.status == 403 and "terminat" in exc.message else logging.WARNING
        log.log(level, "event %s %s on %s/%s not written: %s", p.type_, p.reason, p.ref.get("kind"), p.ref["name"], exc)
