"""AdmissionReview in, decision out: parse the request, decide, build the response document.

Pure functions over plain dicts, so the HTTP layer stays thin and every rule is testable without a
server. Reference: k8s-protocols.md §3.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from koupleless import keys, model, model_rules
from webhook import wire
from webhook.defaults import Defaults, template_ops
from webhook.verdicts import (
    PROBLEM_SEPARATOR,
    Decision,
    allow,
    decide_create,
    deny,
)
from webhook.workloads import WORKLOAD_KINDS, align_selector, module_template_labels

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
_JSON = msgspec.json.Encoder()


class BadReview(ValueError):
    """A request body that is not an AdmissionReview we can answer: no uid to echo."""

    def __init__(self, field: str, what: str, fix: str) -> None:
        super().__init__(f"{field}: {what} — {fix}")
        self.field = field


@dataclass(slots=True)
class Review:
    uid: str
    #: From `read_review`, `object` and `oldObject` are still undecoded (webhook.wire), except the
    #: `object` of a Pod's CREATE, which may be decoded already as `wire.decode_new_pod` reads it.
    request: Mapping[str, Any]

    def object(self) -> Any:
        """`request.object` as a JSON value; Unreadable when it holds what no JSON value can."""
        return self.field("object")

    def field(self, name: str, *, new_pod: bool = False) -> Any:
        value = self.request.get(name)
        try:
            if new_pod and isinstance(value, wire.Raw):
                return wire.decode_new_pod(value)
            return wire.decode(value)
        except wire.DecodeError as exc:
            raise Unreadable(f"request.{name}", str(exc)) from None


class Unreadable(ValueError):
    """A part of the review left undecoded that turns out not to decode: a number beyond float64,
    which msgspec only notices when it builds the value."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def read_review(body: bytes) -> Review:
    """An HTTP request body as a Review, or BadReview naming the first field that is wrong."""
    create = wire.decode_create(body)
    if create is not None:
        try:
            review = parse_review(create)
        except BadReview:
            pass  # said again below, from the body read as any review
        else:
            request = review.request
            if request.get("operation") == "CREATE" and not request.get("subResource") and _is_pod(request):
                return review
    try:
        doc = wire.decode_review(body)
    except wire.DecodeError as exc:
        raise BadReview("body", f"is not JSON ({exc})", f"send an {API_VERSION} {KIND}") from None
    return parse_review(doc)


def parse_review(doc: Any) -> Review:
    """The request part of an AdmissionReview, or BadReview naming the first field that is wrong."""
    if not isinstance(doc, dict):
        raise BadReview("body", "is not a JSON object", f"send an {API_VERSION} {KIND} object")
    if doc.get("apiVersion") != API_VERSION:
        raise BadReview(
            "apiVersion",
            f"{doc.get('apiVersion')!r} is not supported",
            f"send {API_VERSION} (set admissionReviewVersions: [v1] in the webhook configuration)",
        )
    if doc.get("kind") != KIND:
        raise BadReview("kind", f"{doc.get('kind')!r} is not {KIND}", f"send kind: {KIND}")
    request = doc.get("request")
    if not isinstance(request, dict):
        raise BadReview("request", "is missing or not an object", "send the AdmissionRequest in request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview(
            "request.uid", "is missing or not a string", "send the request's uid, echoed in the answer"
        )
    return Review(uid, request)


_ANSWER_HEAD = b'{"apiVersion":"%s","kind":"%s","response":{"uid":' % (API_VERSION.encode(), KIND.encode())


def encode_response(uid: str, decision: Decision) -> bytes:
    """`response_document` as JSON bytes; the common answers (allowed, patched, no warnings) are
    put together from their parts, without building the document."""
    if decision.warnings or decision.result not in ("allowed", "patched"):
        return _JSON.encode(response_document(uid, decision))
    if not decision.ops:
        return b"".join((_ANSWER_HEAD, _JSON.encode(uid), b',"allowed":true}}'))
    return b"".join(
        (
            _ANSWER_HEAD,
            _JSON.encode(uid),
            b',"allowed":true,"patchType":"JSONPatch","patch":"',
            decision.patch,
            b'"}}',
        )
    )


def response_document(uid: str, decision: Decision) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": decision.result in ("allowed", "patched")}
    if decision.ops:
        response["patchType"] = "JSONPatch"
        response["patch"] = decision.patch.decode("ascii")
    if decision.warnings:
        response["warnings"] = decision.warnings
    if not response["allowed"]:
        response["status"] = {
            "status": "Failure",
            "code": decision.code,
            "reason": "Forbidden" if decision.code == 403 else "BadRequest",
            "message": decision.message,
        }
    return {"apiVersion": API_VERSION, "kind": KIND, "response": response}


def decide(review: Review, defaults: Defaults) -> Decision:
    try:
        return _decide(review, defaults)
    except Unreadable as exc:
        return _error(exc.field, f"cannot be read ({exc.reason})", "send numbers a 64-bit float can hold")


def _decide(review: Review, defaults: Defaults) -> Decision:
    request = review.request
    operation = request.get("operation")
    if operation not in ("CREATE", "UPDATE") or request.get("subResource"):
        return Decision("allowed")
    if not _is_pod(request):
        if _is_workload(request):
            return _decide_workload(review, defaults)
        return Decision("allowed")
    pod = review.field("object", new_pod=operation == "CREATE")
    if not isinstance(pod, dict):
        return _error(
            "request.object", "is not a Pod object", "send the Pod being admitted in request.object"
        )
    if not model.is_module_pod(pod):
        return Decision("allowed")
    if operation == "CREATE":
        try:
            return decide_create(pod, defaults)
        except wire.DecodeError as exc:
            raise Unreadable("request.object", str(exc)) from None
    return _decide_update(pod, review.field("oldObject"))


def _decide_update(pod: Mapping[str, Any], old: Any) -> Decision:
    """Container resources, env and affinity are immutable after CREATE, so an UPDATE gets no
    defaults; it is judged only on what it changes, so a Pod stored before the webhook existed (or
    one being deleted) can still have its finalizers and annotations edited."""
    metadata = pod.get("metadata")
    if isinstance(metadata, dict) and metadata.get("deletionTimestamp"):
        return Decision("allowed")
    problems = model_rules.validate_pod(pod, stack_defaulted=True, daemonset_owned=model.owned_by_daemonset(pod))
    before = (
        {
            str(p)
            for p in model_rules.validate_pod(old, stack_defaulted=True, daemonset_owned=model.owned_by_daemonset(old))
        }
        if isinstance(old, dict) and model.is_module_pod(old)
        else set()
    )
    new = [p for p in problems if str(p) not in before]
    errors = model_rules.errors(new)
    if errors:
        return deny(errors)
    return allow([], model_rules.warnings(new))


#: Appended to a DaemonSet's refusal: why its template is checked here, not on its Pods.
DAEMONSET_AFFINITY_NOTE = (
    "(a DaemonSet's Pods carry only the node its controller picked with this affinity, so the "
    "DaemonSet must select bases itself)"
)


def _decide_workload(review: Review, defaults: Defaults) -> Decision:
    """A Deployment / ReplicaSet / StatefulSet / DaemonSet of modules, at CREATE and UPDATE: its
    selector is aligned with the template (webhook.workloads), the template gets the Pod defaults
    that decide placement (webhook.defaults.template_ops), and what is wrong with the template comes
    back as warnings, so `kubectl apply` and `kubectl set image` show it at once. It is not
    rejected: Kubernetes reports Pod problems on the ReplicaSet (FailedCreate), with the Pod
    webhook's message. Except a DaemonSet whose template selects no bases: its Pods carry the
    DaemonSet controller's node term instead of that affinity (model.daemonset_node), so this is
    the only place it can be checked, and it is refused (on UPDATE, when the update brings it)."""
    workload = review.object()
    if not isinstance(workload, dict):
        return _error("request.object", "is not a workload object", "send the object being admitted")
    if module_template_labels(workload) is None:
        return Decision("allowed")
    metadata = workload.get("metadata")
    if isinstance(metadata, dict) and metadata.get("deletionTimestamp"):
        return Decision("allowed")
    kind = review.request["kind"].get("kind")
    ops, warnings = align_selector(workload)
    template = _template(workload)
    if template is None:
        return Decision("patched" if ops else "allowed", ops=ops, warnings=warnings)
    old_template = None
    if review.request.get("operation") == "UPDATE":
        old = review.field("oldObject")
        if isinstance(old, dict) and module_template_labels(old) is not None:
            old_template = _template(old)
    problems = model_rules.validate_pod(template, stack_defaulted=True)
    if kind == "DaemonSet":
        refused = [p for p in model_rules.errors(problems) if p.path.startswith(model.AFFINITY_PATH)]
        if refused and old_template is not None:
            before = {str(p) for p in model_rules.validate_pod(old_template, stack_defaulted=True)}
            refused = [p for p in refused if str(p) not in before]
        if refused:
            message = PROBLEM_SEPARATOR.join(f"spec.template.{p}" for p in refused)
            return Decision("denied", message=f"{message} {DAEMONSET_AFFINITY_NOTE}", code=403)
    ref = _kubectl_ref(kind, workload, review.request)
    warnings += [_template_warning(p, template, old_template, ref) for p in problems]
    if not _controlled(workload):
        added_ops, added = template_ops(template, defaults, eviction_tolerations=kind != "DaemonSet")
        ops += added_ops
        warnings += added
    return Decision("patched" if ops else "allowed", ops=ops, warnings=warnings)


def _template(workload: Any) -> dict[str, Any] | None:
    spec = workload.get("spec") if isinstance(workload, dict) else None
    template = spec.get("template") if isinstance(spec, dict) else None
    return template if isinstance(template, dict) else None


def _controlled(workload: Mapping[str, Any]) -> bool:
    """Whether a controller owns the workload (a Deployment's ReplicaSet, say): that controller
    compares its own template with this one, so this one is left as the controller wrote it."""
    metadata = workload.get("metadata")
    refs = metadata.get("ownerReferences") if isinstance(metadata, dict) else None
    return isinstance(refs, list) and any(isinstance(r, dict) and r.get("controller") is True for r in refs)


def _kubectl_ref(kind: Any, workload: Mapping[str, Any], request: Mapping[str, Any]) -> str:
    """`deployment/test-module-deployment`, as kubectl names the workload."""
    metadata = workload.get("metadata")
    name = request.get("name") or (metadata.get("name") if isinstance(metadata, dict) else None)
    return f"{str(kind).lower()}/{name if isinstance(name, str) and name else '<name>'}"


def _template_warning(
    problem: model_rules.Problem, template: Mapping[str, Any], old: Mapping[str, Any] | None, ref: str
) -> str:
    """A template problem as a warning. BIZ_VERSION that differs from the jar name's version gets a
    fix as a command line: `kubectl set image` of a new jar keeps the template's BIZ_VERSION."""
    if problem.code != model_rules.VERSION_MISMATCH:
        return f"spec.template.{problem}"
    i = int(problem.path[len("spec.containers[") : problem.path.index("]")])
    container = template["spec"]["containers"][i]
    name, image = container.get("name"), container.get("image")
    version = model.env_value(container, keys.ENV_BIZ_VERSION)
    jar = model.infer_from_jar(image if isinstance(image, str) else "")
    if jar is None or not version:  # not what VERSION_MISMATCH means; keep the rule's own words
        return f"spec.template.{problem}"
    old_container = _container(old, i)
    if (
        old_container is not None
        and old_container.get("image") == image
        and model.env_value(old_container, keys.ENV_BIZ_VERSION) != version
    ):  # only BIZ_VERSION changed: the jar is what is left to change
        fix = f"change the jar too: kubectl set image {ref} {name}=<URL of {jar[0]}-{version}-ark-biz.jar>"
    else:
        fix = f"change both: kubectl set env {ref} -c {name} {keys.ENV_BIZ_VERSION}={jar[1]}"
    return (
        f"spec.template.{problem.path}: {keys.ENV_BIZ_VERSION} {version} differs from the version in the jar "
        f"name {jar[1]}, so its Pods would show VersionMismatch — {fix}"
    )


def _container(template: Mapping[str, Any] | None, i: int) -> dict[str, Any] | None:
    spec = template.get("spec") if template is not None else None
    containers = spec.get("containers") if isinstance(spec, dict) else None
    if isinstance(containers, list) and i < len(containers) and isinstance(containers[i], dict):
        return containers[i]
    return None


def _is_workload(request: Mapping[str, Any]) -> bool:
    kind = request.get("kind")
    return isinstance(kind, dict) and kind.get("group") == "apps" and kind.get("kind") in WORKLOAD_KINDS


def _is_pod(request: Mapping[str, Any]) -> bool:
    kind = request.get("kind")
    if isinstance(kind, dict):
        return kind.get("kind") == "Pod" and not kind.get("group")
    resource = request.get("resource")
    return isinstance(resource, dict) and resource.get("resource") == "pods" and not resource.get("group")


def _error(field: str, what: str, fix: str) -> Decision:
    return Decision("error", message=f"{field}: {what} — {fix}", code=400)
