"""Feeding the extender's `ClusterView` from the API server, and binding Pods through it.

Only what placement needs is watched: virtual Nodes (by their component label) and module Pods that
are bound and not finished (by either module label, and a field selector), so the cache stays small
in a cluster full of other workloads.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from extender.view import ClusterView
from koupleless import keys
from koupleless.kube import Informer, KubeClient, node_path, object_key, pod_path

log = logging.getLogger(__name__)

VNODE_SELECTOR = f"{keys.LABEL_COMPONENT_LEGACY}={keys.COMPONENT_VNODE}"
#: Pods that occupy a base: bound, not finished. A Pod leaving this set arrives as a delete.
PLACED_PODS = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"


class WatchCache:
    """Two kinds of informer feeding one view: Nodes, and one Pod watch per module label key."""

    def __init__(self, client: KubeClient, view: ClusterView, *, watch_pods: bool = True) -> None:
        self.client = client
        self.view = view
        self.nodes = Informer(client, node_path(), label_selector=VNODE_SELECTOR, name="extender-vnodes")
        self.nodes.add_handler(
            on_add=view.upsert_node,
            on_update=lambda _old, new: view.upsert_node(new),
            on_delete=view.remove_node,
        )
        self.pods: list[Informer] = []
        if watch_pods:
            for label in keys.MODULE_LABEL_KEYS:
                informer = Informer(
                    client,
                    pod_path(),
                    label_selector=f"{label}={keys.COMPONENT_MODULE}",
                    field_selector=PLACED_PODS,
                    name=f"extender-module-pods-{label.split('/')[0].split('.')[0]}",
                )
                informer.add_handler(
                    on_add=view.observe_pod,
                    on_update=lambda _old, new: view.observe_pod(new),
                    on_delete=self._pod_deleted,
                )
                self.pods.append(informer)
        self._expiry: asyncio.Task[None] | None = None

    @property
    def informers(self) -> list[Informer]:
        return [self.nodes, *self.pods]

    def _pod_deleted(self, pod: dict[str, Any]) -> None:
        key = object_key(pod)
        # A Pod carrying both module labels is in both watches; it is gone only when gone from both.
        if any(informer.get(key) is not None for informer in self.pods):
            return
        self.view.forget_pod(pod)

    async def start(self) -> None:
        for informer in self.informers:
            informer.start()
        self._expiry = asyncio.get_running_loop().create_task(self._expire_assumptions())

    async def wait_synced(self) -> None:
        await asyncio.gather(*(i.wait_synced() for i in self.informers))
        self.view.synced = True

    async def _expire_assumptions(self) -> None:
        while True:
            await asyncio.sleep(self.view.usage.assume_ttl / 3)
            dropped = self.view.usage.expire()
            if dropped:
                log.warning("%d bindings never showed up in the watch; no longer counting them", dropped)

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            await asyncio.gather(self._expiry, return_exceptions=True)
        await asyncio.gather(*(i.stop() for i in self.informers))


class KubeBinder:
    """The scheduler's DefaultBinder, done by the extender so it knows at once where a Pod went."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client

    async def bind(self, namespace: str, name: str, uid: str, node: str) -> None:
        binding: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "namespace": namespace, **({"uid": uid} if uid else {})},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        await self.client.create(pod_path(namespace, name) + "/binding", binding)

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        return await self.client.get(pod_path(namespace, name))
