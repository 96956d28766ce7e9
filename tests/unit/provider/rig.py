"""A provider without a cluster or a broker, for state-machine tests that run in milliseconds.

The real BaseRegistry, CommandSender, PodReconciler and NodeReconciler, wired as in production by
`Provider`; the API server is a dict of Pods (status patches merged, deletes applied), the tunnel
records what would be published, and the work queues are drained by hand so a test decides when a
sync runs.
"""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import orjson

from koupleless import arklet, arklet_base_payloads, keys
from koupleless.kube.client import ApiError
from provider.controller import Provider, ProviderOptions
from provider.state import BaseState
from provider.tunnel import BrokerOptions

ENV = "dev"
URL1 = "https://h/biz1-0.0.1-ark-biz.jar"
URL2 = "https://h/biz1-0.0.2-ark-biz.jar"


class FakeKube:
    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.rv = 1
        self.status_writes: list[tuple[str, dict[str, Any]]] = []
        self.deleted: list[str] = []

    def _key(self, path: str) -> str:
        parts = path.split("/")
        return f"{parts[4]}/{parts[6]}"

    async def patch(self, path: str, body: dict[str, Any], _type: str, subresource: str | None = None) -> dict[str, Any]:
        key = self._key(path)
        if key not in self.pods:
            raise ApiError(404, "NotFound", key)
        self.rv += 1
        pod = self.pods[key]
        pod["status"] = copy.deepcopy(body["status"])
        pod["metadata"]["resourceVersion"] = str(self.rv)
        self.status_writes.append((key, copy.deepcopy(body["status"])))
        return pod

    async def delete(self, path: str, **_: Any) -> dict[str, Any]:
        key = self._key(path)
        if self.pods.pop(key, None) is None:
            raise ApiError(404, "NotFound", key)
        self.deleted.append(key)
        return {}


class FakePods:
    def __init__(self, kube: FakeKube) -> None:
        self.kube = kube

    def get(self, key: str) -> dict[str, Any] | None:
        return self.kube.pods.get(key)

    def on_node(self, node_name: str) -> list[dict[str, Any]]:
        return [p for p in self.kube.pods.values() if p["spec"].get("nodeName") == node_name]


class FakeEvents:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str, str]] = []

    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str, **_: Any) -> None:
        self.sent.append((obj["metadata"].get("name", ""), type_, reason, message))

    def reasons(self, name: str) -> list[str]:
        return [r for n, _t, r, _m in self.sent if n == name]


class RecordingTunnel:
    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.connected.set()
        self.connect_count = 1
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    def send(self, topic: str, payload: bytes, *, qos: int = 1) -> bool:
        base_id, command = arklet.parse_topic(ENV, topic, direction="command")
        self.sent.append((base_id, command, orjson.loads(payload)))
        return True

    def commands(self, command: str) -> list[dict[str, Any]]:
        return [body for _b, c, body in self.sent if c == command]


class Rig:
    def __init__(self, **opts: Any) -> None:
        self.kube = FakeKube()
        self.provider = Provider(self.kube, BrokerOptions("127.0.0.1", 1),  # type: ignore[arg-type]
                                 ProviderOptions(env=ENV, identity="me", **opts))
        self.tunnel = RecordingTunnel()
        self.provider.commands.tunnel = self.tunnel  # type: ignore[assignment]
        self.events = FakeEvents()
        pods = self.provider.pod_reconciler
        pods.pods = FakePods(self.kube)  # type: ignore[assignment]
        pods.events = self.events  # type: ignore[assignment]
        self.registry = self.provider.registry
        self.queued: list[str] = []
        pods.queue.add = self._queue  # type: ignore[method-assign]
        self.node_syncs: list[str] = []
        self.provider.node_reconciler.queue.add = self.node_syncs.append  # type: ignore[method-assign]
        self.registry.connection_changed(True)
        self.ts = int(time.time() * 1000) - 60_000

    def _queue(self, key: str) -> None:
        if key not in self.queued:
            self.queued.append(key)

    @property
    def reconciler(self) -> Any:
        return self.provider.pod_reconciler

    # --- the base side ----------------------------------------------------------------------------

    def say(self, base_id: str, kind: str, data: Any, ts: int | None = None) -> None:
        self.ts += 1
        self.registry.handle(arklet.topic(ENV, base_id, kind), arklet.encode_envelope(data, ts or self.ts))

    def heartbeat(self, base_id: str = "b1", state: str = "activated", ts: int | None = None) -> None:
        hb = {"baseMetadata": {"identity": base_id, "name": "base", "version": "1.1.1", "clusterName": "c"},
              "localIP": "10.0.0.1", "localHostName": "h", "port": 0, "state": state}
        self.say(base_id, arklet.HEART, hb, ts)

    def inventory(self, base_id: str = "b1", *mods: tuple[str, str]) -> None:
        items = [arklet_base_payloads.simple_biz_item(arklet.BizStatus(n, v, arklet.ACTIVATED, 1)) for n, v in mods]
        self.say(base_id, arklet.SIMPLE_BIZ, items)

    def reply(self, command: str, name: str, version: str, code: str = "SUCCESS", message: str = "",
              installed_version: str | None = None, base_id: str = "b1") -> None:
        model = arklet.BizModel(name, version, URL1)
        data = arklet_base_payloads.biz_operation_data(command, model, code, message, biz_state="ACTIVATED" if code == "SUCCESS" else "")
        if installed_version is not None:
            data["response"]["data"]["bizInfos"][0]["bizVersion"] = installed_version
        self.say(base_id, arklet.BIZ_OPERATION, data)

    def base(self, base_id: str = "b1") -> BaseState:
        base = self.registry.get(base_id)
        assert base is not None
        return base

    def online(self, base_id: str = "b1", *mods: tuple[str, str]) -> BaseState:
        """A base heard, owned by this replica, with its inventory known."""
        self.heartbeat(base_id)
        base = self.base(base_id)
        base.owned = True
        self.inventory(base_id, *mods)
        return base

    # --- the Kubernetes side ----------------------------------------------------------------------

    def add_pod(self, name: str, image: str = URL1, version: str = "0.0.1", node: str = "virtual-node-b1",
                labels: dict[str, str] | None = None, container: str = "biz1") -> str:
        self.kube.rv += 1
        pod = {
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "resourceVersion": str(self.kube.rv),
                         "labels": {keys.LABEL_COMPONENT: "module"} if labels is None else labels},
            "spec": {"nodeName": node, "containers": [
                {"name": container, "image": image, "env": [{"name": "BIZ_VERSION", "value": version}]}]},
            "status": {"phase": "Pending"},
        }
        self.kube.pods[f"ns/{name}"] = pod
        self.reconciler.on_pod(pod)
        return f"ns/{name}"

    def delete_pod(self, name: str, grace_s: int = 30) -> None:
        pod = self.kube.pods[f"ns/{name}"]
        deadline = time.gmtime(time.time() + grace_s)
        pod["metadata"]["deletionTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", deadline)
        self.reconciler.on_pod(pod)

    def pod(self, name: str) -> dict[str, Any]:
        return self.kube.pods[f"ns/{name}"]

    def phases(self, name: str) -> list[str]:
        return [s["phase"] for k, s in self.kube.status_writes if k == f"ns/{name}"]

    def waiting(self, name: str) -> dict[str, Any]:
        return dict(self.pod(name)["status"]["containerStatuses"][0]["state"].get("waiting") or {})

    async def settle(self) -> dict[str, float | None]:
        """Run every queued Pod sync until none is left; the delays they asked for, by key."""
        asked: dict[str, float | None] = {}
        for _ in range(100):
            if not self.queued:
                return asked
            key = self.queued.pop(0)
            asked[key] = await self.reconciler.sync(key)
        raise AssertionError("Pod syncs never settled")


def ready(pod: dict[str, Any]) -> bool:
    conds = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
    return pod["status"].get("phase") == "Running" and conds.get("Ready") == "True"
