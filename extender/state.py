"""What the extender knows about bases and the modules on them, as small immutable summaries.

`BaseInfo` is read from a Node dict, `ModulePod` from a Pod dict; `Usage` counts, per base, the
modules of Pods bound there plus those the extender itself has just bound and the watch has not yet
shown (so a burst of module Pods never overbooks a base).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extender.quantity import quantity_bytes, quantity_count
from extender.selector import NodePlacement, placement_of
from koupleless import keys
from koupleless.kube import nodes as node_reader
from koupleless.model import BaseRequirement, base_requirement

#: Annotation a provider may keep on a virtual Node listing the modules assigned to the base
#: (comma-separated bizNames, one entry per module). Read only in full-Node mode without a
#: kubeconfig, where the extender has no Pod watch of its own.
ANNOTATION_NODE_MODULES = keys.ANNOTATION_PREFIX + "modules"

_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


@dataclass(frozen=True, slots=True)
class BaseInfo:
    """One Node, as far as placing modules goes."""

    name: str
    labels: Mapping[str, str]
    is_vnode: bool
    ready: bool
    #: `status.allocatable[koupleless.io/module]`; None = the base states no limit.
    max_modules: int | None
    #: `status.allocatable.memory` in bytes; None = unknown.
    memory: int | None
    #: Modules the provider reports on the Node itself (full-Node mode without a Pod watch).
    annotated_modules: tuple[str, ...] | None = None
    #: (stack, name, version) labels: bases sharing them answer a module's placement alike.
    group: tuple[str | None, str | None, str | None] = (None, None, None)

    @classmethod
    def from_node(cls, node: Mapping[str, Any]) -> BaseInfo:
        meta = _dict(node.get("metadata"))
        status = _dict(node.get("status"))
        raw_labels = _dict(meta.get("labels"))
        labels = {k: v for k, v in raw_labels.items() if isinstance(v, str)}
        ready = node_reader.is_ready(node)
        allocatable = _dict(status.get("allocatable"))
        annotation = _dict(meta.get("annotations")).get(ANNOTATION_NODE_MODULES)
        annotated = (
            tuple(m.strip() for m in annotation.split(",") if m.strip()) if isinstance(annotation, str) else None
        )
        name = meta.get("name")
        return cls(
            name=name if isinstance(name, str) else "",
            labels=labels,
            is_vnode=labels.get(keys.LABEL_COMPONENT_LEGACY) == keys.COMPONENT_VNODE,
            ready=ready,
            max_modules=quantity_count(allocatable.get(keys.RESOURCE_MODULE)),
            memory=quantity_bytes(allocatable.get("memory")),
            annotated_modules=annotated,
            group=(labels.get(keys.LABEL_BASE_STACK), labels.get(keys.LABEL_BASE_NAME),
                   labels.get(keys.LABEL_BASE_VERSION)),
        )


def _memory_request(containers: Iterable[Any]) -> int | None:
    total = 0
    seen = False
    for c in containers:
        resources = _dict(_dict(c).get("resources"))
        # The API server copies limits into missing requests, but a Pod in a full-Node request may
        # come from anywhere: fall back to the limit as it would have.
        raw = _dict(resources.get("requests")).get("memory", _dict(resources.get("limits")).get("memory"))
        n = quantity_bytes(raw)
        if n is not None:
            total += n
            seen = True
    return total if seen else None


@dataclass(frozen=True, slots=True)
class ModulePod:
    """What a module Pod asks of a base."""

    key: str
    uid: str
    biz_names: tuple[str, ...]
    memory: int | None
    placement: NodePlacement
    base: BaseRequirement
    node_name: str = ""
    terminal: bool = False
    #: Set when the Pod is not a module Pod: the extender passes it through untouched.
    is_module: bool = True

    @property
    def modules(self) -> int:
        return len(self.biz_names)

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> ModulePod:
        meta = _dict(pod.get("metadata"))
        spec = _dict(pod.get("spec"))
        containers = [c for c in _list(spec.get("containers")) if isinstance(c, dict)]
        names = tuple(n for n in (c.get("name") for c in containers) if isinstance(n, str))
        ns, name, uid = meta.get("namespace"), meta.get("name"), meta.get("uid")
        node_name = spec.get("nodeName")
        return cls(
            key=f"{ns if isinstance(ns, str) else ''}/{name if isinstance(name, str) else ''}",
            uid=uid if isinstance(uid, str) else "",
            biz_names=names,
            memory=_memory_request(containers),
            placement=placement_of(pod),
            base=base_requirement(spec),
            node_name=node_name if isinstance(node_name, str) else "",
            # A Pod being deleted is leaving its base (the provider uninstalls it, then deletes it):
            # counting it until the final delete races kube-scheduler, whose retry on that delete can
            # arrive before this cache has seen it, and then nothing wakes the Pod up again.
            terminal=_dict(pod.get("status")).get("phase") in _TERMINAL_PHASES
            or bool(meta.get("deletionTimestamp")),
            is_module=keys.is_module_pod_labels(_dict(meta.get("labels"))),
        )


@dataclass(slots=True)
class BaseUsage:
    modules: int = 0
    memory: int = 0
    biz_names: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class Placed:
    node: str
    biz_names: tuple[str, ...]
    memory: int
    #: monotonic time the extender bound it; None once the watch shows the Pod bound.
    assumed_at: float | None = None


class Usage:
    """Modules per base, from Pods bound there (watch) and Pods this extender just bound (assumed).

    Keyed by Pod (`ns/name`), so a Pod seen both as assumed and then from the watch counts once.
    """

    def __init__(self, assume_ttl: float = 30.0, on_change: Callable[[str], None] | None = None) -> None:
        self.assume_ttl = assume_ttl
        self._placed: dict[str, Placed] = {}
        self._by_node: dict[str, BaseUsage] = {}
        #: bizName -> bases holding it: the duplicate check as one set intersection.
        self.biz_nodes: dict[str, set[str]] = {}
        #: Called with a base's name whenever its module count changes.
        self.on_change = on_change

    def __len__(self) -> int:
        return len(self._placed)

    def get(self, node: str) -> BaseUsage | None:
        return self._by_node.get(node)

    @property
    def get_fast(self) -> Callable[[str], BaseUsage | None]:
        """`get` without the Python call around it, for loops over thousands of bases."""
        return self._by_node.get

    def placed(self, pod_key: str) -> Placed | None:
        return self._placed.get(pod_key)

    def _add(self, key: str, placed: Placed) -> None:
        self._placed[key] = placed
        node = placed.node
        usage = self._by_node.get(node)
        if usage is None:
            usage = self._by_node[node] = BaseUsage()
        usage.modules += len(placed.biz_names)
        usage.memory += placed.memory
        for name in placed.biz_names:
            if usage.biz_names[name] <= 0:
                self.biz_nodes.setdefault(name, set()).add(node)
            usage.biz_names[name] += 1
        if self.on_change is not None:
            self.on_change(node)

    def _remove(self, key: str) -> None:
        placed = self._placed.pop(key, None)
        if placed is None:
            return
        node = placed.node
        usage = self._by_node[node]
        usage.modules -= len(placed.biz_names)
        usage.memory -= placed.memory
        for name in placed.biz_names:
            usage.biz_names[name] -= 1
            if usage.biz_names[name] <= 0:
                del usage.biz_names[name]
                holders = self.biz_nodes.get(name)
                if holders is not None:
                    holders.discard(node)
                    if not holders:
                        del self.biz_nodes[name]
        if usage.modules <= 0 and usage.memory <= 0 and not usage.biz_names:
            del self._by_node[node]
        if self.on_change is not None:
            self.on_change(node)

    def observe(self, pod: ModulePod) -> None:
        """A Pod as the watch shows it now (added or updated)."""
        current = self._placed.get(pod.key)
        if pod.is_module and pod.node_name and not pod.terminal:
            self._remove(pod.key)
            self._add(pod.key, Placed(pod.node_name, pod.biz_names, pod.memory or 0))
        elif current is not None and current.assumed_at is not None and not pod.terminal:
            # An event from before our binding, delivered late: the binding still stands.
            return
        else:
            self._remove(pod.key)

    def forget(self, pod_key: str) -> None:
        """The watch says the Pod is gone (deleted, or no longer matches)."""
        self._remove(pod_key)

    def assume(self, pod: ModulePod, node: str, now: float | None = None) -> None:
        """This extender has bound `pod` to `node`; count it until the watch confirms or the TTL ends."""
        self._remove(pod.key)
        at = time.monotonic() if now is None else now
        self._add(pod.key, Placed(node, pod.biz_names, pod.memory or 0, assumed_at=at))

    def unassume(self, pod_key: str) -> None:
        """Our binding failed: drop the assumption, but never a placement the watch has confirmed."""
        placed = self._placed.get(pod_key)
        if placed is not None and placed.assumed_at is not None:
            self._remove(pod_key)

    def expire(self, now: float | None = None) -> int:
        """Drop assumptions the watch never confirmed (the binding failed or the Pod went away)."""
        at = time.monotonic() if now is None else now
        stale = [
            key for key, p in self._placed.items()
            if p.assumed_at is not None and at - p.assumed_at > self.assume_ttl
        ]
        for key in stale:
            self._remove(key)
        return len(stale)
