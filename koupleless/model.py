"""The module model: what a module Pod asks a base to do.

A module Pod carries one module per container (name = bizName, image = jar URL, env BIZ_VERSION =
bizVersion) and says which bases may take it through required node affinity on the base labels.
The webhook, the extender and the provider all read Pods through this module, so a reading lives
here once; the rules that judge a Pod (everything wrong with it) are koupleless.model_rules.
Parsing never raises on odd shapes: a Pod is network input.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from koupleless import keys

JsonDict = dict[str, Any]

#: `<artifact>-<version>-ark-biz.jar`, where the version starts with a digit (Maven convention).
#: The version is greedy: what follows it is fixed (`-ark-biz.jar` at the end), so it matches what a
#: lazy one would, without trying the suffix after every character (a new release's first Pod
#: parses its jar name).
_ARK_BIZ_JAR = re.compile(r"^(?P<artifact>.+?)-(?P<version>\d[0-9A-Za-z.+_-]*)-ark-biz\.jar$")
_JAR_URL_SCHEMES = ("http", "https", "file")

AFFINITY_PATH = "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
BASE_KEYS = (keys.LABEL_BASE_STACK, keys.LABEL_BASE_NAME, keys.LABEL_BASE_VERSION)


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


def _node_selector_terms(spec: Mapping[str, Any]) -> list[Any]:
    # isinstance inline rather than _dict/_list: every admission and every filter call reads these.
    found = spec.get("affinity")
    for step in ("nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution", "nodeSelectorTerms"):
        if not isinstance(found, dict):
            return []
        found = found.get(step)
    return found if isinstance(found, list) else []


def _dict(value: Any) -> JsonDict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
