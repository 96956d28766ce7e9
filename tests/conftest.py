"""Session fixtures: the real control plane and the real broker, started once per test run."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest

from devcluster.broker import Broker
from devcluster.cluster import ControlPlane
from tests.e2e.extender.vnodes import VirtualNodes


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
