"""Base Leases across replicas: renewals spread over the interval, a standby waits for the holder's
Lease to expire and then takes it over (against a fake API, in memory)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from koupleless.kube.client import ApiError
from provider import vnode
from provider.controller import Provider, ProviderOptions
from provider.state import BaseState
from provider.tunnel import BrokerOptions
from tests.helpers import async_wait_until


class FakeLeases:
    """GET/PUT/POST of Leases with resourceVersion checks, like the API server."""

    def __init__(self) -> None:
        self.leases: dict[str, dict[str, Any]] = {}
        self.rv = 100
        #: What GET answers instead, when set: a read that raced with someone else's write.
        self.stale: dict[str, Any] | None = None

    def put_held(self, name: str, holder: str, renewed_ago_s: float, duration_s: int = 8) -> None:
        renew = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=renewed_ago_s)
        self.rv += 1
        self.leases[name] = {
            "metadata": {"name": name, "resourceVersion": str(self.rv)},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration_s,
                     "renewTime": vnode.micro_time(renew), "leaseTransitions": 3},
        }

    async def get(self, path: str) -> dict[str, Any]:
        name = path.rsplit("/", 1)[1]
        if self.stale is not None:
            return self.stale
        if name not in self.leases:
            raise ApiError(404, "NotFound", name)
        return self.leases[name]

    async def replace(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        name = path.rsplit("/", 1)[1]
        if body["metadata"].get("resourceVersion") != self.leases[name]["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", name)
        self.rv += 1
        body["metadata"]["resourceVersion"] = str(self.rv)
        self.leases[name] = body
        return body


def standby(kube: Any, duration_s: int = 8) -> Provider:
    opts = ProviderOptions(env="dev", identity="me", node=vnode.NodeOptions(env="dev", lease_duration_s=duration_s))
    return Provider(kube, BrokerOptions("127.0.0.1", 1), opts)


async def test_standby_waits_for_the_holders_lease_to_expire() -> None:
    kube = FakeLeases()
    kube.put_held("virtual-node-b1", "other", renewed_ago_s=2, duration_s=8)
    p = standby(kube)
    base = BaseState(base_id="b1", node_name="virtual-node-b1")
    retry = await p._acquire_lease(base)
    # Looked at again just after the Lease would expire: about 6 s from now, not a fixed poll.
    assert retry is not None and 5.0 < retry < 6.5
    assert not base.owned and kube.leases["virtual-node-b1"]["spec"]["holderIdentity"] == "other"


async def test_standby_takes_over_an_expired_lease_once() -> None:
    kube = FakeLeases()
    kube.put_held("virtual-node-b1", "other", renewed_ago_s=9, duration_s=8)
    p = standby(kube)
    base = BaseState(base_id="b1", node_name="virtual-node-b1")
    assert await p._acquire_lease(base) is None
    spec = kube.leases["virtual-node-b1"]["spec"]
    assert base.owned and spec["holderIdentity"] == "me"
    assert spec["leaseTransitions"] == 4 and spec["leaseDurationSeconds"] == 8
    # A second replica that read the expired Lease before our write loses the race, and says so.
    rival = standby(kube)
    rival.opts = ProviderOptions(env="dev", identity="rival", node=p.opts.node)
    kube.stale = {"metadata": {"name": "virtual-node-b1", "resourceVersion": "101"}, "spec": {}}
    other_base = BaseState(base_id="b1", node_name="virtual-node-b1")
    assert await rival._acquire_lease(other_base) is not None
    assert not other_base.owned


async def test_renewals_are_spread_over_the_interval_once_each() -> None:
    interval = 0.4
    p = Provider(object(), BrokerOptions("127.0.0.1", 1),  # type: ignore[arg-type]
                 ProviderOptions(env="dev", lease_renew_interval=interval))
    loop = asyncio.get_running_loop()
    renewed: list[tuple[float, str]] = []
    for i in range(40):
        b = BaseState(base_id=f"b{i}", node_name=f"virtual-node-b{i}")
        b.owned = True
        p.bases[b.base_id] = b

    async def renew(b: BaseState) -> None:
        renewed.append((loop.time(), b.base_id))

    p._renew_lease = renew  # type: ignore[method-assign,assignment]
    task = loop.create_task(p._lease_loop())
    try:
        await async_wait_until(lambda: _ret_bool(len(renewed) >= 80), 30, 0.05, what="two renewal rounds")
    finally:
        task.cancel()
    first_round = renewed[:40]
    assert sorted(base_id for _, base_id in first_round) == sorted(p.bases)
    # Not one burst: the first round's renewals cover most of the interval, one base at a time.
    span = first_round[-1][0] - first_round[0][0]
    assert span >= interval * 0.8 * 39 / 40 * 0.99
    assert len({t for t, _ in first_round}) == 40


async def _ret_bool(value: bool) -> bool:
    return value
