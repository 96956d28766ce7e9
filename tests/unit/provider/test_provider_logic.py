"""Pure parts of the provider: Pod status from base reports, the Node object, and the per-base
ordering of MQTT messages (fed straight into the provider's handler; nothing talks to a cluster)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from koupleless import arklet, keys
from koupleless.model import Module
from provider import vnode
from provider.controller import Provider, ProviderOptions
from provider.podstatus import compute_status, status_changed
from provider.state import BaseState, BizRecord, PendingOp, PodRecord
from provider.tunnel import BrokerOptions

URL = "https://h/biz1-0.0.1-ark-biz.jar"


def pod(image: str = URL, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {keys.LABEL_COMPONENT: "module"}},
        "spec": {"nodeName": "virtual-node-b1", "containers": [
            {"name": "biz1", "image": image, "env": [{"name": "BIZ_VERSION", "value": "0.0.1"}]}]},
        "status": status or {},
    }


def base(**kw: Any) -> BaseState:
    b = BaseState(base_id="b1", node_name="virtual-node-b1", **kw)
    b.heartbeat = arklet.Heartbeat(arklet.BaseMetadata("b1", "base", "1.1.1", "c"), "10.0.0.9", "h", 0, "ACTIVATED")
    b.ready = True
    b.inventory_known = True
    return b


def test_activated_module_makes_a_ready_running_pod_with_the_base_ip() -> None:
    b = base()
    b.bizs["biz1:0.0.1"] = BizRecord("biz1", "0.0.1", arklet.ACTIVATED, 1_700_000_000_000, ts=1_700_000_000_000)
    rec = PodRecord(uid="u1", installed={"biz1": Module("biz1", "0.0.1", URL)})
    status = compute_status(pod(), rec, b, node_ready=True, now="2026-01-01T00:00:00Z")
    assert status["phase"] == "Running"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "PodScheduled": "True", "Initialized": "True", "ContainersReady": "True", "Ready": "True"}
    [cs] = status["containerStatuses"]
    assert cs["ready"] and cs["started"] and cs["containerID"] == "arklet://biz1:0.0.1"
    assert cs["state"] == {"running": {"startedAt": "2023-11-14T22:13:20Z"}}
    assert status["podIP"] == status["hostIP"] == "10.0.0.9"
    # the record rebuilt from what we wrote knows what is installed (a restarted provider adopts it)
    again = PodRecord.from_pod(pod(status=status))
    assert again.installed == rec.installed and again.restarts == {"biz1": 0}
    # writing the same thing twice is not a change, nor is the API server's way of storing it
    stored = {**status, "containerStatuses": [{**cs, "lastState": {}}]}
    assert not status_changed(stored, compute_status(pod(status=stored), again, b, True, now="later"))


def test_failed_install_keeps_the_pod_pending_with_the_base_message() -> None:
    rec = PodRecord(uid="u1", failed={"biz1": ("biz1:0.0.1", "disk full on base b1")})
    status = compute_status(pod(), rec, base(), node_ready=True)
    assert status["phase"] == "Pending"
    [cs] = status["containerStatuses"]
    assert cs["state"] == {"waiting": {"reason": "InstallFailed", "message": "disk full on base b1"}}
    assert not cs["ready"] and "containerID" not in cs


def test_replacing_and_not_ready_node() -> None:
    b = base()
    b.bizs["biz1:0.0.1"] = BizRecord("biz1", "0.0.1", arklet.ACTIVATED, 1, ts=1)
    old = Module("biz1", "0.0.1", "https://h/old.jar")
    rec = PodRecord(uid="u1", installed={"biz1": old},
                    pending={"biz1": PendingOp(arklet.CMD_UNINSTALL_BIZ, old, 0.0)})
    [cs] = compute_status(pod(), rec, b, True)["containerStatuses"]
    assert cs["state"]["waiting"]["reason"] == "Replacing" and cs["image"] == "https://h/old.jar"
    rec = PodRecord(uid="u1", installed={"biz1": Module("biz1", "0.0.1", URL)})
    status = compute_status(pod(), rec, b, node_ready=False)
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "False"


def test_node_object() -> None:
    b = base()
    b.health = arklet.HealthReport("SUCCESS", "", memory_bytes=2048 * 1024 * 1024, cpu_count=8)
    node = vnode.build_node(b, vnode.NodeOptions(env="dev", env_taint=True, max_modules=5), "2026-01-01T00:00:00Z")
    assert node["metadata"]["name"] == "virtual-node-b1"
    assert node["metadata"]["labels"][keys.LABEL_BASE_CLUSTER_NAME] == "c"
    assert node["status"]["capacity"] == {"pods": "110", keys.RESOURCE_MODULE: "5", "memory": "2Gi", "cpu": "8"}
    assert {t["key"] for t in node["spec"]["taints"]} == {keys.TAINT_VIRTUAL_NODE, keys.TAINT_NODE_ENV}
    assert node["status"]["addresses"][0] == {"type": "InternalIP", "address": "10.0.0.9"}
    assert vnode.binary_quantity(1536 * 1024 * 1024) == "1536Mi"
    assert vnode.binary_quantity(1000) == "1000"


def test_lease_expiry() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    fresh = {"spec": {"renewTime": "2025-12-31T23:59:50.000000Z", "leaseDurationSeconds": 40}}
    stale = {"spec": {"renewTime": "2025-12-31T23:59:00.000000Z", "leaseDurationSeconds": 40}}
    assert not vnode.lease_expired(fresh, now) and vnode.lease_expired(stale, now)
    assert vnode.lease_expired({"spec": {}}, now)


@pytest.fixture
def provider() -> Provider:
    p = Provider(object(), BrokerOptions("127.0.0.1", 1), ProviderOptions(env="dev"))  # type: ignore[arg-type]
    p.pod_queue.add = lambda key: None  # type: ignore[method-assign]
    p.node_queue.add = lambda key: None  # type: ignore[method-assign]
    return p


def heart(ts: int, state: str = "activated", ip: str = "10.0.0.1") -> bytes:
    data = {"baseMetadata": {"identity": "b1", "name": "base", "version": "1", "clusterName": "c"},
            "localIP": ip, "localHostName": "h", "port": 0, "state": state}
    return arklet.encode_envelope(data, ts)


def op(ts: int, command: str, code: str = "SUCCESS") -> bytes:
    model = arklet.BizModel("biz1", "0.0.1", URL)
    return arklet.encode_envelope(arklet.biz_operation_data(command, model, code, biz_state="ACTIVATED"), ts)


def test_messages_are_ordered_by_the_base_clock(provider: Provider) -> None:
    t = "koupleless_dev/b1/base/"
    provider.on_mqtt(t + "heart", heart(1000))
    b = provider.bases["b1"]
    assert b.ready and b.ip == "10.0.0.1"
    provider.on_mqtt(t + "heart", heart(900, state="deactivated", ip="10.9.9.9"))  # older: ignored
    assert b.ready and b.ip == "10.0.0.1"
    provider.on_mqtt(t + "heart", heart(1000, state="deactivated"))  # replay: ignored
    assert b.ready

    # an uninstall reply overtaken by an older install reply: the older one changes nothing
    provider.on_mqtt(t + "bizOperation", op(2000, "uninstallBiz"))
    provider.on_mqtt(t + "bizOperation", op(1500, "installBiz"))
    assert "biz1:0.0.1" not in b.bizs
    provider.on_mqtt(t + "bizOperation", op(2500, "installBiz"))
    assert b.bizs["biz1:0.0.1"].state == arklet.ACTIVATED
    # a module list taken before that install does not erase it
    provider.on_mqtt(t + "simpleBiz", arklet.encode_envelope([], 2400))
    assert "biz1:0.0.1" in b.bizs and b.inventory_known
    provider.on_mqtt(t + "simpleBiz", arklet.encode_envelope([], 2600))
    assert "biz1:0.0.1" not in b.bizs

    provider.on_mqtt(t + "heart", heart(3000, state="deactivated"))
    assert not b.ready and b.not_ready_reason == "BaseDeactivated"


def test_restarted_base_is_asked_again(provider: Provider) -> None:
    t = "koupleless_dev/b1/base/"
    provider.on_mqtt(t + "heart", heart(1000))
    b = provider.bases["b1"]
    provider.on_mqtt(t + "simpleBiz", arklet.encode_envelope([], 1100))
    assert b.inventory_known
    provider.on_mqtt(t + "queryBaseline", arklet.encode_envelope(b.heartbeat.metadata.to_wire(), 1200))  # type: ignore[union-attr]
    assert not b.inventory_known
