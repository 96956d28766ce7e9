"""Each part of the local control plane is real: controllers, scheduler, node lifecycle, broker."""

from __future__ import annotations

import datetime as dt
import json
import queue
import threading
import uuid

import orjson
import paho.mqtt.client as mqtt
import pytest

from devcluster.broker import PROVIDER_USER, Broker
from devcluster.cluster import ControlPlane
from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _get_json(cp: ControlPlane, *args: str) -> dict:
    return orjson.loads(cp.kubectl("get", *args, "-o", "json").stdout)


def test_deployment_creates_replicaset_and_pods(control_plane: ControlPlane, namespace: str) -> None:
    control_plane.kubectl("create", "deployment", "web", "--image=nginx", "--replicas=2", "-n", namespace)

    rs = wait_until(
        lambda: _get_json(control_plane, "replicasets", "-n", namespace)["items"], what="a ReplicaSet"
    )
    assert rs[0]["metadata"]["ownerReferences"][0]["name"] == "web"
    pods = wait_until(
        lambda: len(items := _get_json(control_plane, "pods", "-n", namespace)["items"]) == 2 and items,
        what="2 Pods",
    )
    assert {p["metadata"]["ownerReferences"][0]["kind"] for p in pods} == {"ReplicaSet"}


def test_unschedulable_pod_gets_failed_scheduling_event(control_plane: ControlPlane, namespace: str) -> None:
    # A selector no node can match: the scheduler must say so in an Event.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "lonely", "namespace": namespace},
        "spec": {"nodeSelector": {"no-such-label": "x"}, "containers": [{"name": "c", "image": "busybox"}]},
    }
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(pod))

    def failed_scheduling() -> str | None:
        events = _get_json(control_plane, "events", "-n", namespace)["items"]
        return next((e["message"] for e in events if e["reason"] == "FailedScheduling"), None)

    message = wait_until(failed_scheduling, what="FailedScheduling event")
    # "no nodes available to schedule pods" on an empty cluster, "0/N nodes are available: ..." otherwise.
    assert "nodes available" in message or "nodes are available" in message
    describe = control_plane.kubectl("describe", "pod", "lonely", "-n", namespace).stdout
    assert "FailedScheduling" in describe


def _node(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"smoke": "true"}}}


def _lease(name: str) -> dict:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": _now()},
    }


def _mark_ready(cp: ControlPlane, name: str) -> None:
    status = {
        "status": {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "SmokeTest",
                    "message": "set by the smoke test",
                    "lastHeartbeatTime": _now(),
                    "lastTransitionTime": _now(),
                }
            ],
            "capacity": {"pods": "10", "cpu": "1", "memory": "1Gi"},
            "allocatable": {"pods": "10", "cpu": "1", "memory": "1Gi"},
        }
    }
    cp.kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p", json.dumps(status))


def test_node_whose_lease_is_never_renewed_becomes_unreachable(control_plane: ControlPlane) -> None:
    suffix = uuid.uuid4().hex[:6]
    healthy, silent = f"smoke-healthy-{suffix}", f"smoke-silent-{suffix}"
    for name in (healthy, silent):
        control_plane.kubectl("apply", "-f", "-", input=json.dumps(_node(name)))
        control_plane.kubectl("apply", "-f", "-", input=json.dumps(_lease(name)))
        _mark_ready(control_plane, name)

    # One Node keeps its heartbeat: with no Ready Node at all the lifecycle controller would enter
    # "master disruption" mode and withhold the taint.
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(2):
            lease = _lease(healthy)
            control_plane.kubectl("apply", "-f", "-", input=json.dumps(lease), check=False)

    beater = threading.Thread(target=heartbeat, daemon=True)
    beater.start()
    try:

        def silent_state() -> tuple[str, list[str]] | None:
            node = _get_json(control_plane, "node", silent)
            ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
            taints = [t["key"] for t in node["spec"].get("taints", [])]
            return (ready["status"], taints) if ready["status"] == "Unknown" and taints else None

        status, taints = wait_until(silent_state, timeout=90, what="silent node Ready=Unknown and tainted")
        assert status == "Unknown"
        assert "node.kubernetes.io/unreachable" in taints

        healthy_node = _get_json(control_plane, "node", healthy)
        ready = next(c for c in healthy_node["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True"
        assert not [t for t in healthy_node["spec"].get("taints", []) if "unreachable" in t["key"]]
    finally:
        stop.set()
        beater.join(10)
        control_plane.kubectl("delete", "node", healthy, silent, "--wait=false", check=False)


def test_message_published_to_broker_is_received(mqtt_broker: Broker) -> None:
    base_id = uuid.uuid4().hex
    topic = f"koupleless_smoke/{base_id}/base/heart"
    mqtt_broker.add_bases([base_id])
    received: queue.Queue[bytes] = queue.Queue()
    subscribed = threading.Event()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    # The broker's shipped accounts: the provider reads every base's reports, the base writes its own.
    sub.username_pw_set(PROVIDER_USER, mqtt_broker.password(PROVIDER_USER))
    sub.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.on_message = lambda _c, _u, msg: received.put(msg.payload)
    sub.connect(mqtt_broker.host, mqtt_broker.port)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    try:
        assert subscribed.wait(10), "subscription not acknowledged by the broker"
        pub.username_pw_set(base_id, mqtt_broker.password(base_id))
        pub.connect(mqtt_broker.host, mqtt_broker.port)
        pub.loop_start()
        payload = orjson.dumps({"publishTimestamp": 1, "data": {"state": "ACTIVATED"}})
        pub.publish(topic, payload, qos=1).wait_for_publish(10)
        assert orjson.loads(received.get(timeout=10)) == {"publishTimestamp": 1, "data": {"state": "ACTIVATED"}}
    finally:
        pub.loop_stop()
        pub.disconnect()
        sub.loop_stop()
        sub.disconnect()
