"""manifests/scheduler as a cluster gets it: the real API server accepts every object, and what
makes two replicas safe (leader election, its Lease RBAC, a PodDisruptionBudget) is in it."""

from __future__ import annotations

import pytest
import yaml

from devcluster.cluster import ControlPlane
from tests.e2e.extender.conftest import MANIFESTS

pytestmark = pytest.mark.controlplane


def test_the_scheduler_manifests_are_accepted_and_run_two_electing_replicas(control_plane: ControlPlane) -> None:
    ns = control_plane.kubectl("create", "namespace", "module-controller", "--dry-run=client", "-o", "yaml").stdout
    control_plane.kubectl("apply", "-f", "-", input=ns)
    applied = control_plane.kubectl("apply", "-k", str(MANIFESTS), "--dry-run=server")
    docs = {(d["kind"], d["metadata"]["name"]): d
            for d in yaml.safe_load_all(control_plane.kubectl("kustomize", str(MANIFESTS)).stdout)}
    assert applied.stdout.count("(server dry run)") == len(docs), applied.stdout

    deployment = docs[("Deployment", "module-controller-extender")]
    assert deployment["spec"]["replicas"] == 2
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "--leader-elect" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pdb = docs[("PodDisruptionBudget", "module-controller-extender")]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]

    # The Lease permissions hold in the extender's namespace only.
    sa = "system:serviceaccount:module-controller:module-controller-extender"

    def can(verb: str, *where: str) -> bool:
        out = control_plane.kubectl("auth", "can-i", verb, "leases.coordination.k8s.io/module-controller-extender",
                                    "--as", sa, *where, check=False)
        return out.stdout.strip() == "yes"

    control_plane.kubectl("apply", "-f", str(MANIFESTS / "serviceaccount.yaml"), "-f", str(MANIFESTS / "rbac.yaml"))
    assert can("update", "-n", "module-controller") and can("get", "-n", "module-controller")
    assert not can("update", "-n", "kube-system") and not can("delete", "-n", "module-controller")
