"""Pure parts of the provider: Pod status from base reports, the Node object, and the per-base
ordering of MQTT messages (fed straight into the provider's handler; nothing talks to a cluster)."""

from __future__ import annotations

from typing import Any

from koupleless import arklet, arklet_base_payloads, keys
from koupleless.model import Module
from provider import vnode
from provider.podstatus import compute_status, status_changed
from provider.state import BaseState, BizRecord, Failure, PendingOp, PodRecord
from tests.unit.provider.rig import Rig

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
    rec = PodRecord(uid="u1", failed={"biz1": Failure("biz1:0.0.1", "disk full on base b1", 2, 0.0, 20.0)})
    status = compute_status(pod(), rec, base(), node_ready=True)
    assert status["phase"] == "Pending"
    [cs] = status["containerStatuses"]
    assert cs["state"] == {"waiting": {"reason": "InstallFailed",
                                       "message": "disk full on base b1 (2 tries; trying again 20s after the last)"}}
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
    # Node agents (kube-proxy, CNIs) select kubernetes.io/os=linux: a base is no Linux host, so they stay off.
    assert "kubernetes.io/os" not in node["metadata"]["labels"] and "kubernetes.io/arch" not in node["metadata"]["labels"]
    # No kubelet API: the base's own host name, and no kubelet port.
    assert node["status"]["addresses"] == [{"type": "InternalIP", "address": "10.0.0.9"},
                                           {"type": "Hostname", "address": "h"}]
    assert node["status"]["daemonEndpoints"] == {"kubeletEndpoint": {"Port": 0}}
    assert vnode.binary_quantity(1536 * 1024 * 1024) == "1536Mi"
    assert vnode.binary_quantity(1000) == "1000"


def test_node_points_kube_apiserver_at_the_providers_kubelet_api() -> None:
    """kube-apiserver's default --kubelet-preferred-address-types try Hostname first: that is the
    provider's kubelet API; InternalIP stays the base's IP (status.podIP=<baseIP>)."""
    opts = vnode.NodeOptions(kubelet_address="module-controller-provider.module-controller.svc", kubelet_port=10250)
    old = vnode.build_node(base(), vnode.NodeOptions(), "2026-01-01T00:00:00Z")["status"]
    status = vnode.node_status(base(), opts, old, "2026-01-01T00:00:10Z")
    assert status["addresses"] == [{"type": "InternalIP", "address": "10.0.0.9"},
                                   {"type": "Hostname", "address": "module-controller-provider.module-controller.svc"}]
    assert status["daemonEndpoints"] == {"kubeletEndpoint": {"Port": 10250}}
    assert vnode.node_status_changed(old, status)  # a Node from before is patched to point here
    moved = vnode.node_status(base(), vnode.NodeOptions(kubelet_address=opts.kubelet_address, kubelet_port=10251),
                              status, "2026-01-01T00:00:20Z")
    assert vnode.node_status_changed(status, moved)  # a new port alone is written too


def heart(ts: int, state: str = "activated", ip: str = "10.0.0.1") -> bytes:
    data = {"baseMetadata": {"identity": "b1", "name": "base", "version": "1", "clusterName": "c"},
            "localIP": ip, "localHostName": "h", "port": 0, "state": state}
    return arklet.encode_envelope(data, ts)


def op(ts: int, command: str, code: str = "SUCCESS") -> bytes:
    model = arklet.BizModel("biz1", "0.0.1", URL)
    return arklet.encode_envelope(arklet_base_payloads.biz_operation_data(command, model, code, biz_state="ACTIVATED"), ts)


T = "koupleless_dev/b1/base/"


def said_goodbye(registry: Any, b: BaseState) -> bool:
    """A DEACTIVATED heartbeat took effect: the Node stays Ready at once (anyone can send one), and
    goes NotReady "BaseDeactivated" only when no heartbeat follows for two intervals."""
    if not b.ready or b.goodbye_at is None:
        return False
    registry.judge(b.goodbye_at + 1.9 * registry.heartbeat_interval)
    if not b.ready:
        return False
    registry.judge(b.goodbye_at + 2.1 * registry.heartbeat_interval)
    return not b.ready and b.not_ready_reason == "BaseDeactivated"


def test_messages_are_ordered_by_the_base_clock() -> None:
    registry = Rig().registry
    registry.handle(T + "heart", heart(1000))
    b = registry.bases["b1"]
    assert b.ready and b.ip == "10.0.0.1"
    registry.handle(T + "heart", heart(900, state="deactivated", ip="10.9.9.9"))  # older: ignored
    assert b.ready and b.ip == "10.0.0.1"
    registry.handle(T + "heart", heart(1000, state="deactivated"))  # replay: ignored
    assert b.ready

    # an uninstall reply overtaken by an older install reply: the older one changes nothing
    b.pending[("uninstallBiz", "biz1:0.0.1")] = "ns/p"
    registry.handle(T + "bizOperation", op(2000, "uninstallBiz"))
    registry.handle(T + "bizOperation", op(1500, "installBiz"))
    assert "biz1:0.0.1" not in b.bizs
    registry.handle(T + "bizOperation", op(2500, "installBiz"))
    assert b.bizs["biz1:0.0.1"].state == arklet.ACTIVATED
    # a module list taken before that install does not erase it
    registry.handle(T + "simpleBiz", arklet.encode_envelope([], 2400))
    assert "biz1:0.0.1" in b.bizs and b.inventory_known
    registry.handle(T + "simpleBiz", arklet.encode_envelope([], 2600))
    assert "biz1:0.0.1" not in b.bizs

    registry.handle(T + "heart", heart(3000, state="deactivated"))
    assert said_goodbye(registry, b)


def test_restarted_base_is_asked_again() -> None:
    registry = Rig().registry
    registry.handle(T + "heart", heart(1000))
    b = registry.bases["b1"]
    registry.handle(T + "simpleBiz", arklet.encode_envelope([], 1100))
    assert b.inventory_known
    registry.handle(T + "queryBaseline", arklet.encode_envelope(b.heartbeat.metadata.to_wire(), 1200))  # type: ignore[union-attr]
    assert not b.inventory_known
    # its clock may have started again: older timestamps than before the restart are its new ones
    registry.handle(T + "heart", heart(500, state="deactivated"))
    assert said_goodbye(registry, b)


def test_a_message_from_the_future_is_refused_and_poisons_nothing() -> None:
    registry = Rig().registry
    now = arklet.now_ms()
    registry.handle(T + "heart", heart(now))
    b = registry.bases["b1"]
    registry.handle(T + "heart", heart(now + 3_600_000, state="deactivated"))  # an hour ahead
    assert b.ready
    registry.handle(T + "heart", heart(now + 1, state="deactivated"))  # the real next one still counts
    assert said_goodbye(registry, b)


def test_a_base_clock_stepping_back_starts_a_new_order() -> None:
    rig = Rig(heartbeat_interval=1)
    registry = rig.registry
    now = arklet.now_ms()
    registry.handle(T + "heart", heart(now))
    b = registry.bases["b1"]
    registry.handle(T + "heart", heart(1, state="deactivated"))  # a replay: ignored
    assert b.ready
    # NTP stepped its clock back 10 minutes: every heartbeat from now on is "old"
    registry.handle(T + "heart", heart(now - 600_000))
    assert b.stale_since is not None
    b.stale_since -= 3.5  # three and a half heartbeat intervals of nothing else
    registry.handle(T + "heart", heart(now - 590_000, ip="10.0.0.2"))
    assert b.ip == "10.0.0.2" and b.stale_since is None


def test_no_base_is_judged_while_the_provider_cannot_hear_the_broker() -> None:
    rig = Rig(heartbeat_interval=1, missed_heartbeats=3)
    rig.heartbeat()
    b = rig.base()
    b.last_heard -= 60  # silent for a minute: we were cut off ourselves
    rig.registry.connection_changed(False)
    assert rig.registry.judge() == [] and b.ready
    rig.registry.connection_changed(True)
    assert rig.registry.judge() == [] and b.ready  # the bases' first heartbeats are on their way
    rig.registry.hearing_since = (rig.registry.hearing_since or 0) - 1.5
    rig.registry.judge()
    assert b.ready  # judged from the reconnect on: 1.5 s of silence is not 3 missed heartbeats
    rig.registry.hearing_since = (rig.registry.hearing_since or 0) - 3
    rig.registry.judge()
    assert not b.ready and b.not_ready_reason == "BaseHeartbeatMissed"


def test_health_without_jvm_figures_asks_again_and_keeps_what_was_known() -> None:
    rig = Rig()
    rig.online()
    asked: list[str] = []
    rig.provider.health_incomplete = lambda base: asked.append(base.base_id)  # type: ignore[method-assign]
    full = arklet_base_payloads.health_data(2048, 8, 5.0)
    rig.say("b1", arklet.BASE_HEALTH, full)
    partial = arklet_base_payloads.health_data(2048, 8, 6.0)
    del partial["data"]["healthData"]["jvm"], partial["data"]["healthData"]["cpu"]
    rig.say("b1", arklet.BASE_HEALTH, partial)
    health = rig.base().health
    assert asked == ["b1"] and health is not None
    assert (health.memory_bytes, health.cpu_count) == (2048 * 1024 * 1024, 8)
