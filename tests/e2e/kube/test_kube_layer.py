"""The kube layer against the real kube-apiserver: informers follow what kubectl does, a relist
repairs a store that missed deletions, and recorded Events show up in `kubectl describe`."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from devcluster.cluster import ControlPlane
from koupleless.kube import (
    EventRecorder,
    Informer,
    KubeClient,
    node_path,
    object_key,
    pod_path,
    resource_path,
)
from koupleless.kube import informer as informer_module
from tests.helpers import async_wait_until

pytestmark = pytest.mark.controlplane

POD_YAML = """
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
  labels:
    app: web
spec:
  containers:
  - name: biz1
    image: https://example.com/biz1-0.0.1-ark-biz.jar
"""


class Calls:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def add(self, obj: dict[str, Any]) -> None:
        self.seen.append(("add", object_key(obj)))

    def update(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        self.seen.append(("update", object_key(new)))

    def delete(self, obj: dict[str, Any]) -> None:
        self.seen.append(("delete", object_key(obj)))


@pytest.fixture
async def client(control_plane: ControlPlane) -> AsyncIterator[KubeClient]:
    async with KubeClient.from_kubeconfig(str(control_plane.kubeconfig)) as c:
        yield c


async def kubectl(cp: ControlPlane, *args: str, input: str | None = None) -> str:
    # In a thread, so the informer under test keeps reading its watch meanwhile.
    result = await asyncio.to_thread(cp.kubectl, *args, input=input)
    return result.stdout


async def test_informer_follows_kubectl_create_update_delete(
    control_plane: ControlPlane, namespace: str, client: KubeClient
) -> None:
    inf = Informer(client, pod_path(namespace), indexers={"app": lambda p: [p["metadata"]["labels"].get("app")]})
    calls = Calls()
    inf.add_handler(calls.add, calls.update, calls.delete)
    inf.start()
    try:
        async with asyncio.timeout(60):
            await inf.wait_synced()
        key = f"{namespace}/web-1"
        await kubectl(control_plane, "apply", "-f", "-", input=POD_YAML.format(name="web-1", namespace=namespace))
        await async_wait_until(lambda: asyncio.sleep(0, inf.get(key)), timeout=30, what="the Pod in the store")
        assert ("add", key) in calls.seen
        assert [object_key(p) for p in inf.by_index("app", "web")] == [key]

        await kubectl(control_plane, "label", "pod", "web-1", "app=api", "--overwrite", "-n", namespace)
        await async_wait_until(
            lambda: asyncio.sleep(0, (inf.get(key) or {}).get("metadata", {}).get("labels", {}).get("app") == "api"),
            timeout=30, what="the label change",
        )
        assert ("update", key) in calls.seen
        assert inf.by_index("app", "web") == [] and len(inf.by_index("app", "api")) == 1

        await kubectl(control_plane, "delete", "pod", "web-1", "-n", namespace, "--wait=false")
        await async_wait_until(lambda: asyncio.sleep(0, ("delete", key) in calls.seen), timeout=30, what="the delete")
        assert inf.get(key) is None and len(inf) == 0
        assert calls.seen[0] == ("add", key) and calls.seen[-1] == ("delete", key)
    finally:
        await inf.stop()


async def test_relist_emits_synthetic_delete_for_objects_deleted_behind_its_back(
    control_plane: ControlPlane, namespace: str, client: KubeClient
) -> None:
    for name in ("keep", "gone"):
        await kubectl(control_plane, "apply", "-f", "-", input=POD_YAML.format(name=name, namespace=namespace))
    inf = Informer(client, pod_path(namespace))
    calls = Calls()
    inf.add_handler(calls.add, calls.update, calls.delete)
    inf.start()
    async with asyncio.timeout(60):
        await inf.wait_synced()
    assert sorted(o["metadata"]["name"] for o in inf.list()) == ["gone", "keep"]
    await inf.stop()  # from here on the informer hears nothing

    await kubectl(control_plane, "delete", "pod", "gone", "-n", namespace, "--wait=true")
    assert inf.get(f"{namespace}/gone") is not None  # stale, as after a missed watch window
    calls.seen.clear()

    await inf.relist()  # what a 410 Gone triggers
    assert calls.seen == [("delete", f"{namespace}/gone")]
    assert [o["metadata"]["name"] for o in inf.list()] == ["keep"]


async def test_no_change_is_lost_across_watch_reconnects(
    control_plane: ControlPlane, namespace: str, client: KubeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Watches the server ends every 2-3 seconds: every change must still arrive exactly once.
    monkeypatch.setattr(informer_module, "MIN_WATCH_SECONDS", 2)
    inf = Informer(client, resource_path("v1", "configmaps", namespace), label_selector="batch=reconnect")
    calls = Calls()
    inf.add_handler(calls.add, calls.update, calls.delete)
    inf.start()
    try:
        async with asyncio.timeout(60):
            await inf.wait_synced()
        names = [f"cm-{i}" for i in range(12)]
        for i, name in enumerate(names):
            cm = {"metadata": {"name": name, "labels": {"batch": "reconnect"}}, "data": {"i": str(i)}}
            await client.create(resource_path("v1", "configmaps", namespace), cm)
            await asyncio.sleep(0.25)  # spread the writes over several watch connections
        await async_wait_until(lambda: asyncio.sleep(0, len(inf) == len(names)), timeout=30, what="all ConfigMaps")
        adds = [k for op, k in calls.seen if op == "add"]
        assert sorted(adds) == sorted(f"{namespace}/{n}" for n in names)  # each exactly once
        restarts = REGISTRY.get_sample_value(
            "koupleless_informer_watch_restarts_total", {"informer": inf.name, "reason": "timeout"}
        )
        assert restarts and restarts >= 1  # the writes really did span several watches
    finally:
        await inf.stop()


async def test_informer_carries_an_object_bigger_than_aiohttp_line_limit(
    control_plane: ControlPlane, namespace: str, client: KubeClient
) -> None:
    inf = Informer(client, resource_path("v1", "configmaps", namespace), field_selector="metadata.name=big")
    inf.start()
    try:
        async with asyncio.timeout(60):
            await inf.wait_synced()
        payload = "x" * (900 * 1024)
        await client.create(resource_path("v1", "configmaps", namespace), {"metadata": {"name": "big"}, "data": {"k": payload}})
        got = await async_wait_until(lambda: asyncio.sleep(0, inf.get(f"{namespace}/big")), timeout=30, what="big")
        assert got["data"]["k"] == payload
    finally:
        await inf.stop()


async def test_event_shows_in_describe_and_a_repeat_counts_two(
    control_plane: ControlPlane, namespace: str, client: KubeClient
) -> None:
    await kubectl(control_plane, "apply", "-f", "-", input=POD_YAML.format(name="biz", namespace=namespace))
    pod = await client.get(pod_path(namespace, "biz"))
    recorder = EventRecorder(client, "module-controller-test", host="test-host")
    await recorder.start()
    recorder.event(pod, "Normal", "ModuleInstalling", "installing biz1:0.0.1 on base-a")
    recorder.event(pod, "Warning", "ModuleInstallFailed", "biz1:0.0.1 failed: jar not found")
    recorder.event(pod, "Warning", "ModuleInstallFailed", "biz1:0.0.1 failed: jar not found")
    await recorder.stop()

    described = await kubectl(control_plane, "describe", "pod", "biz", "-n", namespace)
    assert re.search(r"Normal\s+ModuleInstalling\s+.*module-controller-test\s+installing biz1:0.0.1 on base-a", described)
    assert re.search(r"Warning\s+ModuleInstallFailed\s+.*\(x2 over .*\)\s+module-controller-test\s+biz1:0.0.1 failed", described)

    events = orjson.loads(await kubectl(control_plane, "get", "events", "-n", namespace, "-o", "json"))["items"]
    ours = {e["reason"]: e for e in events if e["source"].get("component") == "module-controller-test"}
    assert ours["ModuleInstallFailed"]["count"] == 2
    assert ours["ModuleInstalling"]["count"] == 1
    assert ours["ModuleInstallFailed"]["involvedObject"]["uid"] == pod["metadata"]["uid"]
    assert ours["ModuleInstallFailed"]["source"]["host"] == "test-host"


async def test_node_event_shows_in_describe_node(control_plane: ControlPlane, client: KubeClient) -> None:
    name = "virtual-node-events-test"
    node = await client.create(node_path(), {"metadata": {"name": name, "labels": {"type": "virtual-kubelet"}}})
    try:
        recorder = EventRecorder(client, "module-controller-test")
        await recorder.start()
        recorder.event(node, "Normal", "BaseOnline", "base events-test came online")
        await recorder.stop()
        described = await kubectl(control_plane, "describe", "node", name)
        assert re.search(r"Normal\s+BaseOnline\s+.*base events-test came online", described), described
    finally:
        await client.delete(node_path(name))


async def test_event_on_a_deleted_namespace_is_counted_not_raised(
    control_plane: ControlPlane, namespace: str, client: KubeClient
) -> None:
    ghost = {"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "p", "namespace": "no-such-ns", "uid": "u"}}
    labels = {"component": "module-controller-test-failures", "outcome": "failed"}
    before = REGISTRY.get_sample_value("koupleless_kube_events_total", labels) or 0
    recorder = EventRecorder(client, "module-controller-test-failures")
    await recorder.start()
    recorder.event(ghost, "Normal", "Nothing", "goes nowhere")
    await recorder.stop()
    assert REGISTRY.get_sample_value("koupleless_kube_events_total", labels) == before + 1
