"""What the webhook fills in on a module Pod at CREATE, as JSON Patch operations.

Every default is derived from the Pod or the webhook's flags, never guessed, and applying the
operations twice changes nothing (the apiserver may reinvoke the webhook).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from koupleless import keys, model
from webhook.patch import Op, add, escape, replace

_AFFINITY = ("spec", "affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution")
_TERMS_PATH = "/" + "/".join(_AFFINITY) + "/nodeSelectorTerms"
#: Paths are f-strings over pre-escaped tokens: this runs on every admission, and a generic
#: pointer builder was a third of the webhook's own time per request.
_RESOURCE_TOKEN = escape(keys.RESOURCE_MODULE)
_NO_EXECUTE = keys.EFFECT_NO_EXECUTE
#: The shape the DefaultTolerationSeconds admission plugin gives every Pod; only these are
#: shortened: any other toleration on these taints was written by someone on purpose (a DaemonSet's
#: tolerate-forever ones included).
_EVICTION_TAINTS = (keys.TAINT_NOT_READY, keys.TAINT_UNREACHABLE)
#: What kube-apiserver's defaulting writes into a Pod that names no scheduler; both it and an
#: absent name mean "the user did not choose one".
DEFAULT_SCHEDULER_NAME = "default-scheduler"


@dataclass(frozen=True, slots=True)
class Defaults:
    #: The provider's env; its taint is tolerated only when the provider puts it on vnodes.
    env: str = keys.DEFAULT_ENV
    env_taint: bool = False
    #: How long a module stays bound to a base that stopped answering before it is evicted.
    eviction_toleration_seconds: int = 30
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


def default_ops(pod: Mapping[str, Any], defaults: Defaults) -> list[Op]:
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return []
    ops: list[Op] = []
    requests_module = False
    containers = spec.get("containers")
    if isinstance(containers, list):
        for i, container in enumerate(containers):
            if isinstance(container, dict):
                ops.extend(_biz_version_ops(i, container))
                ops.extend(_module_resource_ops(i, container))
                requests_module = True
    ops.extend(_stack_ops(spec))
    ops.extend(_toleration_ops(spec, defaults))
    # Only beside the module resource: the profile skips the in-tree node-affinity filter and
    # relies on the extender, which kube-scheduler calls only for Pods that request that resource.
    if requests_module and defaults.scheduler_name:
        ops.extend(_scheduler_ops(spec, defaults.scheduler_name))
    return ops


def _scheduler_ops(spec: Mapping[str, Any], name: str) -> list[Op]:
    current = spec.get("schedulerName")
    # Any other name was picked by the user on purpose, and is kept.
    if current in (None, "", DEFAULT_SCHEDULER_NAME) and current != name:
        return [add("/spec/schedulerName", name)]
    return []


def _biz_version_ops(i: int, container: Mapping[str, Any]) -> list[Op]:
    module = model.module_from_container(container)
    if module.version_source != "jar":
        return []
    entry = {"name": keys.ENV_BIZ_VERSION, "value": module.biz_version}
    env = container.get("env")
    if not isinstance(env, list):
        return [add(f"/spec/containers/{i}/env", [entry])]
    for j, var in enumerate(env):
        if isinstance(var, dict) and var.get("name") == keys.ENV_BIZ_VERSION:
            if var.get("valueFrom"):
                return []  # reported as an error by validation
            # `add` creates the member or replaces it, whether `value` is absent or empty.
            return [add(f"/spec/containers/{i}/env/{j}/value", module.biz_version)]
    return [add(f"/spec/containers/{i}/env/-", entry)]


def _module_resource_ops(i: int, container: Mapping[str, Any]) -> list[Op]:
    """One `koupleless.io/module` per container, in requests and limits (an extended resource must
    have both, equal), unless the user already asked for some."""
    name = keys.RESOURCE_MODULE
    resources = container.get("resources")
    base = f"/spec/containers/{i}/resources"
    if not isinstance(resources, dict):
        return [add(base, {"requests": {name: "1"}, "limits": {name: "1"}})]
    requests, limits = resources.get("requests"), resources.get("limits")
    amount = "1"
    for existing in (requests, limits):
        if isinstance(existing, dict) and isinstance(existing.get(name), str | int):
            amount = str(existing[name])
            break
    ops = []
    for field, current in (("requests", requests), ("limits", limits)):
        if not isinstance(current, dict):
            ops.append(add(f"{base}/{field}", {name: amount}))
        elif name not in current:
            ops.append(add(f"{base}/{field}/{_RESOURCE_TOKEN}", amount))
    return ops


def _stack_ops(spec: Mapping[str, Any]) -> list[Op]:
    required = spec.get("affinity", {})
    for step in _AFFINITY[2:]:
        required = required.get(step) if isinstance(required, dict) else None
    terms = required.get("nodeSelectorTerms") if isinstance(required, dict) else None
    if not isinstance(terms, list):
        return []
    stack = {"key": keys.LABEL_BASE_STACK, "operator": "In", "values": [keys.DEFAULT_BASE_STACK]}
    ops = []
    for t, term in enumerate(terms):
        if not isinstance(term, dict):
            continue
        exprs = term.get("matchExpressions")
        term_path = f"{_TERMS_PATH}/{t}/matchExpressions"
        if not isinstance(exprs, list):
            ops.append(add(term_path, [stack]))
        elif not any(isinstance(e, dict) and e.get("key") == keys.LABEL_BASE_STACK for e in exprs):
            ops.append(add(f"{term_path}/-", stack))
    return ops


def _toleration_ops(spec: Mapping[str, Any], defaults: Defaults) -> list[Op]:
    current = spec.get("tolerations")
    if current is not None and not isinstance(current, list):
        return []
    tolerations = list(current) if current else []
    seconds = defaults.eviction_toleration_seconds
    replaced = False
    vnode = env = not_ready = unreachable = False
    # One pass: this runs on every admission.
    for n, tol in enumerate(tolerations):
        if not isinstance(tol, dict):
            continue
        key = tol.get("key")
        if (
            key in _EVICTION_TAINTS
            and tol.get("operator") == "Exists"
            and tol.get("effect") == keys.EFFECT_NO_EXECUTE
            and tol.get("tolerationSeconds") == defaults.apiserver_toleration_seconds
            and seconds != defaults.apiserver_toleration_seconds
        ):
            tolerations[n] = tol = eviction_toleration(key, seconds)
            replaced = True
        if not key:  # a wildcard may tolerate any of them
            vnode = vnode or tolerates(
                tol, keys.TAINT_VIRTUAL_NODE, keys.TAINT_VIRTUAL_NODE_VALUE, _NO_EXECUTE
            )
            env = env or tolerates(tol, keys.TAINT_NODE_ENV, defaults.env, _NO_EXECUTE)
            not_ready = not_ready or tolerates(tol, keys.TAINT_NOT_READY, "", _NO_EXECUTE)
            unreachable = unreachable or tolerates(tol, keys.TAINT_UNREACHABLE, "", _NO_EXECUTE)
        elif key == keys.TAINT_VIRTUAL_NODE:
            vnode = vnode or tolerates(tol, key, keys.TAINT_VIRTUAL_NODE_VALUE, _NO_EXECUTE)
        elif key == keys.TAINT_NODE_ENV:
            env = True  # the Pod picked its env itself
        elif key == keys.TAINT_NOT_READY:
            not_ready = not_ready or tolerates(tol, key, "", _NO_EXECUTE)
        elif key == keys.TAINT_UNREACHABLE:
            unreachable = unreachable or tolerates(tol, key, "", _NO_EXECUTE)
    missing: list[dict[str, Any]] = []
    if not vnode:
        missing.append(dict(keys.vnode_toleration()))
    if defaults.env_taint and not env:
        missing.append(dict(keys.env_toleration(defaults.env)))
    if not not_ready:
        missing.append(eviction_toleration(keys.TAINT_NOT_READY, seconds))
    if not unreachable:
        missing.append(eviction_toleration(keys.TAINT_UNREACHABLE, seconds))
    if not missing and not replaced:
        return []
    tolerations += missing
    if current is None:
        return [add("/spec/tolerations", tolerations)]
    return [replace("/spec/tolerations", tolerations)]
