"""manifests/scheduler as a cluster gets it: the real API server accepts every object, and what
makes two replicas safe (leader election, a Service that selects the leader's label, RBAC for the
Lease and the label, a PodDisruptionBudget) is in it."""

from __future__ import annotations

import pytest
import yaml

from devcluster.cluster import ControlPlane
from koupleless import keys
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
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container["env"]}
    assert env[keys.ENV_POD_NAME] == "metadata.name" and env[keys.ENV_POD_NAMESPACE] == "metadata.namespace"
    # Every replica is Ready once synced, so a rollout may stop one old replica at a time.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 1
    service = docs[("Service", "module-controller-extender")]
    assert service["spec"]["selector"] == {**deployment["spec"]["selector"]["matchLabels"],
                                           keys.LABEL_EXTENDER_ROLE: keys.EXTENDER_ROLE_LEADER}
    pdb = docs[("PodDisruptionBudget", "module-controller-extender")]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]

    # The Lease and Pod-label permissions hold in the extender's namespace only.
    sa = "system:serviceaccount:module-controller:module-controller-extender"

    def can(verb: str, what: str, *where: str) -> bool:
        out = control_plane.kubectl("auth", "can-i", verb, what, "--as", sa, *where, check=False)
        return out.stdout.strip() == "yes"

    lease = "leases.coordination.k8s.io/module-controller-extender"
    control_plane.kubectl("apply", "-f", str(MANIFESTS / "serviceaccount.yaml"), "-f", str(MANIFESTS / "rbac.yaml"))
    assert can("update", lease, "-n", "module-controller") and can("get", lease, "-n", "module-controller")
    assert not can("update", lease, "-n", "kube-system") and not can("delete", lease, "-n", "module-controller")
    assert can("patch", "pods", "-n", "module-controller")
    assert not can("patch", "pods", "-n", "kube-system") and not can("patch", "pods", "--all-namespaces")
    assert not can("delete", "pods", "-n", "module-controller")
