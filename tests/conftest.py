"""Session fixtures: the real control plane and the real broker, started once per test run."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devcluster.broker import Broker
from devcluster.cluster import ControlPlane
from devcluster.processes import log_tail
from tests.e2e.extender.vnodes import VirtualNodes


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    item.stash[_STARTED] = time.time()
    return (yield)


_STARTED = pytest.StashKey[float]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[pytest.TestReport]:
    """A failed e2e test's report carries the tails of the component logs written while it ran
    (kube-scheduler, the extender, the provider...): a failure seen once in CI can be explained
    from its output, the control plane's workdir being gone by then."""
    report: pytest.TestReport = yield
    plane = getattr(item, "funcargs", {}).get("control_plane")
    if report.when == "call" and report.failed and isinstance(plane, ControlPlane):
        started = item.stash.get(_STARTED, 0.0)
        logs = sorted((plane.workdir / "logs").glob("*.log"), key=lambda p: p.stat().st_mtime)
        for path in logs:
            if path.stat().st_mtime >= started:
                report.sections.append((f"log {path.name} (last lines)", log_tail(path, lines=40)))
    return report


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    with ControlPlane(keep_workdir=bool(os.environ.get("KOUPLELESS_KEEP_WORKDIR"))) as plane:
        yield plane


@pytest.fixture(scope="session")
def mqtt_broker() -> Iterator[Broker]:
    with Broker() as broker:
        yield broker


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", name)
    control_plane.wait_for_service_account(name)
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            control_plane.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture
def vnodes(control_plane: ControlPlane) -> Iterator[VirtualNodes]:
    """Virtual Nodes made by the test itself (no provider), removed afterwards."""
    nodes = VirtualNodes(control_plane.kubeconfig)
    try:
        yield nodes
    finally:
        nodes.close()
