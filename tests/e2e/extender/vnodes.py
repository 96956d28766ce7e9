"""Virtual Nodes as the provider writes them (labels, taint, allocatable, Ready, Lease), made
directly through the API so the extender's e2e does not depend on the provider. A background loop
renews each Node's Lease and keeps Ready=True, as a live provider would, so the node lifecycle
controller leaves them alone."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from koupleless import keys
from koupleless.kube import ApiError, KubeClient, lease_path, node_path
from tests.helpers import async_wait_until
from tests.unit.extender import samples

T = TypeVar("T")
RENEW_EVERY = 3.0


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def vnode_object(name: str, *, base: str, version: str, stack: str = "java") -> dict[str, Any]:
    """The Node as created; its status (Ready, allocatable) is written through the subresource."""
    node = samples.vnode(name, base=base, version=version, stack=stack)
    del node["status"]
    return node


def vnode_status(max_modules: int, memory: str) -> dict[str, Any]:
    resources = {"pods": "110", "cpu": "4", "memory": memory, keys.RESOURCE_MODULE: str(max_modules)}
    now = _now().split(".")[0] + "Z"
    return {
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [{"type": "Ready", "status": "True", "reason": "BaseHealthy",
                            "message": "base is healthy", "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        }
    }


class VirtualNodes:
    """Owns a loop in a thread (tests are synchronous and block on kubectl)."""

    def __init__(self, kubeconfig: Path, renew_every: float = RENEW_EVERY) -> None:
        self.kubeconfig = kubeconfig
        self.renew_every = renew_every
        self.names: dict[str, dict[str, Any]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vnodes", daemon=True)
        self._thread.start()
        self.client: KubeClient = self.run(self._make_client())
        self._renewer = asyncio.run_coroutine_threadsafe(self._renew_forever(), self._loop)

    async def _make_client(self) -> KubeClient:
        return KubeClient.from_kubeconfig(str(self.kubeconfig), qps=None)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # --- what tests call ---------------------------------------------------------------------

    def add(self, name: str, *, base: str, version: str = "1.1.1", max_modules: int = 2,
            memory: str = "4Gi") -> None:
        self.run(self._add(name, base, version, max_modules, memory))

    def add_many(self, names: list[str], **kwargs: Any) -> None:
        async def all_of() -> None:
            sem = asyncio.Semaphore(32)

            async def one(name: str) -> None:
                async with sem:
                    await self._add(name, kwargs.get("base", "base"), kwargs.get("version", "1.1.1"),
                                    kwargs.get("max_modules", 2), kwargs.get("memory", "4Gi"))

            await asyncio.gather(*(one(n) for n in names))

        self.run(all_of(), timeout=600)

    def delete_all(self) -> None:
        async def delete() -> None:
            names = list(self.names)
            self.names.clear()
            sem = asyncio.Semaphore(32)

            async def one(name: str) -> None:
                async with sem:
                    await self.client.delete(node_path(name), grace_period_seconds=0)
                    await self.client.delete(lease_path("kube-node-lease", name))

            await asyncio.gather(*(one(n) for n in names), return_exceptions=True)

        self.run(delete(), timeout=600)

    def close(self) -> None:
        self._renewer.cancel()
        with contextlib.suppress(Exception):
            self.delete_all()
        self.run(self.client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    # --- the provider's duties -----------------------------------------------------------------

    async def _add(self, name: str, base: str, version: str, max_modules: int, memory: str) -> None:
        try:
            await self.client.create(node_path(), vnode_object(name, base=base, version=version))
        except ApiError as exc:
            if not exc.already_exists:
                raise
        status = vnode_status(max_modules, memory)
        self.names[name] = status
        await self.client.patch(node_path(name), status, "merge", subresource="status")
        await self._renew(name)
        await async_wait_until(lambda: self._schedulable(name), timeout=60, interval=0.1,
                               what=f"{name} without the {keys.TAINT_NOT_READY} taint")

    async def _schedulable(self, name: str) -> bool:
        """kube-apiserver taints a new Node not-ready until the node lifecycle controller sees it
        Ready; until then kube-scheduler skips it, so a test that places modules right away could
        find fewer bases than it made."""
        node = await self.client.get(node_path(name))
        return not any(t.get("key") == keys.TAINT_NOT_READY for t in node.get("spec", {}).get("taints") or [])

    async def _renew(self, name: str) -> None:
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": _now()},
        }
        try:
            await self.client.patch(lease_path("kube-node-lease", name), {"spec": lease["spec"]}, "merge")
        except ApiError as exc:
            if not exc.not_found:
                raise
            await self.client.create(lease_path("kube-node-lease"), lease)

    async def _renew_forever(self) -> None:
        sem = asyncio.Semaphore(32)

        async def one(name: str) -> None:
            async with sem:
                with contextlib.suppress(ApiError):
                    await self._renew(name)

        while True:
            await asyncio.sleep(self.renew_every)
            await asyncio.gather(*(one(n) for n in list(self.names)), return_exceptions=True)
