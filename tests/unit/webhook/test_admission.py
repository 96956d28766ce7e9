"""Which module Pods are rejected, with what message, and what passes untouched."""

from __future__ import annotations

import base64
import copy
from typing import Any

import jsonpatch
import orjson
import pytest

from koupleless import keys
from tests.unit.webhook.samples import SEED_DEPLOYMENT, review, seed_pod
from webhook.admission import BadReview, decide, parse_review, response_document
from webhook.defaults import Defaults

UNINFERABLE_JAR = "https://repo.example.com/modules/biz1.jar"


def respond(doc: dict[str, Any]) -> dict[str, Any]:
    parsed = parse_review(doc)
    out = response_document(parsed.uid, decide(parsed, Defaults()))
    assert out["apiVersion"] == "admission.k8s.io/v1"
    assert out["kind"] == "AdmissionReview"
    assert out["response"]["uid"] == parsed.uid
    return out["response"]


def no_version_pod() -> dict[str, Any]:
    pod = seed_pod()
    container = pod["spec"]["containers"][0]
    container["image"] = UNINFERABLE_JAR
    del container["env"]
    return pod


def test_missing_biz_version_is_denied_with_field_path_and_fix() -> None:
    response = respond(review(no_version_pod()))
    assert response["allowed"] is False
    assert response["status"]["code"] == 403
    assert response["status"]["reason"] == "Forbidden"
    assert response["status"]["message"].startswith(
        "spec.containers[0].env: BIZ_VERSION is required — the module version declared in pom.xml, e.g. 0.0.1-SNAPSHOT"
    )
    assert "patch" not in response


def test_every_problem_is_listed_in_one_message() -> None:
    pod = no_version_pod()
    second = copy.deepcopy(pod["spec"]["containers"][0])
    second["image"] = "docker.io/library/nginx:latest"
    pod["spec"]["containers"].append(second)
    third = copy.deepcopy(second)
    third["name"] = "Biz_3"
    pod["spec"]["containers"].append(third)
    term = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]
    term["matchExpressions"] = [
        {"key": keys.LABEL_BASE_NAME, "operator": "NotIn", "values": ["base"]},
    ]
    pod["spec"]["initContainers"] = [{"name": "init", "image": "busybox"}]
    message = respond(review(pod))["status"]["message"]
    problems = message.split("; ")
    paths = [p.split(": ", 1)[0] for p in problems]
    assert paths == [
        "spec.containers[0].env",
        "spec.containers[1].name",  # same bizName as [0]
        "spec.containers[1].image",
        "spec.containers[1].env",
        "spec.containers[2].name",  # not a valid bizName
        "spec.containers[2].image",
        "spec.containers[2].env",
        "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
        ".matchExpressions[0].operator",
        "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
        ".matchExpressions",
        "spec.initContainers",
    ]
    assert "'docker.io/library/nginx:latest' is not an http(s) or file URL of a .jar" in message
    assert "operator 'NotIn' on base.koupleless.io/name is not supported" in message
    assert "no base.koupleless.io/version requirement" in message


def test_no_affinity_at_all_says_which_keys_to_add() -> None:
    pod = seed_pod()
    del pod["spec"]["affinity"]
    message = respond(review(pod))["status"]["message"]
    assert "base.koupleless.io/name In [<base name>]" in message
    assert "base.koupleless.io/version In [<base version>]" in message


def test_soft_problems_are_warnings_and_the_pod_is_admitted() -> None:
    pod = seed_pod()
    pod["spec"]["containers"][0]["name"] = "biz1"  # the jar's artifact is biz1-web-single-host
    response = respond(review(pod))
    assert response["allowed"] is True
    assert any(
        "differs from the jar's artifact name 'biz1-web-single-host'" in w for w in response["warnings"]
    )
    assert all(len(w) <= 256 for w in response["warnings"])


def test_legacy_label_is_a_module_pod_too() -> None:
    pod = no_version_pod()
    pod["metadata"]["labels"] = {keys.LABEL_COMPONENT_LEGACY: "module"}
    assert respond(review(pod))["allowed"] is False


@pytest.mark.parametrize(
    "labels", [{}, {"app": "web"}, {keys.LABEL_COMPONENT: "base"}, {keys.LABEL_COMPONENT_LEGACY: "vnode"}]
)
def test_a_pod_that_is_not_a_module_passes_untouched(labels: dict[str, str]) -> None:
    pod = no_version_pod()
    pod["metadata"]["labels"] = labels
    response = respond(review(pod))
    assert response == {"uid": response["uid"], "allowed": True}


def test_other_kinds_and_subresources_pass_untouched() -> None:
    broken = no_version_pod()
    assert respond(review(broken, kind="Deployment", resource="deployments", group="apps"))["allowed"]
    status_update = review(broken, operation="UPDATE", old=broken)
    status_update["request"]["subResource"] = "status"
    assert respond(status_update)["allowed"]
    assert respond(review(None, operation="DELETE", old=broken))["allowed"]


def test_update_is_judged_on_what_it_changes() -> None:
    stored = no_version_pod()  # stored before the webhook existed
    edited = copy.deepcopy(stored)
    edited["metadata"]["annotations"] = {"note": "x"}
    assert respond(review(edited, operation="UPDATE", old=stored)) == {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "allowed": True,
    }
    bad_image = copy.deepcopy(stored)
    bad_image["spec"]["containers"][0]["image"] = "nginx"
    response = respond(review(bad_image, operation="UPDATE", old=stored))
    assert response["allowed"] is False
    assert response["status"]["message"].startswith("spec.containers[0].image: 'nginx' is not an http(s)")


def test_update_of_a_pod_being_deleted_is_allowed() -> None:
    stored = no_version_pod()
    stored["spec"]["containers"][0]["image"] = "nginx"
    edited = copy.deepcopy(stored)
    edited["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    edited["metadata"]["finalizers"] = []
    assert respond(review(edited, operation="UPDATE", old=stored))["allowed"]


def test_update_gets_no_patch() -> None:
    pod = seed_pod()
    del pod["spec"]["tolerations"]
    response = respond(review(pod, operation="UPDATE", old=pod))
    assert response["allowed"] is True
    assert "patch" not in response


def test_module_pod_with_broken_object_is_an_error_answer() -> None:
    doc = review(seed_pod())
    doc["request"]["object"] = "not a pod"
    response = respond(doc)
    assert response["allowed"] is False
    assert response["status"]["code"] == 400
    assert response["status"]["message"].startswith("request.object: is not a Pod object")


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ([], "body"),
        ({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {}}, "apiVersion"),
        ({"apiVersion": "admission.k8s.io/v1", "kind": "Pod"}, "kind"),
        ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}, "request"),
        (
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": 7}},
            "request.uid",
        ),
    ],
)
def test_unanswerable_reviews_name_the_field(doc: Any, field: str) -> None:
    with pytest.raises(BadReview) as info:
        parse_review(doc)
    assert info.value.field == field
    assert str(info.value).startswith(field + ": ")


def test_seed_deployment_gets_its_selector_aligned() -> None:
    response = respond(
        review(copy.deepcopy(SEED_DEPLOYMENT), kind="Deployment", resource="deployments", group="apps")
    )
    assert response["allowed"] is True
    ops = orjson.loads(base64.b64decode(response["patch"]))
    fixed = jsonpatch.apply_patch(SEED_DEPLOYMENT, ops)
    assert fixed["spec"]["selector"]["matchLabels"] == {"app": "test-module-deployment-non-peer"}
    assert [w.split(":")[0] for w in response["warnings"]] == [
        "spec.selector.matchLabels.app",
        "spec.template.spec.containers[0].name",  # biz1 is not the jar's artifact, as on its Pods
        "spec.template.spec.containers[0].resources",  # the template's placement defaults, each said
        "spec.template.spec.tolerations",
    ]


def test_module_workload_template_problems_are_warnings_not_rejections() -> None:
    deploy = copy.deepcopy(SEED_DEPLOYMENT)
    deploy["spec"]["template"]["spec"] = no_version_pod()["spec"]
    response = respond(review(deploy, kind="Deployment", resource="deployments", group="apps"))
    assert response["allowed"] is True
    assert any(
        w.startswith("spec.template.spec.containers[0].env: BIZ_VERSION is required")
        for w in response["warnings"]
    )


def test_workloads_of_other_pods_pass_untouched() -> None:
    deploy = copy.deepcopy(SEED_DEPLOYMENT)
    deploy["spec"]["template"]["metadata"]["labels"] = {"app": "web"}
    response = respond(review(deploy, kind="Deployment", resource="deployments", group="apps"))
    assert response == {"uid": response["uid"], "allowed": True}


def test_a_module_pinned_to_a_real_node_is_refused() -> None:
    pod = seed_pod()
    pod["spec"]["nodeName"] = "worker-1"
    message = respond(review(pod))["status"]["message"]
    assert message.startswith("spec.nodeName: 'worker-1' is not a base")
    pod["spec"]["nodeName"] = "virtual-node-base-1"
    assert respond(review(pod))["allowed"] is True
