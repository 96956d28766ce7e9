"""Module workloads at CREATE and UPDATE: their template gets the Pod defaults that decide placement
(so a DaemonSet targets bases at all), a DaemonSet that selects no bases is refused, and what is
wrong with a template reaches `kubectl apply` / `kubectl set image` as warnings (issue 11, items 1,
2 and 6)."""

from __future__ import annotations

import base64
import copy
from typing import Any

import jsonpatch
import orjson
import pytest

from koupleless import keys, model_rules
from tests.unit.webhook.samples import SEED_DAEMONSET, SEED_DEPLOYMENT, SEED_JAR, review
from webhook.admission import decide, parse_review, response_document
from webhook.defaults import Defaults

KINDS = {
    "Deployment": "deployments",
    "ReplicaSet": "replicasets",
    "StatefulSet": "statefulsets",
    "DaemonSet": "daemonsets",
}
#: The short not-ready / unreachable toleration the webhook gives by default (README, "A base that dies").
SHORT = Defaults().eviction_toleration_seconds
NEW_JAR = SEED_JAR.replace("0.0.1-SNAPSHOT", "0.0.2-SNAPSHOT")
TERM = "spec.template.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"


def workload_review(obj: dict[str, Any], operation: str = "CREATE", old: Any = None) -> dict[str, Any]:
    kind = obj["kind"]
    return review(obj, operation=operation, old=old, kind=kind, resource=KINDS[kind], group="apps")


def respond(doc: dict[str, Any], defaults: Defaults = Defaults()) -> dict[str, Any]:
    return dict(response_document("u", decide(parse_review(doc), defaults))["response"])


def admitted(obj: dict[str, Any], defaults: Defaults = Defaults(), **kwargs: Any) -> tuple[dict[str, Any], list[str]]:
    """The workload as stored after our answer, and the warnings kubectl prints."""
    response = respond(workload_review(obj, **kwargs), defaults)
    assert response["allowed"] is True, response
    stored = obj
    if "patch" in response:
        stored = jsonpatch.apply_patch(copy.deepcopy(obj), orjson.loads(base64.b64decode(response["patch"])))
    return stored, response.get("warnings", [])


def seed_daemonset() -> dict[str, Any]:
    return copy.deepcopy(SEED_DAEMONSET)


def seed_deployment() -> dict[str, Any]:
    deploy = copy.deepcopy(SEED_DEPLOYMENT)
    deploy["spec"]["selector"]["matchLabels"] = {"app": "test-module-deployment-non-peer"}
    return deploy


def template_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return dict(obj["spec"]["template"]["spec"])


def strip_placement(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]["template"]["spec"]
    del spec["tolerations"]
    term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    term["matchExpressions"] = [e for e in term["matchExpressions"] if e["key"] != keys.LABEL_BASE_STACK]
    return obj


# --- item 2: the template gets the placement defaults ---------------------------------------------------


def test_a_daemonset_without_the_toleration_gets_it_in_its_template() -> None:
    ds = strip_placement(seed_daemonset())
    stored, warnings = admitted(ds, Defaults(env="dev", env_taint=True))
    spec = template_spec(stored)
    assert spec["tolerations"] == [keys.vnode_toleration(), keys.env_toleration("dev")]
    exprs = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]["matchExpressions"]
    assert {"key": keys.LABEL_BASE_STACK, "operator": "In", "values": ["java"]} in exprs
    resources = spec["containers"][0]["resources"]
    assert resources == {"requests": {keys.RESOURCE_MODULE: "1"}, "limits": {keys.RESOURCE_MODULE: "1"}}
    # BIZ_VERSION is not written into a template (each Pod infers it from its own jar); nor the scheduler
    assert spec["containers"][0]["env"] == SEED_DAEMONSET["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "schedulerName" not in spec
    assert warnings == [
        "spec.template.spec.containers[0].name: bizName 'biz1' differs from the jar's artifact name "
        "'biz1-web-single-host' — make sure it matches the bizName declared in the module's pom.xml",
        "spec.template.spec.containers[0].resources: added koupleless.io/module to requests and limits "
        "(a module takes one of its base's module slots)",
        f"{TERM}.matchExpressions: added base.koupleless.io/stack In [java]",
        "spec.template.spec.tolerations: added schedule.koupleless.io/virtual-node=True:NoExecute, "
        "schedule.koupleless.io/node-env=dev:NoExecute, the taints of every base's Node (a DaemonSet only "
        "targets Nodes whose taints its template tolerates)",
    ]


def test_a_daemonset_template_gets_no_short_eviction_tolerations() -> None:
    """Its controller makes every Pod tolerate not-ready / unreachable forever (DaemonSet semantics),
    so a short toleration in the template would be overwritten, and a warning promising it untrue."""
    stored, warnings = admitted(seed_daemonset())
    keys_ = [t["key"] for t in template_spec(stored)["tolerations"]]
    assert keys_ == [keys.TAINT_VIRTUAL_NODE]
    assert not any("now tolerated" in w for w in warnings)


@pytest.mark.parametrize("kind", ["Deployment", "ReplicaSet", "StatefulSet"])
def test_other_workload_templates_get_the_short_eviction_tolerations(kind: str) -> None:
    obj = seed_deployment()
    obj["kind"] = kind
    if kind != "Deployment":
        del obj["spec"]["strategy"]
    stored, warnings = admitted(obj)
    tolerations = {t["key"]: t.get("tolerationSeconds") for t in template_spec(stored)["tolerations"]}
    assert tolerations == {keys.TAINT_VIRTUAL_NODE: None, keys.TAINT_NOT_READY: SHORT, keys.TAINT_UNREACHABLE: SHORT}
    assert (
        "spec.template.spec.tolerations: node.kubernetes.io/not-ready:NoExecute and "
        f"node.kubernetes.io/unreachable:NoExecute now tolerated for {SHORT}s, so modules leave a base that stopped "
        f"answering {SHORT} s after its Node is tainted"
    ) in warnings


def test_the_apiservers_300s_tolerations_in_a_template_are_shortened() -> None:
    obj = seed_deployment()
    template_spec(obj)["tolerations"].append(
        {"key": keys.TAINT_NOT_READY, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
    )
    stored, warnings = admitted(obj)
    seconds = [t.get("tolerationSeconds") for t in template_spec(stored)["tolerations"] if t["key"] == keys.TAINT_NOT_READY]
    assert seconds == [SHORT]
    assert any(w.startswith("spec.template.spec.tolerations: node.kubernetes.io/not-ready:NoExecute and ") for w in warnings)


@pytest.mark.parametrize("kind", list(KINDS))
def test_template_defaults_are_applied_once(kind: str) -> None:
    """Stored, then sent again as it is (`kubectl replace`, or an UPDATE reinvocation): nothing more."""
    obj = strip_placement(seed_deployment())
    obj["kind"] = kind
    stored, _ = admitted(obj, Defaults(env="dev", env_taint=True))
    response = respond(workload_review(stored, operation="UPDATE", old=stored), Defaults(env="dev", env_taint=True))
    assert response["allowed"] is True
    assert "patch" not in response
    assert not any("added" in w or "now tolerated" in w for w in response.get("warnings", []))


def test_an_update_that_drops_the_defaults_gets_them_back() -> None:
    """`kubectl apply` replaces a template's tolerations list as a whole."""
    stored, _ = admitted(strip_placement(seed_daemonset()))
    edited = copy.deepcopy(stored)
    del edited["spec"]["template"]["spec"]["tolerations"]
    again, warnings = admitted(edited, operation="UPDATE", old=stored)
    assert template_spec(again)["tolerations"] == template_spec(stored)["tolerations"]
    assert any(w.startswith("spec.template.spec.tolerations: added ") for w in warnings)


def test_a_replicaset_its_deployment_owns_is_left_as_the_deployment_wrote_it() -> None:
    """The Deployment controller finds its ReplicaSet by comparing templates: a changed one would make
    it create another ReplicaSet, and another."""
    rs = strip_placement(seed_deployment())
    rs["kind"] = "ReplicaSet"
    del rs["spec"]["strategy"]
    rs["metadata"]["ownerReferences"] = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "name": "test-module-deployment", "uid": "1",
         "controller": True, "blockOwnerDeletion": True}
    ]  # fmt: skip
    response = respond(workload_review(rs))
    assert response["allowed"] is True
    assert "patch" not in response


# --- item 1: a DaemonSet whose template selects no bases is refused ---------------------------------------


def test_a_daemonset_without_a_base_requirement_is_refused() -> None:
    ds = seed_daemonset()
    del ds["spec"]["template"]["spec"]["affinity"]
    response = respond(workload_review(ds))
    assert response["allowed"] is False
    assert response["status"]["code"] == 403
    message = response["status"]["message"]
    assert message.startswith(
        "spec.template.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution: "
        "no base name or version is required — add nodeSelectorTerms"
    )
    assert message.endswith(
        "(a DaemonSet's Pods carry only the node its controller picked with this affinity, so the DaemonSet "
        "must select bases itself)"
    )


def test_a_daemonset_missing_the_version_requirement_is_refused_and_says_which() -> None:
    ds = seed_daemonset()
    term = template_spec(ds)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]
    term["matchExpressions"] = [e for e in term["matchExpressions"] if e["key"] != keys.LABEL_BASE_VERSION]
    response = respond(workload_review(ds))
    assert response["allowed"] is False
    assert response["status"]["message"].startswith(
        f"{TERM}.matchExpressions: no base.koupleless.io/version requirement — add "
        "{key: base.koupleless.io/version, operator: In, values: [1.1.1]}"
    )


def test_a_stored_daemonset_that_already_lacked_it_can_still_be_edited_and_deleted() -> None:
    stored = seed_daemonset()
    del stored["spec"]["template"]["spec"]["affinity"]
    edited = copy.deepcopy(stored)
    edited["metadata"]["annotations"] = {"note": "x"}
    assert respond(workload_review(edited, operation="UPDATE", old=stored))["allowed"] is True
    deleting = copy.deepcopy(stored)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert respond(workload_review(deleting, operation="UPDATE", old=stored)) == {"uid": "u", "allowed": True}
    broke = seed_daemonset()
    del broke["spec"]["template"]["spec"]["affinity"]
    assert respond(workload_review(broke, operation="UPDATE", old=seed_daemonset()))["allowed"] is False


def test_other_template_errors_of_a_daemonset_stay_warnings() -> None:
    """Its Pods still reach the Pod webhook, whose refusal is a FailedCreate event on the DaemonSet."""
    ds = seed_daemonset()
    template_spec(ds)["containers"][0]["image"] = "nginx:latest"
    _, warnings = admitted(ds)
    assert any(w.startswith("spec.template.spec.containers[0].image: 'nginx:latest' is not") for w in warnings)


# --- item 6: what is wrong with a template reaches kubectl -----------------------------------------------


def set_image(obj: dict[str, Any], image: str) -> dict[str, Any]:
    """`kubectl set image <kind>/<name> biz1=<image>`: only the image changes."""
    new = copy.deepcopy(obj)
    template_spec(new)["containers"][0]["image"] = image
    return new


def test_kubectl_set_image_of_a_new_jar_warns_that_biz_version_stayed() -> None:
    stored, _ = admitted(seed_deployment())
    _, warnings = admitted(set_image(stored, NEW_JAR), operation="UPDATE", old=stored)
    assert (
        "spec.template.spec.containers[0].env: BIZ_VERSION 0.0.1-SNAPSHOT differs from the version in the jar name "
        "0.0.2-SNAPSHOT, so its Pods would show VersionMismatch — change both: kubectl set env "
        "deployment/test-module-deployment -c biz1 BIZ_VERSION=0.0.2-SNAPSHOT"
    ) in warnings
    # the other soft problem of the seed's template is there too
    assert any(w.startswith("spec.template.spec.containers[0].name: bizName 'biz1' differs") for w in warnings)


def test_then_kubectl_set_env_clears_the_warning() -> None:
    stored, _ = admitted(set_image(admitted(seed_deployment())[0], NEW_JAR))
    fixed = copy.deepcopy(stored)
    template_spec(fixed)["containers"][0]["env"] = [{"name": "BIZ_VERSION", "value": "0.0.2-SNAPSHOT"}]
    _, warnings = admitted(fixed, operation="UPDATE", old=stored)
    assert not any("BIZ_VERSION" in w for w in warnings)


def test_set_env_alone_says_the_jar_is_left_to_change() -> None:
    stored, _ = admitted(seed_deployment())
    edited = copy.deepcopy(stored)
    template_spec(edited)["containers"][0]["env"] = [{"name": "BIZ_VERSION", "value": "0.0.2-SNAPSHOT"}]
    _, warnings = admitted(edited, operation="UPDATE", old=stored)
    assert (
        "spec.template.spec.containers[0].env: BIZ_VERSION 0.0.2-SNAPSHOT differs from the version in the jar name "
        "0.0.1-SNAPSHOT, so its Pods would show VersionMismatch — change the jar too: kubectl set image "
        "deployment/test-module-deployment biz1=<URL of biz1-web-single-host-0.0.2-SNAPSHOT-ark-biz.jar>"
    ) in warnings


@pytest.mark.parametrize("kind", ["StatefulSet", "DaemonSet"])
def test_the_fix_names_the_workload_as_kubectl_does(kind: str) -> None:
    obj = set_image(seed_deployment(), NEW_JAR)
    obj["kind"] = kind
    obj["metadata"]["name"] = "mods"
    _, warnings = admitted(obj)
    assert any(w.endswith(f"kubectl set env {kind.lower()}/mods -c biz1 BIZ_VERSION=0.0.2-SNAPSHOT") for w in warnings)


def test_a_template_without_biz_version_takes_the_new_jars_version_silently() -> None:
    deploy = seed_deployment()
    del template_spec(deploy)["containers"][0]["env"]
    stored, _ = admitted(deploy)
    _, warnings = admitted(set_image(stored, NEW_JAR), operation="UPDATE", old=stored)
    assert not any("BIZ_VERSION" in w for w in warnings)


def test_warnings_about_the_template_are_the_pod_rules_with_the_template_path() -> None:
    deploy = seed_deployment()
    template_spec(deploy)["containers"][0]["readinessProbe"] = {"httpGet": {"path": "/", "port": 8080}}
    _, warnings = admitted(deploy)
    problems = model_rules.validate_pod(deploy["spec"]["template"], stack_defaulted=True)
    assert [w for w in warnings if w.startswith("spec.template.spec.containers")][: len(problems)] == [
        f"spec.template.{p}" for p in problems
    ]
