"""A Pod's hard node placement (`spec.nodeSelector` and required node affinity), compiled once per
request and evaluated per Node.

The module scheduler profile turns the in-tree NodeAffinity filter off so that the extender sees
every base and can say *which* base label the Pod does not match; the extender must then enforce the
whole of the Pod's node selection itself, with the in-tree semantics: terms are ORed, the
requirements inside one term are ANDed, an empty term matches nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Labels = Mapping[str, str]

_OPERATORS = frozenset({"In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"})


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str]

    def matches(self, labels: Labels) -> bool:
        op = self.operator
        if op == "In":
            return labels.get(self.key) in self.values
        if op == "NotIn":
            return labels.get(self.key) not in self.values
        if op == "Exists":
            return self.key in labels
        if op == "DoesNotExist":
            return self.key not in labels
        value = labels.get(self.key)
        if value is None or len(self.values) != 1:
            return False
        try:
            have, want = int(value), int(next(iter(self.values)))
        except ValueError:
            return False
        return have > want if op == "Gt" else have < want


@dataclass(frozen=True, slots=True)
class Term:
    """One nodeSelectorTerm: label requirements and `metadata.name` requirements, ANDed."""

    labels: tuple[Requirement, ...]
    names: tuple[Requirement, ...]

    def matches(self, name: str, labels: Labels) -> bool:
        if not self.labels and not self.names:
            return False
        for req in self.labels:
            if not req.matches(labels):
                return False
        if self.names:
            fields = {"metadata.name": name}
            for req in self.names:
                if not req.matches(fields):
                    return False
        return True


@dataclass(frozen=True, slots=True)
class NodePlacement:
    """`nodeSelector` (exact labels) AND (any of `terms`, when there are terms)."""

    node_selector: tuple[tuple[str, str], ...] = ()
    terms: tuple[Term, ...] | None = None

    @property
    def unconstrained(self) -> bool:
        return not self.node_selector and self.terms is None

    def matches(self, name: str, labels: Labels) -> bool:
        for key, value in self.node_selector:
            if labels.get(key) != value:
                return False
        if self.terms is None:
            return True
        for term in self.terms:
            if term.matches(name, labels):
                return True
        return False


def _requirement(expr: Any) -> Requirement | None:
    if not isinstance(expr, dict):
        return None
    key, op, values = expr.get("key"), expr.get("operator"), expr.get("values")
    if not isinstance(key, str) or not isinstance(op, str) or op not in _OPERATORS:
        return None
    vals = frozenset(v for v in values if isinstance(v, str)) if isinstance(values, list) else frozenset()
    return Requirement(key, op, vals)


def _never() -> Requirement:
    # An expression the API server would have refused cannot match any Node.
    return Requirement("", "In", frozenset())


def placement_of(pod: Mapping[str, Any]) -> NodePlacement:
    spec = pod.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    raw_selector = spec.get("nodeSelector")
    selector = tuple(
        sorted((k, v) for k, v in raw_selector.items() if isinstance(k, str) and isinstance(v, str))
    ) if isinstance(raw_selector, dict) else ()
    affinity = spec.get("affinity")
    node_affinity = affinity.get("nodeAffinity") if isinstance(affinity, dict) else None
    required = (
        node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
        if isinstance(node_affinity, dict)
        else None
    )
    if not isinstance(required, dict):
        return NodePlacement(selector, None)
    raw_terms = required.get("nodeSelectorTerms")
    terms: list[Term] = []
    for raw in raw_terms if isinstance(raw_terms, list) else []:
        raw = raw if isinstance(raw, dict) else {}
        exprs = raw.get("matchExpressions")
        fields = raw.get("matchFields")
        label_reqs = [_requirement(e) or _never() for e in (exprs if isinstance(exprs, list) else [])]
        name_reqs = []
        for f in fields if isinstance(fields, list) else []:
            req = _requirement(f)
            name_reqs.append(req if req and req.key == "metadata.name" and req.operator in ("In", "NotIn")
                             else _never())
        terms.append(Term(tuple(label_reqs), tuple(name_reqs)))
    return NodePlacement(selector, tuple(terms))
