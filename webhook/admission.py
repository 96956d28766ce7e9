"""AdmissionReview in, decision out: parse the request, decide, build the response document.

Pure functions over plain dicts, so the HTTP layer stays thin and every rule is testable without a
server. Reference: k8s-protocols.md §3.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from koupleless import keys, model
from webhook import wire
from webhook.defaults import Defaults, default_ops, template_ops
from webhook.patch import Op, encode
from webhook.workloads import WORKLOAD_KINDS, align_selector, module_template_labels

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
#: Separates problems in a rejection: the message becomes one line of a ReplicaSet event, where a
#: newline would break `kubectl describe`'s table.
PROBLEM_SEPARATOR = "; "
#: New Pods whose spec (what the webhook reads of it) is up to this size have their verdict kept,
#: for this many distinct specs; a bigger one is judged each time, so the cache stays small (a few
#: MB at most) whatever users write.
CACHED_SPEC_BYTES = 16 * 1024
CACHED_SPECS = 512
_JSON = msgspec.json.Encoder()

Result = Literal["allowed", "patched", "denied", "error"]


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


class Decision:
    """Shared between requests (the verdicts of new Pods are kept): never changed once made
    (Final to mypy). A plain class: a frozen dataclass's __init__, which sets each field through
    object.__setattr__, cost a tenth of judging a new Pod."""

    __slots__ = ("code", "message", "ops", "patch", "result", "warnings")

    def __init__(
        self,
        result: Result,
        ops: list[Op] | None = None,
        warnings: list[str] | None = None,
        message: str = "",
        code: int = 200,
    ) -> None:
        self.result: Final = result
        self.ops: Final[list[Op]] = ops if ops is not None else []
        self.warnings: Final[list[str]] = warnings if warnings is not None else []
        self.message: Final = message
        self.code: Final = code
        #: `ops` as the response's `patch`, base64 of their JSON, encoded once
        self.patch: Final = encode(ops) if ops else b""

    def _fields(self) -> tuple[Result, list[Op], list[str], str, int]:
        return (self.result, self.ops, self.warnings, self.message, self.code)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Decision) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # its lists are not hashable either

    def __repr__(self) -> str:
        result, ops, warnings, message, code = self._fields()
        return f"Decision({result!r}, ops={ops!r}, warnings={warnings!r}, message={message!r}, code={code!r})"


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
        return _decide_create(pod, defaults)
    return _decide_update(pod, review.field("oldObject"))


class KeptVerdicts:
    """Verdicts of new Pods by spec (and DaemonSet ownership), for one Defaults at a time: a
    process has one, and a key of bytes alone is hashed once (bytes keep their hash), where a
    Defaults in every key was hashed by Python code at each look-up."""

    __slots__ = ("defaults", "kept", "seen_once")

    def __init__(self) -> None:
        self.defaults: Defaults | None = None
        self.kept: dict[bytes, Decision] = {}
        #: Keys of specs judged once and not yet kept: a verdict is kept from its spec's second
        #: sighting on. Bytes, nothing the garbage collector walks, unlike a kept verdict's ops.
        self.seen_once: set[bytes] = set()

    def use(self, defaults: Defaults) -> None:
        """Verdicts made under other defaults do not apply: forget them."""
        if defaults != self.defaults:
            self.kept.clear()
            self.seen_once.clear()
            self.defaults = defaults


_VERDICTS = KeptVerdicts()


@dataclass(slots=True)
class VerdictCounts:
    """New module Pods whose kept verdict was reused, and those judged afresh (for /metrics)."""

    reused: int = 0
    judged: int = 0


VERDICT_COUNTS = VerdictCounts()


def _decide_create(pod: Mapping[str, Any], defaults: Defaults) -> Decision:
    """A new module Pod's verdict depends on its spec and on whether a DaemonSet owns it (its
    metadata.ownerReferences, model.owned_by_daemonset), and all replicas of a release share that
    spec byte for byte in what the webhook reads of it (webhook.wire declares no volumes, mounts or
    names): one verdict per distinct spec and ownership is kept, from the spec's second Pod on."""
    spec = pod.get("spec")
    daemonset_owned = model.owned_by_daemonset(pod)
    if not isinstance(spec, dict):
        return _judge_new_pod(pod, defaults, daemonset_owned)
    cache = _VERDICTS
    if defaults is not cache.defaults:
        cache.use(defaults)
    key = _JSON.encode((daemonset_owned, spec))  # Raw parts are copied as they arrived
    verdict = cache.kept.get(key)
    if verdict is not None:
        VERDICT_COUNTS.reused += 1
    else:
        VERDICT_COUNTS.judged += 1
        decoded = dict(spec)
        try:
            for name in wire.RAW_SPEC_FIELDS:
                value = decoded.get(name)
                if isinstance(value, wire.Raw):
                    decoded[name] = wire.decode(value)
        except wire.DecodeError as exc:
            raise Unreadable("request.object", str(exc)) from None
        verdict = _judge_new_pod({"spec": decoded}, defaults, daemonset_owned)
        if len(key) <= CACHED_SPEC_BYTES:
            # Kept once the spec comes back: every replica after a release's second reuses it, and
            # a stream of one-off specs does not churn the cache (and the collector) with verdicts
            # nobody asks for again.
            seen_once = cache.seen_once
            if key in seen_once:
                seen_once.discard(key)
                if len(cache.kept) >= CACHED_SPECS:
                    cache.kept.clear()  # simpler than LRU order, and as good: releases come in bursts
                cache.kept[key] = verdict
            else:
                if len(seen_once) >= CACHED_SPECS:
                    seen_once.clear()
                seen_once.add(key)
    return verdict


def _judge_new_pod(pod: Mapping[str, Any], defaults: Defaults, daemonset_owned: bool = False) -> Decision:
    problems = model.validate_pod(pod, stack_defaulted=True, daemonset_owned=daemonset_owned)
    if not problems:  # the usual case, without two list scans
        ops = default_ops(pod, defaults, daemonset_owned=daemonset_owned)
        return Decision("patched" if ops else "allowed", ops=ops)
    errors = model.errors(problems)
    if errors:
        return _deny(errors)
    return _allow(default_ops(pod, defaults, daemonset_owned=daemonset_owned), model.warnings(problems))


def _decide_update(pod: Mapping[str, Any], old: Any) -> Decision:
    """Container resources, env and affinity are immutable after CREATE, so an UPDATE gets no
    defaults; it is judged only on what it changes, so a Pod stored before the webhook existed (or
    one being deleted) can still have its finalizers and annotations edited."""
    metadata = pod.get("metadata")
    if isinstance(metadata, dict) and metadata.get("deletionTimestamp"):
        return Decision("allowed")
    problems = model.validate_pod(pod, stack_defaulted=True, daemonset_owned=model.owned_by_daemonset(pod))
    before = (
        {
            str(p)
            for p in model.validate_pod(old, stack_defaulted=True, daemonset_owned=model.owned_by_daemonset(old))
        }
        if isinstance(old, dict) and model.is_module_pod(old)
        else set()
    )
    new = [p for p in problems if str(p) not in before]
    errors = model.errors(new)
    if errors:
        return _deny(errors)
    return _allow([], model.warnings(new))


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
    problems = model.validate_pod(template, stack_defaulted=True)
    if kind == "DaemonSet":
        refused = [p for p in model.errors(problems) if p.path.startswith(model.AFFINITY_PATH)]
        if refused and old_template is not None:
            before = {str(p) for p in model.validate_pod(old_template, stack_defaulted=True)}
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
    problem: model.Problem, template: Mapping[str, Any], old: Mapping[str, Any] | None, ref: str
) -> str:
    """A template problem as a warning. BIZ_VERSION that differs from the jar name's version gets a
    fix as a command line: `kubectl set image` of a new jar keeps the template's BIZ_VERSION."""
    if problem.code != model.VERSION_MISMATCH:
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


def _allow(ops: list[Op], warnings: list[model.Problem]) -> Decision:
    return Decision("patched" if ops else "allowed", ops=ops, warnings=[str(w) for w in warnings])


def _deny(errors: list[model.Problem]) -> Decision:
    return Decision("denied", message=PROBLEM_SEPARATOR.join(str(e) for e in errors), code=403)


def _error(field: str, what: str, fix: str) -> Decision:
    return Decision("error", message=f"{field}: {what} — {fix}", code=400)
