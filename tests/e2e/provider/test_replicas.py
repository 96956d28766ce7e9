"""Two provider replicas: each base's Lease has one holder, and only the holder acts on it; when the
holder dies, the standby takes the expired Leases over and module flows keep working, with no
module installed twice."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest

from koupleless import keys
from tests.e2e.provider.conftest import System
from tests.e2e.provider.modules import URL_V2, pods, running_ready, sample_deployment
from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane

LEASE_S = "8"  # under the devcluster's 20 s node-monitor grace period, as the flag's help asks


def lease_holders(system: System) -> dict[str, str]:
    leases = system.kubectl_json("get", "leases", "-n", "kube-node-lease", "-l", f"{keys.LABEL_VNODE_ENV}={system.env}")
    return {item["metadata"]["name"]: item["spec"].get("holderIdentity", "") for item in leases["items"]}


def bare_module_pod(namespace: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "biz2-after-takeover", "namespace": namespace,
                     "labels": {keys.LABEL_COMPONENT: "module"}},
        "spec": {
            "nodeName": node,
            "tolerations": [keys.vnode_toleration()],
            "containers": [{"name": "biz2", "image": URL_V2.replace("biz1", "biz2"),
                            "env": [{"name": "BIZ_VERSION", "value": "0.0.2-SNAPSHOT"}]}],
        },
    }


def test_standby_takes_over_from_a_killed_holder_without_double_installs(system: System, namespace: str) -> None:
    replicas = {}
    for name in ("provider-a", "provider-b"):
        replicas[f"{system.env}-{name}"] = system.start_provider("--lease-duration", LEASE_S, name=name)
    sim = system.start_sim(count=3)
    system.wait_nodes_ready(3)

    def held() -> dict[str, str] | None:
        h = lease_holders(system)
        return h if len(h) == 3 and set(h.values()) <= set(replicas) else None

    holders = wait_until(held, 30, what="a holder among the replicas for each of 3 Leases")

    system.cp.kubectl("apply", "-f", "-", input=sample_deployment(namespace))
    [first] = wait_until(lambda: [p for p in pods(system, namespace) if running_ready(p)], 90, what="module Running")
    node = first["spec"]["nodeName"]
    victim = holders[node]
    [survivor] = set(replicas) - {victim}
    proc = replicas[victim]
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)

    wait_until(lambda: set(lease_holders(system).values()) == {survivor}, 60, what=f"{survivor} holding every Lease")
    assert "took over Lease" in replicas[survivor].log_path.read_text()

    # A module Pod for a base the dead replica held is installed by the survivor.
    system.cp.kubectl("apply", "-f", "-", input=json.dumps(bare_module_pod(namespace, node)))
    wait_until(lambda: running_ready(system.kubectl_json("get", "pod", "-n", namespace, "biz2-after-takeover")),
               60, what="biz2 Pod Running after the takeover")
    base_id = node[len("virtual-node-"):]
    assert sorted(m["name"] for m in sim.modules(base_id)) == ["biz1", "biz2"]

    # The first module stayed where it was, installed once; nothing anywhere was installed twice.
    [still] = [p for p in pods(system, namespace) if p["metadata"]["name"] == first["metadata"]["name"]]
    assert still["metadata"]["uid"] == first["metadata"]["uid"] and running_ready(still)
    bases = sim.bases()
    assert sum(b["installs"] for b in bases.values()) == 2
    assert sum(len(b["modules"]) for b in bases.values()) == 2
    assert all(b["uninstalls"] == 0 for b in bases.values())
