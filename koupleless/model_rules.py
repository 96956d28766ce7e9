"""The rules a module Pod must meet: everything wrong with it, each a `Problem` with a field path.

The webhook and the provider judge Pods through this module, so a rule lives here once. It reads
a Pod through koupleless.model, whose readers of a jar URL and of the node affinity it shares, so a
rule and the parsing read a field alike.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from koupleless import keys
from koupleless.model import AFFINITY_PATH, BASE_KEYS, _jar_url, _node_selector_terms, daemonset_node

#: A container name is a DNS-1123 label; a bizName must also be one to be a container name.
_BIZ_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_IGNORED_CONTAINER_FIELDS = ("command", "args", "livenessProbe", "readinessProbe", "startupProbe", "lifecycle")
#: The same as a set: one C-level test of a container's keys finds the usual container has none.
_IGNORED_FIELD_SET = frozenset(_IGNORED_CONTAINER_FIELDS)

_BASE_STACK, _BASE_NAME, _BASE_VERSION = BASE_KEYS
#: Problem.code of the soft problems a workload's admission words for its own command line.
VERSION_MISMATCH = "version-mismatch"
NAME_MISMATCH = "name-mismatch"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a module Pod: where (field path), what, and what to write instead."""

    path: str
    what: str
    fix: str
    severity: Literal["error", "warning"] = "error"
    #: Which rule found it, for a caller that words the fix its own way ("" for most rules).
    code: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.what} — {self.fix}"


def validate_pod(
    pod: Mapping[str, Any], *, stack_defaulted: bool = False, daemonset_owned: bool = False
) -> list[Problem]:
    """Every problem with a module Pod, errors and warnings, in field order.

    Only `spec` is read, and of it only what webhook/wire.py declares: the webhook decodes no
    more than that, and keeps one verdict per distinct such spec. A rule that reads another field
    must be declared there too.

    `stack_defaulted`: the caller will add `base.koupleless.io/stack In [java]`, so a missing stack
    is not reported.
    `daemonset_owned`: `model.owned_by_daemonset(pod)`, passed in so that this still reads only `spec`.
    Such a Pod whose node affinity is the DaemonSet controller's one node term (`daemonset_node`)
    has no base requirement of its own: the controller picked that node against the template's
    affinity, which is checked when the DaemonSet is admitted. Every other rule applies.
    """
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        spec = {}
    return problems_in_containers(spec.get("containers")) + problems_outside_containers(
        spec, daemonset_owned=daemonset_owned
    )


def problems_in_containers(containers: Any) -> list[Problem]:
    """`validate_pod`'s problems with `spec.containers`, which come first in its list."""
    if not isinstance(containers, list) or not containers:
        return [
            Problem(
                "spec.containers",
                "a module Pod needs at least one container",
                "add one container per module: name = bizName, image = the module jar URL, "
                "env BIZ_VERSION = its version",
            )
        ]
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for i, container in enumerate(containers):
        problems.extend(_container_problems(i, container, seen))
    return problems


def problems_outside_containers(spec: Mapping[str, Any], *, daemonset_owned: bool = False) -> list[Problem]:
    """The rest of `validate_pod`'s problems, read from the spec but not its containers: in a
    release, identical between versions (the webhook keeps them per such part of a spec)."""
    problems = [] if daemonset_owned and daemonset_node(spec) is not None else _affinity_problems(spec)
    problems.extend(_unsupported_problems(spec))
    return problems


def errors(problems: Iterable[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def warnings(problems: Iterable[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "warning"]


#: A release's versions keep their container names: a look-up, not a regex match, on a new version.
@functools.lru_cache(maxsize=1024)
def _is_biz_name(name: str) -> bool:
    return bool(_BIZ_NAME.match(name)) and len(name) <= 63


def _container_problems(i: int, container: Any, seen: dict[str, int]) -> list[Problem]:
    # The path is written out in each problem, not built first: most containers have none.
    if not isinstance(container, dict):
        return [Problem(f"spec.containers[{i}]", "is not an object", "write a container with name, image and env BIZ_VERSION")]
    out: list[Problem] = []
    name = container.get("name")
    image = container.get("image")
    if not isinstance(name, str) or not name:
        out.append(Problem(f"spec.containers[{i}].name", "bizName is required", "set the module's bizName, e.g. biz1"))
    elif not _is_biz_name(name):
        out.append(
            Problem(
                f"spec.containers[{i}].name",
                f"{name!r} is not a valid bizName",
                "use the module's artifactId in lower case: letters, digits and '-', at most 63 "
                "characters, starting and ending with a letter or digit, e.g. biz1",
            )
        )
    elif name in seen:
        out.append(
            Problem(
                f"spec.containers[{i}].name",
                f"bizName {name!r} is also spec.containers[{seen[name]}]",
                "a base holds one version of a module at a time: give each container its own module",
            )
        )
    if isinstance(name, str) and name:
        seen.setdefault(name, i)

    jar = None
    if not isinstance(image, str) or not image:
        out.append(
            Problem(
                f"spec.containers[{i}].image",
                "the module jar URL is required",
                "set image to the ark-biz jar URL, e.g. https://host/biz1-0.0.1-ark-biz.jar",
            )
        )
    elif not (parsed := _jar_url(image))[0]:  # one cache look-up for both questions
        out.append(
            Problem(
                f"spec.containers[{i}].image",
                f"{image!r} is not an http(s) or file URL of a .jar",
                "set image to the module's ark-biz jar URL, e.g. "
                "https://host/biz1-0.0.1-SNAPSHOT-ark-biz.jar or file:///opt/modules/biz1.jar",
            )
        )
    else:
        jar = parsed[1]

    # The BIZ_VERSION value and whether it comes from valueFrom, in one pass over env: this runs
    # on every admission.
    version: str | None = None
    value_from = False
    env = container.get("env")
    if isinstance(env, list):
        for var in env:
            if isinstance(var, dict) and var.get("name") == keys.ENV_BIZ_VERSION:
                if version is None:
                    value = var.get("value")
                    version = value if isinstance(value, str) else ""
                if var.get("valueFrom"):
                    value_from = True
                    break
    if version is None or version == "":
        if value_from:
            out.append(
                Problem(
                    f"spec.containers[{i}].env",
                    "BIZ_VERSION comes from valueFrom, which a base cannot resolve",
                    "write BIZ_VERSION as a literal value, the module version declared in pom.xml, "
                    "e.g. 0.0.1-SNAPSHOT",
                )
            )
        elif jar is None:
            out.append(
                Problem(
                    f"spec.containers[{i}].env",
                    "BIZ_VERSION is required",
                    "the module version declared in pom.xml, e.g. 0.0.1-SNAPSHOT "
                    "(or name the jar <artifact>-<version>-ark-biz.jar so it can be inferred)",
                )
            )
    if jar and isinstance(name, str) and name and jar[0] != name:
        out.append(
            Problem(
                f"spec.containers[{i}].name",
                f"bizName {name!r} differs from the jar's artifact name {jar[0]!r}",
                "make sure it matches the bizName declared in the module's pom.xml",
                "warning",
                NAME_MISMATCH,
            )
        )
    if jar and version and jar[1] != version:
        out.append(
            Problem(
                f"spec.containers[{i}].env",
                f"BIZ_VERSION {version!r} differs from the version in the jar name {jar[1]!r}",
                "make sure it matches the version declared in the module's pom.xml",
                "warning",
                VERSION_MISMATCH,
            )
        )
    if _IGNORED_FIELD_SET.isdisjoint(container):
        return out
    for ignored in _IGNORED_CONTAINER_FIELDS:
        if container.get(ignored):
            out.append(
                Problem(
                    f"spec.containers[{i}].{ignored}",
                    f"{ignored} is ignored: a base runs the module inside its own JVM",
                    f"remove {ignored}",
                    "warning",
                )
            )
    return out


def _affinity_problems(spec: Mapping[str, Any]) -> list[Problem]:
    terms = _node_selector_terms(spec)
    if not terms:
        return [
            Problem(
                AFFINITY_PATH,
                "no base name or version is required",
                f"add nodeSelectorTerms with matchExpressions {keys.LABEL_BASE_NAME} In [<base name>] and "
                f"{keys.LABEL_BASE_VERSION} In [<base version>], so the module lands only on bases that can run it",
            )
        ]
    out: list[Problem] = []
    for t, term in enumerate(terms):
        has_name = has_version = False
        exprs = term.get("matchExpressions") if isinstance(term, dict) else None
        for e, expr in enumerate(exprs if isinstance(exprs, list) else ()):
            if not isinstance(expr, dict):
                continue
            key = expr.get("key")
            if key == _BASE_NAME:
                has_name = True
            elif key == _BASE_VERSION:
                has_version = True
            elif key != _BASE_STACK:
                continue
            op = expr.get("operator")
            values = expr.get("values")
            if not isinstance(values, list):
                values = []
            if op != "In":
                out.append(
                    Problem(
                        f"{_term_path(t)}[{e}].operator",
                        f"operator {op!r} on {key} is not supported",
                        "use operator In with the exact values allowed, e.g. values: [1.1.1]",
                    )
                )
            elif not values or not _all_non_empty_strings(values):
                out.append(
                    Problem(
                        f"{_term_path(t)}[{e}].values",
                        f"{key} In needs at least one non-empty value",
                        "list the allowed values, e.g. values: [1.1.1]",
                    )
                )
        if not has_name:
            out.append(_missing_requirement(t, _BASE_NAME, "base"))
        if not has_version:
            out.append(_missing_requirement(t, _BASE_VERSION, "1.1.1"))
    return out


def _missing_requirement(t: int, key: str, example: str) -> Problem:
    return Problem(_term_path(t), f"no {key} requirement", f"add {{key: {key}, operator: In, values: [{example}]}}")


def _term_path(t: int) -> str:
    # Built only for a term with a problem: most admissions have none.
    return f"{AFFINITY_PATH}.nodeSelectorTerms[{t}].matchExpressions"


def _unsupported_problems(spec: Mapping[str, Any]) -> list[Problem]:
    out: list[Problem] = []
    if spec.get("initContainers"):
        out.append(
            Problem(
                "spec.initContainers",
                "a base cannot run init containers",
                "remove initContainers and put each module in spec.containers",
            )
        )
    if spec.get("ephemeralContainers"):
        out.append(
            Problem("spec.ephemeralContainers", "a base cannot run ephemeral containers", "remove them")
        )
    node_name = spec.get("nodeName")
    if isinstance(node_name, str) and node_name and not node_name.startswith(keys.VNODE_NAME_PREFIX):
        out.append(
            Problem(
                "spec.nodeName",
                f"{node_name!r} is not a base: only virtual nodes ({keys.VNODE_NAME_PREFIX}<baseID>) install modules",
                "remove nodeName and let the scheduler pick a base from the node affinity",
            )
        )
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        out.append(
            Problem(
                "spec",
                "hostNetwork / hostPID / hostIPC have no meaning for a module",
                "remove them: a module runs inside its base's JVM",
            )
        )
    return out


def _all_non_empty_strings(values: list[Any]) -> bool:
    for v in values:
        if not isinstance(v, str) or not v:
            return False
    return True
