"""Base Leases across replicas: renewals are jobs of the Node queue, a standby waits for the holder's
Lease to expire and then takes it over (against a fake API, in memory)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from koupleless.kube.client import ApiError
from koupleless.kube.lease import micro_time
from provider import vnode
from provider.controller import Provider, ProviderOptions
from provider.nodes import NodeReconciler
from provider.state import BaseState
from provider.tunnel import BrokerOptions


class FakeLeases:
    """GET/PUT/POST of Leases with resourceVersion checks, like the API server."""

    def __init__(self) -> None:
        self.leases: dict[str, dict[str, Any]] = {}
        self.rv = 100
        #: What GET answers instead, when set: a read that raced with someone else's write.
        self.stale: dict[str, Any] | None = None
        #: `limited` of each replace: renewals must not wait behind --kube-qps.
        self.limited: list[bool] = []

    def put_held(self, name: str, holder: str, renewed_ago_s: float, duration_s: int = 8) -> None:
        renew = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=renewed_ago_s)
        self.rv += 1
        self.leases[name] = {
            "metadata": {"name": name, "resourceVersion": str(self.rv)},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration_s,
                     "renewTime": micro_time(renew), "leaseTransitions": 3},
        }

    async def get(self, path: str) -> dict[str, Any]:
        name = path.rsplit("/", 1)[1]
        if self.stale is not None:
            return self.stale
        if name not in self.leases:
            raise ApiError(404, "NotFound", name)
        return self.leases[name]

    async def replace(self, path: str, body: dict[str, Any], *, limited: bool = True) -> dict[str, Any]:
        name = path.rsplit("/", 1)[1]
        self.limited.append(limited)
        if body["metadata"].get("resourceVersion") != self.leases[name]["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", name)
        self.rv += 1
        body["metadata"]["resourceVersion"] = str(self.rv)
        self.leases[name] = body
        return body


def standby(kube: Any, duration_s: int = 8, identity: str = "me") -> NodeReconciler:
    opts = ProviderOptions(env="dev", identity=identity,
                           node=vnode.NodeOptions(env="dev", lease_duration_s=duration_s))
    return Provider(kube, BrokerOptions("127.0.0.1", 1), opts).node_reconciler


async def test_standby_waits_for_the_holders_lease_to_expire() -> None:
    kube = FakeLeases()
    kube.put_held("virtual-node-b1", "other", renewed_ago_s=2, duration_s=8)
    p = standby(kube)
    base = BaseState(base_id="b1", node_name="virtual-node-b1")
    retry = await p._acquire_lease(base)
    # Looked at again just after the Lease would expire, judged by silence this replica observed
    # (first sight now, 8 s duration), not by the holder's clock; not a fixed poll either.
    assert retry is not None and 7.5 < retry < 8.5
    assert not base.owned and kube.leases["virtual-node-b1"]["spec"]["holderIdentity"] == "other"


async def test_standby_takes_over_an_expired_lease_once() -> None:
    kube = FakeLeases()
    kube.put_held("virtual-node-b1", "other", renewed_ago_s=30, duration_s=8)  # long past any clock skew
    p = standby(kube)
    base = BaseState(base_id="b1", node_name="virtual-node-b1")
    assert await p._acquire_lease(base) is None
    spec = kube.leases["virtual-node-b1"]["spec"]
    assert base.owned and spec["holderIdentity"] == "me"
    assert spec["leaseTransitions"] == 4 and spec["leaseDurationSeconds"] == 8
    # A second replica that read the expired Lease before our write loses the race, and says so.
    rival = standby(kube, identity="rival")
    kube.stale = {"metadata": {"name": "virtual-node-b1", "resourceVersion": "101"}, "spec": {}}
    other_base = BaseState(base_id="b1", node_name="virtual-node-b1")
    assert await rival._acquire_lease(other_base) is not None
    assert not other_base.owned


async def test_renewal_is_a_queued_job_due_every_interval_with_jitter() -> None:
    kube = FakeLeases()
    kube.put_held("virtual-node-b1", "me", renewed_ago_s=1, duration_s=40)
    opts = ProviderOptions(env="dev", identity="me", lease_renew_interval=10.0)
    provider = Provider(kube, BrokerOptions("127.0.0.1", 1), opts)  # type: ignore[arg-type]
    nodes = provider.node_reconciler
    base = BaseState(base_id="b1", node_name="virtual-node-b1")
    provider.registry.add(base)
    assert await nodes._acquire_lease(base) is None
    renewed_rv = kube.leases["virtual-node-b1"]["metadata"]["resourceVersion"]
    nodes.nodes.get = lambda name: {"metadata": {"name": name}, "spec": {}, "status": {}}  # type: ignore[method-assign]

    async def patch(*_a: Any, **_k: Any) -> dict[str, Any]:
        return {}

    kube.patch = patch  # type: ignore[attr-defined]
    delays = [await nodes.sync("virtual-node-b1") for _ in range(3)]
    # just renewed: no write now, and the next sync is due when the next renewal is
    assert kube.leases["virtual-node-b1"]["metadata"]["resourceVersion"] == renewed_rv
    assert all(d is not None and 8.5 <= d <= 11.0 for d in delays)
    base.lease_renewed_at -= 9
    kube.limited.clear()
    await nodes.sync("virtual-node-b1")
    assert kube.leases["virtual-node-b1"]["metadata"]["resourceVersion"] != renewed_rv
    # a renewal never waits behind the client's rate limit (other writes of a busy provider)
    assert kube.limited == [False]


def test_node_workers_flag_sizes_the_node_queue_apart_from_pod_syncs() -> None:
    import argparse

    import pytest

    from provider import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    opts = cli.options_from_args(parser.parse_args(["--mqtt-broker", "127.0.0.1:1883", "--workers", "4"]))
    provider = Provider(FakeLeases(), BrokerOptions("127.0.0.1", 1), opts)  # type: ignore[arg-type]
    # Lease renewals of thousands of bases must not share the Pod syncs' few workers.
    assert provider.node_reconciler.queue._workers == 128 and opts.workers == 4
    with pytest.raises(ValueError, match="--node-workers 0: at least 1"):
        cli.options_from_args(parser.parse_args(["--mqtt-broker", "127.0.0.1:1883", "--node-workers", "0"]))


class FakeKube(FakeLeases):
    """FakeLeases plus POST of Nodes and Leases, as the API server answers them."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[str, dict[str, Any]] = {}

    async def create(self, path: str, body: dict[str, Any], params: Any = None) -> dict[str, Any]:
        self.rv += 1
        name = body["metadata"]["name"]
        store = self.leases if "/leases" in path else self.nodes
        if name in store:
            raise ApiError(409, "AlreadyExists", name)
        body["metadata"].update(resourceVersion=str(self.rv), uid=f"uid-{name}")
        store[name] = body
        return body


def recording_provider(kube: Any) -> tuple[Provider, list[str]]:
    provider = Provider(kube, BrokerOptions("127.0.0.1", 1), ProviderOptions(env="dev", identity="me"))
    sent: list[str] = []

    def send(topic: str, _payload: bytes, *, qos: int = 1) -> bool:
        sent.append(topic.rsplit("/", 1)[1])
        return True

    provider.commands.tunnel.send = send  # type: ignore[method-assign]
    return provider, sent


async def test_a_new_base_is_asked_for_its_modules_and_health_once() -> None:
    """Discovery asks; taking the brand-new base's Lease a moment later does not ask again (it
    doubled every new base's messages in a registration burst)."""
    kube = FakeKube()
    provider, sent = recording_provider(kube)
    base = BaseState(base_id="b1", node_name="virtual-node-b1")
    provider.registry.add(base)
    provider.base_discovered(base)
    await provider.node_reconciler.sync("virtual-node-b1")
    assert base.owned and "virtual-node-b1" in kube.nodes and "virtual-node-b1" in kube.leases
    assert sorted(sent) == ["health", "queryAllBiz"]


async def test_a_base_taken_over_from_another_replica_is_asked_afresh() -> None:
    kube = FakeKube()
    kube.put_held("virtual-node-b1", "other", renewed_ago_s=120, duration_s=8)
    kube.nodes["virtual-node-b1"] = {"metadata": {"name": "virtual-node-b1"}, "spec": {}, "status": {}}
    provider, sent = recording_provider(kube)
    nodes = provider.node_reconciler
    nodes.nodes.get = lambda name: kube.nodes.get(name)  # type: ignore[method-assign]

    async def patch(*_a: Any, **_k: Any) -> dict[str, Any]:
        return {}

    kube.patch = patch  # type: ignore[attr-defined]
    base = BaseState(base_id="b1", node_name="virtual-node-b1")
    provider.registry.add(base)
    await nodes.sync("virtual-node-b1")
    # What the other replica did meanwhile is unknown here: ask what is true now.
    assert base.owned and sorted(sent) == ["health", "queryAllBiz"]
