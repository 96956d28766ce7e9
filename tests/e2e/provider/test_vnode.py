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


def test_status_command_lists_bases_and_modules(system: System, namespace: str) -> None:
    import subprocess
    import sys

    from tests.e2e.provider.modules import pods, running_ready, sample_deployment

    system.start_provider()
    sim = system.start_sim(count=2)
    system.wait_nodes_ready(2)
    system.cp.kubectl("apply", "-f", "-", input=sample_deployment(namespace))
    wait_until(lambda: [p for p in pods(system, namespace) if running_ready(p)], 60, what="module Ready")
    [pod] = pods(system, namespace)

    out = subprocess.run(
        [sys.executable, "-m", "koupleless", "status", "--kubeconfig", str(system.cp.kubeconfig), "--env", system.env],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    lines = out.splitlines()
    assert lines[0].split() == ["NODE", "BASE", "VERSION", "IP", "READY", "MODULES", "MEMORY"]
    holder = pod["spec"]["nodeName"]
    for base_id, base in sim.bases().items():
        row = next(line for line in lines if line.startswith(keys.vnode_name(base_id)))
        used = "1/10" if keys.vnode_name(base_id) == holder else "0/10"
        assert row.split() == [keys.vnode_name(base_id), "base", "1.1.1", base["ip"], "True", used, "4Gi"]
    module_line = next(line for line in lines if "biz1:0.0.1-SNAPSHOT" in line)
    assert "running" in module_line and "Ready" in module_line and pod["metadata"]["name"] in module_line


def test_deactivated_base_goes_not_ready_soon_and_long_gone_node_is_deleted(system: System) -> None:
    # heartbeats every 1 s, 30 missed before NotReady: a DEACTIVATED heartbeat followed by two seconds
    # of silence need not wait for that (a forged one followed by heartbeats: test_admission.py)
    system.start_provider("--missed-heartbeats", "30", "--gone-after", "8")
    sim = system.start_sim("--goodbye", count=2)  # arklet sends no goodbye; this base does
    system.wait_nodes_ready(2)
    leaving = sorted(sim.bases())[0]
    name = keys.vnode_name(leaving)
    sim.shutdown(leaving)

    def deactivated() -> dict | None:
        node = system.kubectl_json("get", "node", name)
        cond = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
        return cond if cond["status"] == "False" else None

    cond = wait_until(deactivated, 10, what="NotReady soon after the DEACTIVATED heartbeat")
    assert cond["reason"] == "BaseDeactivated"
    # gone for longer than --gone-after: the Node (and its Lease) are deleted; the other base stays
    wait_until(lambda: name not in {n["metadata"]["name"] for n in system.nodes()}, 30, what="Node deleted")
    assert [n["metadata"]["name"] for n in system.nodes()] == [keys.vnode_name(sorted(sim.bases())[1])]
    leases = system.cp.kubectl("get", "leases", "-n", "kube-node-lease", "-o", "name").stdout
    assert name not in leases
