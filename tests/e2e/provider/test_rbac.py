"""The provider runs with the ServiceAccount and RBAC of manifests/provider and nothing more."""

from __future__ import annotations

import pytest

from tests.e2e.provider.conftest import System, manifest_rbac_kubeconfig
from tests.e2e.provider.modules import pods, running_ready, sample_deployment
from tests.helpers import forbidden_lines, wait_until

pytestmark = pytest.mark.controlplane



def test_provider_works_with_exactly_the_manifest_rbac(system: System, namespace: str) -> None:
    cp = system.cp
    kubeconfig = manifest_rbac_kubeconfig(cp)

    system.start_provider("--kubeconfig", str(kubeconfig))
    sim = system.start_sim(count=2)
    system.wait_nodes_ready(2)
    cp.kubectl("apply", "-f", "-", input=sample_deployment(namespace))
    wait_until(lambda: [p for p in pods(system, namespace) if running_ready(p)], 60, what="module Pod Ready")
    [pod] = pods(system, namespace)
    assert "Installed" in cp.kubectl("describe", "pod", pod["metadata"]["name"], "-n", namespace).stdout
    cp.kubectl("delete", "deployment/test-module-deployment", "-n", namespace)
    wait_until(lambda: pods(system, namespace) == [], 60, what="Pod finally deleted by the provider")
    assert all(b["modules"] == [] for b in sim.bases().values())
    assert system.provider is not None
    log = (system.workdir / "provider.log").read_text()
    assert not forbidden_lines(log), f"the provider asked for something RBAC does not grant: {forbidden_lines(log)}"
