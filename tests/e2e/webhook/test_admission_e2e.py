"""Acceptance of issue 3 against the real control plane: what `kubectl apply` and `kubectl describe`
show a user releasing modules through the webhook."""

from __future__ import annotations

import copy
import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from devcluster.cluster import ControlPlane
from extender.config import MODULE_SCHEDULER_NAME
from koupleless import keys
from tests.e2e.webhook.conftest import EVICTION_SECONDS, RunningWebhook
from tests.helpers import wait_until
from tests.unit.webhook.samples import SEED_DEPLOYMENT, seed_pod, stripped

pytestmark = pytest.mark.controlplane

DENIED = re.compile(
    r'admission webhook "pods\.module-controller\.koupleless\.io" denied the request: '
    r"spec\.containers\[0\]\.env: BIZ_VERSION is required — the module version declared in pom\.xml, "
    r"e\.g\. 0\.0\.1-SNAPSHOT"
)
UNINFERABLE_JAR = "https://repo.example.com/modules/biz1.jar"
SAMPLE = Path(__file__).resolve().parents[3] / "manifests" / "samples" / "module-deployment.yaml"


def no_version(pod: dict[str, Any]) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    container = pod["spec"]["containers"][0]
    container["image"] = UNINFERABLE_JAR
    container.pop("env", None)
    return pod


def apply(cp: ControlPlane, namespace: str, obj: dict[str, Any], check: bool = True) -> Any:
    return cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj), check=check)


def get_json(cp: ControlPlane, namespace: str, *args: str) -> Any:
    return orjson.loads(cp.kubectl("get", "-n", namespace, *args, "-o", "json").stdout)


def deployment(template_pod: dict[str, Any], name: str = "test-module-deployment") -> dict[str, Any]:
    deploy = copy.deepcopy(SEED_DEPLOYMENT)
    deploy["metadata"] = {"name": name}
    template = {"metadata": template_pod["metadata"], "spec": template_pod["spec"]}
    template["metadata"].pop("name", None)
    deploy["spec"]["template"] = template
    return deploy


def first_pod(cp: ControlPlane, namespace: str) -> dict[str, Any]:
    return wait_until(lambda: (get_json(cp, namespace, "pods")["items"] or [None])[0], what="a Pod")


def test_bare_pod_without_version_is_refused_by_kubectl_apply(
    control_plane: ControlPlane, webhook_namespace: str
) -> None:
    proc = apply(control_plane, webhook_namespace, no_version(seed_pod()), check=False)
    assert proc.returncode != 0
    assert DENIED.search(proc.stderr), proc.stderr
    assert not get_json(control_plane, webhook_namespace, "pods")["items"]


def test_legacy_label_pod_is_refused_too(control_plane: ControlPlane, webhook_namespace: str) -> None:
    pod = no_version(seed_pod())
    pod["metadata"]["labels"] = {keys.LABEL_COMPONENT_LEGACY: "module"}
    proc = apply(control_plane, webhook_namespace, pod, check=False)
    assert proc.returncode != 0
    assert (
        'admission webhook "legacy-pods.module-controller.koupleless.io" denied the request: ' in proc.stderr
    )
    assert "spec.containers[0].env: BIZ_VERSION is required" in proc.stderr


def test_same_pod_in_a_deployment_shows_failed_create_on_the_replicaset(
    control_plane: ControlPlane, webhook_namespace: str
) -> None:
    proc = apply(control_plane, webhook_namespace, deployment(no_version(seed_pod())))
    assert proc.returncode == 0

    def failed_create() -> str | None:
        events = get_json(control_plane, webhook_namespace, "events")["items"]
        return next(
            (
                e["message"]
                for e in events
                if e["reason"] == "FailedCreate" and e["involvedObject"]["kind"] == "ReplicaSet"
            ),
            None,
        )

    message = wait_until(failed_create, what="a FailedCreate event on the ReplicaSet")
    assert message.startswith("Error creating: ")
    assert DENIED.search(message), message
    described = control_plane.kubectl("describe", "replicaset", "-n", webhook_namespace).stdout
    assert DENIED.search(described), described


def test_seed_deployment_stripped_of_defaults_is_stored_with_them_restored(
    control_plane: ControlPlane, webhook_namespace: str
) -> None:
    apply(control_plane, webhook_namespace, deployment(stripped(seed_pod())))
    pod = first_pod(control_plane, webhook_namespace)
    spec = pod["spec"]
    assert keys.vnode_toleration() in spec["tolerations"]
    required = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert {"key": keys.LABEL_BASE_STACK, "operator": "In", "values": ["java"]} in required[
        "nodeSelectorTerms"
    ][0]["matchExpressions"]
    container = spec["containers"][0]
    assert {"name": "BIZ_VERSION", "value": "0.0.1-SNAPSHOT"} in container["env"]
    assert container["resources"]["requests"][keys.RESOURCE_MODULE] == "1"
    assert container["resources"]["limits"][keys.RESOURCE_MODULE] == "1"
    # the extender's profile, where a base label that does not match is named in the Pod's events
    assert spec["schedulerName"] == MODULE_SCHEDULER_NAME
    eviction = sorted(
        (t["key"], t.get("tolerationSeconds"))
        for t in spec["tolerations"]
        if t["key"] in (keys.TAINT_NOT_READY, keys.TAINT_UNREACHABLE)
    )
    # exactly one each, whichever of the apiserver's plugin and the webhook ran first
    assert eviction == [(keys.TAINT_NOT_READY, EVICTION_SECONDS), (keys.TAINT_UNREACHABLE, EVICTION_SECONDS)]


def test_the_seed_sample_runs_as_written(control_plane: ControlPlane, webhook_namespace: str) -> None:
    """manifests/samples/module-deployment.yaml is the seed's text; only its `namespace: default` is
    dropped so it lands in the test's namespace. Its selector does not match its template: the
    webhook aligns it and says so."""
    sample = yaml.safe_load(SAMPLE.read_text())
    del sample["metadata"]["namespace"]
    proc = apply(control_plane, webhook_namespace, sample)
    assert "Warning: spec.selector.matchLabels.app: 'test-module-deployment' does not match" in proc.stderr
    stored = get_json(control_plane, webhook_namespace, "deployment", "test-module-deployment")
    assert stored["spec"]["selector"]["matchLabels"] == {"app": "test-module-deployment-non-peer"}
    pod = first_pod(control_plane, webhook_namespace)
    template = sample["spec"]["template"]["spec"]
    assert pod["spec"]["affinity"] == template["affinity"]
    assert pod["spec"]["containers"][0]["env"] == template["containers"][0]["env"]
    # applying the same file again works (the selector is immutable: it is aligned again, not changed)
    apply(control_plane, webhook_namespace, sample)
    again = get_json(control_plane, webhook_namespace, "deployment", "test-module-deployment")
    assert again["spec"]["selector"] == stored["spec"]["selector"]
    assert len(get_json(control_plane, webhook_namespace, "replicasets")["items"]) == 1


def test_kubectl_apply_of_a_broken_module_deployment_warns_at_once(
    control_plane: ControlPlane, webhook_namespace: str
) -> None:
    proc = apply(control_plane, webhook_namespace, deployment(no_version(seed_pod())))
    assert "Warning: spec.template.spec.containers[0].env: BIZ_VERSION is required" in proc.stderr


def test_kubectl_prints_soft_problems_as_warnings(
    control_plane: ControlPlane, webhook_namespace: str
) -> None:
    proc = apply(control_plane, webhook_namespace, seed_pod())
    assert (
        "Warning: spec.containers[0].name: bizName 'biz1' differs from the jar's artifact name "
        "'biz1-web-single-host'" in proc.stderr
    ), proc.stderr


def test_a_non_module_pod_passes_unchanged(control_plane: ControlPlane, webhook_namespace: str) -> None:
    plain = no_version(seed_pod("plain"))
    plain["metadata"]["labels"] = {"app": "plain"}
    del plain["spec"]["tolerations"]
    apply(control_plane, webhook_namespace, plain)
    stored = get_json(control_plane, webhook_namespace, "pod", "plain")
    assert (
        "resources" not in stored["spec"]["containers"][0] or not stored["spec"]["containers"][0]["resources"]
    )
    assert "env" not in stored["spec"]["containers"][0]
    assert stored["spec"]["schedulerName"] == "default-scheduler"
    # only the apiserver's own defaults
    default_seconds = control_plane.timings.default_toleration_seconds
    assert sorted((t["key"], t.get("tolerationSeconds")) for t in stored["spec"]["tolerations"]) == [
        (keys.TAINT_NOT_READY, default_seconds),
        (keys.TAINT_UNREACHABLE, default_seconds),
    ]
    assert stored["spec"]["affinity"] == plain["spec"]["affinity"]


def test_update_that_breaks_the_module_is_refused(
    control_plane: ControlPlane, webhook_namespace: str
) -> None:
    apply(control_plane, webhook_namespace, seed_pod("swap"))
    proc = control_plane.kubectl(
        "set", "image", "-n", webhook_namespace, "pod/swap", "biz1=nginx:latest", check=False
    )
    assert proc.returncode != 0
    assert "spec.containers[0].image: 'nginx:latest' is not an http(s) or file URL of a .jar" in proc.stderr
    new_jar = "https://repo.example.com/biz1-0.0.2-ark-biz.jar"
    control_plane.kubectl("set", "image", "-n", webhook_namespace, "pod/swap", f"biz1={new_jar}")
    assert (
        get_json(control_plane, webhook_namespace, "pod", "swap")["spec"]["containers"][0]["image"] == new_jar
    )


def test_malformed_body_gets_400_and_the_running_webhook_keeps_admitting(
    control_plane: ControlPlane, webhook_namespace: str, webhook: RunningWebhook
) -> None:
    request = urllib.request.Request(
        webhook.url + "/mutate", data=b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}'
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, context=webhook.ssl_context(), timeout=5)
    assert info.value.code == 400
    assert info.value.read().decode().startswith("request: is missing or not an object")
    proc = apply(control_plane, webhook_namespace, no_version(seed_pod("after-garbage")), check=False)
    assert DENIED.search(proc.stderr), proc.stderr
    _, metrics = webhook.get("/metrics")
    assert 'koupleless_webhook_bad_requests_total{field="request"}' in metrics
    denied = re.search(r'^koupleless_webhook_admissions_total\{result="denied"\} (\S+)$', metrics, re.M)
    assert denied and float(denied.group(1)) >= 1
