"""Defaults a module Pod gets at CREATE, checked by applying the hand-built patch to the Pod."""

from __future__ import annotations

import base64
import copy
from typing import Any

import jsonpatch
import orjson
import pytest

from extender.config import MODULE_SCHEDULER_NAME
from koupleless import keys
from tests.unit.webhook.samples import SEED_JAR, review, seed_pod, stripped
from webhook.admission import decide, parse_review, response_document
from webhook.defaults import Defaults, default_ops, tolerates
from webhook.patch import escape, pointer

TERM_PATH = (
    "spec",
    "affinity",
    "nodeAffinity",
    "requiredDuringSchedulingIgnoredDuringExecution",
    "nodeSelectorTerms",
)


def admitted(pod: dict[str, Any], defaults: Defaults = Defaults()) -> dict[str, Any]:
    """The Pod as the apiserver stores it after our response (patch applied)."""
    response = response_document("u", decide(parse_review(review(pod)), defaults))["response"]
    assert response["allowed"], response
    if "patch" not in response:
        return pod
    assert response["patchType"] == "JSONPatch"
    ops = orjson.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(pod, ops)


def terms(pod: dict[str, Any]) -> list[dict[str, Any]]:
    node: Any = pod
    for step in TERM_PATH:
        node = node[step]
    return node


def eviction_tolerations(pod: dict[str, Any]) -> dict[str, Any]:
    return {
        t["key"]: t.get("tolerationSeconds")
        for t in pod["spec"]["tolerations"]
        if t.get("key") in (keys.TAINT_NOT_READY, keys.TAINT_UNREACHABLE)
    }


def test_pointer_escapes_tilde_before_slash() -> None:
    assert escape("a~/b") == "a~0~1b"
    assert (
        pointer("metadata", "labels", "koupleless.io/module", 0) == "/metadata/labels/koupleless.io~1module/0"
    )


def test_stripped_seed_pod_gets_tolerations_stack_and_version_back() -> None:
    stored = admitted(stripped(seed_pod()))
    assert keys.vnode_toleration() in stored["spec"]["tolerations"]
    stack = {"key": keys.LABEL_BASE_STACK, "operator": "In", "values": ["java"]}
    assert stack in terms(stored)[0]["matchExpressions"]
    assert stored["spec"]["containers"][0]["env"] == [{"name": "BIZ_VERSION", "value": "0.0.1-SNAPSHOT"}]


def test_seed_pod_only_gets_module_resource_and_short_eviction_tolerations() -> None:
    pod = seed_pod()
    stored = admitted(pod)
    container = stored["spec"]["containers"][0]
    assert container["resources"] == {
        "requests": {keys.RESOURCE_MODULE: "1"},
        "limits": {keys.RESOURCE_MODULE: "1"},
    }
    assert stored["spec"]["tolerations"][0] == pod["spec"]["tolerations"][0]
    short = Defaults().eviction_toleration_seconds  # 10 (README, "A base that dies")
    assert eviction_tolerations(stored) == {keys.TAINT_NOT_READY: short, keys.TAINT_UNREACHABLE: short}
    assert terms(stored) == terms(pod)
    assert container["env"] == pod["spec"]["containers"][0]["env"]


def test_apiserver_300s_tolerations_are_shortened_not_duplicated() -> None:
    pod = seed_pod()
    for key in (keys.TAINT_NOT_READY, keys.TAINT_UNREACHABLE):
        pod["spec"]["tolerations"].append(
            {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
        )
    stored = admitted(pod, Defaults(eviction_toleration_seconds=12))
    assert eviction_tolerations(stored) == {keys.TAINT_NOT_READY: 12, keys.TAINT_UNREACHABLE: 12}
    assert len(stored["spec"]["tolerations"]) == 3


def test_tolerations_written_by_the_user_are_kept() -> None:
    pod = seed_pod()
    pod["spec"]["tolerations"] += [
        {"key": keys.TAINT_NOT_READY, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 600},
        # what the DaemonSet controller adds: tolerate forever
        {"key": keys.TAINT_UNREACHABLE, "operator": "Exists", "effect": "NoExecute"},
    ]
    stored = admitted(pod)
    assert eviction_tolerations(stored) == {keys.TAINT_NOT_READY: 600, keys.TAINT_UNREACHABLE: None}


def test_a_tolerate_everything_toleration_counts_as_the_vnode_one() -> None:
    pod = stripped(seed_pod())
    pod["spec"]["tolerations"] = [{"operator": "Exists"}]
    stored = admitted(pod)
    assert stored["spec"]["tolerations"] == [{"operator": "Exists"}]


def test_env_toleration_only_when_the_env_taint_is_in_use() -> None:
    without = admitted(seed_pod(), Defaults(env="prod"))
    assert not [t for t in without["spec"]["tolerations"] if t["key"] == keys.TAINT_NODE_ENV]
    with_taint = admitted(seed_pod(), Defaults(env="prod", env_taint=True))
    assert keys.env_toleration("prod") in with_taint["spec"]["tolerations"]


def test_a_pod_that_picked_its_env_keeps_it() -> None:
    pod = seed_pod()
    pod["spec"]["tolerations"].append(keys.env_toleration("test"))
    stored = admitted(pod, Defaults(env="prod", env_taint=True))
    assert [t["value"] for t in stored["spec"]["tolerations"] if t["key"] == keys.TAINT_NODE_ENV] == ["test"]


def test_stack_is_added_to_every_term_that_lacks_it() -> None:
    pod = seed_pod()
    base_only = {"key": keys.LABEL_BASE_NAME, "operator": "In", "values": ["other"]}
    version = {"key": keys.LABEL_BASE_VERSION, "operator": "In", "values": ["2.0.0"]}
    stack_go = {"key": keys.LABEL_BASE_STACK, "operator": "In", "values": ["go"]}
    terms(pod).append({"matchExpressions": [base_only, version]})
    terms(pod).append({"matchExpressions": [base_only, version, stack_go]})
    stored = admitted(pod)
    stacks = [
        [e["values"] for e in t["matchExpressions"] if e["key"] == keys.LABEL_BASE_STACK]
        for t in terms(stored)
    ]
    assert stacks == [[["java"]], [["java"]], [["go"]]]


def test_biz_version_from_the_jar_fills_an_empty_value_and_keeps_other_env() -> None:
    pod = seed_pod()
    pod["spec"]["containers"][0]["env"] = [{"name": "JAVA_OPTS", "value": "-Xmx1g"}, {"name": "BIZ_VERSION"}]
    stored = admitted(pod)
    assert stored["spec"]["containers"][0]["env"] == [
        {"name": "JAVA_OPTS", "value": "-Xmx1g"},
        {"name": "BIZ_VERSION", "value": "0.0.1-SNAPSHOT"},
    ]


def test_biz_version_appended_when_env_has_other_vars() -> None:
    pod = seed_pod()
    pod["spec"]["containers"][0]["env"] = [{"name": "JAVA_OPTS", "value": "-Xmx1g"}]
    stored = admitted(pod)
    assert stored["spec"]["containers"][0]["env"][-1] == {"name": "BIZ_VERSION", "value": "0.0.1-SNAPSHOT"}


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ({}, {"requests": {keys.RESOURCE_MODULE: "1"}, "limits": {keys.RESOURCE_MODULE: "1"}}),
        (
            {"requests": {"memory": "64Mi"}},
            {
                "requests": {"memory": "64Mi", keys.RESOURCE_MODULE: "1"},
                "limits": {keys.RESOURCE_MODULE: "1"},
            },
        ),
        (
            {"limits": {keys.RESOURCE_MODULE: "2"}},
            {"limits": {keys.RESOURCE_MODULE: "2"}, "requests": {keys.RESOURCE_MODULE: "2"}},
        ),
    ],
)
def test_module_resource_requested_once_per_container(
    resources: dict[str, Any], expected: dict[str, Any]
) -> None:
    pod = seed_pod()
    pod["spec"]["containers"][0]["resources"] = resources
    second = copy.deepcopy(pod["spec"]["containers"][0])
    second["name"] = "biz2"
    second["image"] = SEED_JAR.replace("biz1-web-single-host", "biz2")
    pod["spec"]["containers"].append(second)
    stored = admitted(pod)
    assert [c["resources"] for c in stored["spec"]["containers"]] == [expected, expected]


def test_defaults_are_idempotent() -> None:
    defaults = Defaults(env="prod", env_taint=True)
    once = admitted(stripped(seed_pod()), defaults)
    assert default_ops(once, defaults) == []


def test_tolerates_follows_kubernetes_rules() -> None:
    taint = (keys.TAINT_VIRTUAL_NODE, "True", "NoExecute")
    assert tolerates(keys.vnode_toleration(), *taint)
    assert tolerates({"key": keys.TAINT_VIRTUAL_NODE, "operator": "Exists"}, *taint)
    assert not tolerates({"key": keys.TAINT_VIRTUAL_NODE, "value": "False"}, *taint)
    assert not tolerates(
        {"key": keys.TAINT_VIRTUAL_NODE, "operator": "Exists", "effect": "NoSchedule"}, *taint
    )
    assert not tolerates({"operator": "Equal", "value": "True"}, *taint)
    assert tolerates({"operator": "Exists", "effect": "NoExecute"}, *taint)


MODULE_PROFILE = Defaults(scheduler_name=MODULE_SCHEDULER_NAME)


@pytest.mark.parametrize("current", [None, "", "default-scheduler"])
def test_module_pod_without_a_chosen_scheduler_goes_to_the_module_profile(current: str | None) -> None:
    pod = seed_pod()
    if current is not None:
        pod["spec"]["schedulerName"] = current
    stored = admitted(pod, MODULE_PROFILE)
    assert stored["spec"]["schedulerName"] == MODULE_SCHEDULER_NAME
    # together with the resource that makes kube-scheduler call the extender for it
    assert all(keys.RESOURCE_MODULE in c["resources"]["requests"] for c in stored["spec"]["containers"])
    assert default_ops(stored, MODULE_PROFILE) == []


def test_a_scheduler_picked_by_the_user_is_kept() -> None:
    pod = seed_pod()
    pod["spec"]["schedulerName"] = "my-scheduler"
    assert admitted(pod, MODULE_PROFILE)["spec"]["schedulerName"] == "my-scheduler"


def test_scheduler_name_is_left_alone_without_the_flag() -> None:
    pod = seed_pod()
    pod["spec"]["schedulerName"] = "default-scheduler"
    assert admitted(pod)["spec"]["schedulerName"] == "default-scheduler"
    assert "schedulerName" not in admitted(seed_pod())["spec"]


@pytest.mark.parametrize("spec", [{}, {"containers": []}, {"containers": ["not a container"]}])
def test_no_scheduler_name_without_a_container_to_carry_the_module_resource(spec: dict[str, Any]) -> None:
    assert all(op["path"] != "/spec/schedulerName" for op in default_ops({"spec": spec}, MODULE_PROFILE))


def test_updates_never_change_the_scheduler_name() -> None:
    pod = seed_pod()
    update = parse_review(review(pod, operation="UPDATE", old=pod))
    response = response_document("u", decide(update, MODULE_PROFILE))
    assert "patch" not in response["response"]
