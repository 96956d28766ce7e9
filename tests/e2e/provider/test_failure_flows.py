"""When things go wrong: a base dies or restarts empty, an install fails, a base of the right version
does not exist yet, the provider restarts, and bases send garbage."""

from __future__ import annotations

import re
import urllib.request
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from koupleless import arklet, arklet_base_payloads, keys
from tests.e2e.provider.conftest import System
from tests.e2e.provider.modules import base_of, describe, pods, running_ready, sample_deployment
from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane

DEPLOY = "deployment/test-module-deployment"


def live_ready(system: System, ns: str, count: int) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]] | None:
        items = [p for p in pods(system, ns) if not p["metadata"].get("deletionTimestamp")]
        return items if len(items) == count and all(running_ready(p) for p in items) else None

    return wait_until(check, 120, what=f"{count} Running+Ready module Pods")


def test_killed_base_modules_move_and_restarted_base_gets_them_back(system: System, namespace: str) -> None:
    system.start_provider()
    sim = system.start_sim(count=3)
    system.wait_nodes_ready(3)
    system.cp.kubectl("apply", "-f", "-", input=sample_deployment(namespace))
    system.cp.kubectl("scale", DEPLOY, "-n", namespace, "--replicas=2")
    before = live_ready(system, namespace, 2)

    # a base restarted empty (same identity, no modules) gets its module back, same Pod
    restarted = base_of(before[0])
    uid = before[0]["metadata"]["uid"]
    sim.restart(restarted)

    def reinstalled() -> dict[str, Any] | None:
        items = [p for p in pods(system, namespace) if p["metadata"]["uid"] == uid]
        ok = items and running_ready(items[0]) and items[0]["status"]["containerStatuses"][0]["restartCount"] == 1
        return items[0] if ok else None

    wait_until(reinstalled, 60, what="module reinstalled on the restarted base")
    assert [m["state"] for m in sim.modules(restarted)] == ["ACTIVATED"]
    assert "ModuleLost" in describe(system, namespace, "pod", before[0]["metadata"]["name"])

    # a killed base: NotReady, its module evicted and re-created on a surviving base
    victim = base_of(before[1])
    sim.kill(victim)
    wait_until(
        lambda: any(t["key"] == keys.TAINT_NOT_READY for t in
                    system.kubectl_json("get", "node", keys.vnode_name(victim))["spec"].get("taints", [])),
        60, what="victim Node tainted not-ready",
    )

    def moved() -> list[dict[str, Any]] | None:
        items = pods(system, namespace)
        ok = len(items) == 2 and all(running_ready(p) and base_of(p) != victim for p in items)
        return items if ok else None

    after = wait_until(moved, 120, what="module Pods re-created on surviving bases")
    for p in after:
        assert [m["state"] for m in sim.modules(base_of(p))] == ["ACTIVATED"]


def test_install_failure_is_visible(system: System, namespace: str) -> None:
    system.start_provider()
    system.start_sim("--fail-biz", "biz1", count=1)
    system.wait_nodes_ready(1)
    system.cp.kubectl("apply", "-f", "-", input=sample_deployment(namespace))

    def failed() -> dict[str, Any] | None:
        items = pods(system, namespace)
        if len(items) != 1:
            return None
        waiting = items[0]["status"].get("containerStatuses", [{}])[0].get("state", {}).get("waiting", {})
        return items[0] if waiting.get("reason") == "InstallFailed" else None

    pod = wait_until(failed, 60, what="container waiting with InstallFailed")
    cs = pod["status"]["containerStatuses"][0]
    assert "simulated failure" in cs["state"]["waiting"]["message"]
    assert not cs["ready"]
    assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "False"
    text = describe(system, namespace, "pod", pod["metadata"]["name"])
    assert re.search(r"Warning\s+InstallFailed", text) and "simulated failure" in text


DAEMONSET = """
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: biz1-everywhere
  namespace: {ns}
spec:
  selector:
    matchLabels: {{app: biz1-everywhere}}
  template:
    metadata:
      labels:
        app: biz1-everywhere
        module-controller.koupleless.io/component: module
    spec:
      containers:
      - name: biz1
        image: https://example.com/modules/biz1-0.0.1-ark-biz.jar
        env: [{{name: BIZ_VERSION, value: 0.0.1}}]
      affinity:
        nodeAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            nodeSelectorTerms:
            - matchExpressions:
              - {{key: base.koupleless.io/name, operator: In, values: [base]}}
              - {{key: base.koupleless.io/version, operator: In, values: [1.1.1]}}
              - {{key: virtual-kubelet.koupleless.io/env, operator: In, values: [{env}]}}
      tolerations:
      - {{key: schedule.koupleless.io/virtual-node, operator: Equal, value: "True", effect: NoExecute}}
"""


def test_daemonset_puts_one_copy_on_each_base(system: System, namespace: str) -> None:
    system.start_provider()
    sim = system.start_sim(count=3)
    system.wait_nodes_ready(3)
    system.cp.kubectl("apply", "-f", "-", input=DAEMONSET.format(ns=namespace, env=system.env))
    items = live_ready(system, namespace, 3)
    assert sorted(base_of(p) for p in items) == sorted(sim.bases())
    for b in sim.bases().values():
        assert [(m["name"], m["state"]) for m in b["modules"]] == [("biz1", "ACTIVATED")]


def test_module_for_a_newer_base_waits_for_it(system: System, namespace: str) -> None:
    system.start_provider()
    system.start_sim(count=2)
    system.wait_nodes_ready(2)
    manifest = sample_deployment(namespace).replace("- 1.1.1", "- 2.0.0")
    system.cp.kubectl("apply", "-f", "-", input=manifest)

    def pending_unschedulable() -> dict[str, Any] | None:
        items = pods(system, namespace)
        if len(items) != 1 or items[0]["status"].get("phase") != "Pending":
            return None
        cond = {c["type"]: c for c in items[0]["status"].get("conditions", [])}.get("PodScheduled", {})
        return items[0] if cond.get("reason") == "Unschedulable" else None

    pending = wait_until(pending_unschedulable, 60, what="module Pod Pending, Unschedulable")
    assert not pending["spec"].get("nodeName")

    sim2 = system.start_sim(count=1, version="2.0.0")
    [pod] = live_ready(system, namespace, 1)
    assert base_of(pod) in sim2.bases()
    assert [m["name"] for m in sim2.modules(base_of(pod))] == ["biz1"]


def _metric(port: int, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (not labels or labels in line) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_provider_restart_reinstalls_nothing(system: System, namespace: str) -> None:
    system.start_provider()
    sim = system.start_sim(count=2)
    system.wait_nodes_ready(2)
    system.cp.kubectl("apply", "-f", "-", input=sample_deployment(namespace))
    system.cp.kubectl("scale", DEPLOY, "-n", namespace, "--replicas=2")
    before = live_ready(system, namespace, 2)
    installs = {b: v["installs"] for b, v in sim.bases().items()}

    assert system.provider is not None
    system.provider.stop()
    system.start_provider(name="provider")  # same identity: holds its Leases straight away
    # the new provider reconciles: both bases reported, Pods still Ready, nothing installed again
    wait_until(lambda: _metric(system.provider_port, "koupleless_provider_mqtt_handled_total",
                               'kind="base/simpleBiz"') >= 2, 30, what="inventories reconciled")
    after = live_ready(system, namespace, 2)
    assert {p["metadata"]["uid"] for p in after} == {p["metadata"]["uid"] for p in before}
    assert {b: v["installs"] for b, v in sim.bases().items()} == installs
    assert all(p["status"]["containerStatuses"][0]["restartCount"] == 0 for p in after)


def test_bad_mqtt_input_is_counted_and_changes_nothing(system: System, namespace: str) -> None:
    system.start_provider()
    sim = system.start_sim(count=1)
    system.wait_nodes_ready(1)
    system.cp.kubectl("apply", "-f", "-", input=sample_deployment(namespace))
    [pod] = live_ready(system, namespace, 1)
    [base_id] = sim.bases()
    port = system.provider_port

    # let the steady state settle: no write pending
    wait_until(lambda: _metric(port, "koupleless_workqueue_depth") == 0, 30)
    writes_before = _metric(port, "koupleless_provider_api_writes_total", 'what="pod')
    node_writes_before = _metric(port, "koupleless_provider_api_writes_total", 'what="node')
    rejected_before = _metric(port, "koupleless_provider_mqtt_rejected_total")

    env = system.env
    heart = arklet.topic(env, base_id, arklet.HEART)
    good = {"baseMetadata": {"identity": base_id, "name": "base", "version": "1.1.1", "clusterName": "base"},
            "localIP": "10.0.0.1", "localHostName": "x", "port": 0, "state": "activated"}
    imposter = dict(good, baseMetadata=dict(good["baseMetadata"], identity="someone-else"))
    replayed_install = arklet_base_payloads.biz_operation_data(
        arklet.CMD_INSTALL_BIZ, arklet.BizModel("biz1", "0.0.1-SNAPSHOT", "u"), "FAILED", "replayed")
    bad: list[tuple[str, bytes]] = [
        (heart, b"not json at all"),
        (heart, b'{"publishTimestamp": "noon", "data": {}}'),
        (heart, arklet.encode_envelope({"baseMetadata": "flat"})),
        (heart, b"{" + b" " * (1024 * 1024) + b"}"),
        (heart, arklet.encode_envelope(imposter)),
        (heart, arklet.encode_envelope(dict(good, state="deactivated"), publish_ts_ms=1)),  # out of order
        (arklet.topic(env, base_id, "base/whatever"), arklet.encode_envelope({})),
        (f"koupleless_{env}/{base_id}", b"{}"),
        (arklet.topic(env, base_id, arklet.SIMPLE_BIZ), arklet.encode_envelope({"not": "a list"})),
        (arklet.topic(env, base_id, arklet.SIMPLE_BIZ), arklet.encode_envelope([], publish_ts_ms=2)),
        (arklet.topic(env, base_id, arklet.BIZ_OPERATION), arklet.encode_envelope(replayed_install, 3)),
        (arklet.topic(env, base_id, arklet.BASE_HEALTH), arklet.encode_envelope({"code": 5})),
        (arklet.topic(env, "unknown-base", arklet.SIMPLE_BIZ), arklet.encode_envelope([])),
    ]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{env}-garbage", protocol=mqtt.MQTTv5)
    system.broker.login_as_fleet(client)  # a client that may publish anything: the worst the provider can get
    client.connect(system.broker.host, system.broker.port)
    client.loop_start()
    try:
        for topic, payload in bad:
            client.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()

    wait_until(lambda: _metric(port, "koupleless_provider_mqtt_rejected_total") >= rejected_before + len(bad) - 1,
               30, what="every bad message counted")
    assert system.provider is not None and system.provider.running()
    # the base keeps heartbeating and its Pod stays as it was; nothing was written because of the garbage
    wait_until(lambda: _metric(port, "koupleless_provider_mqtt_handled_total", 'kind="base/heart"') > 0, 10)
    assert _metric(port, "koupleless_provider_api_writes_total", 'what="pod') == writes_before
    assert _metric(port, "koupleless_provider_api_writes_total", 'what="node') == node_writes_before
    [after] = pods(system, namespace)
    assert running_ready(after) and after["status"] == pod["status"]
    assert [m["state"] for m in sim.modules(base_id)] == ["ACTIVATED"]


@pytest.mark.parametrize("policy", ["report", "uninstall"])
def test_orphan_module_is_reported_and_removed_only_when_asked(system: System, policy: str) -> None:
    system.start_provider("--orphan-policy", policy)
    sim = system.start_sim(count=1)
    system.wait_nodes_ready(1)
    [base_id] = sim.bases()
    # somebody installs a module on the base behind Kubernetes' back
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{system.env}-ops", protocol=mqtt.MQTTv5)
    system.broker.login_as_fleet(client)  # an operator's tool, allowed to command any base
    client.connect(system.broker.host, system.broker.port)
    client.loop_start()
    try:
        model = arklet.BizModel("sidecar", "9.9", "https://example.com/sidecar-9.9-ark-biz.jar")
        client.publish(arklet.topic(system.env, base_id, arklet.CMD_INSTALL_BIZ), arklet.encode_command(model),
                       qos=1).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()
    node = keys.vnode_name(base_id)
    wait_until(lambda: "OrphanModule" in system.cp.kubectl("describe", "node", node).stdout, 30,
               what="OrphanModule event on the Node")
    text = system.cp.kubectl("describe", "node", node).stdout
    assert "sidecar:9.9" in text and "--orphan-policy=uninstall" in text
    assert _metric(system.provider_port, "koupleless_provider_orphan_modules_total") >= 1
    if policy == "report":
        assert [m["name"] for m in sim.modules(base_id)] == ["sidecar"]
    else:
        wait_until(lambda: sim.modules(base_id) == [], 30, what="orphan uninstalled")
