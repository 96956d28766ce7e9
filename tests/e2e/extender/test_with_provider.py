"""The acceptance flow end to end with real bases: provider + simulated bases (arklet over MQTT),
the real kube-scheduler and the extender. Seven modules on three bases of two slots each."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster.broker import Broker
from devcluster.cluster import ControlPlane
from tests.e2e.extender.conftest import RunningExtender, apply, module_pod
from tests.e2e.extender.test_scheduling import pods_by_name, wait_for_reason
from tests.e2e.provider.conftest import System
from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane


@pytest.fixture
def bases(control_plane: ControlPlane, mqtt_broker: Broker, tmp_path: Path) -> Iterator[System]:
    system = System(control_plane, mqtt_broker, tmp_path)
    try:
        system.start_provider("--max-modules", "2")
        yield system
    finally:
        system.stop()


def test_six_modules_run_and_the_seventh_waits_for_capacity(
    control_plane: ControlPlane, extender: RunningExtender, bases: System, namespace: str
) -> None:
    base = f"base-{namespace}"
    bases.start_sim(count=3, name=base, version="1.1.1")
    nodes = [n["metadata"]["name"] for n in bases.wait_nodes_ready(3)]
    apply(control_plane, *(module_pod(f"m{i}", namespace, biz=f"biz{i}", base=base) for i in range(7)))

    def six_running() -> dict[str, dict] | None:
        pods = pods_by_name(control_plane, namespace)
        running = [p for p in pods.values() if p.get("status", {}).get("phase") == "Running"]
        return pods if len(running) == 6 else None

    pods = wait_until(six_running, timeout=120, what="6 of 7 module Pods Running on the bases")
    assert Counter(p["spec"]["nodeName"] for p in pods.values() if p["spec"].get("nodeName")) == \
        {name: 2 for name in nodes}
    (pending,) = [name for name, p in pods.items() if p["status"].get("phase") != "Running"]
    assert pods[pending]["status"]["phase"] == "Pending" and not pods[pending]["spec"].get("nodeName")
    wait_for_reason(control_plane, namespace, pending, "base at module capacity")
