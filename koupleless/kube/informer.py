"""An asyncio informer: list, then watch, keeping a local store of plain dicts with secondary indexes.

Same contract as client-go's reflector + indexer: handlers see every change after the store has it;
when the watch falls too far behind (410 Gone) the informer relists and turns the difference into
synthetic deletes and updates, so a consumer never keeps an object the cluster no longer has.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from koupleless.kube import metrics
from koupleless.kube.client import ApiError, WatchDecodeError, backoff_delay

log = logging.getLogger(__name__)

Obj = dict[str, Any]
AddHandler = Callable[[Obj], Any]
UpdateHandler = Callable[[Obj, Obj], Any]
DeleteHandler = Callable[[Obj], Any]
IndexFunc = Callable[[Obj], Iterable[str]]
#: Spelled as an alias because `list` is also a method name inside the classes below.
ObjList = list[Obj]

#: Watches are asked to end after 5-10 minutes (randomised like client-go) so connections through
#: proxies and load balancers are refreshed; that end is normal and needs no backoff.
MIN_WATCH_SECONDS = 300
#: A watch that ends normally faster than this without a single event counts as a failure.
SHORT_WATCH_SECONDS = 1.0


class ListWatchClient(Protocol):
    async def list(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]: ...

    def watch_stream(self, path: str, params: dict[str, Any] | None = None) -> Any: ...


def object_key(obj: Obj) -> str:
    """`namespace/name`, or `name` for cluster-scoped objects (client-go's MetaNamespaceKeyFunc)."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name', '')}" if ns else str(meta.get("name", ""))


def strip_managed_fields(obj: Obj) -> Obj:
    """Drop `metadata.managedFields` (server-side apply's bookkeeping) before an object is stored, as
    client-go's TransformStripManagedFields does for kube-scheduler: nothing here reads it, and it
    is a third of a module Pod and two fifths of a Node in memory."""
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
    return obj


def _rv(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))


class _Handlers:
    def __init__(
        self, on_add: AddHandler | None, on_update: UpdateHandler | None, on_delete: DeleteHandler | None
    ) -> None:
        self.on_add = on_add
        self.on_update = on_update
        self.on_delete = on_delete


class Store:
    """Objects by key plus secondary indexes (index name -> value -> keys). Not thread-safe: the
    event loop is the only writer."""

    def __init__(self, indexers: dict[str, IndexFunc] | None = None) -> None:
        self.indexers = dict(indexers or {})
        self._items: dict[str, Obj] = {}
        self._indices: dict[str, dict[str, set[str]]] = {name: {} for name in self.indexers}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> Obj | None:
        return self._items.get(key)

    def keys(self) -> Iterable[str]:
        return tuple(self._items)

    def list(self) -> ObjList:
        return list(self._items.values())

    def _index_values(self, name: str, obj: Obj) -> set[str]:
        try:
            return {str(v) for v in self.indexers[name](obj) if v is not None and v != ""}
        except Exception:
            log.exception("indexer %r failed on %s; object left out of that index", name, object_key(obj))
            return set()

    def _unindex(self, key: str, obj: Obj) -> None:
        for name, index in self._indices.items():
            for value in self._index_values(name, obj):
                bucket = index.get(value)
                if bucket is not None:
                    bucket.discard(key)
                    if not bucket:
                        del index[value]

    def _index(self, key: str, obj: Obj) -> None:
        for name, index in self._indices.items():
            for value in self._index_values(name, obj):
                index.setdefault(value, set()).add(key)

    def put(self, obj: Obj) -> Obj | None:
        """Store `obj`; return the object it replaced, if any."""
        key = object_key(obj)
        old = self._items.get(key)
        if old is not None:
            self._unindex(key, old)
        self._items[key] = obj
        self._index(key, obj)
        return old

    def remove(self, key: str) -> Obj | None:
        old = self._items.pop(key, None)
        if old is not None:
            self._unindex(key, old)
        return old

    def by_index(self, name: str, value: str) -> ObjList:
        if name not in self._indices:
            raise KeyError(f"no index named {name!r}; indexes: {', '.join(self._indices) or 'none'}")
        return [self._items[k] for k in self._indices[name].get(value, ())]

    def index_values(self, name: str) -> Iterable[str]:
        return tuple(self._indices[name])


class Informer:
    """List+watch one resource path and keep it in a local store.

    `path` is a collection path (e.g. `pod_path()` for all namespaces, `node_path()`); selectors are
    sent to the server. Handlers are plain callables run on the loop after the store is updated; a
    handler that returns a coroutine gets it scheduled as a task. Handler exceptions are logged and
    counted, and never stop the informer.
    """

    def __init__(
        self,
        client: ListWatchClient,
        path: str,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        indexers: dict[str, IndexFunc] | None = None,
        name: str = "",
        keep: Callable[[Obj], bool] | None = None,
    ) -> None:
        self.client = client
        #: Objects it rejects are not stored (and look deleted if they were): for a watch whose
        #: server-side selectors cannot say all that matters, the store stays small all the same.
        self.keep = keep
        self.path = path
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.name = name or path
        self.store = Store(indexers)
        self.synced = asyncio.Event()
        self.resource_version = ""
        self._handlers: list[_Handlers] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._events_applied = 0

    # --- reading ----------------------------------------------------------------------------------

    def get(self, key: str) -> Obj | None:
        return self.store.get(key)

    def list(self) -> ObjList:
        return self.store.list()

    def by_index(self, index: str, value: str) -> ObjList:
        return self.store.by_index(index, value)

    def __len__(self) -> int:
        return len(self.store)

    async def wait_synced(self) -> None:
        await self.synced.wait()

    # --- handlers ---------------------------------------------------------------------------------

    def add_handler(
        self,
        on_add: AddHandler | None = None,
        on_update: UpdateHandler | None = None,
        on_delete: DeleteHandler | None = None,
    ) -> None:
        """Register handlers. Objects already in the store are replayed to `on_add`, so a handler
        added late still sees everything (as client-go does)."""
        handlers = _Handlers(on_add, on_update, on_delete)
        self._handlers.append(handlers)
        if on_add is not None:
            for obj in self.store.list():
                self._call(on_add, obj)

    def _call(self, fn: Callable[..., Any], *args: Obj) -> None:
        try:
            result = fn(*args)
        except Exception:
            metrics.INFORMER_HANDLER_ERRORS.labels(self.name).inc()
            log.exception("informer %s: handler %s failed on %s", self.name, _fn_name(fn), object_key(args[-1]))
            return
        if inspect.isawaitable(result):
            self._spawn(result, fn, args[-1])

    def _spawn(self, awaitable: Awaitable[Any], fn: Callable[..., Any], obj: Obj) -> None:
        async def guarded() -> None:
            try:
                await awaitable
            except asyncio.CancelledError:
                raise
            except Exception:
                metrics.INFORMER_HANDLER_ERRORS.labels(self.name).inc()
                log.exception("informer %s: handler %s failed on %s", self.name, _fn_name(fn), object_key(obj))

        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _emit_add(self, obj: Obj) -> None:
        for h in self._handlers:
            if h.on_add is not None:
                self._call(h.on_add, obj)

    def _emit_update(self, old: Obj, new: Obj) -> None:
        for h in self._handlers:
            if h.on_update is not None:
                self._call(h.on_update, old, new)

    def _emit_delete(self, obj: Obj) -> None:
        for h in self._handlers:
            if h.on_delete is not None:
                self._call(h.on_delete, obj)

    # --- store mutation (pure; fed by the list and the watch) -------------------------------------

    def replace(self, items: Iterable[Obj], resource_version: str) -> None:
        """Make the store equal to a fresh list: adds for new keys, updates for changed
        resourceVersions, synthetic deletes (last known state) for keys that vanished."""
        fresh: dict[str, Obj] = {}
        keep = self.keep
        for obj in items:
            if keep is None or keep(obj):
                fresh[object_key(obj)] = strip_managed_fields(obj)
        for key in self.store.keys():
            if key not in fresh:
                old = self.store.remove(key)
                if old is not None:
                    metrics.INFORMER_EVENTS.labels(self.name, "SYNTHETIC_DELETE").inc()
                    self._emit_delete(old)
        for obj in fresh.values():
            old = self.store.put(obj)
            if old is None:
                self._emit_add(obj)
            elif _rv(old) != _rv(obj):
                self._emit_update(old, obj)
        self.resource_version = resource_version
        metrics.INFORMER_OBJECTS.labels(self.name).set(len(self.store))

    def apply_event(self, event: dict[str, Any]) -> None:
        """Apply one ADDED/MODIFIED/DELETED/BOOKMARK event. ERROR events are the caller's business."""
        kind = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            raise WatchDecodeError(f"watch {self.path}: {kind} event without an object")
        strip_managed_fields(obj)
        rv = _rv(obj)
        metrics.INFORMER_EVENTS.labels(self.name, str(kind)).inc()
        self._events_applied += 1
        if kind == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return
        if self.keep is not None and object_key(obj) not in self.store and (kind == "DELETED" or not self.keep(obj)):
            pass  # never kept: nothing to tell
        elif kind in ("ADDED", "MODIFIED") and self.keep is not None and not self.keep(obj):
            self.store.remove(object_key(obj))
            self._emit_delete(obj)
        elif kind in ("ADDED", "MODIFIED"):
            old = self.store.put(obj)
            if old is None:
                self._emit_add(obj)
            else:
                self._emit_update(old, obj)
        elif kind == "DELETED":
            # The event carries the final state, which is newer than what the store held.
            self.store.remove(object_key(obj))
            self._emit_delete(obj)
        else:
            raise WatchDecodeError(f"watch {self.path}: unknown event type {kind!r}")
        if rv:
            self.resource_version = rv
        metrics.INFORMER_OBJECTS.labels(self.name).set(len(self.store))

    # --- the reflector loop -----------------------------------------------------------------------

    def _selectors(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.label_selector:
            params["labelSelector"] = self.label_selector
        if self.field_selector:
            params["fieldSelector"] = self.field_selector
        return params

    async def relist(self) -> str:
        """List everything now and reconcile the store with it; returns the list's resourceVersion."""
        result = await self.client.list(self.path, self._selectors())
        metrics.INFORMER_LISTS.labels(self.name).inc()
        rv = str((result.get("metadata") or {}).get("resourceVersion", ""))
        self.replace(result.get("items") or [], rv)
        return rv

    async def _list_until_done(self) -> None:
        attempt = 0
        while True:
            try:
                await self.relist()
                return
            except Exception as exc:  # any failure: the informer must outlive it
                delay = backoff_delay(attempt, base=0.5, cap=30.0)
                log.warning("informer %s: list failed (%s); retrying in %.1fs", self.name, exc, delay)
                attempt += 1
                await asyncio.sleep(delay)

    async def _watch_once(self) -> str:
        """Watch from the current resourceVersion until the stream ends.

        Returns "timeout" for a normal end, "gone" when a relist is needed; raises on failures.
        """
        params = {
            **self._selectors(),
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": True,
            "timeoutSeconds": int(MIN_WATCH_SECONDS * (1 + random.random())),
        }
        async for event in self.client.watch_stream(self.path, params):
            if event.get("type") == "ERROR":
                status = event.get("object") or {}
                if status.get("code") == 410:
                    return "gone"
                raise ApiError(
                    int(status.get("code") or 0),
                    str(status.get("reason") or "WatchError"),
                    str(status.get("message") or status),
                    status,
                )
            self.apply_event(event)
        return "timeout"

    async def run(self) -> None:
        """List, then watch forever (relisting on 410). Cancel the task to stop."""
        await self._list_until_done()
        self.synced.set()
        log.info("informer %s synced: %d objects at resourceVersion %s", self.name, len(self), self.resource_version)
        failures = 0
        while True:
            started = time.monotonic()
            events_before = self._events_applied
            try:
                outcome = await self._watch_once()
            except ApiError as exc:
                if not exc.gone:
                    if exc.status in (401, 403):
                        log.error("informer %s: watch refused (%s); check RBAC for %s", self.name, exc, self.path)
                    failures = await self._backoff(failures, exc)
                    continue
                outcome = "gone"
            except Exception as exc:  # a dropped connection, a read timeout, a garbled line
                failures = await self._backoff(failures, exc)
                continue
            if outcome == "gone":
                metrics.INFORMER_RELISTS_410.labels(self.name).inc()
                log.info("informer %s: resourceVersion %s expired (410), relisting", self.name, self.resource_version)
                await self._list_until_done()
                failures = 0
            elif self._events_applied == events_before and time.monotonic() - started < SHORT_WATCH_SECONDS:
                # Ended at once with nothing in it: something between us and the apiserver is
                # closing watches. Back off instead of reconnecting in a tight loop.
                failures = await self._backoff(failures, ConnectionError("watch ended at once with no events"))
            else:
                metrics.INFORMER_WATCH_RESTARTS.labels(self.name, "timeout").inc()
                failures = 0

    async def _backoff(self, failures: int, exc: Exception) -> int:
        metrics.INFORMER_WATCH_RESTARTS.labels(self.name, "error").inc()
        delay = backoff_delay(failures, base=0.5, cap=30.0)
        log.warning(
            "informer %s: watch failed (%s: %s); reconnecting from resourceVersion %s in %.1fs",
            self.name, type(exc).__name__, exc, self.resource_version, delay,
        )
        await asyncio.sleep(delay)
        return failures + 1

    def start(self) -> asyncio.Task[None]:
        """Run in a background task (kept alive by the informer); cancel it, or call `stop()`."""
        task = asyncio.get_running_loop().create_task(self.run(), name=f"informer:{self.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
