"""Issue 11, items 1, 2 and 6, against the real control plane: a module DaemonSet gets its Pods from
the real DaemonSet controller (its node term admitted, its template given the toleration), and
`kubectl set image` of the seed's Deployment prints the BIZ_VERSION warning; the README's replace
commands work as printed."""

from __future__ import annotations

import copy
import json
import re
import shlex
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from devcluster.cluster import ControlPlane
from koupleless import keys
from tests.e2e.extender.vnodes import VirtualNodes
from tests.helpers import wait_until
from tests.unit.webhook.samples import SEED_DAEMONSET, SEED_JAR

pytestmark = pytest.mark.controlplane

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "manifests" / "samples" / "module-deployment.yaml"
README = ROOT / "README.md"
NEW_JAR = SEED_JAR.replace("0.0.1-SNAPSHOT", "0.0.2-SNAPSHOT")
TERMS = ("affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution", "nodeSelectorTerms")


def get_json(cp: ControlPlane, namespace: str, *args: str) -> Any:
    return orjson.loads(cp.kubectl("get", "-n", namespace, *args, "-o", "json").stdout)


def apply(cp: ControlPlane, namespace: str, obj: dict[str, Any], check: bool = True) -> Any:
    return cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj), check=check)


def terms(spec: dict[str, Any]) -> Any:
    node: Any = spec
    for step in TERMS:
        node = node[step]
    return node


@pytest.fixture
def bases(vnodes: VirtualNodes) -> tuple[str, list[str], str]:
    """Two virtual Nodes of a base name of their own (other suites' Nodes never match it), and one
    of another version: (base name, matching Node names, the other Node's name)."""
    base = f"ds-base-{uuid.uuid4().hex[:6]}"
    matching = [f"virtual-node-{base}-{i}" for i in range(2)]
    other = f"virtual-node-{base}-old"
    vnodes.add_many(matching, base=base, version="1.1.1")
    vnodes.add(other, base=base, version="0.9.0")
    return base, matching, other


def seed_daemonset(base: str) -> dict[str, Any]:
    """The seed's Deployment template (affinity, toleration) as a DaemonSet, for bases named `base`."""
    ds = copy.deepcopy(SEED_DAEMONSET)
    del ds["metadata"]["namespace"]
    for expr in terms(ds["spec"]["template"]["spec"])[0]["matchExpressions"]:
        if expr["key"] == keys.LABEL_BASE_NAME:
            expr["values"] = [base]
    return ds


def daemonset_pods_by_node(cp: ControlPlane, namespace: str) -> dict[str, dict[str, Any]]:
    """The DaemonSet's Pods, by the node named in their matchFields term (as the DaemonSet
    controller reads them, whether or not they are bound yet)."""
    out = {}
    for pod in get_json(cp, namespace, "pods")["items"]:
        (term,) = terms(pod["spec"])
        out[term["matchFields"][0]["values"][0]] = pod
    return out


def wait_for_daemonset_pods(cp: ControlPlane, namespace: str, nodes: list[str]) -> dict[str, dict[str, Any]]:
    def created() -> dict[str, dict[str, Any]] | None:
        pods = daemonset_pods_by_node(cp, namespace)
        status = get_json(cp, namespace, "daemonset", "test-module-daemonset").get("status", {})
        # `kubectl get ds`: DESIRED and CURRENT
        counts = (status.get("desiredNumberScheduled"), status.get("currentNumberScheduled"))
        return pods if set(pods) >= set(nodes) and counts == (len(nodes), len(nodes)) else None

    return wait_until(created, timeout=60, what=f"DaemonSet Pods for {nodes}")


def failed_creates(cp: ControlPlane, namespace: str) -> list[str]:
    return [
        e["message"]
        for e in get_json(cp, namespace, "events")["items"]
        if e["reason"] == "FailedCreate" and e["involvedObject"]["kind"] == "DaemonSet"
    ]


def force_delete_pods(cp: ControlPlane, namespace: str) -> None:
    """The fake Nodes have no kubelet to confirm a bound Pod's deletion."""
    cp.kubectl("delete", "daemonset", "--all", "-n", namespace, "--wait=false", check=False)
    cp.kubectl("delete", "pods", "--all", "-n", namespace, "--force", "--grace-period=0", check=False)


def test_a_module_daemonset_like_the_seed_gets_one_pod_per_matching_base(
    control_plane: ControlPlane, webhook_namespace: str, bases: tuple[str, list[str], str]
) -> None:
    base, matching, other = bases
    try:
        proc = apply(control_plane, webhook_namespace, seed_daemonset(base))
        assert "created" in proc.stdout
        pods = wait_for_daemonset_pods(control_plane, webhook_namespace, matching)
        assert set(pods) == set(matching), f"a Pod for {other} (another base version)?"
        for node, pod in pods.items():
            # the DaemonSet controller's node term, untouched by the webhook
            assert terms(pod["spec"]) == [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
            ]
            assert keys.vnode_toleration() in pod["spec"]["tolerations"]
            assert pod["spec"]["containers"][0]["resources"]["requests"][keys.RESOURCE_MODULE] == "1"
            assert pod["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet"
        assert not failed_creates(control_plane, webhook_namespace)
    finally:
        force_delete_pods(control_plane, webhook_namespace)


def test_a_module_daemonset_without_the_toleration_gets_it_and_its_pods(
    control_plane: ControlPlane, webhook_namespace: str, bases: tuple[str, list[str], str]
) -> None:
    base, matching, _ = bases
    ds = seed_daemonset(base)
    spec = ds["spec"]["template"]["spec"]
    del spec["tolerations"]
    terms(spec)[0]["matchExpressions"] = [
        e for e in terms(spec)[0]["matchExpressions"] if e["key"] != keys.LABEL_BASE_STACK
    ]
    try:
        proc = apply(control_plane, webhook_namespace, ds)
        assert (
            "Warning: spec.template.spec.tolerations: added schedule.koupleless.io/virtual-node=True:NoExecute"
            in proc.stderr
        ), proc.stderr
        assert "matchExpressions: added base.koupleless.io/stack In [java]" in proc.stderr
        stored = get_json(control_plane, webhook_namespace, "daemonset", "test-module-daemonset")
        assert keys.vnode_toleration() in stored["spec"]["template"]["spec"]["tolerations"]
        wait_for_daemonset_pods(control_plane, webhook_namespace, matching)
        assert not failed_creates(control_plane, webhook_namespace)
    finally:
        force_delete_pods(control_plane, webhook_namespace)


def test_a_module_daemonset_that_selects_no_bases_is_refused(
    control_plane: ControlPlane, webhook_namespace: str
) -> None:
    ds = seed_daemonset("base")
    del ds["spec"]["template"]["spec"]["affinity"]
    proc = apply(control_plane, webhook_namespace, ds, check=False)
    assert proc.returncode != 0
    assert (
        'admission webhook "workloads.module-controller.koupleless.io" denied the request: '
        "spec.template.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution: "
        "no base name or version is required" in proc.stderr
    ), proc.stderr
    assert not get_json(control_plane, webhook_namespace, "daemonsets")["items"]


def readme_replace_commands() -> tuple[str, list[str], list[str], list[str]]:
    """The README's replace example: JAR=..., `kubectl set image`, `kubectl set env`, and the
    one-request `kubectl patch`, as argument lists with $JAR substituted."""
    text = README.read_text()
    jar = re.search(r"^JAR=(\S+)$", text, re.M)
    set_image = re.search(r"^(kubectl set image deployment/test-module-deployment biz1=\$JAR)\s+#", text, re.M)
    set_env = re.search(r"^(kubectl set env deployment/test-module-deployment -c biz1 BIZ_VERSION=\S+)\s+#", text, re.M)
    patch = re.search(r"`(kubectl patch deployment test-module-deployment -p\s+'[^`]+')`", text)
    assert jar and set_image and set_env and patch, "the README's replace example moved"
    url = jar.group(1)

    def args(command: str) -> list[str]:
        return shlex.split(command.replace("$JAR", url))[1:]

    return url, args(set_image.group(1)), args(set_env.group(1)), args(" ".join(patch.group(1).split("\n")))


def test_kubectl_set_image_on_the_sample_warns_and_the_readmes_commands_replace_the_module(
    control_plane: ControlPlane, webhook_namespace: str
) -> None:
    jar, set_image, set_env, patch = readme_replace_commands()
    assert jar == NEW_JAR
    sample = yaml.safe_load(SAMPLE.read_text())
    del sample["metadata"]["namespace"]
    apply(control_plane, webhook_namespace, sample)
    ns = ["-n", webhook_namespace]

    # the one-request form, as a server-side dry run: both change, nothing to warn about
    proc = control_plane.kubectl(*patch, *ns, "--dry-run=server", "-o", "json")
    patched = orjson.loads(proc.stdout)["spec"]["template"]["spec"]["containers"][0]
    assert patched["image"] == NEW_JAR
    assert {"name": "BIZ_VERSION", "value": "0.0.2-SNAPSHOT"} in patched["env"]
    assert "BIZ_VERSION" not in proc.stderr, proc.stderr

    proc = control_plane.kubectl(*set_image, *ns)
    assert (
        "Warning: spec.template.spec.containers[0].env: BIZ_VERSION 0.0.1-SNAPSHOT differs from the version in the "
        "jar name 0.0.2-SNAPSHOT, so its Pods would show VersionMismatch — change both: kubectl set env "
        "deployment/test-module-deployment -c biz1 BIZ_VERSION=0.0.2-SNAPSHOT"
    ) in proc.stderr, proc.stderr
    proc = control_plane.kubectl(*set_env, *ns)
    assert "BIZ_VERSION" not in proc.stderr, proc.stderr
    stored = get_json(control_plane, webhook_namespace, "deployment", "test-module-deployment")
    container = stored["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == NEW_JAR
    assert {"name": "BIZ_VERSION", "value": "0.0.2-SNAPSHOT"} in container["env"]

    def newest_pod_version() -> str | None:
        for rs in get_json(control_plane, webhook_namespace, "replicasets")["items"]:
            if rs["metadata"]["annotations"].get("deployment.kubernetes.io/revision") == "3":
                env = rs["spec"]["template"]["spec"]["containers"][0]["env"]
                return str(next(e["value"] for e in env if e["name"] == "BIZ_VERSION"))
        return None

    # the Deployment's newest ReplicaSet makes Pods of the new jar with its version
    assert wait_until(newest_pod_version, what="revision 3's ReplicaSet") == "0.0.2-SNAPSHOT"
