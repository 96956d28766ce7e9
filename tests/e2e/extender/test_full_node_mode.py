"""Full-Node mode: kube-scheduler sends whole Node objects and the extender needs no kubeconfig."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devcluster.cluster import ControlPlane
from extender.config import extender_entry, module_profile
from extender.state import ANNOTATION_NODE_MODULES
from koupleless.kube import node_path
from tests.e2e.extender.conftest import RunningExtender, apply, get_json, module_pod, start_extender
from tests.e2e.extender.test_scheduling import pods_by_name, wait_for_reason
from tests.e2e.extender.vnodes import VirtualNodes
from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane


@pytest.fixture(scope="module")
def full_node_extender(control_plane: ControlPlane) -> Iterator[RunningExtender]:
    running = start_extender(control_plane, "--no-kube", name="extender-full-node")
    control_plane.start_scheduler(
        extenders=[extender_entry(running.url, node_cache_capable=False, bind=False)],
        extra_profiles=[module_profile()],
    )
    try:
        yield running
    finally:
        control_plane.start_scheduler()
        running.process.stop()


def test_without_a_kubeconfig_modules_are_placed_and_explained(
    control_plane: ControlPlane, full_node_extender: RunningExtender, vnodes: VirtualNodes, namespace: str
) -> None:
    assert "serving full-Node requests only" not in full_node_extender.log()  # --no-kube: chosen, not a fallback
    base = f"base-{namespace}"
    vnodes.add(f"virtual-node-{namespace}-old", base=base, version="1.0.0")
    apply(control_plane, module_pod("m1", namespace, biz="biz1", base=base))
    wait_for_reason(control_plane, namespace, "m1", "base version not in [1.1.1]")

    vnodes.add(f"virtual-node-{namespace}-new", base=base, version="1.1.1")
    node = wait_until(lambda: pods_by_name(control_plane, namespace)["m1"]["spec"].get("nodeName"),
                      timeout=60, what="m1 scheduled")
    assert node == f"virtual-node-{namespace}-new"
    metrics = full_node_extender.metrics()
    assert 'koupleless_extender_requests_total{outcome="ok",verb="filter"}' in metrics


def test_provider_annotation_is_the_module_count_without_a_pod_watch(
    control_plane: ControlPlane, full_node_extender: RunningExtender, vnodes: VirtualNodes, namespace: str
) -> None:
    base = f"base-{namespace}"
    name = f"virtual-node-{namespace}-0"
    vnodes.add(name, base=base, max_modules=2)
    patch = {"metadata": {"annotations": {ANNOTATION_NODE_MODULES: "biz7,biz8"}}}
    vnodes.run(vnodes.client.patch(node_path(name), patch, "merge"))
    assert get_json(control_plane, "node", name)["metadata"]["annotations"][ANNOTATION_NODE_MODULES] == "biz7,biz8"
    apply(control_plane, module_pod("m2", namespace, biz="biz2", base=base))
    wait_for_reason(control_plane, namespace, "m2", "base at module capacity")
    assert pods_by_name(control_plane, namespace)["m2"]["spec"].get("nodeName") is None
