"""The extender's picture of the cluster: bases by name, modules per base, and the module Pods that
have passed the filter but whose binding nobody has seen yet.

The last part is what keeps a burst from overbooking a base. kube-scheduler filters Pod N+1 while
Pod N is still being bound, and it does not count our extended resource itself (ignoredByScheduler),
so a count taken from the watch alone would let two Pods take the last slot (or pile onto the base
that looked emptiest). When an in-flight Pod may land on one of the bases a filter is about to
pass, the filter waits (briefly, bounded) until that Pod's binding is known — from our own bind
verb, which arrives within a millisecond or so of the scheduler's decision, or else from the watch.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from extender.state import BaseInfo, BaseUsage, ModulePod, Usage


@dataclass(frozen=True, slots=True)
class InFlight:
    pod: ModulePod
    biz_names: frozenset[str]
    candidates: frozenset[str]
    expires: float

    @property
    def modules(self) -> int:
        return self.pod.modules


#: Bases with fewer free module slots than this are indexed by their free slots, so "too full for a
#: Pod bringing k modules" is a union of k sets. Pods bringing more modules take the slow path.
SLOT_INDEX = 8

Group = tuple[str | None, str | None, str | None]


class ClusterView:
    def __init__(self, *, assume_ttl: float = 30.0, inflight_ttl: float = 2.0) -> None:
        self.bases: dict[str, BaseInfo] = {}
        self.usage = Usage(assume_ttl=assume_ttl, on_change=self._reslot)
        self.inflight_ttl = inflight_ttl
        self._inflight: dict[str, InFlight] = {}
        self._changed = asyncio.Event()
        #: Both watches have delivered their first full list.
        self.synced = False
        # Indexes for the filter's set-at-a-time path (see policy.filter_indexed).
        self.groups: dict[Group, set[str]] = {}
        #: group -> reason -> {base: reason} for every base in the group: the filter's answer for a
        #: group that does not match, reused while the group's members stay the same (the replicas
        #: of one Deployment all get the same reasons).
        self._group_failures: dict[Group, dict[str, dict[str, str]]] = {}
        self.not_ready: set[str] = set()
        self.not_vnodes: set[str] = set()
        #: free module slots (0..SLOT_INDEX-1, -1 = over capacity) -> bases; bases with more, or no
        #: limit, are absent. Slots are bizNames held (`BaseUsage.slots`).
        self.slots: dict[int, set[str]] = {}
        self._slot_of: dict[str, int] = {}
        #: allocatable memory minus the module Pods' requests, for bases that state their memory.
        self.free_memory: dict[str, int] = {}
        #: the same as (free, base) pairs in ascending order: the bases short of a request are a prefix.
        self._by_free_memory: list[tuple[int, str]] = []

    # --- bases ---------------------------------------------------------------------------------

    def base(self, name: str) -> BaseInfo | None:
        return self.bases.get(name)

    def usage_of(self, name: str) -> BaseUsage | None:
        return self.usage.get(name)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _reslot(self, name: str) -> None:
        """Keep the per-base indexes that depend on usage (free slots, free memory) current."""
        base = self.bases.get(name)
        free: int | None = None
        if base is not None and base.memory is not None:
            usage = self.usage.get(name)
            free = base.memory - (usage.memory if usage is not None else 0)
        old_free = self.free_memory.get(name)
        if old_free != free:
            if old_free is not None:
                by_free = self._by_free_memory
                del by_free[bisect.bisect_left(by_free, (old_free, name))]
                del self.free_memory[name]
            if free is not None:
                bisect.insort(self._by_free_memory, (free, name))
                self.free_memory[name] = free
        slot: int | None = None
        if base is not None and base.max_modules is not None:
            usage = self.usage.get(name)
            free = base.max_modules - (usage.slots if usage is not None else 0)
            # -1: over capacity already (a smaller limit since, or Pods bound by hand).
            slot = max(free, -1) if free < SLOT_INDEX else None
        old = self._slot_of.get(name)
        if old == slot:
            return
        if old is not None:
            members = self.slots[old]
            members.discard(name)
            if not members:
                del self.slots[old]
            del self._slot_of[name]
        if slot is not None:
            self.slots.setdefault(slot, set()).add(name)
            self._slot_of[name] = slot

    def short_of_memory(self, request: int) -> list[str]:
        """Bases whose free memory is below `request` (bases that state no memory are never short)."""
        by_free = self._by_free_memory
        return [name for _, name in by_free[:bisect.bisect_left(by_free, (request, ""))]]

    def _unindex(self, info: BaseInfo, *, keep_group: bool = False) -> None:
        members = self.groups.get(info.group)
        if members is not None and not keep_group:
            members.discard(info.name)
            self._group_failures.pop(info.group, None)
            if not members:
                del self.groups[info.group]
        self.not_ready.discard(info.name)
        self.not_vnodes.discard(info.name)

    def group_failures(self, group: Group, reason: str) -> dict[str, str]:
        """{base: reason} for every base in `group`. Shared: read it, never change it."""
        by_reason = self._group_failures.setdefault(group, {})
        failures = by_reason.get(reason)
        if failures is None:
            if len(by_reason) >= 8:
                by_reason.clear()
            failures = by_reason[reason] = dict.fromkeys(self.groups[group], reason)
        return failures

    def upsert_node(self, node: Mapping[str, Any]) -> None:
        info = BaseInfo.from_node(node)
        if not info.name:
            return
        old = self.bases.get(info.name)
        # Most updates (status, conditions) leave a base in its group: keep that group's answers.
        same_group = old is not None and old.group == info.group
        if old is not None:
            self._unindex(old, keep_group=same_group)
        self.bases[info.name] = info
        if not same_group:
            self.groups.setdefault(info.group, set()).add(info.name)
            self._group_failures.pop(info.group, None)
        if not info.ready:
            self.not_ready.add(info.name)
        if not info.is_vnode:
            self.not_vnodes.add(info.name)
        self._reslot(info.name)
        if old is None:
            self._notify()

    def remove_node(self, node: Mapping[str, Any]) -> None:
        info = self.bases.pop(BaseInfo.from_node(node).name, None)
        if info is not None:
            self._unindex(info)
            self._reslot(info.name)

    async def wait_for_bases(self, names: Iterable[str], within: float) -> None:
        """Until every name is a known base, or `within` seconds (a Node the scheduler already sees
        may not have reached our watch yet)."""
        deadline = time.monotonic() + within
        missing = [n for n in names if n not in self.bases]
        while missing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return
            missing = [n for n in missing if n not in self.bases]

    # --- module Pods ---------------------------------------------------------------------------

    def observe_pod(self, pod: Mapping[str, Any]) -> None:
        module = ModulePod.from_pod(pod)
        self.usage.observe(module)
        if module.node_name or module.terminal:
            self.end_inflight(module.key)

    def forget_pod(self, pod: Mapping[str, Any]) -> None:
        key = ModulePod.from_pod(pod).key
        self.usage.forget(key)
        self.end_inflight(key)

    def assume(self, pod: ModulePod, node: str) -> None:
        self.usage.assume(pod, node)
        self.end_inflight(pod.key)

    # --- in-flight Pods ------------------------------------------------------------------------

    def begin_inflight(self, pod: ModulePod, passing: Iterable[str], now: float | None = None) -> None:
        at = time.monotonic() if now is None else now
        self._inflight[pod.key] = InFlight(pod, frozenset(pod.biz_names), frozenset(passing), at + self.inflight_ttl)

    def inflight_pod(self, pod_key: str) -> ModulePod | None:
        entry = self._inflight.get(pod_key)
        return entry.pod if entry is not None else None

    def end_inflight(self, pod_key: str) -> None:
        if self._inflight.pop(pod_key, None) is not None:
            self._notify()

    def inflight_others(self, pod_key: str, now: float | None = None) -> dict[str, InFlight]:
        at = time.monotonic() if now is None else now
        expired = [k for k, v in self._inflight.items() if v.expires <= at]
        for key in expired:
            del self._inflight[key]
        return {k: v for k, v in self._inflight.items() if k != pod_key}

    def inflight_overlaps(self, passing: list[str], others: Mapping[str, InFlight]) -> bool:
        """Whether some in-flight Pod may land on one of `passing`: until it has, neither the module
        counts (capacity, spread) nor the bizNames on those bases are known."""
        if not others or not passing:
            return False
        passing_set = set(passing)
        return any(not passing_set.isdisjoint(o.candidates) for o in others.values())

    async def settle(self, pod_key: str, within: float) -> bool:
        """Wait until no other Pod is in flight, or `within` seconds. True when everything settled."""
        deadline = time.monotonic() + within
        while self.inflight_others(pod_key):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.05))
            except TimeoutError:
                continue
        return True
