"""Two extender replicas as manifests/scheduler runs them: both report ready, one leads and labels
its Pod, and the Service (played by a proxy that selects Pods by the manifest's labels) sends
kube-scheduler to it. When the leader dies, the standby takes the Lease, moves the label to its own
Pod, and module Pods keep being scheduled through the real kube-scheduler.

The replicas are processes on loopback; two real Pod objects stand for them in the API (nobody
schedules them; only their labels matter) and each process is told its Pod's name as the Deployment
tells it, through POD_NAME and POD_NAMESPACE."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devcluster.cluster import ControlPlane
from devcluster.processes import ManagedProcess, free_port
from koupleless import keys
from koupleless.kube import ApiError, KubeClient, load_config
from koupleless.kube.leaderelection import LeaderElectionConfig, LeaderElector
from tests.e2e.extender.conftest import (
    CLI,
    MANIFESTS,
    apply,
    get_json,
    manifest_kubeconfig,
    manifest_scheduler_config,
    module_pod,
)
from tests.e2e.extender.label_proxy import LabelProxy
from tests.e2e.extender.vnodes import VirtualNodes
from tests.helpers import async_wait_until, forbidden_lines, wait_until

pytestmark = pytest.mark.controlplane

LEASE_NAMESPACE = "module-controller"
LEASE_NAME = "module-controller-extender"  # the manifest's default, the one name its Role allows
LEASE_DURATION = 4.0
ELECTION_FLAGS = ("--leader-elect", "--leader-lease-duration", str(LEASE_DURATION),
                  "--leader-renew-deadline", "3", "--leader-retry-period", "0.5")


def status_of(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


class Replica:
    def __init__(self, cp: ControlPlane, kubeconfig: Path, identity: str, pod_name: str) -> None:
        self.identity = identity
        self.pod_name = pod_name
        self.port = free_port()
        args = [*CLI, "extender", "--kubeconfig", str(kubeconfig), "--host", "127.0.0.1", "--port", str(self.port),
                "--leader-elect-identity", identity, *ELECTION_FLAGS]
        env = {**os.environ, keys.ENV_POD_NAME: pod_name, keys.ENV_POD_NAMESPACE: LEASE_NAMESPACE}
        self.process = ManagedProcess(identity, args, cp.workdir / "logs" / f"{identity}-{self.port}.log",
                                      env=env).start()

    def wait_synced(self) -> None:
        self.process.wait_ready(lambda: "watch cache synced" in self.log(), timeout=60)

    def ready(self) -> bool:
        return status_of(self.port, "/readyz") == 200

    def kill(self) -> None:
        """SIGKILL: no chance to release the Lease, so the standby must wait for it to expire."""
        assert self.process.proc is not None
        os.killpg(self.process.proc.pid, signal.SIGKILL)
        self.process.proc.wait(10)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace")


def replica_pod(name: str) -> dict[str, Any]:
    """A Pod as the Deployment's template makes it; nobody schedules it (no such scheduler)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": LEASE_NAMESPACE,
                     "labels": {"app.kubernetes.io/name": "module-controller-extender"}},
        "spec": {
            "schedulerName": "nobody-schedules-these",
            "serviceAccountName": "module-controller-extender",
            "automountServiceAccountToken": False,
            "containers": [{"name": "extender", "image": "koupleless/module-controller:0.1.0"}],
        },
    }


def labelled_leaders(cp: ControlPlane) -> set[str]:
    """Names of the Pods carrying the leader label, as the Service's selector sees them."""
    out = get_json(cp, "pods", "-n", LEASE_NAMESPACE, "-l", f"{keys.LABEL_EXTENDER_ROLE}={keys.EXTENDER_ROLE_LEADER}")
    return {p["metadata"]["name"] for p in out["items"]}


def service_selector() -> dict[str, str]:
    return dict(yaml.safe_load((MANIFESTS / "service.yaml").read_text())["spec"]["selector"])


def lease(cp: ControlPlane) -> dict[str, object]:
    return dict(get_json(cp, "lease", LEASE_NAME, "-n", LEASE_NAMESPACE)["spec"])


def post_filter(port: int, pod: dict[str, Any], names: list[str]) -> dict[str, Any]:
    body = json.dumps({"Pod": pod, "Nodes": None, "NodeNames": names}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/filter", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return dict(json.loads(resp.read()))


def filter_calls(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith('koupleless_extender_requests_total{') and 'verb="filter"' in line and 'outcome="ok"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def replicas(control_plane: ControlPlane) -> Iterator[list[Replica]]:
    kubeconfig = manifest_kubeconfig(control_plane)  # also applies the manifest's RBAC, Role included
    control_plane.kubectl("delete", "lease", LEASE_NAME, "-n", LEASE_NAMESPACE, "--ignore-not-found")
    pod_names = [f"extender-failover-{i}" for i in range(2)]
    control_plane.kubectl("delete", "pod", *pod_names, "-n", LEASE_NAMESPACE, "--ignore-not-found", "--wait")
    apply(control_plane, *(replica_pod(name) for name in pod_names))
    started = [Replica(control_plane, kubeconfig, f"extender-{i}", pod_names[i]) for i in range(2)]
    try:
        yield started
    finally:
        control_plane.start_scheduler()
        for replica in started:
            replica.process.stop()
        control_plane.kubectl("delete", "pod", *pod_names, "-n", LEASE_NAMESPACE, "--ignore-not-found",
                              "--grace-period=0")
        for replica in started:
            log = replica.log()
            assert not forbidden_lines(log), f"{replica.identity} needed more than its manifest RBAC: {forbidden_lines(log)}"
        control_plane.kubectl("delete", "lease", LEASE_NAME, "-n", LEASE_NAMESPACE, "--ignore-not-found")


def scheduled_on(cp: ControlPlane, namespace: str, names: list[str]) -> dict[str, str] | None:
    pods = {p["metadata"]["name"]: p for p in get_json(cp, "pods", "-n", namespace)["items"]}
    nodes = {n: pods[n]["spec"].get("nodeName") for n in names if n in pods}
    return nodes if len(nodes) == len(names) and all(nodes.values()) else None


def test_the_standby_takes_over_when_the_leader_dies_and_modules_keep_being_scheduled(
    control_plane: ControlPlane, replicas: list[Replica], vnodes: VirtualNodes, namespace: str
) -> None:
    for replica in replicas:
        replica.wait_synced()
    by_pod = {r.pod_name: r for r in replicas}
    (leader_pod,) = wait_until(lambda: labelled_leaders(control_plane) or None, timeout=30,
                               what="the leader to label its Pod")
    leader = by_pod[leader_pod]
    (standby,) = [r for r in replicas if r is not leader]
    assert lease(control_plane)["holderIdentity"] == leader.identity
    # Both Ready (a Deployment shows 2/2, rollouts and drains go on as usual); the label decides.
    assert leader.ready() and standby.ready()
    assert status_of(standby.port, "/healthz") == 200
    transitions_before = int(lease(control_plane).get("leaseTransitions") or 0)  # type: ignore[call-overload]

    proxy = LabelProxy(control_plane.kubeconfig, LEASE_NAMESPACE, service_selector(),
                       {r.pod_name: r.port for r in replicas})
    try:
        extenders, profiles = manifest_scheduler_config(proxy.url)
        control_plane.start_scheduler(extenders=extenders, extra_profiles=profiles)
        base = f"base-{namespace}"
        vnodes.add_many([f"virtual-node-{namespace}-{i}" for i in range(3)], base=base, max_modules=2)

        apply(control_plane, module_pod("before", namespace, biz="before", base=base))
        wait_until(lambda: scheduled_on(control_plane, namespace, ["before"]), timeout=60,
                   what="a module Pod scheduled through the leader")
        assert filter_calls(leader.metrics()) >= 1
        assert filter_calls(standby.metrics()) == 0
        # A call that reaches the standby anyway is answered from its own (warm) cache.
        nodes = [f"virtual-node-{namespace}-{i}" for i in range(3)]
        probe = module_pod("probe", namespace, biz="before", base=base)
        probe["metadata"]["uid"] = "probe-uid"
        answer = post_filter(standby.port, probe, nodes)
        assert answer["Error"] == ""
        held = scheduled_on(control_plane, namespace, ["before"])
        assert held is not None
        assert answer["FailedAndUnresolvableNodes"] == {held["before"]: "base already has module before"}
        assert sorted(answer["NodeNames"]) == sorted(n for n in nodes if n != held["before"])
        standby_calls = filter_calls(standby.metrics())

        leader.kill()  # its Pod keeps the label: a killed process removes nothing
        assert labelled_leaders(control_plane) == {leader.pod_name}
        # The new leader labels its own Pod and takes the label off the dead leader's.
        wait_until(lambda: labelled_leaders(control_plane) == {standby.pod_name}, timeout=LEASE_DURATION * 3,
                   what="the label to move to the new leader's Pod")
        spec = lease(control_plane)
        assert spec["holderIdentity"] == standby.identity
        assert int(spec["leaseTransitions"]) == transitions_before + 1  # type: ignore[call-overload]
        assert f"taking it over from {leader.identity}" in standby.log()

        after = [f"after-{i}" for i in range(4)]
        apply(control_plane, *(module_pod(n, namespace, biz=n, base=base) for n in after))
        placed = wait_until(lambda: scheduled_on(control_plane, namespace, after), timeout=90,
                            what="module Pods created after the failover to be scheduled")
        assert filter_calls(standby.metrics()) >= standby_calls + len(after)
        # The new leader counted what the old one bound: no base above its 2 modules.
        everything = scheduled_on(control_plane, namespace, ["before", *after])
        assert everything is not None and set(placed.items()) <= set(everything.items())
        per_base: dict[str, int] = {}
        for node in everything.values():
            per_base[node] = per_base.get(node, 0) + 1
        assert max(per_base.values()) <= 2
        assert proxy.routed and proxy.routed[-1] == standby.port

        # A leader that is stopped (SIGTERM, as on a rollout or drain) takes its label off.
        standby.process.stop()
        assert standby.process.proc is not None and standby.process.proc.returncode == 0
        assert labelled_leaders(control_plane) == set()
    finally:
        proxy.close()


# --- the elector itself, against the real API server ----------------------------------------------

def _config(namespace: str, identity: str, lease_duration: float = 30.0) -> LeaderElectionConfig:
    return LeaderElectionConfig(namespace=namespace, name="election-test", identity=identity,
                                lease_duration=lease_duration, renew_deadline=2.0, retry_period=0.3)


async def test_racing_replicas_elect_exactly_one_leader(control_plane: ControlPlane, namespace: str) -> None:
    client = KubeClient(load_config(str(control_plane.kubeconfig)))
    electors = [LeaderElector(client, _config(namespace, f"r{i}")) for i in range(5)]
    try:
        results = await asyncio.gather(*(e.try_acquire_or_renew() for e in electors), return_exceptions=True)
        winners = [e for e, won in zip(electors, results, strict=True) if won is True]
        losers = [r for r in results if r is not True]
        assert len(winners) == 1
        # The others either saw the winner's Lease or lost the write race (409): never both win.
        assert all(r is False or (isinstance(r, ApiError) and r.status == 409) for r in losers)
        spec = (await client.get(f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/election-test"))["spec"]
        assert spec["holderIdentity"] == winners[0].config.identity
    finally:
        await client.close()


async def test_a_leader_that_stops_hands_over_without_waiting_out_the_lease(
    control_plane: ControlPlane, namespace: str
) -> None:
    client = KubeClient(load_config(str(control_plane.kubeconfig)))
    first = LeaderElector(client, _config(namespace, "first"))
    second = LeaderElector(client, _config(namespace, "second"))
    try:
        first.start()
        await async_wait_until(lambda: _true(first.is_leader), timeout=10, what="the first elector to lead")
        second.start()
        await async_wait_until(lambda: _true(second.holder == "first"), timeout=10, what="the second to see it")
        assert not second.is_leader
        await first.stop()  # releases the 30 s Lease
        assert not first.is_leader
        # Well inside the 30 s lease duration: only a released Lease allows that.
        await async_wait_until(lambda: _true(second.is_leader), timeout=10, what="the second elector to lead")
    finally:
        await first.stop()
        await second.stop()
        await client.close()


async def _true(value: bool) -> bool:
    return value
