"""Leader election's safety rules, with the API server's Lease semantics (resourceVersion checks)
kept in memory so a replica's connection can be cut. The real API server runs the same elector in
tests/e2e/extender/test_failover.py."""

from __future__ import annotations

import asyncio
import copy
import random
import time
from typing import Any

import pytest

from koupleless.kube import ApiError
from koupleless.kube.leaderelection import LeaderElectionConfig, LeaderElector
from tests.helpers import async_wait_until


class LeaseStore:
    """One Lease with optimistic concurrency, as kube-apiserver keeps it."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0

    def write(self, body: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        body = copy.deepcopy(body)
        body["metadata"]["resourceVersion"] = str(self.version)
        self.lease = body
        return copy.deepcopy(body)


class Connection:
    """One replica's view of the store; `cut` makes every call fail as an unreachable server does."""

    def __init__(self, store: LeaseStore) -> None:
        self.store = store
        self.cut = False

    def _check(self) -> None:
        if self.cut:
            raise ApiError(0, "ConnectionError", "connection refused")

    async def get(self, path: str) -> dict[str, Any]:
        self._check()
        if self.store.lease is None:
            raise ApiError(404, "NotFound", f"{path} not found")
        return copy.deepcopy(self.store.lease)

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self._check()
        if self.store.lease is not None:
            raise ApiError(409, "AlreadyExists", "lease exists")
        return self.store.write(body)

    async def replace(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self._check()
        assert self.store.lease is not None
        if body["metadata"].get("resourceVersion") != self.store.lease["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified")
        return self.store.write(body)


def config(identity: str) -> LeaderElectionConfig:
    return LeaderElectionConfig(namespace="module-controller", name="module-controller-extender", identity=identity,
                                lease_duration=1.0, renew_deadline=0.6, retry_period=0.1)


class Timeline:
    def __init__(self) -> None:
        self.events: list[tuple[float, str, bool]] = []

    def recorder(self, who: str) -> Any:
        return lambda leading: self.events.append((time.monotonic(), who, leading))

    def leaders_at_every_moment(self) -> list[set[str]]:
        leading: set[str] = set()
        states = []
        for _, who, is_leader in sorted(self.events):
            (leading.add if is_leader else leading.discard)(who)
            states.append(set(leading))
        return states


async def test_a_cut_off_leader_stops_leading_before_the_standby_starts() -> None:
    store, timeline = LeaseStore(), Timeline()
    links = {name: Connection(store) for name in ("a", "b")}
    electors = {name: LeaderElector(link, config(name), timeline.recorder(name))  # type: ignore[arg-type]
                for name, link in links.items()}
    electors["a"].start()
    await async_wait_until(lambda: _is(electors["a"].is_leader), timeout=5, what="a to lead")
    electors["b"].start()
    await async_wait_until(lambda: _is(electors["b"].holder == "a"), timeout=5, what="b to see a's Lease")
    try:
        links["a"].cut = True
        await async_wait_until(lambda: _is(electors["b"].is_leader), timeout=10, what="b to take over")
        assert not electors["a"].is_leader
        # Never two leaders at once: a gave up (renew deadline) before b could take the Lease.
        assert all(len(leaders) <= 1 for leaders in timeline.leaders_at_every_moment())
        assert [(who, leading) for _, who, leading in sorted(timeline.events)] == [
            ("a", True), ("a", False), ("b", True)]
        assert store.lease is not None and store.lease["spec"]["holderIdentity"] == "b"
        assert store.lease["spec"]["leaseTransitions"] == 1
    finally:
        for elector in electors.values():
            await elector.stop()


async def test_a_leader_whose_connection_comes_back_rejoins_as_standby() -> None:
    store = LeaseStore()
    links = {name: Connection(store) for name in ("a", "b")}
    electors = {name: LeaderElector(link, config(name)) for name, link in links.items()}  # type: ignore[arg-type]
    electors["a"].start()
    await async_wait_until(lambda: _is(electors["a"].is_leader), timeout=5, what="a to lead")
    electors["b"].start()
    try:
        links["a"].cut = True
        await async_wait_until(lambda: _is(electors["b"].is_leader), timeout=10, what="b to take over")
        links["a"].cut = False
        await async_wait_until(lambda: _is(electors["a"].holder == "b"), timeout=5, what="a to see b's Lease")
        assert not electors["a"].is_leader and electors["b"].is_leader
    finally:
        for elector in electors.values():
            await elector.stop()


async def test_stop_returns_whenever_it_is_called() -> None:
    """A shutdown that lands while a renewal completes must not be lost (asyncio.wait_for on 3.11
    swallowed it, and the process never exited)."""
    rnd = random.Random(5)
    for i in range(150):
        fast = LeaderElectionConfig(namespace="ns", name=f"lease-{i}", identity="a", lease_duration=0.05,
                                    renew_deadline=0.03, retry_period=0.001)
        elector = LeaderElector(Connection(LeaseStore()), fast)  # type: ignore[arg-type]
        elector.start()
        await asyncio.sleep(rnd.uniform(0, 0.01))
        stopping = asyncio.ensure_future(elector.stop())
        done, _ = await asyncio.wait({stopping}, timeout=5)
        if not done:
            assert elector._task is not None
            elector._task.cancel()
            await asyncio.gather(stopping, return_exceptions=True)
        assert done, f"stop() never returned (attempt {i})"


def test_durations_that_could_make_two_leaders_are_refused() -> None:
    bad = LeaderElectionConfig(namespace="ns", name="l", identity="a", lease_duration=5, renew_deadline=5,
                               retry_period=2)
    with pytest.raises(ValueError, match="--leader-lease-duration"):
        LeaderElector(Connection(LeaseStore()), bad)  # type: ignore[arg-type]


async def _is(value: bool) -> bool:
    return value
