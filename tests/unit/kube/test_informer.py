"""Informer store, indexes and relist diff, fed with a list and a watch stream recorded from a real
kube-apiserver (tests/unit/kube/data), plus the reflector loop's reaction to 410 and broken streams."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from koupleless.kube.client import ApiError
from koupleless.kube.informer import Informer, object_key
from tests.helpers import async_wait_until

DATA = Path(__file__).parent / "data"
POD_LIST: dict[str, Any] = orjson.loads((DATA / "pod_list.json").read_bytes())
POD_WATCH: list[dict[str, Any]] = [orjson.loads(line) for line in (DATA / "pod_watch.jsonl").read_bytes().splitlines()]
GONE = {
    "type": "ERROR",
    "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version: 1 (247)", "reason": "Expired", "code": 410,
    },
}


def by_node(pod: dict[str, Any]) -> list[str]:
    return [pod["spec"].get("nodeName", "")]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def add(self, obj: dict[str, Any]) -> None:
        self.calls.append(("add", object_key(obj)))

    def update(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        assert object_key(old) == object_key(new)
        self.calls.append(("update", object_key(new)))

    def delete(self, obj: dict[str, Any]) -> None:
        self.calls.append(("delete", object_key(obj)))


def informer_with_recorder(client: Any = None) -> tuple[Informer, Recorder]:
    inf = Informer(client, "/api/v1/namespaces/rec/pods", indexers={"node": by_node}, name="test-pods")
    rec = Recorder()
    inf.add_handler(rec.add, rec.update, rec.delete)
    return inf, rec


def test_object_key() -> None:
    assert object_key({"metadata": {"namespace": "ns", "name": "p"}}) == "ns/p"
    assert object_key({"metadata": {"name": "virtual-node-a"}}) == "virtual-node-a"


def test_list_fills_store_and_index() -> None:
    inf, rec = informer_with_recorder()
    inf.replace(copy.deepcopy(POD_LIST["items"]), POD_LIST["metadata"]["resourceVersion"])
    assert sorted(rec.calls) == [("add", "rec/web-1"), ("add", "rec/web-2")]
    assert len(inf) == 2
    assert inf.get("rec/web-1")["metadata"]["labels"] == {"app": "web"}
    assert {object_key(p) for p in inf.by_index("node", "virtual-node-base-a")} == {"rec/web-1", "rec/web-2"}
    assert inf.resource_version == POD_LIST["metadata"]["resourceVersion"]


def test_recorded_watch_events_update_store_index_and_handlers() -> None:
    inf, rec = informer_with_recorder()
    inf.replace(copy.deepcopy(POD_LIST["items"]), POD_LIST["metadata"]["resourceVersion"])
    rec.calls.clear()
    for event in copy.deepcopy(POD_WATCH):
        inf.apply_event(event)
    # label change on web-1, web-3 created, web-2 marked for deletion then deleted, a bookmark.
    assert rec.calls == [
        ("update", "rec/web-1"), ("add", "rec/web-3"), ("update", "rec/web-2"), ("delete", "rec/web-2"),
    ]
    assert sorted(o["metadata"]["name"] for o in inf.list()) == ["web-1", "web-3"]
    assert inf.get("rec/web-1")["metadata"]["labels"]["tier"] == "front"
    assert [object_key(p) for p in inf.by_index("node", "virtual-node-base-a")] == ["rec/web-1"]
    assert [object_key(p) for p in inf.by_index("node", "virtual-node-base-b")] == ["rec/web-3"]
    # The bookmark moved the resourceVersion on without touching the store.
    assert inf.resource_version == POD_WATCH[-1]["object"]["metadata"]["resourceVersion"]


def test_store_keeps_no_managed_fields() -> None:
    """Objects as kube-apiserver sends them carry managedFields; the store (memory at 50,000
    modules) keeps everything else."""
    fields = [{"manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
    items = copy.deepcopy(POD_LIST["items"])
    for item in items:
        item["metadata"]["managedFields"] = fields
    inf, _ = informer_with_recorder()
    inf.replace(items, POD_LIST["metadata"]["resourceVersion"])
    for event in copy.deepcopy(POD_WATCH):
        if isinstance(event.get("object"), dict) and event["type"] != "BOOKMARK":
            event["object"]["metadata"]["managedFields"] = fields
        inf.apply_event(event)
    assert [o["metadata"]["name"] for o in inf.list() if "managedFields" in o["metadata"]] == []
    assert inf.get("rec/web-1")["metadata"]["labels"]["tier"] == "front"  # the rest is all there


def test_index_follows_a_changed_value() -> None:
    inf, _ = informer_with_recorder()
    pod = copy.deepcopy(POD_LIST["items"][0])
    inf.apply_event({"type": "ADDED", "object": pod})
    moved = copy.deepcopy(pod)
    moved["spec"]["nodeName"] = "virtual-node-base-z"
    moved["metadata"]["resourceVersion"] = "999"
    inf.apply_event({"type": "MODIFIED", "object": moved})
    assert inf.by_index("node", "virtual-node-base-a") == []
    assert inf.by_index("node", "virtual-node-base-z") == [moved]
    inf.apply_event({"type": "DELETED", "object": moved})
    assert inf.by_index("node", "virtual-node-base-z") == []
    assert inf.store.index_values("node") == ()


def test_unknown_index_names_the_known_ones() -> None:
    inf, _ = informer_with_recorder()
    with pytest.raises(KeyError, match="no index named 'host'; indexes: node"):
        inf.by_index("host", "x")


def test_relist_emits_synthetic_delete_update_and_add() -> None:
    inf, rec = informer_with_recorder()
    inf.replace(copy.deepcopy(POD_LIST["items"]), "240")
    rec.calls.clear()
    web1, _web2 = copy.deepcopy(POD_LIST["items"])
    unchanged = copy.deepcopy(web1)
    web3 = copy.deepcopy(POD_WATCH[1]["object"])
    inf.replace([unchanged, web3], "300")
    # web-2 vanished behind the informer's back: a delete carrying its last known state.
    assert sorted(rec.calls) == [("add", "rec/web-3"), ("delete", "rec/web-2")]
    rec.calls.clear()
    changed = copy.deepcopy(unchanged)
    changed["metadata"]["resourceVersion"] = "301"
    inf.replace([changed, web3], "301")
    assert rec.calls == [("update", "rec/web-1")]  # unchanged resourceVersions are not re-announced


def test_handler_added_late_sees_existing_objects() -> None:
    inf, _ = informer_with_recorder()
    inf.replace(copy.deepcopy(POD_LIST["items"]), "240")
    late = Recorder()
    inf.add_handler(on_add=late.add)
    assert sorted(late.calls) == [("add", "rec/web-1"), ("add", "rec/web-2")]


def test_handler_exception_does_not_stop_other_handlers_or_the_store() -> None:
    def broken(_: dict[str, Any]) -> None:
        raise RuntimeError("handler bug")

    inf = Informer(None, "/api/v1/namespaces/rec/pods")  # type: ignore[arg-type]
    inf.add_handler(on_add=broken)
    rec = Recorder()
    inf.add_handler(rec.add, rec.update, rec.delete)
    inf.replace(copy.deepcopy(POD_LIST["items"]), "240")
    assert len(inf) == 2 and len(rec.calls) == 2


async def test_coroutine_handlers_are_scheduled() -> None:
    inf = Informer(None, "/api/v1/pods")  # type: ignore[arg-type]
    seen: list[str] = []

    async def on_add(obj: dict[str, Any]) -> None:
        seen.append(object_key(obj))

    inf.add_handler(on_add=on_add)
    inf.replace(copy.deepcopy(POD_LIST["items"]), "240")
    await async_wait_until(lambda: asyncio.sleep(0, len(seen) == 2), timeout=5, what="async handlers")


# --- the reflector loop over a scripted list/watch ------------------------------------------------


class ScriptedApi:
    """Answers list and watch from scripts: each list returns the next list; each watch either
    raises (an ApiError) or yields the next batch of events and ends."""

    def __init__(self, lists: list[dict[str, Any]], watches: list[list[dict[str, Any]] | Exception]) -> None:
        self.lists = lists
        self.watches = watches
        self.list_calls = 0
        self.watch_params: list[dict[str, Any]] = []
        self.exhausted = asyncio.Event()

    async def list(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        result = self.lists[min(self.list_calls, len(self.lists) - 1)]
        self.list_calls += 1
        return copy.deepcopy(result)

    async def watch_stream(self, path: str, params: dict[str, Any] | None = None) -> AsyncIterator[dict[str, Any]]:
        self.watch_params.append(dict(params or {}))
        if not self.watches:
            self.exhausted.set()
            await asyncio.Event().wait()  # a quiet, healthy watch
        step = self.watches.pop(0)
        if isinstance(step, Exception):
            raise step
        for event in step:
            yield copy.deepcopy(event)


async def run_until_exhausted(inf: Informer, api: ScriptedApi) -> None:
    task = inf.start()
    try:
        async with asyncio.timeout(30):
            await api.exhausted.wait()
    finally:
        await inf.stop()
    assert task.cancelled()


async def test_in_stream_410_relists_and_emits_synthetic_delete() -> None:
    web1, _ = POD_LIST["items"]
    after = {"metadata": {"resourceVersion": "400"}, "items": [web1]}
    api = ScriptedApi([POD_LIST, after], [[GONE]])
    inf, rec = informer_with_recorder(api)
    await run_until_exhausted(inf, api)
    assert inf.synced.is_set()
    assert api.list_calls == 2
    assert ("delete", "rec/web-2") in rec.calls
    assert [object_key(o) for o in inf.list()] == ["rec/web-1"]
    # The watch after the relist starts from the relist's resourceVersion, with bookmarks.
    assert api.watch_params[-1]["resourceVersion"] == "400"
    assert api.watch_params[-1]["allowWatchBookmarks"] is True


async def test_http_410_on_connect_relists() -> None:
    after = {"metadata": {"resourceVersion": "500"}, "items": []}
    api = ScriptedApi([POD_LIST, after], [ApiError(410, "Expired", "too old resource version")])
    inf, rec = informer_with_recorder(api)
    await run_until_exhausted(inf, api)
    assert sorted(c for c in rec.calls if c[0] == "delete") == [("delete", "rec/web-1"), ("delete", "rec/web-2")]
    assert len(inf) == 0


async def test_other_errors_reconnect_from_the_last_resource_version_without_relisting() -> None:
    api = ScriptedApi(
        [POD_LIST],
        [
            POD_WATCH[:2],  # two events, then the server ends the watch normally
            ApiError(500, "InternalError", "etcd leader changed"),
            [{"type": "ERROR", "object": {"kind": "Status", "code": 500, "message": "internal"}}],
            POD_WATCH[2:],
        ],
    )
    inf, rec = informer_with_recorder(api)
    await run_until_exhausted(inf, api)
    assert api.list_calls == 1
    rvs = [p["resourceVersion"] for p in api.watch_params]
    second_event_rv = POD_WATCH[1]["object"]["metadata"]["resourceVersion"]
    assert rvs[:4] == [POD_LIST["metadata"]["resourceVersion"], second_event_rv, second_event_rv, second_event_rv]
    assert sorted(o["metadata"]["name"] for o in inf.list()) == ["web-1", "web-3"]
    assert ("delete", "rec/web-2") in rec.calls


async def test_list_failure_is_retried_before_synced() -> None:
    class FlakyList(ScriptedApi):
        async def list(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
            self.list_calls += 1
            if self.list_calls == 1:
                raise ApiError(0, "ConnectionError", "connection refused")
            return copy.deepcopy(POD_LIST)

    api = FlakyList([], [])
    inf, _ = informer_with_recorder(api)
    await run_until_exhausted(inf, api)
    assert api.list_calls == 2 and len(inf) == 2 and inf.synced.is_set()


async def test_selectors_are_sent_to_list_and_watch() -> None:
    seen: list[dict[str, Any]] = []

    class Recording(ScriptedApi):
        async def list(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
            seen.append(dict(params or {}))
            return await super().list(path, params)

    api = Recording([POD_LIST], [])
    inf = Informer(api, "/api/v1/pods", label_selector="app=web", field_selector="spec.nodeName=vn")
    await run_until_exhausted(inf, api)
    assert seen == [{"labelSelector": "app=web", "fieldSelector": "spec.nodeName=vn"}]
    assert api.watch_params[0]["labelSelector"] == "app=web"
    assert api.watch_params[0]["fieldSelector"] == "spec.nodeName=vn"


async def test_watches_that_end_at_once_back_off_instead_of_spinning() -> None:
    api = ScriptedApi([POD_LIST], [[], [], POD_WATCH[:1]])
    inf, _ = informer_with_recorder(api)
    labels = {"informer": inf.name, "reason": "error"}
    before = REGISTRY.get_sample_value("koupleless_informer_watch_restarts_total", labels) or 0
    await run_until_exhausted(inf, api)
    assert REGISTRY.get_sample_value("koupleless_informer_watch_restarts_total", labels) == before + 2
    assert inf.get("rec/web-1")["metadata"]["labels"]["tier"] == "front"  # and it still caught up
