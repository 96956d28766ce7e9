"""The real kube-scheduler calling the extender: what a user sees with kubectl."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import pytest

from devcluster.cluster import ControlPlane
from tests.e2e.extender.conftest import RunningExtender, apply, get_json, module_pod, module_pod_spec
from tests.e2e.extender.vnodes import VirtualNodes
from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane


def pods_by_name(cp: ControlPlane, namespace: str) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in get_json(cp, "pods", "-n", namespace)["items"]}


def failed_scheduling(cp: ControlPlane, namespace: str, pod: str) -> list[str]:
    events = get_json(cp, "events", "-n", namespace, "--field-selector", f"involvedObject.name={pod}")["items"]
    return [e["message"] for e in events if e["reason"] == "FailedScheduling"]


def wait_for_reason(cp: ControlPlane, namespace: str, pod: str, reason: str) -> str:
    pattern = re.compile(r"0/\d+ nodes are available: .*\b\d+ " + re.escape(reason))
    seen: list[str] = []

    def matching() -> str | None:
        seen[:] = failed_scheduling(cp, namespace, pod)
        return next((m for m in seen if pattern.search(m)), None)

    try:
        return wait_until(matching, timeout=60, what=f"FailedScheduling for {pod} naming {reason!r}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; its FailedScheduling messages: {seen or 'none'}") from None


def test_pending_module_explains_the_version_then_lands_when_a_matching_base_appears(
    control_plane: ControlPlane, extender: RunningExtender, vnodes: VirtualNodes, namespace: str
) -> None:
    base = f"base-{namespace}"
    vnodes.add(f"virtual-node-{namespace}-old", base=base, version="1.0.0")
    apply(control_plane, module_pod("biz1-pod", namespace, biz="biz1", base=base, versions=("1.1.1",)))

    message = wait_for_reason(control_plane, namespace, "biz1-pod", "base version not in [1.1.1]")
    assert len(message.encode()) < 1024
    described = control_plane.kubectl("describe", "pod", "biz1-pod", "-n", namespace).stdout
    assert "FailedScheduling" in described and "base version not in [1.1.1]" in described
    assert pods_by_name(control_plane, namespace)["biz1-pod"]["spec"].get("nodeName") is None

    vnodes.add(f"virtual-node-{namespace}-new", base=base, version="1.1.1")
    node = wait_until(
        lambda: pods_by_name(control_plane, namespace)["biz1-pod"]["spec"].get("nodeName"),
        timeout=60, what="the module Pod to be scheduled on the new base",
    )
    assert node == f"virtual-node-{namespace}-new"
    events = get_json(control_plane, "events", "-n", namespace, "--field-selector", "involvedObject.name=biz1-pod")
    assert any(e["reason"] == "Scheduled" and node in e["message"] for e in events["items"])


def test_module_capacity_is_never_overbooked_in_a_burst(
    control_plane: ControlPlane, extender: RunningExtender, vnodes: VirtualNodes, namespace: str
) -> None:
    base = f"base-{namespace}"
    names = [f"virtual-node-{namespace}-{i}" for i in range(3)]
    vnodes.add_many(names, base=base, max_modules=2)
    # Seven modules at once, in one request: the scheduler handles them back to back.
    apply(control_plane, *(module_pod(f"m{i}", namespace, biz=f"biz{i}", base=base) for i in range(7)))

    def six_placed() -> dict[str, dict[str, Any]] | None:
        pods = pods_by_name(control_plane, namespace)
        placed = [p for p in pods.values() if p["spec"].get("nodeName")]
        return pods if len(placed) == 6 else None

    pods = wait_until(six_placed, timeout=90, what="6 of 7 module Pods scheduled")
    per_base = Counter(p["spec"]["nodeName"] for p in pods.values() if p["spec"].get("nodeName"))
    assert per_base == {name: 2 for name in names}
    (pending,) = [name for name, p in pods.items() if not p["spec"].get("nodeName")]
    wait_for_reason(control_plane, namespace, pending, "base at module capacity")
    condition = next(c for c in pods_by_name(control_plane, namespace)[pending]["status"]["conditions"]
                     if c["type"] == "PodScheduled")
    assert condition["status"] == "False" and "base at module capacity" in condition["message"]


def test_replicas_of_one_module_never_share_a_base(
    control_plane: ControlPlane, extender: RunningExtender, vnodes: VirtualNodes, namespace: str
) -> None:
    base = f"base-{namespace}"
    names = [f"virtual-node-{namespace}-{i}" for i in range(3)]
    vnodes.add_many(names, base=base, max_modules=5)
    labels = {"app": "biz1-deployment"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "biz1", "namespace": namespace},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": {**module_pod("x", namespace, biz="biz1", base=base)["metadata"]["labels"],
                                                 **labels}},
                         "spec": module_pod_spec(biz="biz1", base=base)},
        },
    }
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(deployment))

    def placed(count: int) -> list[str] | None:
        nodes = [p["spec"]["nodeName"] for p in pods_by_name(control_plane, namespace).values()
                 if p["spec"].get("nodeName")]
        return nodes if len(nodes) == count else None

    nodes = wait_until(lambda: placed(3), timeout=90, what="3 replicas scheduled")
    assert sorted(nodes) == sorted(names), "3 replicas, 3 bases"

    control_plane.kubectl("scale", "deployment/biz1", "--replicas=4", "-n", namespace)
    pending = wait_until(
        lambda: next((n for n, p in pods_by_name(control_plane, namespace).items() if not p["spec"].get("nodeName")),
                     None),
        timeout=60, what="the 4th replica",
    )
    wait_for_reason(control_plane, namespace, pending, "base already has module biz1")
    assert len(placed(3) or []) == 3


def test_spread_puts_three_modules_on_three_bases(
    control_plane: ControlPlane, extender: RunningExtender, vnodes: VirtualNodes, namespace: str
) -> None:
    base = f"base-{namespace}"
    names = [f"virtual-node-{namespace}-{i}" for i in range(3)]
    vnodes.add_many(names, base=base, max_modules=10)
    apply(control_plane, *(module_pod(f"m{i}", namespace, biz=f"biz{i}", base=base) for i in range(3)))

    def placed() -> list[str] | None:
        nodes = [p["spec"].get("nodeName") for p in pods_by_name(control_plane, namespace).values()]
        return nodes if len(nodes) == 3 and all(nodes) else None

    nodes = wait_until(placed, timeout=90, what="3 module Pods scheduled")
    assert sorted(nodes) == sorted(names)


def test_a_module_asking_more_memory_than_any_base_has_shows_kube_schedulers_own_reason(
    control_plane: ControlPlane, extender: RunningExtender, vnodes: VirtualNodes, namespace: str
) -> None:
    """kube-scheduler's NodeResourcesFit filter runs before extenders and drops those bases first,
    so the reason is its own `Insufficient memory`, as the README says (the extender's
    `base memory below ... requested` shows only in a profile without that filter)."""
    base = f"base-{namespace}"
    vnodes.add_many([f"virtual-node-{namespace}-{i}" for i in range(3)], base=base, memory="4Gi")
    pod = module_pod("big", namespace, biz="biz1", base=base)
    pod["spec"]["containers"][0]["resources"]["requests"]["memory"] = "64Gi"
    apply(control_plane, pod)
    # (Nodes other tests of the session left behind may add reasons of their own.)
    expected = re.compile(r"0/\d+ nodes are available: (.+, )?3 Insufficient memory[,.]")
    message = wait_until(lambda: next((m for m in failed_scheduling(control_plane, namespace, "big")
                                       if expected.match(m)), None),
                         timeout=60, what=f"FailedScheduling for big: {expected.pattern}")
    assert "base memory below" not in message
    described = control_plane.kubectl("describe", "pod", "big", "-n", namespace).stdout
    assert "3 Insufficient memory" in described
    assert not pods_by_name(control_plane, namespace)["big"]["spec"].get("nodeName")


def test_malformed_extender_args_get_a_clear_error_and_serving_goes_on(
    control_plane: ControlPlane, extender: RunningExtender, vnodes: VirtualNodes, namespace: str
) -> None:
    def post(body: bytes) -> tuple[int, Any]:
        req = urllib.request.Request(extender.url + "/filter", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, out = post(b'{"Pod": {"metadata": {}}, "NodeNames": "virtual-node-x"}')
    assert status == 200
    assert out["Error"] == ("malformed filter request: NodeNames: is a str, not a list — send a list of Node names")
    assert out["NodeNames"] is None and out["Nodes"] is None
    assert 'koupleless_extender_requests_total{outcome="bad_request",verb="filter"}' in extender.metrics()
    assert "bad filter request" in extender.log()

    # Still serving the scheduler: a module Pod is placed after the garbage.
    base = f"base-{namespace}"
    vnodes.add(f"virtual-node-{namespace}-0", base=base)
    apply(control_plane, module_pod("after", namespace, biz="biz1", base=base))
    wait_until(lambda: pods_by_name(control_plane, namespace)["after"]["spec"].get("nodeName"),
               timeout=60, what="a module Pod scheduled after the malformed request")
    assert extender.process.running()
