"""The module model against the seed's sample Pod template and each way a field can be missing or wrong."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from koupleless import keys
from koupleless.model import AFFINITY_PATH, ModuleSpec, _jar_url, infer_from_jar, is_module_pod
from koupleless.model_rules import errors, validate_pod, warnings

SEED_JAR = (
    "https://serverless-opensource.oss-cn-shanghai.aliyuncs.com/module-packages/stable/"
    "biz1-web-single-host-0.0.1-SNAPSHOT-ark-biz.jar"
)


def seed_pod() -> dict[str, Any]:
    """The Pod the seed's sample Deployment template produces (samples/module-deployment.yaml)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "labels": {
                "module-controller.koupleless.io/component": "module",
                "app": "test-module-deployment-non-peer",
            }
        },
        "spec": {
            "containers": [
                {"name": "biz1", "image": SEED_JAR, "env": [{"name": "BIZ_VERSION", "value": "0.0.1-SNAPSHOT"}]}
            ],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "base.koupleless.io/stack", "operator": "In", "values": ["java"]},
                                    {"key": "base.koupleless.io/version", "operator": "In", "values": ["1.1.1"]},
                                    {"key": "base.koupleless.io/name", "operator": "In", "values": ["base"]},
                                ]
                            }
                        ]
                    }
                }
            },
            "tolerations": [
                {
                    "key": "schedule.koupleless.io/virtual-node",
                    "operator": "Equal",
                    "value": "True",
                    "effect": "NoExecute",
                }
            ],
        },
    }


TERM = f"{AFFINITY_PATH}.nodeSelectorTerms[0].matchExpressions"


def test_seed_sample_is_a_valid_module_pod() -> None:
    pod = seed_pod()
    assert is_module_pod(pod)
    assert errors(validate_pod(pod)) == []
    spec = ModuleSpec.from_pod(pod)
    assert [m.to_biz_model() for m in spec.modules] == [
        {"bizName": "biz1", "bizVersion": "0.0.1-SNAPSHOT", "bizUrl": SEED_JAR}
    ]
    assert spec.base.values(keys.LABEL_BASE_NAME) == {"base"}
    assert spec.base.values(keys.LABEL_BASE_VERSION) == {"1.1.1"}
    assert spec.base.values(keys.LABEL_BASE_STACK) == {"java"}
    assert spec.base.allows(
        {keys.LABEL_BASE_STACK: "java", keys.LABEL_BASE_NAME: "base", keys.LABEL_BASE_VERSION: "1.1.1"}
    )
    assert not spec.base.allows(
        {keys.LABEL_BASE_STACK: "java", keys.LABEL_BASE_NAME: "base", keys.LABEL_BASE_VERSION: "2.0.0"}
    )


def test_seed_sample_warns_that_bizname_differs_from_jar_artifact() -> None:
    # The seed's jar is biz1-web-single-host-...: the container name biz1 is allowed but worth a warning.
    (warning,) = warnings(validate_pod(seed_pod()))
    assert warning.path == "spec.containers[0].name"
    assert "biz1-web-single-host" in warning.what


def test_legacy_label_key_marks_a_module_pod() -> None:
    pod = seed_pod()
    pod["metadata"]["labels"] = {"virtual-kubelet.koupleless.io/component": "module"}
    assert is_module_pod(pod)
    pod["metadata"]["labels"] = {"virtual-kubelet.koupleless.io/component": "vnode"}
    assert not is_module_pod(pod)


def _edit(path: list[Any], value: Any = None, delete: bool = False) -> dict[str, Any]:
    pod = seed_pod()
    target: Any = pod
    for step in path[:-1]:
        target = target[step]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return pod


CONTAINER = ["spec", "containers", 0]
EXPRS = [
    "spec", "affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution",
    "nodeSelectorTerms", 0, "matchExpressions",
]

CASES = [
    ("missing BIZ_VERSION, jar name without version",
     lambda: _no_version_pod(),
     "spec.containers[0].env", "BIZ_VERSION is required"),
    ("BIZ_VERSION from valueFrom",
     lambda: _edit([*CONTAINER, "env"], [{"name": "BIZ_VERSION", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]),
     "spec.containers[0].env", "valueFrom"),
    ("image not a URL", lambda: _edit([*CONTAINER, "image"], "nginx:latest"), "spec.containers[0].image",
     "not an http(s) or file URL"),
    ("image not a jar", lambda: _edit([*CONTAINER, "image"], "https://host/biz1.zip"), "spec.containers[0].image",
     "of a .jar"),
    ("image missing", lambda: _edit([*CONTAINER, "image"], delete=True), "spec.containers[0].image", "required"),
    ("bizName invalid", lambda: _edit([*CONTAINER, "name"], "Biz_1"), "spec.containers[0].name",
     "not a valid bizName"),
    ("bizName missing", lambda: _edit([*CONTAINER, "name"], delete=True), "spec.containers[0].name",
     "bizName is required"),
    ("no containers", lambda: _edit(["spec", "containers"], []), "spec.containers", "at least one container"),
    ("no affinity", lambda: _edit(["spec", "affinity"], delete=True), AFFINITY_PATH, "no base name or version"),
    ("no base name", lambda: _drop_expr("base.koupleless.io/name"), TERM, "no base.koupleless.io/name"),
    ("no base version", lambda: _drop_expr("base.koupleless.io/version"), TERM, "no base.koupleless.io/version"),
    ("operator NotIn on version", lambda: _edit([*EXPRS, 1, "operator"], "NotIn"), f"{TERM}[1].operator",
     "'NotIn' on base.koupleless.io/version"),
    ("empty version values", lambda: _edit([*EXPRS, 1, "values"], []), f"{TERM}[1].values",
     "at least one non-empty value"),
    ("init containers", lambda: _edit(["spec", "initContainers"], [{"name": "i", "image": "busybox"}]),
     "spec.initContainers", "init containers"),
]


def _no_version_pod() -> dict[str, Any]:
    pod = _edit([*CONTAINER, "env"], delete=True)
    pod["spec"]["containers"][0]["image"] = "https://host/biz1.jar"
    return pod


def _drop_expr(key: str) -> dict[str, Any]:
    pod = seed_pod()
    term = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"][0]
    term["matchExpressions"] = [e for e in term["matchExpressions"] if e["key"] != key]
    return pod


@pytest.mark.parametrize(("case", "make", "path", "text"), CASES, ids=[c[0] for c in CASES])
def test_each_problem_is_reported_once_with_its_field_path(case: str, make: Any, path: str, text: str) -> None:
    problems = errors(validate_pod(make()))
    assert len(problems) == 1, [str(p) for p in problems]
    (problem,) = problems
    assert problem.path == path
    assert text in problem.what
    assert problem.fix, "every problem says what to write instead"
    assert str(problem).startswith(f"{path}: ")


def test_all_problems_are_reported_together() -> None:
    pod = _no_version_pod()
    pod["spec"]["containers"][0]["name"] = "Bad_Name"
    del pod["spec"]["affinity"]
    paths = [p.path for p in errors(validate_pod(pod))]
    assert paths == ["spec.containers[0].name", "spec.containers[0].env", AFFINITY_PATH]


def test_duplicate_biz_names_are_rejected() -> None:
    pod = seed_pod()
    pod["spec"]["containers"].append(copy.deepcopy(pod["spec"]["containers"][0]))
    (problem,) = errors(validate_pod(pod))
    assert problem.path == "spec.containers[1].name"
    assert "also spec.containers[0]" in problem.what


def test_version_is_inferred_from_ark_biz_jar_name() -> None:
    assert infer_from_jar(SEED_JAR) == ("biz1-web-single-host", "0.0.1-SNAPSHOT")
    assert infer_from_jar("file:///opt/biz2-1.2.3-ark-biz.jar") == ("biz2", "1.2.3")
    assert infer_from_jar("https://host/biz2.jar") is None
    assert infer_from_jar("http://[::1/biz2-1.2.3-ark-biz.jar") is None  # not a URL: nothing to infer
    pod = _edit([*CONTAINER, "env"], delete=True)
    assert errors(validate_pod(pod)) == []
    (module,) = ModuleSpec.from_pod(pod).modules
    assert (module.biz_version, module.version_source) == ("0.0.1-SNAPSHOT", "jar")


def test_odd_shapes_never_raise() -> None:
    for pod in ({}, {"spec": None}, {"spec": {"containers": "x"}}, {"spec": {"containers": [1, None]}},
                {"spec": {"affinity": {"nodeAffinity": []}}}):
        validate_pod(pod)
        ModuleSpec.from_pod(pod)


def test_vnode_name_is_a_dns_subdomain() -> None:
    assert keys.vnode_name("10.1.0.45") == "virtual-node-10.1.0.45"
    assert keys.vnode_name("Base_UUID:7") == "virtual-node-base-uuid-7"
    assert len(keys.vnode_name("x" * 400)) == 253


def test_workload_is_the_same_across_a_deployments_replicasets() -> None:
    from koupleless.model import workload

    def pod(kind: str, name: str, template_hash: str | None = None) -> dict[str, object]:
        labels = {"pod-template-hash": template_hash} if template_hash else {}
        ref = {"kind": kind, "name": name, "controller": True, "apiVersion": "apps/v1", "uid": "u"}
        return {"metadata": {"namespace": "ns", "labels": labels, "ownerReferences": [ref]}}

    old, new = pod("ReplicaSet", "web-6798ff7d54", "6798ff7d54"), pod("ReplicaSet", "web-5f4c7b9d8", "5f4c7b9d8")
    assert workload(old) == workload(new) == ("ns", "Deployment", "web")
    assert workload(pod("ReplicaSet", "plain-rs")) == ("ns", "ReplicaSet", "plain-rs")
    assert workload(pod("DaemonSet", "agent")) == ("ns", "DaemonSet", "agent")
    assert workload({"metadata": {"namespace": "ns"}}) is None
    assert workload({"metadata": {"ownerReferences": "garbage"}}) is None


def _jar_url_by_urlsplit(url: str) -> tuple[bool, tuple[str, str] | None]:
    """What koupleless.model read from a jar URL before its fast path: urlsplit alone."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return False, None
    is_jar = parts.scheme in ("http", "https", "file") and (parts.scheme == "file" or bool(parts.netloc)) \
        and parts.path.endswith(".jar")
    match = re.match(r"^(?P<artifact>.+?)-(?P<version>\d[0-9A-Za-z.+_-]*?)-ark-biz\.jar$", parts.path.rsplit("/", 1)[-1])
    return is_jar, ((match["artifact"], match["version"]) if match else None)


_URL_PARTS = st.sampled_from([
    "http", "https", "HTTPS", "file", "ftp", "", ":", "://", "//", "/", "?", "#", "[", "]", "[::1]", " ", "\t",
    "\n", "\x00", "é", "host", "user@host:99", "biz1", "-", "0.0.1-SNAPSHOT", "-ark-biz", ".jar", "a/b", ".",
])


@settings(max_examples=3000, deadline=None)
@given(url=st.lists(_URL_PARTS, max_size=12).map("".join) | st.text(max_size=40))
def test_a_jar_url_is_read_as_urlsplit_reads_it(url: str) -> None:
    assert _jar_url.__wrapped__(url) == _jar_url_by_urlsplit(url)


@pytest.mark.parametrize("url", [
    SEED_JAR, "https://h/a/b-1.0-ark-biz.jar?x#y", "file:///opt/x-1-ark-biz.jar", "http://host", "http://host?x.jar",
    "https://[::1]/b-1-ark-biz.jar", "https://u@h:99/p/b-2-ark-biz.jar#f", " https://h/b-1-ark-biz.jar",
    "https://h/b-1-ark-biz.jar\n", "https://h/b 1-ark-biz.jar", "HTTPS://h/b-1-ark-biz.jar", "https://hé/b-1-ark-biz.jar",
])
def test_usual_and_unusual_jar_urls_are_read_as_urlsplit_reads_them(url: str) -> None:
    assert _jar_url.__wrapped__(url) == _jar_url_by_urlsplit(url)
