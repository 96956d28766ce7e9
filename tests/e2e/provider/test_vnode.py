"""Bases become virtual Nodes: labels, taints, address, capacity, Lease; NotReady when silent."""

from __future__ import annotations

import pytest

from koupleless import keys
from tests.e2e.provider.conftest import System, node_ready
from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane


def test_bases_become_ready_nodes_with_lease(system: System) -> None:
    system.start_provider()
    sim = system.start_sim(count=2)
    nodes = system.wait_nodes_ready(2)
    bases = sim.bases()
    by_name = {n["metadata"]["name"]: n for n in nodes}
    for base_id, base in bases.items():
        node = by_name[keys.vnode_name(base_id)]
        labels = node["metadata"]["labels"]
        assert labels[keys.LABEL_BASE_NAME] == "base"
        assert labels[keys.LABEL_BASE_VERSION] == "1.1.1"
        assert labels[keys.LABEL_BASE_STACK] == "java"
        assert labels[keys.LABEL_COMPONENT_LEGACY] == "vnode"
        assert labels["type"] == "virtual-kubelet"
        taints = {(t["key"], t.get("value"), t["effect"]) for t in node["spec"]["taints"]}
        assert (keys.TAINT_VIRTUAL_NODE, "True", "NoExecute") in taints
        assert not any(t[0] == keys.TAINT_NODE_ENV for t in taints)
        addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
        assert addresses["InternalIP"] == base["ip"]
        cap = node["status"]["capacity"]
        assert cap["pods"] == "110" and cap[keys.RESOURCE_MODULE] == "10"
        assert cap["memory"] == "4Gi" and cap["cpu"] == "4"
        lease = system.kubectl_json("get", "lease", "-n", "kube-node-lease", node["metadata"]["name"])
        assert lease["spec"]["holderIdentity"] == f"{system.env}-provider"
        assert lease["metadata"]["ownerReferences"][0]["name"] == node["metadata"]["name"]

    # the Lease keeps being renewed
    name = nodes[0]["metadata"]["name"]
    first = system.kubectl_json("get", "lease", "-n", "kube-node-lease", name)["spec"]["renewTime"]
    wait_until(
        lambda: system.kubectl_json("get", "lease", "-n", "kube-node-lease", name)["spec"]["renewTime"] != first,
        30, what="lease renewal",
    )


def test_silent_base_goes_not_ready_and_comes_back(system: System) -> None:
    system.start_provider()
    sim = system.start_sim(count=2)
    system.wait_nodes_ready(2)
    victim = sorted(sim.bases())[0]
    node_name = keys.vnode_name(victim)
    sim.kill(victim)

    def not_ready() -> dict | None:
        node = system.kubectl_json("get", "node", node_name)
        return node if node_ready(node) == "False" else None

    node = wait_until(not_ready, 30, what="NotReady after missed heartbeats")
    cond = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert cond["reason"] == "BaseHeartbeatMissed"
    assert victim in cond["message"]
    # the node lifecycle controller reacts to our Ready=False with its not-ready taint
    wait_until(
        lambda: any(t["key"] == keys.TAINT_NOT_READY for t in
                    system.kubectl_json("get", "node", node_name)["spec"].get("taints", [])),
        30, what="not-ready taint",
    )
    sim.restart(victim)
    wait_until(lambda: node_ready(system.kubectl_json("get", "node", node_name)) == "True", 30, what="Ready again")
