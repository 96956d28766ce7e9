"""What the extender knows about bases and the modules on them, as small immutable summaries.

`BaseInfo` is read from a Node dict, `ModulePod` from a Pod dict; `Usage` counts, per base, the
modules of Pods bound there plus those the extender itself has just bound and the watch has not yet
shown (so a burst of module Pods never overbooks a base), and remembers which workload holds each
module at which version (a workload's next version may replace its own module in place).
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
from koupleless.model import BaseRequirement, base_requirement, module_from_container, workload

#: (namespace, kind, name) of a Pod's workload, the same across its revisions (`model.workload`).
Workload = tuple[str, str, str]
#: Who holds a module on a base: the holding Pod's workload (None: no controller) and the version.
Holder = tuple[Workload | None, str]

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
    #: bizVersion of each of `biz_names` (BIZ_VERSION, else the jar name's version, else "").
    versions: tuple[str, ...] = ()
    #: The Pod's workload across revisions (a Deployment for a ReplicaSet's Pod); None for a bare Pod.
    workload: Workload | None = None

    @property
    def modules(self) -> int:
        return len(self.biz_names)

    def versioned(self) -> Iterable[tuple[str, str]]:
        """(bizName, bizVersion) of each module the Pod brings."""
        versions = self.versions
        return ((biz, versions[i] if i < len(versions) else "") for i, biz in enumerate(self.biz_names))

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> ModulePod:
        meta = _dict(pod.get("metadata"))
        spec = _dict(pod.get("spec"))
        containers = [c for c in _list(spec.get("containers")) if isinstance(c, dict)]
        modules = [module_from_container(c) for c in containers if isinstance(c.get("name"), str)]
        ns, name, uid = meta.get("namespace"), meta.get("name"), meta.get("uid")
        node_name = spec.get("nodeName")
        return cls(
            key=f"{ns if isinstance(ns, str) else ''}/{name if isinstance(name, str) else ''}",
            uid=uid if isinstance(uid, str) else "",
            biz_names=tuple(m.biz_name for m in modules),
            versions=tuple(m.biz_version for m in modules),
            workload=workload(pod),
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
    #: bizName -> who holds it here, counted (empty when only counts are known: the Node annotation).
    holders: dict[str, Counter[Holder]] = field(default_factory=dict)

    @property
    def slots(self) -> int:
        """Module slots taken: one per bizName held. A workload's next version installed beside its
        old one during an in-place upgrade shares the old one's slot until the old Pod goes."""
        return len(self.biz_names)

    def replaces(self, biz_name: str, of: Workload | None, version: str) -> bool:
        """Whether a Pod of workload `of` bringing `biz_name` at `version` upgrades (or rolls back) that
        module in place here, as SOFAArk does: every Pod holding it on this base belongs to that
        workload, at another version. Never for a Pod no controller owns, never over another
        workload's module, never beside the same version (two replicas of one revision)."""
        if of is None:
            return False
        held = self.holders.get(biz_name)
        if not held:
            return False
        return all(w == of and v != version for w, v in held)


@dataclass(frozen=True, slots=True)
class Placed:
    node: str
    biz_names: tuple[str, ...]
    memory: int
    #: monotonic time the extender bound it; None once the watch shows the Pod bound.
    assumed_at: float | None = None
    versions: tuple[str, ...] = ()
    workload: Workload | None = None

    @classmethod
    def of(cls, pod: ModulePod, node: str, assumed_at: float | None = None) -> Placed:
        return cls(node, pod.biz_names, pod.memory or 0, assumed_at, pod.versions, pod.workload)


def _sole_workload(held: Counter[Holder]) -> Workload | None:
    """The one workload holding a module on a base, or None (nobody, several, or a bare Pod)."""
    sole: Workload | None = None
    for w, _ in held:
        if w is None or (sole is not None and w != sole):
            return None
        sole = w
    return sole


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
        #: bizName -> workload -> bases where only that workload holds it, and (bizName, version) ->
        #: bases holding that version: the in-place upgrade check as set operations (`upgradable`).
        self._sole: dict[str, dict[Workload, set[str]]] = {}
        self._version_nodes: dict[tuple[str, str], set[str]] = {}
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

    def holding(self, biz_names: Iterable[str]) -> set[str]:
        """Bases holding any of `biz_names`. Shared when there is one: read it, never change it."""
        sets = [held for held in map(self.biz_nodes.get, biz_names) if held]
        if len(sets) == 1:
            return sets[0]
        return set().union(*sets)

    def upgradable(self, biz_name: str, of: Workload | None, version: str) -> set[str]:
        """Bases where `BaseUsage.replaces(biz_name, of, version)` holds. Shared: read it, never change it."""
        if of is None:
            return set()
        sole = self._sole.get(biz_name, {}).get(of)
        if not sole:
            return set()
        same = self._version_nodes.get((biz_name, version))
        return sole - same if same else sole

    def _hold(self, node: str, usage: BaseUsage, biz_name: str, holder: Holder, delta: int) -> None:
        held = usage.holders.get(biz_name)
        if held is None:
            held = usage.holders[biz_name] = Counter()
        version = holder[1]
        before = _sole_workload(held)
        had_version = any(v == version for _, v in held)
        held[holder] += delta
        if held[holder] <= 0:
            del held[holder]
        after = _sole_workload(held)
        has_version = any(v == version for _, v in held)
        if not held:
            del usage.holders[biz_name]
        if before != after:
            if before is not None:
                by_workload = self._sole[biz_name]
                by_workload[before].discard(node)
                if not by_workload[before]:
                    del by_workload[before]
                    if not by_workload:
                        del self._sole[biz_name]
            if after is not None:
                self._sole.setdefault(biz_name, {}).setdefault(after, set()).add(node)
        if had_version != has_version:
            key = (biz_name, version)
            if has_version:
                self._version_nodes.setdefault(key, set()).add(node)
            else:
                nodes = self._version_nodes[key]
                nodes.discard(node)
                if not nodes:
                    del self._version_nodes[key]

    def _add(self, key: str, placed: Placed) -> None:
        self._placed[key] = placed
        node = placed.node
        usage = self._by_node.get(node)
        if usage is None:
            usage = self._by_node[node] = BaseUsage()
        usage.modules += len(placed.biz_names)
        usage.memory += placed.memory
        versions = placed.versions
        for i, name in enumerate(placed.biz_names):
            if usage.biz_names[name] <= 0:
                self.biz_nodes.setdefault(name, set()).add(node)
            usage.biz_names[name] += 1
            self._hold(node, usage, name, (placed.workload, versions[i] if i < len(versions) else ""), 1)
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
        versions = placed.versions
        for i, name in enumerate(placed.biz_names):
            self._hold(node, usage, name, (placed.workload, versions[i] if i < len(versions) else ""), -1)
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
            self._add(pod.key, Placed.of(pod, pod.node_name))
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
        self._add(pod.key, Placed.of(pod, node, assumed_at=at))

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
