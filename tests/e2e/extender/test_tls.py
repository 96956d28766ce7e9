"""The extender over HTTPS, as kube-scheduler verifies it: certificate from our CA, caData in the entry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from certs import pki
from devcluster.cluster import ControlPlane
from extender.config import extender_entry, module_profile
from tests.e2e.extender.conftest import RunningExtender, apply, module_pod, start_extender
from tests.e2e.extender.test_scheduling import pods_by_name
from tests.e2e.extender.vnodes import VirtualNodes
from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane


@pytest.fixture(scope="module")
def tls_extender(control_plane: ControlPlane) -> Iterator[RunningExtender]:
    ca = pki.new_ca("extender-e2e-ca", days=1)
    serving = pki.issue(ca, "extender", dns_names=["localhost"], ips=["127.0.0.1"], days=1)
    cert, key = control_plane.workdir / "extender-tls.crt", control_plane.workdir / "extender-tls.key"
    serving.write(cert, key)
    running = start_extender(control_plane, "--tls-cert-file", str(cert), "--tls-private-key-file", str(key),
                             name="extender-tls", ready_scheme="https", ca=ca)
    url = f"https://127.0.0.1:{running.port}"
    control_plane.start_scheduler(extenders=[extender_entry(url, ca_pem=ca.cert_pem)],
                                  extra_profiles=[module_profile()])
    try:
        yield running
    finally:
        control_plane.start_scheduler()
        running.process.stop()


def test_scheduler_verifies_the_extender_certificate_and_places_the_module(
    control_plane: ControlPlane, tls_extender: RunningExtender, vnodes: VirtualNodes, namespace: str
) -> None:
    base = f"base-{namespace}"
    vnodes.add(f"virtual-node-{namespace}-0", base=base)
    apply(control_plane, module_pod("m", namespace, biz="biz1", base=base))
    node = wait_until(lambda: pods_by_name(control_plane, namespace)["m"]["spec"].get("nodeName"),
                      timeout=60, what="the module Pod scheduled through the HTTPS extender")
    assert node == f"virtual-node-{namespace}-0"
    assert "bind" in tls_extender.metrics()
