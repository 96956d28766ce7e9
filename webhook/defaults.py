"""What the webhook fills in on a module Pod at CREATE, as JSON Patch operations.

Every default is derived from the Pod or the webhook's flags, never guessed, and applying the
operations twice changes nothing (the apiserver may reinvoke the webhook).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from koupleless import keys, model
from webhook.patch import Op, add, escape

_AFFINITY = ("spec", "affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution")
_TERMS_PATH = "/" + "/".join(_AFFINITY) + "/nodeSelectorTerms"
#: Paths are f-strings over pre-escaped tokens: this runs on every admission, and a generic
#: pointer builder was a third of the webhook's own time per request.
_RESOURCE_TOKEN = escape(keys.RESOURCE_MODULE)
_NO_EXECUTE = keys.EFFECT_NO_EXECUTE
_BIZ_VERSION = keys.ENV_BIZ_VERSION
#: What a user may have written as an extended-resource amount (`str | int`, as a tuple once).
_AMOUNT_TYPES = (str, int)
#: The shape the DefaultTolerationSeconds admission plugin gives every Pod; only these are
#: shortened: any other toleration on these taints was written by someone on purpose (a DaemonSet's
#: tolerate-forever ones included).
_NOT_READY, _UNREACHABLE = keys.TAINT_NOT_READY, keys.TAINT_UNREACHABLE
_VIRTUAL_NODE, _VIRTUAL_NODE_VALUE, _NODE_ENV = keys.TAINT_VIRTUAL_NODE, keys.TAINT_VIRTUAL_NODE_VALUE, keys.TAINT_NODE_ENV
_STACK_KEY = keys.LABEL_BASE_STACK
_RESOURCE = keys.RESOURCE_MODULE
_DEFAULT_STACK = keys.DEFAULT_BASE_STACK
#: `/spec/containers/<i>` of the first few containers, formatted once (most Pods have one).
_CONTAINER_POINTERS = tuple(f"/spec/containers/{i}" for i in range(8))


def _container_pointer(i: int) -> str:
    return _CONTAINER_POINTERS[i] if i < len(_CONTAINER_POINTERS) else f"/spec/containers/{i}"

#: What kube-apiserver's defaulting writes into a Pod that names no scheduler; both it and an
#: absent name mean "the user did not choose one".
DEFAULT_SCHEDULER_NAME = "default-scheduler"


@dataclass(frozen=True, slots=True)
class Defaults:
    #: The provider's env; its taint is tolerated only when the provider puts it on vnodes.
    env: str = keys.DEFAULT_ENV
    env_taint: bool = False
    #: How long a module stays bound to a base that stopped answering before it is evicted, counted
    #: from the Node's not-ready taint: with the provider's defaults a module leaves a base silent
    #: for 20 s (NotReady) + up to 5 s (node lifecycle controller) + this (README, "A base that dies").
    eviction_toleration_seconds: int = 10
    #: The apiserver's --default-not-ready-toleration-seconds / --default-unreachable-toleration-seconds:
    #: tolerations with exactly this value were added by the apiserver, not the user.
    apiserver_toleration_seconds: int = 300
    #: `spec.schedulerName` for module Pods that did not choose a scheduler ("" leaves it alone):
    #: the extender's profile, where node selection is the extender's and it can name the base
    #: label that does not match (extender/config.py).
    scheduler_name: str = ""


def tolerates(toleration: Any, key: str, value: str, effect: str) -> bool:
    """Kubernetes' ToleratesTaint for a taint `key=value:effect`."""
    if not isinstance(toleration, dict):
        return False
    t_effect = toleration.get("effect") or ""
    if t_effect and t_effect != effect:
        return False
    t_key = toleration.get("key") or ""
    if t_key and t_key != key:
        return False
    operator = toleration.get("operator") or "Equal"
    if operator == "Exists":
        return True
    return operator == "Equal" and bool(t_key) and (toleration.get("value") or "") == value


def eviction_toleration(key: str, seconds: int) -> dict[str, Any]:
    return {"key": key, "operator": "Exists", "effect": keys.EFFECT_NO_EXECUTE, "tolerationSeconds": seconds}


def default_ops(pod: Mapping[str, Any], defaults: Defaults, *, daemonset_owned: bool = False) -> list[Op]:
    """Only `spec` is read, and of it only what webhook/wire.py declares (see model_rules.validate_pod).

    `daemonset_owned` (model.owned_by_daemonset): a DaemonSet's Pod whose node affinity is its
    controller's one node term keeps that term as written (no stack requirement added to it).
    """
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return []
    ops, requests_module = ops_in_containers(spec.get("containers"))
    ops += ops_outside_containers(spec, defaults, daemonset_owned=daemonset_owned)
    if requests_module:
        ops += scheduler_ops(spec, defaults)
    return ops


def ops_in_containers(containers: Any) -> tuple[list[Op], bool]:
    """`default_ops`'s operations on `spec.containers`, which come first, and whether a container
    requests the module resource (then `scheduler_ops` apply)."""
    # The helpers append to one list: this runs on every admission, and a list per helper plus
    # `extend` was a measurable share of it.
    ops: list[Op] = []
    requests_module = False
    if isinstance(containers, list):
        for i, container in enumerate(containers):
            if isinstance(container, dict):
                _biz_version_ops(ops, i, container)
                _module_resource_ops(ops, i, container)
                requests_module = True
    return ops, requests_module


def ops_outside_containers(spec: Mapping[str, Any], defaults: Defaults, *, daemonset_owned: bool = False) -> list[Op]:
    """`default_ops`'s operations after those on containers, but for `scheduler_ops`: read from the
    spec but not its containers, so in a release identical between versions (the webhook keeps
    them per such part of a spec)."""
    ops: list[Op] = []
    if not (daemonset_owned and model.daemonset_node(spec) is not None):
        _stack_ops(ops, spec)
    ops.extend(_toleration_ops(spec, defaults))
    return ops


def scheduler_ops(spec: Mapping[str, Any], defaults: Defaults) -> list[Op]:
    """`default_ops`'s last operations, for a Pod that requests the module resource (a container,
    `ops_in_containers`). Only beside that resource: the profile skips the in-tree node-affinity
    filter and relies on the extender, which kube-scheduler calls only for Pods that request it."""
    return _scheduler_ops(spec, defaults.scheduler_name) if defaults.scheduler_name else []


#: Where an apps/v1 workload keeps its Pod template, before the paths default_ops writes (/spec/...).
TEMPLATE_POINTER = "/spec/template"
_TEMPLATE_AFFINITY_PATH = "spec.template." + model.AFFINITY_PATH


def template_ops(
    template: Mapping[str, Any], defaults: Defaults, *, eviction_tolerations: bool = True
) -> tuple[list[Op], list[str]]:
    """The defaults of `default_ops` that decide where a workload's Pods can go, written into its
    Pod template (`spec.template`), and one warning per field they change.

    A DaemonSet controller creates Pods only for Nodes whose taints the template tolerates and
    whose labels its affinity selects, before any Pod reaches the webhook: so the virtual-node (and
    env) toleration, the stack requirement and `koupleless.io/module` per container go into the
    template. The short not-ready / unreachable tolerations too, unless `eviction_tolerations` is
    False (a DaemonSet's: its controller makes every Pod tolerate those taints forever anyway).
    Not BIZ_VERSION from the jar name: each Pod infers it from its own jar, so a template that
    does not write BIZ_VERSION takes a new jar's version with `kubectl set image`. Not the
    scheduler name either: each Pod gets it. Applying the result twice changes nothing.
    """
    spec = template.get("spec")
    if not isinstance(spec, dict):
        return [], []
    ops: list[Op] = []
    warnings: list[str] = []
    containers = spec.get("containers")
    if isinstance(containers, list):
        for i, container in enumerate(containers):
            if isinstance(container, dict):
                n = len(ops)
                _module_resource_ops(ops, i, container)
                if len(ops) > n:
                    warnings.append(
                        f"spec.template.spec.containers[{i}].resources: added {keys.RESOURCE_MODULE} to "
                        "requests and limits (a module takes one of its base's module slots)"
                    )
    n = len(ops)
    _stack_ops(ops, spec)
    for op in ops[n:]:
        term = op["path"][len(_TERMS_PATH) + 1 :].split("/", 1)[0]
        warnings.append(
            f"{_TEMPLATE_AFFINITY_PATH}.nodeSelectorTerms[{term}].matchExpressions: added "
            f"{keys.LABEL_BASE_STACK} In [{keys.DEFAULT_BASE_STACK}]"
        )
    tolerations = _toleration_ops(spec, defaults, eviction=eviction_tolerations)
    if tolerations:
        ops.extend(tolerations)
        warnings.extend(_toleration_warnings(spec.get("tolerations") or [], tolerations[0]["value"], defaults))
    return [{**op, "path": TEMPLATE_POINTER + op["path"]} for op in ops], warnings


def _toleration_warnings(before: list[Any], after: list[dict[str, Any]], defaults: Defaults) -> list[str]:
    changed = [t for n, t in enumerate(after) if n >= len(before) or t != before[n]]
    placement = [t for t in changed if t.get("key") in (keys.TAINT_VIRTUAL_NODE, keys.TAINT_NODE_ENV)]
    eviction = [str(t["key"]) for t in changed if t.get("key") in (_NOT_READY, _UNREACHABLE)]
    out = []
    if placement:
        taints = ", ".join(f"{t['key']}={t['value']}:{t['effect']}" for t in placement)
        out.append(
            f"spec.template.spec.tolerations: added {taints}, the taint{'s' if len(placement) > 1 else ''} "
            "of every base's Node (a DaemonSet only targets Nodes whose taints its template tolerates)"
        )
    if eviction:
        seconds = defaults.eviction_toleration_seconds
        taints = " and ".join(f"{key}:{_NO_EXECUTE}" for key in eviction)
        out.append(
            f"spec.template.spec.tolerations: {taints} now tolerated for {seconds}s, so modules leave a "
            f"base that stopped answering {seconds} s after its Node is tainted"
        )
    return out


def _scheduler_ops(spec: Mapping[str, Any], name: str) -> list[Op]:
    current = spec.get("schedulerName")
    # Any other name was picked by the user on purpose, and is kept.
    if current in (None, "", DEFAULT_SCHEDULER_NAME) and current != name:
        return [add("/spec/schedulerName", name)]
    return []


def _biz_version_ops(ops: list[Op], i: int, container: Mapping[str, Any]) -> None:
    """BIZ_VERSION from the jar name when the env does not give one (model.module_from_container's
    rule), read in one pass over env: the first BIZ_VERSION entry decides."""
    env = container.get("env")
    found = -1
    from_ref = False
    if isinstance(env, list):
        for j, var in enumerate(env):
            if isinstance(var, dict) and var.get("name") == _BIZ_VERSION:
                value = var.get("value")
                if isinstance(value, str) and value:
                    return
                found, from_ref = j, bool(var.get("valueFrom"))
                break
    image = container.get("image")
    inferred = model.infer_from_jar(image if isinstance(image, str) else "")
    if inferred is None:
        return
    version = inferred[1]
    # Ops as literals (patch.add's shape) on the paths of new Pods: a call less each.
    if not isinstance(env, list):
        path = _container_pointer(i) + "/env"
        ops.append({"op": "add", "path": path, "value": [{"name": _BIZ_VERSION, "value": version}]})
    elif found < 0:
        path = _container_pointer(i) + "/env/-"
        ops.append({"op": "add", "path": path, "value": {"name": _BIZ_VERSION, "value": version}})
    elif not from_ref:  # valueFrom is reported as an error by validation
        # `add` creates the member or replaces it, whether `value` is absent or empty.
        ops.append(add(f"/spec/containers/{i}/env/{found}/value", version))


def _module_resource_ops(ops: list[Op], i: int, container: Mapping[str, Any]) -> None:
    """One `koupleless.io/module` per container, in requests and limits (an extended resource must
    have both, equal), unless the user already asked for some."""
    name = _RESOURCE
    resources = container.get("resources")
    base = _container_pointer(i) + "/resources"
    if not isinstance(resources, dict):
        ops.append({"op": "add", "path": base, "value": {"requests": {name: "1"}, "limits": {name: "1"}}})
        return
    requests, limits = resources.get("requests"), resources.get("limits")
    if not isinstance(requests, dict):
        requests = None
    if not isinstance(limits, dict):
        limits = None
    amount = "1"
    if requests is not None and isinstance(requests.get(name), _AMOUNT_TYPES):
        amount = str(requests[name])
    elif limits is not None and isinstance(limits.get(name), _AMOUNT_TYPES):
        amount = str(limits[name])
    if requests is None:
        ops.append({"op": "add", "path": base + "/requests", "value": {name: amount}})
    elif name not in requests:
        ops.append({"op": "add", "path": f"{base}/requests/{_RESOURCE_TOKEN}", "value": amount})
    if limits is None:
        ops.append({"op": "add", "path": base + "/limits", "value": {name: amount}})
    elif name not in limits:
        ops.append({"op": "add", "path": f"{base}/limits/{_RESOURCE_TOKEN}", "value": amount})


def _stack_ops(ops: list[Op], spec: Mapping[str, Any]) -> None:
    # _AFFINITY's steps below spec, written out: this runs on every new Pod.
    required = spec.get("affinity")
    if isinstance(required, dict):
        required = required.get("nodeAffinity")
    if isinstance(required, dict):
        required = required.get("requiredDuringSchedulingIgnoredDuringExecution")
    terms = required.get("nodeSelectorTerms") if isinstance(required, dict) else None
    if not isinstance(terms, list):
        return
    for t, term in enumerate(terms):
        if not isinstance(term, dict):
            continue
        exprs = term.get("matchExpressions")
        if not isinstance(exprs, list):
            ops.append(add(f"{_TERMS_PATH}/{t}/matchExpressions", [_stack_expression()]))
            continue
        for e in exprs:
            if isinstance(e, dict) and e.get("key") == _STACK_KEY:
                break
        else:
            path = f"{_TERMS_PATH}/{t}/matchExpressions/-"
            ops.append({"op": "add", "path": path, "value": _stack_expression()})


def _stack_expression() -> dict[str, Any]:
    return {"key": _STACK_KEY, "operator": "In", "values": [_DEFAULT_STACK]}


def _toleration_ops(spec: Mapping[str, Any], defaults: Defaults, *, eviction: bool = True) -> list[Op]:
    """`eviction` False: the not-ready / unreachable tolerations are neither added nor shortened."""
    current = spec.get("tolerations")
    if current is not None and not isinstance(current, list):
        return []
    tolerations = list(current) if current else []
    seconds = defaults.eviction_toleration_seconds
    apiserver_seconds = defaults.apiserver_toleration_seconds
    shorten = eviction and seconds != apiserver_seconds
    replaced = False
    vnode = env = not_ready = unreachable = False
    # One pass: this runs on every admission.
    for n, tol in enumerate(tolerations):
        if not isinstance(tol, dict):
            continue
        key = tol.get("key")
        if not key:  # a wildcard may tolerate any of them
            vnode = vnode or tolerates(tol, _VIRTUAL_NODE, _VIRTUAL_NODE_VALUE, _NO_EXECUTE)
            env = env or tolerates(tol, _NODE_ENV, defaults.env, _NO_EXECUTE)
            not_ready = not_ready or tolerates(tol, _NOT_READY, "", _NO_EXECUTE)
            unreachable = unreachable or tolerates(tol, _UNREACHABLE, "", _NO_EXECUTE)
        elif key == _NOT_READY or key == _UNREACHABLE:
            if (
                shorten
                and tol.get("operator") == "Exists"
                and tol.get("effect") == _NO_EXECUTE
                and tol.get("tolerationSeconds") == apiserver_seconds
            ):
                # eviction_toleration's, written out: most new Pods have both shortened
                tolerations[n] = {"key": key, "operator": "Exists", "effect": _NO_EXECUTE, "tolerationSeconds": seconds}
                replaced = True
                tolerated = True  # the replacement is an Exists toleration of this very taint
            elif key == _NOT_READY:
                tolerated = not_ready or tolerates(tol, key, "", _NO_EXECUTE)
            else:
                tolerated = unreachable or tolerates(tol, key, "", _NO_EXECUTE)
            if key == _NOT_READY:
                not_ready = not_ready or tolerated
            else:
                unreachable = unreachable or tolerated
        elif key == _VIRTUAL_NODE:
            vnode = vnode or tolerates(tol, key, _VIRTUAL_NODE_VALUE, _NO_EXECUTE)
        elif key == _NODE_ENV:
            env = True  # the Pod picked its env itself
    missing: list[dict[str, Any]] = []
    if not vnode:
        missing.append(keys.vnode_toleration())
    if defaults.env_taint and not env:
        missing.append(keys.env_toleration(defaults.env))
    if eviction and not not_ready:
        missing.append(eviction_toleration(keys.TAINT_NOT_READY, seconds))
    if eviction and not unreachable:
        missing.append(eviction_toleration(keys.TAINT_UNREACHABLE, seconds))
    if not missing and not replaced:
        return []
    tolerations += missing
    return [{"op": "add" if current is None else "replace", "path": "/spec/tolerations", "value": tolerations}]
