"""Pods of a module DaemonSet, exactly as the DaemonSet controller writes them, are admitted: their
node affinity is the controller's one `matchFields metadata.name In [<node>]` term, not a base
requirement (issue 11, item 1)."""

from __future__ import annotations

import base64
import copy
from typing import Any

import jsonpatch
import orjson

from koupleless import keys, model
from tests.unit.webhook.samples import SEED_DAEMONSET, daemonset_pod, review, seed_pod
from webhook.admission import decide, encode_response, parse_review, read_review, response_document
from webhook.defaults import Defaults

DEFAULTS = Defaults(scheduler_name="koupleless-module-scheduler")
REQUIRED = ("spec", "affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution")


def respond(doc: dict[str, Any], defaults: Defaults = DEFAULTS) -> dict[str, Any]:
    """The answer as the server sends it: the body read as bytes (webhook.wire), verdicts kept."""
    body = orjson.dumps(doc)
    decision = decide(read_review(body), defaults)
    whole = response_document("u", decide(parse_review(doc), defaults))
    assert orjson.loads(encode_response("u", decision)) == whole
    return dict(whole["response"])


def stored(pod: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    if "patch" not in response:
        return pod
    return dict(jsonpatch.apply_patch(copy.deepcopy(pod), orjson.loads(base64.b64decode(response["patch"]))))


def required(pod: dict[str, Any]) -> Any:
    node: Any = pod
    for step in REQUIRED:
        node = node[step]
    return node


def test_a_daemonset_pod_as_the_controller_writes_it_is_admitted() -> None:
    pod = daemonset_pod("virtual-node-base-1-1-1-0")
    response = respond(review(pod))
    assert response["allowed"] is True, response
    assert "warnings" not in response or not any("requirement" in w for w in response["warnings"])
    after = stored(pod, response)
    # the DaemonSet controller's node term is kept exactly: no stack requirement ANDed into it
    assert required(after) == {
        "nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["virtual-node-base-1-1-1-0"]}]}
        ]
    }
    # the other defaults still apply
    assert after["spec"]["schedulerName"] == "koupleless-module-scheduler"
    container = after["spec"]["containers"][0]
    assert container["resources"]["requests"][keys.RESOURCE_MODULE] == "1"
    # the DaemonSet's tolerate-forever tolerations are its own, left alone
    forever = {t["key"]: t.get("tolerationSeconds") for t in after["spec"]["tolerations"]}
    assert forever[keys.TAINT_NOT_READY] is None and forever[keys.TAINT_UNREACHABLE] is None


def test_the_same_pod_without_the_daemonset_owner_is_refused() -> None:
    pod = daemonset_pod()
    del pod["metadata"]["ownerReferences"]
    response = respond(review(pod))
    assert response["allowed"] is False
    assert f"no {keys.LABEL_BASE_NAME} requirement" in response["status"]["message"]


def test_the_owner_is_part_of_the_kept_verdict() -> None:
    """Same spec bytes, with and without the DaemonSet owner, either order: two verdicts."""
    owned = daemonset_pod("virtual-node-kept-verdict")
    stray = copy.deepcopy(owned)
    stray["metadata"]["ownerReferences"][0]["kind"] = "ReplicaSet"
    for first, second in ((owned, stray), (stray, owned)):
        first_answer = respond(review(first))
        second_answer = respond(review(second))
        assert first_answer["allowed"] is (first is owned)
        assert second_answer["allowed"] is (second is owned)
    # the name and uid of the owner do not split verdicts: every Pod of a DaemonSet shares one
    other = copy.deepcopy(owned)
    other["metadata"]["ownerReferences"][0].update(name="another", uid="0")
    assert respond(review(other))["allowed"] is True


def test_only_a_controller_ref_to_a_daemonset_counts() -> None:
    for change in (
        {"controller": False},
        {"kind": "ReplicaSet"},
        {"apiVersion": "extensions/v1beta1x"},
    ):
        pod = daemonset_pod()
        pod["metadata"]["ownerReferences"][0].update(change)
        assert respond(review(pod))["allowed"] is False, change
    pod = daemonset_pod()
    del pod["metadata"]["ownerReferences"][0]["controller"]
    assert respond(review(pod))["allowed"] is False


def test_only_the_controllers_exact_term_counts() -> None:
    node_term = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["virtual-node-a"]}]}
    variants: list[Any] = [
        [node_term, node_term],  # two terms
        [{**node_term, "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}],
        [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["a", "b"]}]}],
        [{"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["a"]}]}],
        [{"matchFields": [{"key": "metadata.namespace", "operator": "In", "values": ["a"]}]}],
        [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [""]}]}],
        [],
    ]
    for terms in variants:
        pod = daemonset_pod()
        required(pod)["nodeSelectorTerms"] = terms
        assert respond(review(pod))["allowed"] is False, terms
        assert model.daemonset_node(pod["spec"]) is None
    # an empty matchExpressions beside matchFields is the same term
    pod = daemonset_pod()
    required(pod)["nodeSelectorTerms"][0]["matchExpressions"] = []
    assert respond(review(pod))["allowed"] is True


def test_every_other_module_rule_still_applies() -> None:
    pod = daemonset_pod()
    pod["spec"]["containers"][0]["image"] = "nginx:latest"
    response = respond(review(pod))
    assert response["allowed"] is False
    assert response["status"]["message"].startswith("spec.containers[0].image: 'nginx:latest' is not an http(s)")
    assert "requirement" not in response["status"]["message"]
    soft = daemonset_pod()  # the seed's bizName biz1 is not the jar's artifact
    assert any("differs from the jar's artifact name" in w for w in respond(review(soft))["warnings"])


def test_a_daemonset_pod_from_a_stripped_template_gets_the_pod_defaults() -> None:
    template = copy.deepcopy(SEED_DAEMONSET["spec"]["template"])
    del template["spec"]["tolerations"]
    del template["spec"]["containers"][0]["env"]
    pod = daemonset_pod("virtual-node-x", template)
    response = respond(review(pod))
    assert response["allowed"] is True
    after = stored(pod, response)
    assert keys.vnode_toleration() in after["spec"]["tolerations"]
    assert {"name": keys.ENV_BIZ_VERSION, "value": "0.0.1-SNAPSHOT"} in after["spec"]["containers"][0]["env"]
    assert required(after) == required(pod)


def test_updates_of_a_daemonset_pod_are_judged_as_daemonset_pods() -> None:
    pod = daemonset_pod()
    edited = copy.deepcopy(pod)
    edited["metadata"]["annotations"] = {"note": "x"}
    assert respond(review(edited, operation="UPDATE", old=pod))["allowed"] is True


def test_ownership_never_lifts_the_rules_of_a_plain_pod() -> None:
    """A Pod claiming a DaemonSet owner but with a real base requirement is judged as any Pod."""
    pod = seed_pod()
    pod["metadata"]["ownerReferences"] = daemonset_pod()["metadata"]["ownerReferences"]
    assert respond(review(pod))["allowed"] is True
    del pod["spec"]["affinity"]
    assert respond(review(pod))["allowed"] is False
