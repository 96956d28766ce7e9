"""The seed's flows, at the kubectl level and on the bases: release, query, scale, replace, roll back,
take offline."""

from __future__ import annotations

import json
from typing import Any

import pytest

from koupleless import keys
from tests.e2e.provider.conftest import System
from tests.e2e.provider.modules import (
    URL_V1,
    URL_V2,
    base_of,
    describe,
    pods,
    running_ready,
    sample_deployment,
    wait_live_ready,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane

DEPLOY = "deployment/test-module-deployment"


def test_release_query_scale_offline(system: System, namespace: str) -> None:
    system.start_provider()
    sim = system.start_sim(count=3)
    system.wait_nodes_ready(3)
    system.cp.kubectl("apply", "-f", "-", input=sample_deployment(namespace))

    [pod] = wait_live_ready(system, namespace, 1)
    base_id = base_of(pod)
    base = sim.bases()[base_id]
    assert pod["status"]["podIP"] == base["ip"] and pod["status"]["hostIP"] == base["ip"]
    cs = pod["status"]["containerStatuses"][0]
    assert cs["ready"] and cs["started"] and "running" in cs["state"] and cs["image"] == URL_V1
    assert [(m["name"], m["version"], m["url"], m["state"]) for m in base["modules"]] == [
        ("biz1", "0.0.1-SNAPSHOT", URL_V1, "ACTIVATED")
    ]
    # the seed's two ways of listing a base's modules
    name = pod["metadata"]["name"]
    by_ip = system.cp.kubectl("get", "pod", "-n", namespace, "--field-selector", f"status.podIP={base['ip']}").stdout
    by_node = system.cp.kubectl(
        "get", "pod", "-n", namespace, "--field-selector", f"spec.nodeName=virtual-node-{base_id}"
    ).stdout
    assert name in by_ip and name in by_node
    events = describe(system, namespace, "pod", name)
    assert "Installing" in events and "Installed" in events

    system.cp.kubectl("scale", "deployments/test-module-deployment", f"--namespace={namespace}", "--replicas=3")
    scaled = wait_live_ready(system, namespace, 3)
    assert sorted(base_of(p) for p in scaled) == sorted(sim.bases()), "one module per base"
    for b in sim.bases().values():
        assert [(m["name"], m["state"]) for m in b["modules"]] == [("biz1", "ACTIVATED")]

    system.cp.kubectl("delete", DEPLOY, "--namespace", namespace)
    wait_until(lambda: pods(system, namespace) == [], 60, what="module Pods gone")
    wait_until(lambda: all(b["modules"] == [] for b in sim.bases().values()), 30, what="modules uninstalled")
    assert all(b["uninstalls"] >= 1 for b in sim.bases().values())


def test_rolling_update_and_rollback(system: System, namespace: str) -> None:
    system.start_provider()
    sim = system.start_sim(count=3)
    system.wait_nodes_ready(3)
    system.cp.kubectl("apply", "-f", "-", input=sample_deployment(namespace))
    system.cp.kubectl("scale", DEPLOY, "-n", namespace, "--replicas=3")
    wait_live_ready(system, namespace, 3, URL_V1)

    container = {"name": "biz1", "image": URL_V2, "env": [{"name": "BIZ_VERSION", "value": "0.0.2-SNAPSHOT"}]}
    patch = json.dumps({"spec": {"template": {"spec": {"containers": [container]}}}})
    system.cp.kubectl("patch", DEPLOY, "-n", namespace, "-p", patch)
    system.cp.kubectl("rollout", "status", DEPLOY, "-n", namespace, "--timeout=120s", timeout=130)
    new = wait_live_ready(system, namespace, 3, URL_V2)
    wait_until(lambda: _versions_on(sim, new) == {"0.0.2-SNAPSHOT"}, 30, what="bases hold only 0.0.2")

    system.cp.kubectl("rollout", "undo", DEPLOY, "-n", namespace)
    system.cp.kubectl("rollout", "status", DEPLOY, "-n", namespace, "--timeout=120s", timeout=130)
    old = wait_live_ready(system, namespace, 3, URL_V1)
    wait_until(lambda: _versions_on(sim, old) == {"0.0.1-SNAPSHOT"}, 30, what="bases hold only 0.0.1 again")


def _versions_on(sim: Any, items: list[dict[str, Any]]) -> set[str]:
    """Versions of biz1 on the bases that hold these Pods, and on every other base."""
    bases = sim.bases()
    return {m["version"] for b in bases.values() for m in b["modules"] if m["state"] == "ACTIVATED"} | {
        m["version"] for p in items for m in bases[base_of(p)]["modules"]
    }


BARE_POD = """
apiVersion: v1
kind: Pod
metadata:
  name: bare-module
  namespace: {ns}
  labels:
    module-controller.koupleless.io/component: module
spec:
  containers:
  - name: biz1
    image: {url}
    env:
    - name: BIZ_VERSION
      value: 0.0.1-SNAPSHOT
  - name: biz2
    image: https://example.com/modules/biz2-1.0.0-ark-biz.jar
    env:
    - name: BIZ_VERSION
      value: 1.0.0
  affinity:
    nodeAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        nodeSelectorTerms:
        - matchExpressions:
          - key: base.koupleless.io/name
            operator: In
            values: [base]
          - key: base.koupleless.io/version
            operator: In
            values: [1.1.1]
  tolerations:
  - key: schedule.koupleless.io/virtual-node
    operator: Equal
    value: "True"
    effect: NoExecute
"""


def test_bare_pod_two_modules_replaced_in_place(system: System, namespace: str) -> None:
    system.start_provider()
    sim = system.start_sim(count=1)
    system.wait_nodes_ready(1)
    system.cp.kubectl("apply", "-f", "-", input=BARE_POD.format(ns=namespace, url=URL_V1))
    [pod] = wait_live_ready(system, namespace, 2 - 1)
    base_id = base_of(pod)
    assert [m["name"] for m in sim.modules(base_id)] == ["biz1", "biz2"], "installed in container order"
    uid = pod["metadata"]["uid"]

    new_url = "https://example.com/modules/biz1-patched-0.0.1-SNAPSHOT-ark-biz.jar"
    system.cp.kubectl("set", "image", "pod/bare-module", f"biz1={new_url}", "-n", namespace)

    def replaced() -> dict[str, Any] | None:
        [p] = pods(system, namespace)
        cs = {c["name"]: c for c in p["status"]["containerStatuses"]}
        ok = running_ready(p) and cs["biz1"]["image"] == new_url and cs["biz1"]["restartCount"] == 1
        return p if ok else None

    p = wait_until(replaced, 60, what="biz1 replaced in place")
    assert p["metadata"]["uid"] == uid, "same Pod, not a new one"
    assert {c["name"]: c["restartCount"] for c in p["status"]["containerStatuses"]}["biz2"] == 0
    assert {(m["name"], m["url"]) for m in sim.modules(base_id)} == {
        ("biz1", new_url), ("biz2", "https://example.com/modules/biz2-1.0.0-ark-biz.jar")
    }
    text = describe(system, namespace, "pod", "bare-module")
    assert "Replacing" in text and "Uninstalled" in text

    system.cp.kubectl("delete", "pod", "bare-module", "-n", namespace, "--wait=false")
    wait_until(lambda: pods(system, namespace) == [], 60, what="Pod gone after uninstall")
    assert sim.modules(base_id) == []


def test_node_name_selectors_and_keys(system: System) -> None:
    """A dotted base ID that --base-id-pattern accepts is the Node name as it is (IDs that are no DNS
    names are refused: tests/e2e/provider/test_admission.py)."""
    system.start_provider("--base-id-pattern", r"[a-z0-9.-]+")
    sim = system.start_sim(count=1, id_prefix=f"base-id.{system.env}.")
    [node] = system.wait_nodes_ready(1)
    [base_id] = sim.bases()
    assert node["metadata"]["name"] == keys.vnode_name(base_id) == f"virtual-node-base-id.{system.env}.0"
    assert node["metadata"]["annotations"][keys.ANNOTATION_BASE_ID] == base_id
