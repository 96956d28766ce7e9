"""Thousands of random Pods and reviews thrown at /mutate: never a 5xx, never an unhandled
exception, always a well-formed AdmissionReview; a patch always applies, and applying it is final."""

from __future__ import annotations

import asyncio
import base64
import copy
import string
from collections.abc import Iterator
from typing import Any

import jsonpatch
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from koupleless import keys, model, model_rules
from tests import strategies
from tests.unit.webhook.samples import SEED_JAR, daemonset_pod, review, seed_pod
from webhook.admission import (
    DAEMONSET_AFFINITY_NOTE,
    decide,
    encode_response,
    parse_review,
    read_review,
    response_document,
)
from webhook.defaults import Defaults
from webhook.server import create_app

DEFAULTS = Defaults(env="fuzz", env_taint=True)

json_values = strategies.json_values(floats=False)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return strategies.mostly(strategy, json_values)


names = st.sampled_from(["biz1", "biz2", "biz1-web-single-host", "Biz_1", "", "a" * 64]) | st.text(
    alphabet=string.ascii_lowercase + "-", min_size=1, max_size=10
)
images = st.sampled_from(
    [
        SEED_JAR,
        "https://repo.example.com/biz2-1.0.0-ark-biz.jar",
        "https://repo.example.com/biz1.jar",
        "file:///opt/m/biz1-0.1-ark-biz.jar",
        "nginx:latest",
        "http://",
        "",
    ]
) | st.text(max_size=20)
env_var = st.fixed_dictionaries(
    {"name": st.sampled_from([keys.ENV_BIZ_VERSION, "JAVA_OPTS", ""])},
    optional={"value": maybe(st.sampled_from(["", "0.0.1-SNAPSHOT", "1.0.0"])), "valueFrom": json_values},
)
quantities = st.sampled_from(["1", "2", "64Mi"]) | json_values
resources = st.fixed_dictionaries(
    {},
    optional={
        "requests": maybe(
            st.dictionaries(st.sampled_from([keys.RESOURCE_MODULE, "cpu"]), quantities, max_size=2)
        ),
        "limits": maybe(
            st.dictionaries(st.sampled_from([keys.RESOURCE_MODULE, "memory"]), quantities, max_size=2)
        ),
    },
)
#: Fields a base ignores (warned about), and one nobody reads (skipped undecoded by the server).
container_extras = st.fixed_dictionaries(
    {},
    optional={
        "args": json_values,
        "command": st.lists(st.text(max_size=4), max_size=2),
        "lifecycle": json_values,
        "volumeMounts": st.lists(st.fixed_dictionaries({"name": st.text(max_size=6)}), max_size=2),
    },
)
container = st.tuples(
    st.fixed_dictionaries(
        {"name": maybe(names), "image": maybe(images)},
        optional={"env": maybe(st.lists(maybe(env_var), max_size=3)), "resources": maybe(resources)},
    ),
    container_extras,
).map(lambda parts: {**parts[0], **parts[1]})
expression = st.fixed_dictionaries(
    {
        "key": st.sampled_from(
            [keys.LABEL_BASE_STACK, keys.LABEL_BASE_NAME, keys.LABEL_BASE_VERSION, "zone"]
        ),
        "operator": st.sampled_from(["In", "NotIn", "Exists", "Gt"]) | json_values,
    },
    optional={"values": maybe(st.lists(st.sampled_from(["java", "base", "1.1.1", ""]), max_size=2))},
)
#: The DaemonSet controller's node term, and near misses of it.
field_requirement = st.fixed_dictionaries(
    {
        "key": st.sampled_from(["metadata.name", "metadata.name", "metadata.namespace"]),
        "operator": st.sampled_from(["In", "In", "NotIn"]),
        "values": st.sampled_from([["virtual-node-a"], ["virtual-node-a"], ["a", "b"], [""], []]),
    }
)
term = st.fixed_dictionaries(
    {},
    optional={
        "matchExpressions": maybe(st.lists(maybe(expression), max_size=4)),
        "matchFields": maybe(st.lists(field_requirement, min_size=1, max_size=2)),
    },
)
affinity = st.fixed_dictionaries(
    {
        "nodeAffinity": maybe(
            st.fixed_dictionaries(
                {
                    "requiredDuringSchedulingIgnoredDuringExecution": maybe(
                        st.fixed_dictionaries({"nodeSelectorTerms": maybe(st.lists(maybe(term), max_size=3))})
                    )
                }
            )
        )
    }
)
toleration = st.fixed_dictionaries(
    {},
    optional={
        "key": st.sampled_from(
            [keys.TAINT_VIRTUAL_NODE, keys.TAINT_NODE_ENV, keys.TAINT_NOT_READY, keys.TAINT_UNREACHABLE, ""]
        ),
        "operator": st.sampled_from(["Equal", "Exists", ""]),
        "value": st.sampled_from(["True", "fuzz", "other", ""]),
        "effect": st.sampled_from(["NoExecute", "NoSchedule", ""]),
        "tolerationSeconds": st.sampled_from([300, 30, 600, 0]),
    },
)
labels = st.dictionaries(
    st.sampled_from([keys.LABEL_COMPONENT, keys.LABEL_COMPONENT_LEGACY, "app"]),
    st.sampled_from(["module", "vnode", "x"]),
    max_size=2,
)
pod_spec = st.fixed_dictionaries(
    {"containers": maybe(st.lists(maybe(container), max_size=3))},
    optional={
        "affinity": maybe(affinity),
        "tolerations": maybe(st.lists(maybe(toleration), max_size=4)),
        "initContainers": json_values,
        "hostNetwork": st.booleans(),
    },
)
pods = st.fixed_dictionaries(
    {
        "apiVersion": st.just("v1"),
        "kind": st.just("Pod"),
        "metadata": st.fixed_dictionaries({"labels": maybe(labels)}, optional={"ownerReferences": maybe(
            st.lists(st.fixed_dictionaries({
                "apiVersion": st.sampled_from(["apps/v1", "v1"]),
                "kind": st.sampled_from(["DaemonSet", "ReplicaSet"]),
                "name": st.just("owner"),
                "uid": st.just("1"),
            }, optional={"controller": st.booleans() | json_values}), max_size=2)
        )}),
    },
    optional={"spec": maybe(pod_spec)},
)


@st.composite
def seed_variants(draw: st.DrawFn) -> dict[str, Any]:
    """The seed's Pod with parts taken out or replaced: mostly admissible, so patches get exercised."""
    pod = seed_pod()
    spec = pod["spec"]
    first = spec["containers"][0]
    if draw(st.booleans()):
        del spec["tolerations"]
    elif draw(st.booleans()):
        spec["tolerations"] += draw(st.lists(toleration, max_size=3))
    if draw(st.booleans()):
        exprs = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ][0]["matchExpressions"]
        del exprs[0]
    if draw(st.booleans()):
        del first["env"]
    elif draw(st.booleans()):
        first["env"] = draw(st.lists(env_var, max_size=3))
    if draw(st.booleans()):
        first["image"] = draw(images)
    if draw(st.booleans()):
        first["resources"] = draw(resources)
    first.update(draw(container_extras))
    if draw(st.integers(0, 3)) == 0:  # as its DaemonSet's controller would make it for one node
        owned = daemonset_pod("virtual-node-a")
        pod["metadata"]["ownerReferences"] = owned["metadata"]["ownerReferences"]
        spec["affinity"] = owned["spec"]["affinity"]
    for n in range(draw(st.integers(0, 2))):
        extra = copy.deepcopy(first)
        extra["name"] = f"biz{n + 2}"
        extra["image"] = draw(images)
        spec["containers"].append(extra)
    if draw(st.booleans()):
        pod["metadata"]["labels"] = {keys.LABEL_COMPONENT_LEGACY: "module"}
    return pod


operations = st.one_of(
    st.just("CREATE"),
    st.just("CREATE"),
    st.just("CREATE"),
    st.sampled_from(["UPDATE", "DELETE", "CONNECT"]),
    json_values,
)


WORKLOAD = {"kind": "Deployment", "resource": "deployments", "group": "apps"}
DAEMONSET = {"kind": "DaemonSet", "resource": "daemonsets", "group": "apps"}


def workload_of(request: dict[str, Any]) -> dict[str, str] | None:
    kind = request["kind"]
    for workload in (WORKLOAD, DAEMONSET):
        if kind == {"group": "apps", "version": "v1", "kind": workload["kind"]}:
            return workload
    return None


selectors = st.fixed_dictionaries(
    {},
    optional={
        "matchLabels": maybe(
            st.dictionaries(
                st.sampled_from(["app", keys.LABEL_COMPONENT]), st.sampled_from(["web", "module"])
            )
        ),
        "matchExpressions": json_values,
    },
)


@st.composite
def reviews(draw: st.DrawFn) -> dict[str, Any]:
    pod = draw(pods | seed_variants() | seed_variants())
    workload = draw(st.sampled_from([None, None, None, None, None, None, WORKLOAD, DAEMONSET]))
    obj: Any = pod
    old = draw(st.none() | pods | st.just(seed_pod()))
    if workload:
        template = {"metadata": pod["metadata"], "spec": pod.get("spec")}
        obj = {
            "apiVersion": "apps/v1",
            "kind": workload["kind"],
            "spec": {"selector": draw(maybe(selectors)), "template": template},
        }
        if draw(st.booleans()):
            old = {"apiVersion": "apps/v1", "kind": workload["kind"], "spec": {"template": old}}
    doc = review(obj, operation=draw(operations), old=old, **(workload or {}))
    request = doc["request"]
    for key in ("kind", "resource", "subResource", "object", "name", "namespace"):
        if draw(st.integers(0, 19)) == 0:
            request[key] = draw(json_values)
    return doc


@pytest.fixture(scope="module")
def post() -> Iterator[Any]:
    """A synchronous POST to a live app on its own loop: hypothesis drives sync tests."""
    loop = asyncio.new_event_loop()
    client = TestClient(TestServer(create_app(DEFAULTS, registry=CollectorRegistry())), loop=loop)
    loop.run_until_complete(client.start_server())

    async def send(body: bytes) -> tuple[int, bytes]:
        resp = await client.post("/mutate", data=body)
        return resp.status, await resp.read()

    yield lambda body: loop.run_until_complete(send(body))
    loop.run_until_complete(client.close())
    loop.close()


def check_answer(doc: Any, status: int, body: bytes) -> dict[str, Any] | None:
    """The response is either 400 + reason (nothing to echo) or a well-formed AdmissionReview."""
    assert status < 500, body
    request = doc.get("request") if isinstance(doc, dict) else None
    answerable = (
        isinstance(doc, dict)
        and doc.get("apiVersion") == "admission.k8s.io/v1"
        and doc.get("kind") == "AdmissionReview"
        and isinstance(request, dict)
        and isinstance(request.get("uid"), str)
        and request["uid"] != ""
    )
    if not answerable:
        assert status == 400, body
        assert body.strip(), "a 400 must say why"
        return None
    assert status == 200, body
    out = orjson.loads(body)
    assert set(out) == {"apiVersion", "kind", "response"}
    assert (out["apiVersion"], out["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
    response = out["response"]
    assert response["uid"] == request["uid"]
    assert isinstance(response["allowed"], bool)
    assert ("patch" in response) == ("patchType" in response)
    assert all(isinstance(w, str) for w in response.get("warnings", []))
    if not response["allowed"]:
        assert response["status"]["code"] in (400, 403), "500 means decide() raised"
        assert response["status"]["message"]
        assert "patch" not in response
    return response


@settings(
    max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(doc=reviews())
def test_random_reviews_get_well_formed_answers(post: Any, doc: dict[str, Any]) -> None:
    status, body = post(orjson.dumps(doc))
    response = check_answer(doc, status, body)
    if response is None or "patch" not in response:
        return
    request = doc["request"]
    workload = workload_of(request)
    # Pods are defaulted only at CREATE (their spec is immutable after); a workload's selector and
    # template defaults are applied on UPDATE too.
    assert request["operation"] == "CREATE" or workload
    ops = orjson.loads(base64.b64decode(response["patch"]))
    stored = jsonpatch.apply_patch(copy.deepcopy(request["object"]), ops)
    again = decide(parse_review(review(stored, **(workload or {}))), DEFAULTS)
    assert again.result == "allowed", again
    assert again.ops == []


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    doc=json_values
    | st.fixed_dictionaries(
        {
            "apiVersion": st.sampled_from(["admission.k8s.io/v1", "v1"]),
            "kind": st.sampled_from(["AdmissionReview", "Pod"]),
        },
        optional={"request": json_values | st.fixed_dictionaries({"uid": json_values | st.just("u")})},
    )
)
def test_random_bodies_never_break_the_server(post: Any, doc: Any) -> None:
    status, body = post(orjson.dumps(doc))
    check_answer(doc, status, body)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=64))
def test_random_bytes_get_400(post: Any, body: bytes) -> None:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    status, answer = post(body)
    check_answer(doc, status, answer)


@settings(max_examples=1000, deadline=None)
@given(doc=reviews())
def test_every_error_is_one_item_of_the_rejection(doc: dict[str, Any]) -> None:
    """The separator never appears inside a problem, so the message splits back into the problems."""
    decision = decide(parse_review(doc), DEFAULTS)
    if decision.result == "denied":
        obj = doc["request"]["object"]
        if workload_of(doc["request"]):  # a DaemonSet whose template selects no bases
            errors = model_rules.errors(model_rules.validate_pod(obj["spec"]["template"], stack_defaulted=True))
            wanted = [f"spec.template.{e}" for e in errors if e.path.startswith(model.AFFINITY_PATH)]
            problems = decision.message.removesuffix(" " + DAEMONSET_AFFINITY_NOTE).split("; ")
            assert problems == wanted or doc["request"]["operation"] == "UPDATE"
            return
        errors = model_rules.errors(
            model_rules.validate_pod(obj, stack_defaulted=True, daemonset_owned=model.owned_by_daemonset(obj))
        )
        if doc["request"]["operation"] == "CREATE":
            assert decision.message.split("; ") == [str(e) for e in errors]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=reviews())
def test_reading_only_what_is_needed_changes_no_answer(doc: dict[str, Any]) -> None:
    """The server decodes only the fields it reads (webhook.wire) and keeps one verdict per new
    Pod spec: it answers every review exactly as the whole decoded document is answered, the first
    time and from the kept verdict."""
    whole = decide(parse_review(doc), DEFAULTS)
    body = orjson.dumps(doc)
    first = decide(read_review(body), DEFAULTS)
    kept = decide(read_review(body), DEFAULTS)
    assert first == whole
    assert kept == whole
    assert orjson.loads(encode_response("u", kept)) == response_document("u", whole)
