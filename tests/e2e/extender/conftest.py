"""The extender as a user runs it (`module-controller extender` subprocess), registered in the real
kube-scheduler with the module profile; virtual Nodes made through the API."""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from devcluster.cluster import ControlPlane
from devcluster.processes import ManagedProcess, free_port
from extender.config import MODULE_SCHEDULER_NAME, extender_entry, module_profile
from koupleless import keys
from tests.e2e.extender.vnodes import VirtualNodes
from tests.unit.extender.samples import SEED_JAR

CLI = [sys.executable, "-m", "koupleless"]


def _http_ok(port: int, path: str) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
        return resp.status == 200


class RunningExtender:
    def __init__(self, process: ManagedProcess, port: int) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as resp:
            return resp.read().decode()

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace")


def start_extender(cp: ControlPlane, *extra: str, name: str = "extender") -> RunningExtender:
    port = free_port()
    args = [*CLI, "extender", "--kubeconfig", str(cp.kubeconfig), "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "debug", *extra]
    proc = ManagedProcess(name, args, cp.workdir / "logs" / f"{name}-{port}.log").start()
    proc.wait_ready(lambda: _http_ok(port, "/readyz"), timeout=60)
    return RunningExtender(proc, port)


@pytest.fixture(scope="module")
def extender(control_plane: ControlPlane) -> Iterator[RunningExtender]:
    """One extender (spread) registered with the session's kube-scheduler for this module's tests;
    the default scheduler comes back afterwards, for everyone else."""
    running = start_extender(control_plane)
    control_plane.start_scheduler(extenders=[extender_entry(running.url)], extra_profiles=[module_profile()])
    try:
        yield running
    finally:
        control_plane.start_scheduler()
        running.process.stop()


@pytest.fixture
def vnodes(control_plane: ControlPlane) -> Iterator[VirtualNodes]:
    nodes = VirtualNodes(control_plane.kubeconfig)
    try:
        yield nodes
    finally:
        nodes.close()


def module_pod(name: str, namespace: str, *, biz: str, base: str, versions: tuple[str, ...] = ("1.1.1",),
               labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A module Pod as the webhook leaves it: the seed's shape, plus the module resource and the
    module scheduler's name (the webhook is not part of this test)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {keys.LABEL_COMPONENT: keys.COMPONENT_MODULE, **(labels or {})}},
        "spec": module_pod_spec(biz=biz, base=base, versions=versions),
    }


def module_pod_spec(*, biz: str, base: str, versions: tuple[str, ...] = ("1.1.1",)) -> dict[str, Any]:
    one = {keys.RESOURCE_MODULE: "1"}
    return {
        "schedulerName": MODULE_SCHEDULER_NAME,
        "containers": [{
            "name": biz,
            "image": SEED_JAR,
            "env": [{"name": keys.ENV_BIZ_VERSION, "value": "0.0.1-SNAPSHOT"}],
            "resources": {"requests": dict(one), "limits": dict(one)},
        }],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [
                {"key": keys.LABEL_BASE_STACK, "operator": "In", "values": ["java"]},
                {"key": keys.LABEL_BASE_VERSION, "operator": "In", "values": list(versions)},
                {"key": keys.LABEL_BASE_NAME, "operator": "In", "values": [base]},
            ]}
        ]}}},
        "tolerations": [keys.vnode_toleration()],
    }


def apply(cp: ControlPlane, *objects: dict[str, Any]) -> None:
    cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))


def get_json(cp: ControlPlane, *args: str) -> Any:
    return json.loads(cp.kubectl("get", *args, "-o", "json").stdout)
