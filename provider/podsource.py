"""The Pods a provider must look at: module Pods, selected by label at the API server (either key
users write), and the few other Pods that got bound to a virtual Node anyway (they tolerate every
taint, or their module label has a typo) so they can be failed instead of hanging.

The label selectors are disjoint, so a Pod is in exactly one informer and `get` may ask them all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from koupleless import keys
from koupleless.kube.client import KubeClient, pod_path
from koupleless.kube.informer import IndexFunc, Informer

Obj = dict[str, Any]

BOUND = "spec.nodeName!="


def _node_of(pod: Obj) -> list[str]:
    return [str((pod.get("spec") or {}).get("nodeName") or "")]


class PodSource:
    def __init__(self, kube: KubeClient, *, is_our_node: Callable[[str], bool]) -> None:
        seed, legacy = keys.LABEL_COMPONENT, keys.LABEL_COMPONENT_LEGACY
        indexers: dict[str, IndexFunc] = {"node": _node_of}
        self.modules = Informer(kube, pod_path(), label_selector=seed, field_selector=BOUND,
                                indexers=indexers, name="module-pods")
        self.legacy = Informer(kube, pod_path(), label_selector=f"{legacy},!{seed}", field_selector=BOUND,
                               indexers=indexers, name="module-pods-legacy")
        # Every other bound Pod streams past; only those on a virtual Node are kept.
        self.strays = Informer(kube, pod_path(), label_selector=f"!{seed},!{legacy}", field_selector=BOUND,
                               indexers=indexers, name="stray-pods",
                               keep=lambda pod: is_our_node(_node_of(pod)[0]))
        self.informers = (self.modules, self.legacy, self.strays)

    def get(self, key: str) -> Obj | None:
        for informer in self.informers:
            pod = informer.get(key)
            if pod is not None:
                return pod
        return None

    def on_node(self, node_name: str) -> list[Obj]:
        out: list[Obj] = []
        for informer in self.informers:
            out.extend(informer.by_index("node", node_name))
        return out

    def start(self) -> list[asyncio.Task[None]]:
        return [informer.start() for informer in self.informers]

    async def wait_synced(self) -> None:
        for informer in self.informers:
            await informer.wait_synced()

    def add_handler(self, on_change: Callable[[Obj], Any], on_delete: Callable[[Obj], Any]) -> None:
        for informer in self.informers:
            informer.add_handler(on_change, lambda _old, new: on_change(new), on_delete)

    async def stop(self) -> None:
        for informer in self.informers:
            await informer.stop()
