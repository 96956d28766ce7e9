"""EventRecorder decisions (aggregate or create, retry or give up, what the Event says), observed
through the API calls it makes. The e2e suite checks the same against a real apiserver."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import REGISTRY

from koupleless.kube import events as events_module
from koupleless.kube.client import ApiError
from koupleless.kube.events import SPAM_BURST, EventRecorder, object_reference, truncate_message

POD = {
    "kind": "Pod",
    "apiVersion": "v1",
    "metadata": {"name": "biz", "namespace": "team-a", "uid": "uid-1", "resourceVersion": "42"},
}
NODE = {"kind": "Node", "apiVersion": "v1", "metadata": {"name": "virtual-node-a", "uid": "node-uid"}}


class FakeApi:
    """Records create/patch calls; `failures` is a queue of ApiErrors to raise first."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.failures: list[ApiError] = []

    async def create(self, path: str, obj: Any) -> dict[str, Any]:
        self.calls.append(("create", path, obj))
        if self.failures:
            raise self.failures.pop(0)
        return obj

    async def patch(self, path: str, body: Any, patch_type: str = "merge") -> dict[str, Any]:
        self.calls.append(("patch", path, body))
        if self.failures:
            raise self.failures.pop(0)
        return body


async def record(api: FakeApi, *events: tuple[dict[str, Any], str, str, str], **kwargs: Any) -> EventRecorder:
    kwargs.setdefault("retry_backoff", 0.001)
    recorder = EventRecorder(api, "module-controller", host="host-1", **kwargs)  # type: ignore[arg-type]
    await recorder.start()
    for obj, type_, reason, message in events:
        recorder.event(obj, type_, reason, message)
    await recorder.stop()
    return recorder


def outcome(component: str, name: str) -> float:
    return REGISTRY.get_sample_value("koupleless_kube_events_total", {"component": component, "outcome": name}) or 0


async def test_first_event_is_a_complete_core_v1_event() -> None:
    api = FakeApi()
    await record(api, (POD, "Warning", "ModuleInstallFailed", "jar not found"))
    [(verb, path, event)] = api.calls
    assert (verb, path) == ("create", "/api/v1/namespaces/team-a/events")
    assert event["metadata"]["name"].startswith("biz.")
    assert event["involvedObject"] == {
        "kind": "Pod", "apiVersion": "v1", "name": "biz", "namespace": "team-a", "uid": "uid-1", "resourceVersion": "42",
    }
    assert (event["type"], event["reason"], event["message"], event["count"]) == (
        "Warning", "ModuleInstallFailed", "jar not found", 1,
    )
    assert event["source"] == {"component": "module-controller", "host": "host-1"}
    assert event["firstTimestamp"] == event["lastTimestamp"]


async def test_repeats_bump_count_on_the_same_event() -> None:
    api = FakeApi()
    same = (POD, "Warning", "BackOff", "retrying install")
    await record(api, same, same, same)
    assert [c[0] for c in api.calls] == ["create", "patch", "patch"]
    name = api.calls[0][2]["metadata"]["name"]
    assert api.calls[1][1] == f"/api/v1/namespaces/team-a/events/{name}"
    assert [c[2]["count"] for c in api.calls[1:]] == [2, 3]


async def test_different_messages_are_different_events() -> None:
    api = FakeApi()
    await record(api, (POD, "Normal", "Installing", "biz1:1.0"), (POD, "Normal", "Installing", "biz1:2.0"))
    assert [c[0] for c in api.calls] == ["create", "create"]


async def test_outside_the_window_a_repeat_starts_a_new_event() -> None:
    api = FakeApi()
    same = (POD, "Normal", "Installed", "ok")
    await record(api, same, same, aggregate_window=0.0)
    assert [c[0] for c in api.calls] == ["create", "create"]


async def test_expired_event_is_created_again_when_the_patch_finds_nothing() -> None:
    api = FakeApi()
    same = (POD, "Normal", "Installed", "ok")
    recorder = EventRecorder(api, "module-controller")  # type: ignore[arg-type]
    await recorder.start()
    recorder.event(*same)
    await recorder.flush()
    api.failures.append(ApiError(404, "NotFound", "events not found"))
    recorder.event(*same)
    await recorder.stop()
    assert [c[0] for c in api.calls] == ["create", "patch", "create"]
    assert api.calls[-1][2]["count"] == 1


async def test_transient_failure_is_retried() -> None:
    api = FakeApi()
    api.failures.append(ApiError(503, "ServiceUnavailable", "apiserver restarting"))
    await record(api, (POD, "Normal", "Installed", "ok"))
    assert [c[0] for c in api.calls] == ["create", "create"]


async def test_rejected_event_is_counted_and_the_next_one_still_written() -> None:
    api = FakeApi()
    api.failures.append(ApiError(422, "Invalid", "bad event"))
    before = outcome("module-controller", "failed")
    await record(api, (POD, "Normal", "One", "x"), (POD, "Normal", "Two", "y"))
    assert [c[0] for c in api.calls] == ["create", "create"]
    assert api.calls[1][2]["reason"] == "Two"
    assert outcome("module-controller", "failed") == before + 1


async def test_node_events_use_the_node_name_as_uid_in_the_default_namespace() -> None:
    api = FakeApi()
    await record(api, (NODE, "Normal", "BaseOnline", "up"))
    [(_, path, event)] = api.calls
    assert path == "/api/v1/namespaces/default/events"
    assert event["involvedObject"]["uid"] == "virtual-node-a"  # what `kubectl describe node` searches for
    assert "namespace" not in event["involvedObject"]


def test_object_reference_kind_override_for_list_items_without_kind() -> None:
    bare = {"metadata": {"name": "p", "namespace": "ns", "uid": "u"}}
    assert object_reference(bare, kind="Pod")["kind"] == "Pod"


async def test_invalid_events_are_refused_at_the_call() -> None:
    api = FakeApi()
    before = outcome("module-controller", "invalid")
    await record(api, (POD, "Error", "Bad", "type must be Normal or Warning"),
                 ({"metadata": {"name": "no-kind"}}, "Normal", "Bad", "no kind"))
    assert api.calls == []
    assert outcome("module-controller", "invalid") == before + 2


def test_long_messages_are_cut_on_a_character_boundary() -> None:
    cut = truncate_message("é" * 1000, limit=101)
    assert len(cut.encode()) <= 101 and cut.endswith(" ...")
    assert truncate_message("short") == "short"


async def test_a_flood_of_distinct_events_on_one_object_is_throttled() -> None:
    api = FakeApi()
    flood = [(POD, "Normal", "Progress", f"step {i}") for i in range(SPAM_BURST + 5)]
    before = outcome("module-controller", "throttled")
    await record(api, *flood)
    assert len(api.calls) == SPAM_BURST
    assert outcome("module-controller", "throttled") == before + 5


@pytest.mark.parametrize("status", [0, 500])
async def test_event_never_raises_to_the_caller(status: int) -> None:
    api = FakeApi()
    api.failures.extend(ApiError(status, "X", "down") for _ in range(10))
    await record(api, (POD, "Normal", "Installed", "ok"))  # would raise here if it could
    assert len(api.calls) >= 2


class GatedApi(FakeApi):
    """Creates for the objects named in `held` wait until `release` is set."""

    def __init__(self, held: set[str]) -> None:
        super().__init__()
        self.held = held
        self.release = asyncio.Event()
        self.written = asyncio.Condition()

    async def create(self, path: str, obj: Any) -> dict[str, Any]:
        if obj["involvedObject"]["name"] in self.held:
            await self.release.wait()
        result = await super().create(path, obj)
        async with self.written:
            self.written.notify_all()
        return result

    def names(self) -> set[str]:
        return {c[2]["involvedObject"]["name"] for c in self.calls}


def pod(name: str) -> dict[str, Any]:
    return {"kind": "Pod", "apiVersion": "v1", "metadata": {"name": name, "namespace": "team-a", "uid": f"uid-{name}"}}


async def test_a_slow_write_holds_up_only_its_own_object() -> None:
    api = GatedApi(held={"stuck"})
    recorder = EventRecorder(api, "module-controller", host="h", writers=4)  # type: ignore[arg-type]
    await recorder.start()
    recorder.event(pod("stuck"), "Normal", "Installing", "one")
    others = [f"biz-{i}" for i in range(12)]
    for name in others:
        recorder.event(pod(name), "Normal", "Installing", "one")
    # Objects that share the stuck object's writer wait behind it; the rest are written meanwhile.
    async with asyncio.timeout(5), api.written:
        await api.written.wait_for(lambda: len(api.names()) >= 3)
    assert "stuck" not in api.names()
    api.release.set()
    await recorder.stop()
    assert api.names() == {"stuck", *others}


async def test_one_objects_events_are_written_in_the_order_recorded() -> None:
    api = FakeApi()
    steps = [f"step {i}" for i in range(20)]
    await record(api, *[(pod(f"p{i % 5}"), "Normal", "Progress", s) for i, s in enumerate(steps)], writers=4)
    for n in range(5):
        written = [c[2]["message"] for c in api.calls if c[2]["involvedObject"]["name"] == f"p{n}"]
        assert written == [s for i, s in enumerate(steps) if i % 5 == n]


async def test_a_full_queue_drops_and_says_so_once(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_module, "QUEUE_LIMIT", 3)
    api = GatedApi(held={"biz-0", "biz-1", "biz-2"})
    recorder = EventRecorder(api, "drops-test", host="h", writers=1)  # type: ignore[arg-type]
    for i in range(10):
        recorder.event(pod(f"biz-{i}"), "Normal", "Installing", "one")
    assert outcome("drops-test", "dropped") == 7
    lines = [r.getMessage() for r in caplog.records if "event queue full" in r.getMessage()]
    assert len(lines) == 1 and "dropped 1 Events" in lines[0]
    api.release.set()
    await recorder.start()
    await recorder.stop()
    assert [c[2]["involvedObject"]["name"] for c in api.calls] == ["biz-0", "biz-1", "biz-2"]
