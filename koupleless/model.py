"""The module model: what a module Pod asks a base to do, and everything wrong with it.

A module Pod carries one module per container (name = bizName, image = jar URL, env BIZ_VERSION =
bizVersion) and says which bases may take it through required node affinity on the base labels.
The webhook, the extender and the provider all read Pods through this module, so a rule lives here
once. Parsing never raises on odd shapes: a Pod is network input.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from koupleless import keys

JsonDict = dict[str, Any]

#: A container name is a DNS-1123 label; a bizName must also be one to be a container name.
_BIZ_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
#: `<artifact>-<version>-ark-biz.jar`, where the version starts with a digit (Maven convention).
#: The version is greedy: what follows it is fixed (`-ark-biz.jar` at the end), so it matches what a
#: lazy one would, without trying the suffix after every character (a new release's first Pod
#: parses its jar name).
_ARK_BIZ_JAR = re.compile(r"^(?P<artifact>.+?)-(?P<version>\d[0-9A-Za-z.+_-]*)-ark-biz\.jar$")
_JAR_URL_SCHEMES = ("http", "https", "file")
_IGNORED_CONTAINER_FIELDS = ("command", "args", "livenessProbe", "readinessProbe", "startupProbe", "lifecycle")
#: The same as a set: one C-level test of a container's keys finds the usual container has none.
_IGNORED_FIELD_SET = frozenset(_IGNORED_CONTAINER_FIELDS)

AFFINITY_PATH = "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
BASE_KEYS = (keys.LABEL_BASE_STACK, keys.LABEL_BASE_NAME, keys.LABEL_BASE_VERSION)
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


def biz_key(biz_name: str, biz_version: str) -> str:
    """How a module is named everywhere (Pods, bases, Events): `bizName:bizVersion`."""
    return f"{biz_name}:{biz_version}"


@dataclass(frozen=True, slots=True)
class Module:
    """One container of a module Pod: the arklet BizModel it becomes."""

    biz_name: str
    biz_version: str
    biz_url: str
    #: Where BIZ_VERSION came from: the env var, the jar file name, or nowhere.
    version_source: Literal["env", "jar", "missing"] = "env"

    @property
    def biz_key(self) -> str:
        return biz_key(self.biz_name, self.biz_version)

    def to_biz_model(self) -> dict[str, str]:
        """The arklet installBiz / uninstallBiz payload (empty fields omitted, as arklet expects)."""
        model = {"bizName": self.biz_name, "bizVersion": self.biz_version, "bizUrl": self.biz_url}
        return {k: v for k, v in model.items() if v}


@dataclass(frozen=True, slots=True)
class BaseRequirement:
    """Allowed values per base label, one dict per nodeSelectorTerm (terms are ORed).

    A key absent from a term means "any value". No terms at all means no requirement.
    """

    terms: tuple[Mapping[str, frozenset[str]], ...] = ()

    def allows(self, node_labels: Mapping[str, str] | None) -> bool:
        if not self.terms:
            return True
        labels = node_labels or {}
        return any(
            all(labels.get(key) in allowed for key, allowed in term.items()) for term in self.terms
        )

    def values(self, key: str) -> frozenset[str] | None:
        """All values any term allows for `key`, or None when some term leaves it open."""
        out: set[str] = set()
        for term in self.terms:
            if key not in term:
                return None
            out |= term[key]
        return frozenset(out) if self.terms else None

    def mismatches(self, node_labels: Mapping[str, str] | None) -> list[str]:
        """For a node that fails, the keys the Pod constrains that the node does not meet (first term that
        comes closest), so a caller can say *why* in words taken from the Pod."""
        if not self.terms:
            return []
        labels = node_labels or {}
        best: list[str] | None = None
        for term in self.terms:
            missing = [key for key, allowed in term.items() if labels.get(key) not in allowed]
            if best is None or len(missing) < len(best):
                best = missing
        return best or []


@dataclass(frozen=True, slots=True)
class ModuleSpec:
    modules: tuple[Module, ...]
    base: BaseRequirement = field(default_factory=BaseRequirement)

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> ModuleSpec:
        spec = _dict(pod.get("spec"))
        modules = tuple(module_from_container(c) for c in _list(spec.get("containers")) if isinstance(c, dict))
        return cls(modules=modules, base=base_requirement(spec))

    @property
    def biz_names(self) -> list[str]:
        return [m.biz_name for m in self.modules]


def is_module_pod(pod: Mapping[str, Any]) -> bool:
    metadata = pod.get("metadata")
    labels = metadata.get("labels") if isinstance(metadata, dict) else None
    return keys.is_module_pod_labels(labels if isinstance(labels, dict) else None)


def workload(pod: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(namespace, kind, name) of the workload a Pod belongs to, the same across its revisions: a
    Deployment for a ReplicaSet's Pod (the ReplicaSet's name less its pod-template-hash), else the
    controller that owns it. None for a Pod no controller owns."""
    meta = pod.get("metadata")
    if not isinstance(meta, dict):
        return None
    refs = meta.get("ownerReferences")
    for ref in refs if isinstance(refs, list) else []:
        if not isinstance(ref, dict) or not ref.get("controller"):
            continue
        kind, name = str(ref.get("kind", "")), str(ref.get("name", ""))
        labels = meta.get("labels")
        template_hash = labels.get("pod-template-hash") if isinstance(labels, dict) else None
        if kind == "ReplicaSet" and isinstance(template_hash, str) and template_hash and name.endswith("-" + template_hash):
            kind, name = "Deployment", name[: -len(template_hash) - 1]
        return str(meta.get("namespace", "")), kind, name
    return None


def owned_by_daemonset(pod: Mapping[str, Any]) -> bool:
    """Whether a DaemonSet is the Pod's controller (`metadata.ownerReferences`, as the DaemonSet
    controller writes it: apiVersion apps/v1, kind DaemonSet, controller true)."""
    meta = pod.get("metadata")
    refs = meta.get("ownerReferences") if isinstance(meta, dict) else None
    if not isinstance(refs, list):
        return False
    for ref in refs:
        if isinstance(ref, dict) and ref.get("controller") is True:
            api_version = ref.get("apiVersion")
            return (
                ref.get("kind") == "DaemonSet"
                and isinstance(api_version, str)
                and api_version.startswith("apps/")
            )
    return False


def daemonset_node(spec: Mapping[str, Any]) -> str | None:
    """The node a DaemonSet's Pod is made for, when its required node affinity is exactly the
    DaemonSet controller's (k8s.io/kubernetes/pkg/controller/daemon/util
    ReplaceDaemonSetPodNodeNameNodeAffinity replaces all the template's nodeSelectorTerms with one
    term, `matchFields: [{key: metadata.name, operator: In, values: [<node>]}]`); else None."""
    terms = _node_selector_terms(spec)
    if len(terms) != 1 or not isinstance(terms[0], dict):
        return None
    term = terms[0]
    if term.get("matchExpressions") or set(term) - {"matchFields", "matchExpressions"}:
        return None
    fields = term.get("matchFields")
    if not isinstance(fields, list) or len(fields) != 1 or not isinstance(fields[0], dict):
        return None
    req = fields[0]
    values = req.get("values")
    if (
        req.get("key") != "metadata.name"
        or req.get("operator") != "In"
        or not isinstance(values, list)
        or len(values) != 1
        or not isinstance(values[0], str)
        or not values[0]
    ):
        return None
    return values[0]


def infer_from_jar(url: str) -> tuple[str, str] | None:
    """(artifact, version) from a `<artifact>-<version>-ark-biz.jar` URL, else None."""
    return _jar_url(url)[1]


#: Every replica of a release carries the same jar URLs, and URL parsing is the costliest step of
#: reading a module on the webhook's and the extender's hot paths: remember recent answers, and
#: parse a new one once for both questions asked of it.
@functools.lru_cache(maxsize=4096)
def _jar_url(url: str) -> tuple[bool, tuple[str, str] | None]:
    """(is it an http(s) or file URL of a .jar, (artifact, version) from its file name)."""
    plain = _PLAIN_URL.fullmatch(url) if url.isascii() else None
    if plain is not None:
        # the file name was matched as _ARK_BIZ_JAR would match it, in the same pass
        scheme, netloc, path, artifact, version = plain.groups()
        if artifact is not None:
            return scheme == "file" or bool(netloc), (artifact, version)
        path = path or ""
    else:
        try:
            parts = urlsplit(url)
        except ValueError:  # e.g. "http://[::1": not a URL at all
            return False, None
        scheme, netloc, path = parts.scheme, parts.netloc, parts.path
    is_jar = scheme in _JAR_URL_SCHEMES and (scheme == "file" or bool(netloc)) and path.endswith(".jar")
    match = _ARK_BIZ_JAR.match(path.rsplit("/", 1)[-1])
    return is_jar, ((match["artifact"], match["version"]) if match else None)


#: The usual jar URL, split as `urlsplit` splits it, at a fraction of its cost (each new release
#: brings new URLs, so the cache above misses on a release's first Pod): a lower-case scheme we
#: accept, a host without brackets, then path, query, fragment, all ASCII without whitespace
#: (which urlsplit strips or drops). Anything else takes urlsplit itself. The whitespace is spelled
#: out, as the ASCII characters `\s` matches: a set of characters is a table lookup, `\s` a call.
#: The path's last segment is tried as `<artifact>-<version>-ark-biz.jar` first (_ARK_BIZ_JAR over
#: the characters such a segment can have), so the usual jar URL takes one match.
_ASCII_SPACE = r"\t\n\x0b\x0c\r\x1c-\x1f "
_SEGMENT = rf"[^/?#{_ASCII_SPACE}]"
_PLAIN_URL = re.compile(
    rf"(https?|file)://([^/?#\[\]{_ASCII_SPACE}]*)"
    rf"(/(?:[^?#{_ASCII_SPACE}]*/)?(?:(?P<artifact>{_SEGMENT}+?)-(?P<version>\d[0-9A-Za-z.+_-]*)-ark-biz\.jar|{_SEGMENT}*))?"
    rf"(?:[?#][^{_ASCII_SPACE}]*)?"
)


def env_value(container: Mapping[str, Any], name: str) -> str | None:
    for env in _list(container.get("env")):
        if isinstance(env, dict) and env.get("name") == name:
            value = env.get("value")
            return value if isinstance(value, str) else ""
    return None


def module_from_container(container: Mapping[str, Any]) -> Module:
    name = container.get("name")
    image = container.get("image")
    biz_name = name if isinstance(name, str) else ""
    biz_url = image if isinstance(image, str) else ""
    version = env_value(container, keys.ENV_BIZ_VERSION)
    if version:
        return Module(biz_name, version, biz_url, "env")
    inferred = infer_from_jar(biz_url)
    if inferred:
        return Module(biz_name, inferred[1], biz_url, "jar")
    return Module(biz_name, "", biz_url, "missing")


def base_requirement(spec: Mapping[str, Any]) -> BaseRequirement:
    terms = []
    for term in _node_selector_terms(spec):
        allowed: dict[str, frozenset[str]] = {}
        for expr in _list(_dict(term).get("matchExpressions")):
            expr = _dict(expr)
            key = expr.get("key")
            if key in BASE_KEYS and expr.get("operator") == "In":
                values = frozenset(v for v in _list(expr.get("values")) if isinstance(v, str))
                # Several expressions on one key are ANDed: intersect.
                allowed[key] = allowed[key] & values if key in allowed else values
        terms.append(allowed)
    return BaseRequirement(tuple(terms))


def validate_pod(
    pod: Mapping[str, Any], *, stack_defaulted: bool = False, daemonset_owned: bool = False
) -> list[Problem]:
    """Every problem with a module Pod, errors and warnings, in field order.

    Only `spec` is read, and of it only what webhook/wire.py declares: the webhook decodes no
    more than that, and keeps one verdict per distinct such spec. A rule that reads another field
    must be declared there too.

    `stack_defaulted`: the caller will add `base.koupleless.io/stack In [java]`, so a missing stack
    is not reported.
    `daemonset_owned`: `owned_by_daemonset(pod)`, passed in so that this still reads only `spec`.
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


def _node_selector_terms(spec: Mapping[str, Any]) -> list[Any]:
    # isinstance inline rather than _dict/_list: every admission and every filter call reads these.
    found = spec.get("affinity")
    for step in ("nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution", "nodeSelectorTerms"):
        if not isinstance(found, dict):
            return []
        found = found.get(step)
    return found if isinstance(found, list) else []


def _all_non_empty_strings(values: list[Any]) -> bool:
    for v in values:
        if not isinstance(v, str) or not v:
            return False
    return True


def _dict(value: Any) -> JsonDict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
